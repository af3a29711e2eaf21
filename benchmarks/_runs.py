"""What the study scripts share (``reproduce_table1.py``, ``training_length.py``): the table-1 protocol's methods,
model configs and scales, the flags and folder of one run, launching or resuming it, the FID classifier, and the
provenance line of a results file. No study script imports another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from _common import machine


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAPER_LAMBDA = 15000.0

# name -> flags (lambda added where the method has a penalty); any other name is a --method spec ("er+rank1")
METHODS = {
    "non-continual": ["--joint", "--ewc_type", "none"],
    "diag w/o GD": ["--ewc_type", "diag", "--ewc_mode", "loss", "--replay", "off"],
    "rank-1 w/o GD": ["--ewc_type", "rank1", "--ewc_mode", "loss", "--replay", "off"],
    "GD": ["--ewc_type", "none"],
    "diag + GD": ["--ewc_type", "diag", "--ewc_mode", "loss"],
    "rank-1 + GD": ["--ewc_type", "rank1", "--ewc_mode", "loss"],
    "rank-1-unscaled + GD": ["--ewc_type", "rank1_unscaled", "--ewc_mode", "loss"],
    "decoupled diag + GD": ["--ewc_type", "diag", "--ewc_mode", "decoupled"],
    "decoupled rank-1 + GD": ["--ewc_type", "rank1", "--ewc_mode", "decoupled"],
}
HAS_PENALTY = {m for m, flags in METHODS.items() if "none" not in flags}


UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "num_class_embeds": 10,
}
TINY_UNET_CONFIG = {**UNET_CONFIG, "sample_size": 8, "block_out_channels": [8, 8, 8]}
# a DiT of about the UNet's parameter count (0.30M vs 0.28M): 3 blocks of width 64 over 8x8 patches of 2x2 pixels
DIT_CONFIG = {
    "_class_name": "DiTTransformer2DModel",
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_layers": 3,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
}


SCALES = {
    # Sized from measured costs on 2 CPU cores (one thread per run, 2 runs at a time): a step of 32 real + 32 replay
    # images at 16x16 on the (16, 32, 32) UNet takes ~80 ms and one image-step of DDIM ~0.3 ms, so a run is ~3-4 min
    # and the ~60 runs fit the 3-hour budget. On one task (200 images) the epoch loss of this UNet falls from 0.17 to
    # ~0.06 by epoch 30 and then drifts down slowly (memorisation); DDIM uses 20 steps (not 50) to fit.
    "cpu": dict(
        model="config",
        resolution=16,
        per_class=100,
        epochs=40,
        replay=100,
        fid=200,
        steps=20,
        batch=32,
        lr=2e-3,
        stem="table1_fmnist_cpu",
    ),
    # every study's --tiny mode (for the tests): scikit-learn's 8x8 digits, which need no download, 4 images per class,
    # one epoch, a tiny UNet (TINY_UNET_CONFIG); a 5-task run takes seconds
    "tiny": dict(
        model="config",
        resolution=8,
        per_class=4,
        epochs=1,
        replay=2,
        fid=4,
        steps=2,
        batch=8,
        lr=2e-3,
        stem="tiny",
    ),
    "smoke": dict(
        model="config",
        resolution=16,
        per_class=50,
        epochs=5,
        replay=20,
        fid=100,
        steps=10,
        batch=32,
        lr=2e-3,
        stem="table1_fmnist_cpu_smoke",
    ),
    # The paper's model and protocol (35M UNet at 32x32, zero-padded 28x28, 200 epochs per task, Adam 2e-4, batch
    # 128, 5000 replay images per class, DDIM 50, Fisher on the whole task, FID on each task's 2,000 test images).
    "gpu": dict(
        model="paper",
        resolution=32,
        per_class=None,
        epochs=200,
        replay=5000,
        fid=None,
        steps=50,
        batch=128,
        lr=2e-4,
        stem="table1_fmnist_gpu",
    ),
    # The paper's UNet and optimiser on 400 images per class (120 optimizer steps per task), sized to the 15 minutes
    # of GPU time a task may get (the four runs side by side on one GPU, `--jobs 4`): GD, diag + GD, rank-1 + GD and
    # decoupled rank-1 + GD on seed 0, classifier FID on 200 samples per task (Inception weights cannot be fetched
    # offline). From the H200 check: a bf16 training step of this UNet at batch 128 takes ~0.1 s, launch-bound.
    "gpu-reduced": dict(
        model="paper",
        resolution=32,
        per_class=400,
        epochs=20,
        replay=100,
        fid=200,
        steps=50,
        batch=128,
        lr=2e-4,
        stem="table1_fmnist_gpu_reduced",
    ),
}


def tiny_banner(sc: dict) -> list[str]:
    """The first line of a results file written at the tiny scale (none at any other scale)."""
    return ["**A tiny check (8x8 digits, a tiny UNet): not a result.**\n"] if sc is SCALES["tiny"] else []


def run_flags(
    name: str, lam: float | None, seed: int, work: Path, data_dir: str, sc: dict, backbone: str = "unet"
) -> list[str]:
    source = ["--dataset_name", data_dir] if data_dir == "digits" else ["--train_data_dir", data_dir]
    flags = [*source, "--classes_per_task", "2", "--resolution", str(sc["resolution"])]
    if sc["model"] == "config":
        flags += [
            "--resize",
            "--model_config_name_or_path",
            str(work / f"{backbone}_config.json"),
            "--preset",
            "cpu-small",
        ]
    else:
        flags += ["--preset", sc["model"]]
    if sc["per_class"]:
        flags += ["--max_train_per_class", str(sc["per_class"]), "--fisher_num_samples", str(2 * sc["per_class"])]
    if sc["fid"]:
        flags += ["--fid_num_samples", str(sc["fid"])]
    flags += [
        "--num_epochs_per_task",
        str(sc["epochs"]),
        "--train_batch_size",
        str(sc["batch"]),
        "--learning_rate",
        str(sc["lr"]),
        "--replay_per_class",
        str(sc["replay"]),
        "--num_inference_steps",
        str(sc["steps"]),
        "--fid_classifier",
        str(work / "fid_classifier"),
        "--fid_reference_dir",
        str(work / "fid_reference"),
        "--checkpointing_steps",
        "250",
        "--seed",
        str(seed),
        *METHODS.get(name, ["--method", name]),
    ]
    if lam is not None:
        flags += ["--ewc_lambda", str(lam)]
    return flags


def run_dir_name(name: str, lam: float | None, seed: int, backbone: str = "unet") -> str:
    slug = name.replace(" + ", "+").replace(" ", "_").replace("/", "")
    return f"{'dit_' if backbone == 'dit' else ''}{slug}{'' if lam is None else f'_lam{lam:g}'}_seed{seed}"


def finished(out: Path, num_tasks: int = 5) -> bool:
    path = out / "results.json"
    if not path.exists():
        return False
    results = json.loads(path.read_text())
    return results.get("joint") and "afid_final" in results or str(num_tasks) in results.get("afid", {})


def launch(
    name: str,
    lam: float | None,
    seed: int,
    work: Path,
    data_dir: str,
    sc: dict,
    log: Path,
    on_gpu: bool = False,
    backbone: str = "unet",
    folder: str | None = None,
    extra: Sequence[str] = (),
    num_tasks: int = 5,
) -> Path:
    """Run (or resume) one training run into work/runs/FOLDER (default: run_dir_name); skipped when finished."""
    out = work / "runs" / (folder or run_dir_name(name, lam, seed, backbone))
    if finished(out, num_tasks):
        return out
    cmd = [
        sys.executable,
        str(ROOT / "train_continual_ddpm.py"),
        *run_flags(name, lam, seed, work, data_dir, sc, backbone),
        *extra,
        "--output_dir",
        str(out),
    ]
    if (out / "checkpoints").exists():
        cmd += ["--resume_from_checkpoint", "latest"]
    env = {**os.environ, "TQDM_DISABLE": "1", **({} if on_gpu else {"OMP_NUM_THREADS": "1"})}
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"[{time.strftime('%H:%M:%S')}] {out.name}: {status} in {time.time() - start:.0f} s", flush=True)
    return out


def provenance() -> str:
    """The command, the commit and the machine, for a results file."""
    info = machine()
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"Command: `python {' '.join(sys.argv)}`; commit {info['commit']}; machine: {info['cpu']}, "
        f"{info['cpu_count']} CPU cores{gpu}, torch {info['torch']}."
    )


def train_fid_classifier(work: Path, data_dir: str, size_flags: Sequence[str]) -> Path:
    """The FID feature classifier of a study, trained once into WORK/fid_classifier (``hf_r1ewc.evaluate
    train-classifier``, 2 epochs on the full training split); returns its folder."""
    folder = work / "fid_classifier"
    if not (folder / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "hf_r1ewc.evaluate", "train-classifier", "--dataset_name", data_dir]
        cmd += ["--output_dir", str(folder), *size_flags, "--epochs", "2"]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    return folder


def drift_geometry(out: Path, data_dir: str, sc: dict, seed: int, tasks: list[list[int]]) -> dict:
    """Where a run's forgetting goes (GD's, ER's), from its task folders (TASKS: the classes of each task) (cached in OUT/geometry.json): mu_k (the task's mean
    per-sample gradient, estimated at theta*_k as consolidation would), cos(mu_k, mu_k+1); the share of task k's
    parameter change theta*_k - theta*_k-1 inside span(mu_1..mu_k-1) (against (k-1)/P for a random direction); and
    for each old task j the first-order change of its loss that rank-1 EWC constrains, mu_j^T (theta*_T - theta*_j),
    beside the measured change L_j(theta*_T) - L_j(theta*_j) (fixed noise, 8 draws per image)."""
    import torch
    from diffusers import UNet2DModel

    from hf_r1ewc.continual import ContinualLearner, fisher_loader
    from hf_r1ewc.data import images_to_model_input, load_labeled_images
    from hf_r1ewc.fisher import estimate_fisher
    from hf_r1ewc.models import training_noise_scheduler

    cache = out / "geometry.json"
    if cache.exists():
        return json.loads(cache.read_text())
    train = load_labeled_images(data_dir, "train").head_per_class(sc["per_class"])
    scheduler = training_noise_scheduler()
    models, mus, thetas, data = [], [], [], []
    for k, classes in enumerate(tasks, start=1):
        unet = UNet2DModel.from_pretrained(out / f"task_{k:02d}" / "unet").eval()
        task = train.subset(classes)
        images = images_to_model_input(task.images, sc["resolution"], True)
        loader = fisher_loader(images, task.labels, 2 * len(task.labels), 64, seed + k)
        stats = estimate_fisher(
            unet,
            scheduler,
            loader,
            kinds=("rank1",),
            generator=torch.Generator().manual_seed(seed + k),
            show_progress=False,
        )
        models.append(unet)
        mus.append(torch.cat([stats.mu[n].double().flatten() for n, _ in unet.named_parameters()]))
        thetas.append(torch.cat([p.detach().double().flatten() for p in unet.parameters()]))
        data.append((images, task.labels))

    @torch.no_grad()
    def loss(unet, j):  # task j's denoising loss under fixed noise: 8 (t, eps) draws per image
        images, labels = data[j]
        g = torch.Generator().manual_seed(1000 + j)
        x = images.repeat(8, 1, 1, 1)
        return float(ContinualLearner(scheduler).loss(unet, x, labels.repeat(8), g)["denoise"])

    P = thetas[0].numel()
    cos = [float(torch.nn.functional.cosine_similarity(mus[k], mus[k + 1], dim=0)) for k in range(len(tasks) - 1)]
    along = []
    for k in range(1, len(tasks)):
        q, _ = torch.linalg.qr(torch.stack(mus[:k], dim=1))
        delta = thetas[k] - thetas[k - 1]
        along.append({"share": float((q.T @ delta).pow(2).sum() / delta.pow(2).sum()), "random": k / P})
    last = len(tasks) - 1
    first_order = [
        {
            "task": j + 1,
            "linear": float(mus[j] @ (thetas[last] - thetas[j])),
            "measured": loss(models[last], j) - loss(models[j], j),
        }
        for j in range(last)
    ]
    result = {
        "parameters": P,
        "mu_norm": [float(m.norm()) for m in mus],
        "cos_consecutive_mu": cos,
        "change_along_old_mu": along,
        "first_order_vs_measured": first_order,
    }
    cache.write_text(json.dumps(result, indent=1))
    return result
