"""Shared fixtures: tiny class-conditional UNets built from configs, and the real Fashion-MNIST location."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

# CPU capabilities, the same on every machine CI may get: native bf16 reported absent (AVX2 CPUs such as AMD EPYC lack
# it; an Intel Xeon with AVX512-BF16 has it) in this process and, through cpu_capabilities/sitecustomize.py on
# PYTHONPATH, in every process a test starts. A test of the bf16 branch asks for the `native_bf16` fixture.
CAPABILITIES = Path(__file__).resolve().parent / "cpu_capabilities"
os.environ["HF_R1EWC_TEST_NATIVE_BF16"] = "0"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CAPABILITIES), os.environ.get("PYTHONPATH")]))
_capabilities = importlib.util.spec_from_file_location("cpu_capabilities", CAPABILITIES / "sitecustomize.py")
_force_native_bf16 = importlib.util.module_from_spec(_capabilities)
_capabilities.loader.exec_module(_force_native_bf16)
_force_native_bf16 = _force_native_bf16._force_native_bf16
_force_native_bf16(False)


@pytest.fixture
def native_bf16(monkeypatch):
    """Native bf16 reported present, here and in the processes the test starts (emulated where the CPU lacks it)."""
    monkeypatch.setenv("HF_R1EWC_TEST_NATIVE_BF16", "1")
    _force_native_bf16(True)
    yield
    _force_native_bf16(False)


@pytest.fixture
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"real Fashion-MNIST not found in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist` "
            f"(setup.sh does this) or set FASHION_MNIST_DIR"
        )
    return FASHION_MNIST_DIR


def tiny_unet_config(channels: int = 1, num_classes: int = 4, sample_size: int = 8) -> dict:
    """The tiny UNet's config (JSON values): as ``--model_config_name_or_path`` with ``_class_name`` added."""
    return {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [4, 4],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 2,
        "attention_head_dim": 4,
        "num_class_embeds": num_classes,
    }


def make_tiny_unet(channels: int = 1, num_classes: int = 4, sample_size: int = 8, seed: int = 0):
    """A ~5k-parameter class-conditional UNet2DModel with an attention block in each direction."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**tiny_unet_config(channels, num_classes, sample_size))


def make_tiny_dit(channels: int = 1, num_classes: int = 4, sample_size: int = 8, seed: int = 0):
    """A ~3.7k-parameter class-conditional DiTTransformer2DModel (patch 2, one block), in eval mode: in train mode
    diffusers' DiT drops 10 % of the class labels at random (classifier-free guidance training)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=channels,
        out_channels=channels,
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(params=["unet", "dit"])
def tiny_denoiser(request):
    """The tiny UNet, then the tiny DiT: the library's math is backbone-agnostic."""
    return make_tiny_unet() if request.param == "unet" else make_tiny_dit()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (precision, accumulation): reset Accelerate's process-wide singletons
    after it, as Accelerate's own tests do."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------------- the training script, launched

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "train_continual_ddpm.py")
FAST = [
    "--dataset_name",
    "digits",
    "--preset",
    "demo",
    "--tasks",
    "0,1;2,3",
    "--num_epochs_per_task",
    "2",
    "--train_batch_size",
    "32",
    "--replay_per_class",
    "16",
    "--num_inference_steps",
    "4",
    "--fisher_num_samples",
    "64",
    "--max_train_per_class",
    "48",
    "--checkpointing_steps",
    "1000",
]


def launch(
    args: list[str], num_processes: int = 1, check: bool = True, dynamo_backend: str = "no"
) -> subprocess.CompletedProcess:
    """One process: `accelerate launch --cpu [--dynamo_backend ...]`. Several: torchrun with ACCELERATE_USE_CPU=true, because
    `accelerate launch --cpu --num_processes N` starts ONE process on a machine without GPUs (its simple launcher
    spreads CPU processes only through mpirun); the Accelerator then runs MULTI_CPU over gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if num_processes == 1:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            dynamo_backend,
            SCRIPT,
            *args,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(num_processes),
            SCRIPT,
            *args,
        ]
        env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="session")
def two_task_run(tmp_path_factory):
    """A finished two-task rank-1 run of the script, with TensorBoard and a validation grid every epoch."""
    out = tmp_path_factory.mktemp("run") / "out"
    flags = [
        "--ewc_type",
        "rank1",
        "--fid_num_samples",
        "40",
        "--report_to",
        "tensorboard",
        "--validation_epochs",
        "1",
    ]
    launch([*FAST, "--output_dir", str(out), *flags])
    return out


def run(argv: list[str]) -> None:
    """The training script's ``main(argv)`` in this process, with Accelerate's process-wide state reset afterwards (as
    between two launches)."""
    from accelerate.state import AcceleratorState, GradientState

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train_continual_ddpm

    try:
        train_continual_ddpm.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def refusal(argv: list[str]) -> str:
    """The message with which the training script's ``main(argv)``, run in this process, refuses to start: what the
    argument check prints before its SystemExit, or the exception a later check (data, model, resume folder) raises."""
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            run(argv)
        except SystemExit as exc:
            return f"{stderr.getvalue()}{exc.code}"
        except Exception as exc:  # the message is what the caller checks
            return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"main() started a run instead of refusing: {argv}")


# ------------------------------------------------------------------------- parameter isolation (ensemble, lora)

ISOLATION_TASKS = [[0, 1], [2, 3], [4, 5]]


def isolation_run(out: Path, *method_flags: str) -> Path:
    """A 3-task run (ISOLATION_TASKS, one epoch each) of a parameter-isolation method into ``out``."""
    flags = [*FAST, "--tasks", "0,1;2,3;4,5", "--num_epochs_per_task", "1", "--fid_num_samples", "16"]
    run([*flags, *method_flags, "--output_dir", str(out)])
    return out


def row_generators(seeds) -> list[torch.Generator]:
    """One generator per row: a row's noise does not depend on the rows beside it."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def quiet_pipeline(folder: Path):
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_nothing_forgotten(run_dir: Path) -> None:
    """Task folder k samples the classes of tasks 1..k-1 bit-identically to task folder k-1 (same noise), and every
    FID_i(m_k) equals FID_i(m_i)."""
    import json

    for k in (2, 3):
        old = [c for t in ISOLATION_TASKS[: k - 1] for c in t]
        before = quiet_pipeline(run_dir / f"task_0{k - 1}")(old, 3, generator=row_generators(old), output_type="pt")
        after = quiet_pipeline(run_dir / f"task_0{k}")(old, 3, generator=row_generators(old), output_type="pt")
        assert torch.equal(before.images, after.images)
    fid = json.loads((run_dir / "results.json").read_text())["fid"]
    assert all(fid[str(k)][str(i)] == fid[str(i)][str(i)] for k in (2, 3) for i in range(1, k))


def assert_plain_diffusers_samples_each_route_alone(folder: Path, routes: dict[str, list[int]]) -> None:
    """``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder)`` on a mixed batch of classes 0, 5, 1, 4
    equals, row by row, what each route's model (``routes``: route name -> the batch rows it serves) samples alone."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from hf_r1ewc.pipeline import sample

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 5, 1, 4]
    mixed = pipe(labels, 3, generator=row_generators(range(4)), output_type="pt").images
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for route, rows in routes.items():
        model = pipe.denoiser.models[route]
        alone = sample(model, scheduler, torch.tensor([labels[r] for r in rows]), 3, row_generators(rows))
        assert torch.equal(mixed[rows], (alone / 2 + 0.5).clamp(0, 1))


# ------------------------------------------------------------------------------------------ continued runs


def assert_same_task_folder(a: Path, b: Path) -> None:
    """Two task folders hold the same files with the same content: safetensors tensor for tensor (difference 0.0)
    with the same metadata, JSON as values (metrics.json less its wall seconds, training_state.json less the digests
    of files compared here), the card with each run's folder path read as the same."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for path in files:
        x, y = a / path, b / path
        if path.suffix == ".safetensors":
            tx, ty = load_file(str(x)), load_file(str(y))
            assert tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx), path
            with safe_open(str(x), "pt") as fx, safe_open(str(y), "pt") as fy:
                assert fx.metadata() == fy.metadata(), path
        elif path.suffix == ".json":
            jx, jy = json.loads(x.read_text()), json.loads(y.read_text())
            for record in (jx, jy):
                record.pop("seconds_by_phase", None)
                record.pop("sha256", None)
            assert jx == jy, path
        elif path.name == "README.md":
            assert x.read_text().replace(str(a.parent), "RUN") == y.read_text().replace(str(b.parent), "RUN"), path
        else:
            assert x.read_bytes() == y.read_bytes(), path


def named_shapes_parquet(root: Path, names=("circle", "square"), size: int = 8, channels: int = 1) -> Path:
    """A local parquet dataset with named classes (label: ClassLabel): a bright disc or square on a dark ground with
    noise, 24 training and 12 test images per class."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    y, x = np.mgrid[:size, :size] - (size - 1) / 2

    def image(c: int):
        shape = (x**2 + y**2 < (size / 3) ** 2) if c % 2 == 0 else (np.maximum(abs(x), abs(y)) < size / 3)
        pixels = np.clip(shape * 200 + rng.normal(20, 15, (size, size)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels if channels == 1 else np.repeat(pixels[..., None], 3, -1))

    data = root / "data"
    data.mkdir(parents=True)
    for split, per_class in (("train", 24), ("test", 12)):
        labels = [c for _ in range(per_class) for c in range(len(names))]
        dataset = datasets.Dataset.from_dict({"image": [image(c) for c in labels], "label": labels}, features=features)
        dataset.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    return root
