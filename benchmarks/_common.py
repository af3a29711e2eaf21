"""Shared helpers for the benchmark scripts: models by size, interleaved timing, JSON output with machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


RESULTS = Path(__file__).parent / "results"


def unet(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=32, channels=1, num_classes=10, seed=0):
    """A class-conditional UNet2DModel with attention in the last down block and the first up block."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=min(8, block_out_channels[0]),
        num_class_embeds=num_classes,
    )


def dit(num_layers=4, width=128, sample_size=32, channels=1, num_classes=10, seed=0):
    """A class-conditional pixel-space DiTTransformer2DModel (patch 2, heads of 32 channels)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=width // 32,
        attention_head_dim=32,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    ).eval()  # eval: the DiT drops 10 % of class labels in train mode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], None]], repeats: int, device=torch.device("cpu")
) -> dict[str, float]:
    """Median seconds of each fn, run round-robin ``repeats`` times (after one warm-up each) so drift hits all."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_model() -> str:
    """The processor's model name (Linux), e.g. "AMD EPYC": timings are compared only within one machine."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def machine() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    info = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **results}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    for key, value, note in rows:
        print(f"{key:<{width}}  {value:>10}  {note}")


OPTIMIZER = {"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8}  # continual.make_optimizer's arguments in the benchmarks


def learner_with(scheduler, teacher=None, pool=None, classes=8, penalty=None, replay_batch_size=None):
    """A ``ContinualLearner`` as the script composes one: EWC holding ``penalty`` (in the loss) and generative
    distillation replaying ``pool`` (already on the device you want) from ``teacher``; either may be left out."""
    from hf_r1ewc.continual import ContinualLearner
    from hf_r1ewc.methods import EWC, GenerativeDistillation
    from hf_r1ewc.methods.generative_distillation import Replay

    methods = []
    if penalty is not None:
        ewc = EWC(scheduler, penalty.kind, penalty.ewc_lambda, "loss")
        ewc.penalty_module = penalty
        methods.append(ewc)
    if pool is not None:
        gd = GenerativeDistillation(per_class=1, batch_size=replay_batch_size)
        gd.replay = Replay(teacher, list(range(classes)), pool)
        methods.append(gd)
    return ContinualLearner(scheduler, methods)
