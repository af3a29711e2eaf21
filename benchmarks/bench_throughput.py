"""Achieved FLOP/s and MFU of every phase of the method, against the device's peak measured in the same run.

    python benchmarks/bench_throughput.py [--quick] [--device cpu|cuda]

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one call of each workload
(a multiply-add counts 2). The peak is the best of a few large matmuls in the workload's precision (fp32 on CPU,
bf16 autocast's matmul dtype on CUDA); known GPUs also get their datasheet dense-bf16 peak. Workloads, all through
the library's own code paths:

* plain step: ``ContinualLearner.training_step`` with no penalty and no replay (batch B);
* GD step: + a replay batch of B from a pool, the frozen teacher's forward and the distillation term;
* rank-1 step (K tasks): GD step + the rank-1 penalty over K tasks in the loss (``penalty_overhead`` = its extra time
  relative to the GD step);
* sampling: ``pipeline.sample`` (DDIM, S steps) at batch N, images per second;
* Fisher: ``estimate_fisher`` (rank-1: μ and c*) over M samples.

The GD step again, one optimisation at a time and all together, against the step as it was before them (``base``:
Adam's per-parameter loop, the loss terms read back to the host at every step, noise and timesteps drawn on the
host): ``adam`` (multi-tensor Adam on the CPU, fused on CUDA), ``no host read`` (the terms stay on the device, as the
script logs them every ``--logging_steps``), ``device noise`` (the step's generator on the device; the same thing on
a CPU), ``compiled`` (inductor, static shapes; only with ``--compile``: the first step compiles for minutes on 2 CPU
cores; run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for the cold compile, else inductor's on-disk cache from an
earlier run shortens the first call). ``--phases RUN_DIR ...``: where a finished run's wall time went, from its task folders' metrics.json.

Writes ``benchmarks/results/throughput[_quick].{json,md}``. ``--quick`` (a 0.28M UNet at 16x16) takes < 1 min on 2
CPU cores; the default (the cpu-small preset's 1.11M UNet at 32x32, batch 64) a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode


sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    OPTIMIZER,
    RESULTS,
    interleaved_medians,
    learner_with,
    machine,
    print_table,
    sync,
    unet,
    write_results,
)

from hf_r1ewc.continual import ContinualLearner, fisher_loader, make_optimizer, step_generator  # noqa: E402
from hf_r1ewc.data import InMemoryTask, whole_batch  # noqa: E402
from hf_r1ewc.distill import ReplayPool, frozen_teacher  # noqa: E402
from hf_r1ewc.fisher import FisherStatistics, estimate_fisher  # noqa: E402
from hf_r1ewc.models import training_noise_scheduler  # noqa: E402
from hf_r1ewc.penalty import EWCPenalty  # noqa: E402
from hf_r1ewc.pipeline import default_autocast_dtype, sample, sampling_scheduler  # noqa: E402


# dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}

SIZES = {  # (UNet channels, resolution, batch, sampling batch, sampling steps, Fisher samples, timed repeats)
    "tiny": ((8, 8, 8), 8, 4, 4, 2, 8, 1),
    "quick": ((16, 32, 32), 16, 32, 64, 10, 64, 3),
    "full": ((32, 64, 64), 32, 64, 128, 20, 256, 5),
}


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` square matmuls of side ``size`` (after one warm-up)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


VARIANTS = {  # the GD step with each optimisation alone and all together; base = the step before them
    "base": {},
    "adam": {"adam": True},
    "no host read": {"host_read": False},
    "device noise": {"device_noise": True},
    "compiled": {"compiled": True},
    "all": {"adam": True, "host_read": False, "device_noise": True},
    "all + compiled": {"adam": True, "host_read": False, "device_noise": True, "compiled": True},
}


def gd_step_variant(
    accelerator,
    channels,
    resolution,
    x,
    y,
    pool,
    scheduler,
    adam: bool = False,
    host_read: bool = True,
    device_noise: bool = False,
    compiled: bool = False,
):
    """A GD step (real + replay through the student, the teacher's forward) on its own model and optimizer.
    adam: ``make_optimizer``'s (multi-tensor on the CPU, fused on CUDA) instead of the per-parameter loop;
    host_read: the step reads its loss terms back and checks them (one host sync); device_noise: the generator
    and the pool on the device; compiled: student and teacher through torch.compile (inductor, static shapes)."""
    device = accelerator.device
    model = unet(channels, sample_size=resolution).to(device)
    teacher = frozen_teacher(model)
    optimizer = (
        make_optimizer(model, **OPTIMIZER, device=device) if adam else torch.optim.Adam(model.parameters(), lr=1e-5)
    )
    if compiled:
        model, teacher = torch.compile(model, dynamic=False), torch.compile(teacher, dynamic=False)
    learner = learner_with(scheduler, teacher, pool.to(device) if device_noise else pool)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    counter = {"step": 0}

    def step():
        counter["step"] += 1
        generator = step_generator(0, counter["step"], device=device if device_noise else "cpu")
        learner.training_step(accelerator, prepared, optimizer, x, y, generator, check_finite=host_read)

    return step


def loader_epoch_seconds(resolution: int, batch: int, repeats: int, num_images: int = 6000) -> dict[str, float]:
    """Seconds per batch of an epoch over an in-memory task: a TensorDataset read image by image and stacked (the
    loader before #26) against ``InMemoryTask``'s one gather per batch (the script's)."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(num_images, 1, resolution, resolution, generator=g), torch.arange(num_images) % 2
    loaders = {
        "per image": DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True),
        "gathered": DataLoader(
            InMemoryTask(images, labels), batch_size=batch, shuffle=True, drop_last=True, collate_fn=whole_batch
        ),
    }
    epochs = interleaved_medians({k: lambda loader=loader: list(loader) for k, loader in loaders.items()}, repeats)
    return {k: t / (num_images // batch) for k, t in epochs.items()}


def phase_profile(run_dir: Path) -> dict[str, float]:
    """Wall seconds by phase (replay pool, training, FID, Fisher) summed over a finished run's task folders."""
    totals: dict[str, float] = {}
    for metrics in sorted(run_dir.glob("task_*/metrics.json")):
        for phase, seconds in json.loads(metrics.read_text()).get("seconds_by_phase", {}).items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    if not totals:
        raise SystemExit(f"error: --phases {run_dir}: no task folder with metrics.json there (a finished run?)")
    return totals


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 0.28M UNet at 16x16: < 1 min on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_tasks", type=int, default=19, help="K, the tasks the rank-1 penalty holds")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the compiled GD step (inductor; its first step compiles: ~3 min on 2 CPU cores)",
    )
    parser.add_argument(
        "--phases", nargs="*", default=[], metavar="RUN_DIR", help="finished runs whose wall time to break down"
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of every part, for the tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    channels, resolution, batch, sample_batch, sample_steps, fisher_samples, repeats = SIZES[
        "tiny" if args.tiny else "quick" if args.quick else "full"
    ]
    mixed_precision = "bf16" if device.type == "cuda" else "no"
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    autocast_dtype = default_autocast_dtype(device) if device.type == "cuda" else None
    scheduler = training_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 1, resolution, resolution, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    model = unet(channels, sample_size=resolution).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    pool = ReplayPool((torch.rand(512, 1, resolution, resolution, generator=g) * 2 - 1).half(), torch.arange(512) % 8)
    penalty = EWCPenalty("rank1", 10.0)
    for k in range(args.num_tasks):
        mu = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
        penalty.add_task(
            FisherStatistics(mu, None, 1.0, 64), {n: p.detach().cpu() for n, p in model.named_parameters()}
        )
    penalty.to(device)

    teacher = frozen_teacher(model)
    learners = {
        "plain step": ContinualLearner(scheduler),
        "GD step": learner_with(scheduler, teacher, pool.to(device)),
        f"rank-1 step (K={args.num_tasks})": learner_with(scheduler, teacher, pool.to(device), penalty=penalty),
    }
    prepared, optimizer = accelerator.prepare(model, make_optimizer(model, **OPTIMIZER, device=device))
    counter = {"step": 0}

    def step_fn(learner):
        def step():  # the script's step: the terms stay on the device, noise is drawn there
            counter["step"] += 1
            generator = step_generator(0, counter["step"], device=device)
            learner.training_step(accelerator, prepared, optimizer, x, y, generator, check_finite=False)

        return step

    sampler = sampling_scheduler("ddim", scheduler.config)
    labels = (torch.arange(sample_batch) % 10).to(device)

    def sample_fn():
        sample(teacher, sampler, labels, sample_steps, torch.Generator().manual_seed(1), autocast_dtype)

    fisher_data = fisher_loader(
        x.cpu().repeat(fisher_samples // batch + 1, 1, 1, 1)[:fisher_samples],
        y.cpu().repeat(fisher_samples // batch + 1)[:fisher_samples],
        None,
        64,
        0,
    )

    fisher_model = unet(channels, sample_size=resolution).to(device)

    def fisher_fn():
        estimate_fisher(
            fisher_model,
            scheduler,
            fisher_data,
            kinds=("rank1",),
            generator=torch.Generator().manual_seed(0),
            show_progress=False,
        )

    workloads = {name: step_fn(learner) for name, learner in learners.items()}
    workloads[f"DDIM-{sample_steps} sampling (batch {sample_batch})"] = sample_fn
    workloads[f"Fisher mu + c* ({fisher_samples} samples)"] = fisher_fn
    # FlopCounterMode segfaults inside torch.func.jvp (the Fisher's second pass) in torch 2.13: time only there
    flops = {name: None if name.startswith("Fisher") else counted_flops(fn) for name, fn in workloads.items()}
    seconds = interleaved_medians(workloads, repeats, device)
    # built after the table above: compiling starts inductor's worker processes, which would share its cores
    variants = {
        name: gd_step_variant(accelerator, channels, resolution, x, y, pool, scheduler, **flags)
        for name, flags in VARIANTS.items()
        if args.compile or not flags.get("compiled")
    }
    first_call = {}
    for name, fn in variants.items():  # the first call of a compiled variant compiles
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        first_call[name] = time.perf_counter() - start
    variant_seconds = interleaved_medians(variants, 3 * repeats, device)  # their differences are small: more repeats
    variant_results = {
        name: {"seconds": t, "speedup_vs_base": variant_seconds["base"] / t, "first_call_seconds": first_call[name]}
        for name, t in variant_seconds.items()
    }
    loader_seconds = loader_epoch_seconds(resolution, batch, repeats)

    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured_peak = matmul_peak(device, matmul_dtype, 8192 if device.type == "cuda" else 1536)
    sheet = datasheet_peak(device)
    rows, results = [], {}
    for name in workloads:
        achieved = flops[name] / seconds[name] if flops[name] else None
        results[name] = {
            "flops": flops[name],
            "seconds": seconds[name],
            "tflops_per_s": achieved / 1e12 if achieved else None,
            "mfu_measured_peak": achieved / measured_peak if achieved else None,
            "mfu_datasheet_peak": achieved / sheet if achieved and sheet else None,
        }
        counted = (
            f"{flops[name] / 1e9:.2f} GFLOP, {achieved / 1e12:.3f} TFLOP/s, {100 * achieved / measured_peak:.1f} % "
            f"of the measured peak"
            if achieved
            else "FLOPs not counted (forward-mode AD)"
        )
        rows.append((name, f"{seconds[name] * 1e3:.1f} ms", counted))
    gd, rank1 = seconds["GD step"], seconds[f"rank-1 step (K={args.num_tasks})"]
    sampling_name = next(n for n in workloads if "sampling" in n)
    summary = {
        "penalty_overhead": rank1 / gd - 1,
        "gd_step_vs_plain_step": gd / seconds["plain step"],
        "sampling_images_per_s": sample_batch / seconds[sampling_name],
        "measured_peak_tflops_per_s": measured_peak / 1e12,
        "datasheet_peak_tflops_per_s": sheet / 1e12 if sheet else None,
        "peak_dtype": str(matmul_dtype),
    }
    rows += [
        ("penalty_overhead", f"{summary['penalty_overhead']:.3f}", f"rank-1 (K={args.num_tasks}) over the GD step"),
        ("gd_step_vs_plain_step", f"{summary['gd_step_vs_plain_step']:.2f}", "real + replay + teacher vs real"),
        ("sampling_images_per_s", f"{summary['sampling_images_per_s']:.1f}", sampling_name),
        ("measured_peak", f"{measured_peak / 1e12:.3f}", f"TFLOP/s, {matmul_dtype} matmul"),
    ]
    print_table(rows)
    name = "throughput_tiny" if args.tiny else "throughput_quick" if args.quick else "throughput"
    config = {
        "unet_channels": list(channels),
        "resolution": resolution,
        "batch": batch,
        "num_params": num_params,
        "device": str(device),
        "mixed_precision": mixed_precision,
        "threads": torch.get_num_threads(),
    }
    for variant, r in variant_results.items():
        print(f"GD step, {variant}: {r['seconds'] * 1e3:.1f} ms, {r['speedup_vs_base']:.2f}x the base step")
    phases = {str(run): phase_profile(Path(run)) for run in args.phases}
    for kind, t in loader_seconds.items():
        print(f"task loader, {kind}: {t * 1e3:.2f} ms per batch")
    data = {"config": config, "workloads": results, "summary": summary, "gd_step_variants": variant_results}
    path = write_results(name, {**data, "loader_seconds_per_batch": loader_seconds, "phases": phases})
    write_markdown(RESULTS / f"{name}.md", config, results, summary, variant_results, loader_seconds, phases)
    print(f"wrote {path}")


def write_markdown(
    path: Path,
    config: dict,
    results: dict,
    summary: dict,
    variants: dict,
    loader: dict[str, float],
    phases: dict[str, dict[str, float]],
) -> None:
    info = machine()
    lines = [
        f"# Throughput ({config['device']}, {config['mixed_precision']}, {config['threads']} threads)",
        "",
        f"UNet {config['unet_channels']} ({config['num_params'] / 1e6:.2f}M parameters) at {config['resolution']}x"
        f"{config['resolution']}, batch {config['batch']}; {info['cpu']}, {info['platform']}, torch {info['torch']}, commit "
        f"{info['commit']}. FLOPs counted by FlopCounterMode; MFU against a {summary['peak_dtype']} matmul measured in "
        f"the same run ({summary['measured_peak_tflops_per_s']:.3f} TFLOP/s).",
        "",
        "| workload | ms | GFLOP | TFLOP/s | MFU (measured peak) | MFU (datasheet) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if r["flops"] is None:
            lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | not counted (forward-mode AD) | — | — | — |")
            continue
        sheet = f"{100 * r['mfu_datasheet_peak']:.1f} %" if r["mfu_datasheet_peak"] else "—"
        lines.append(
            f"| {name} | {r['seconds'] * 1e3:.1f} | {r['flops'] / 1e9:.2f} | {r['tflops_per_s']:.3f} | "
            f"{100 * r['mfu_measured_peak']:.1f} % | {sheet} |"
        )
    lines += [
        "",
        f"Rank-1 penalty overhead on the GD step: {100 * summary['penalty_overhead']:.1f} %; GD step / plain step: "
        f"{summary['gd_step_vs_plain_step']:.2f}; sampling: {summary['sampling_images_per_s']:.1f} images/s.",
        "",
        "## The GD step, one optimisation at a time",
        "",
        "base: the step before them (per-parameter Adam, the loss terms read back at every step, noise drawn on the "
        "host); each row adds one (see the script's docstring), `all` adds every one but compilation. On a CPU "
        "`device noise` is the base step itself (the device is the host): its row shows the timing noise.",
        "",
        "| GD step | ms | speed-up vs base | first call (s; compiles) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {r['seconds'] * 1e3:.1f} | {r['speedup_vs_base']:.2f}x | {r['first_call_seconds']:.1f} |"
            for name, r in variants.items()
        ),
        "",
        f"Reading an in-memory task (batch {config['batch']}): {loader['per image'] * 1e3:.2f} ms per batch image by "
        f"image and stacked (before), {loader['gathered'] * 1e3:.2f} ms as one gather (`InMemoryTask`), "
        f"{loader['per image'] / loader['gathered']:.1f}x.",
        "",
    ]
    for run, seconds in phases.items():
        total = sum(seconds.values())
        lines += [
            f"## Where a run's time goes: `{run}`",
            "",
            f"Wall seconds summed over its tasks ({total:.0f} s; data loading and the FID classifier, once per run, "
            "and writing the task folders are not in the task metrics).",
            "",
            "| phase | seconds | share |",
            "| --- | --- | --- |",
            *(
                f"| {phase} | {t:.1f} | {100 * t / total:.1f} % |"
                for phase, t in sorted(seconds.items(), key=lambda kv: -kv[1])
            ),
            "",
        ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
