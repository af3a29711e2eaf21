"""The GPU check: what no CPU test can see, measured in one short run (<= 8 minutes on one H100).

    python benchmarks/gpu_check.py [--out DIR]                 # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny         # dry run of every section on CPU

Sections (each one recorded even when another fails), written to DIR/gpu_check.json and DIR/gpu_check.md
(default DIR: benchmarks/results):

1. train_step: the paper's UNet (35.7M params, 32x32, batch 128) under Accelerate bf16, one ContinualLearner step,
   alone and with the rank-1 penalty at K = 4 and K = 19 (overhead ratios).
2. fisher: exact mu, c*, diag of that UNet on 512 samples (estimate_fisher) against the authors' approach, a
   batch-size-1 float64 loop (timed on a few samples, extrapolated per sample: one pass for mu, one for c*);
   every tensor handed to the all-reduce must be on the GPU (NCCL reduces GPU tensors only).
3. sampling: DDIM-50 replay images/s at batch 500 (bf16 and fp32, through hf_r1ewc.pipeline.sample) and the ratio
   to a plain fp32 DDIMScheduler loop; the hand-written DDIM update against scheduler.step.
4. script_bf16: a 3-task run of train_continual_ddpm.py with accelerate_configs/single_gpu_bf16.yaml; the saved
   Fisher equals an fp32 re-estimate at the saved weights; the saved pipeline loads and samples on the GPU.
5. fsdp: the same run through accelerate_configs/fsdp.yaml with one process.
6. geometry (issue 30: does the Fisher's rank-1 structure strengthen with model size?): task 1 of Fashion-MNIST
   (classes 0, 1; 28x28 padded to 32) trained with the paper's UNet (35.75M) and with cpu-small (1.1M) until the
   epoch-mean denoising loss stops falling (< 2 % over the last quarter of the epochs) or the section's time budget
   ends, then hf_r1ewc.analysis at t = 100, 300, 500, 700, 900 on 1024 training images: lambda2/lambda1, the rank-1
   and diagonal relative errors and |cos(g_i, mu)|, side by side -> DIR/geometry_by_size.md. ``--tiny``: the digits
   at 8x8 with two tiny UNets, a dry run.
7. throughput (issue 26): FLOPs counted per step (FlopCounterMode), the plain step (batch 128) and the GD step
   (128 real + 128 replay through the student, the teacher's forward) as the script runs it (fused Adam, noise on the
   GPU, no host read per step) eager, compiled (torch.compile) and compiled with CUDA graphs (mode="reduce-overhead"),
   and eager with the step as before issue 26 (terms read back every step, noise drawn on the host), each with its MFU against the datasheet and a measured bf16 matmul peak;
   DDIM-50 images/s at batch 500; and each paper protocol projected in GPU-hours from these times -> DIR/
   throughput_gpu.md. ``--tiny`` on CPU: eager only (compiling on 2 cores takes minutes), a dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from _common import interleaved_medians, machine, sync  # noqa: E402

from hf_r1ewc.fisher import FisherStatistics, estimate_fisher  # noqa: E402
from hf_r1ewc.models import training_noise_scheduler, unet_from_preset  # noqa: E402
from hf_r1ewc.penalty import EWCPenalty  # noqa: E402


def paper_unet(args):
    if args.tiny:
        from _common import unet

        return unet(block_out_channels=(8, 16), sample_size=8)
    return unet_from_preset("paper", 32, 1, 10)


def batch(n, model, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    return (
        (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(device),
        torch.randint(0, 10, (n,), generator=g).to(device),
    )


def check_train_step(args, device) -> dict:
    from _common import OPTIMIZER, learner_with
    from accelerate import Accelerator

    from hf_r1ewc.continual import ContinualLearner, make_optimizer, step_generator

    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    model = paper_unet(args).to(device)
    optimizer = make_optimizer(model, **OPTIMIZER, device=device)
    model, optimizer = accelerator.prepare(model, optimizer)
    n = 8 if args.tiny else 128
    x, y = batch(n, model, device)
    scheduler = training_noise_scheduler()
    learners = {"plain": ContinualLearner(scheduler)}
    for k in (4, 19):
        penalty = EWCPenalty("rank1", 15000.0)
        params = {name: p.detach() for name, p in model.named_parameters()}
        for task in range(k):
            g = torch.Generator().manual_seed(task)
            mu = {name: torch.randn(p.shape, generator=g).mul_(1e-4).to(device) for name, p in params.items()}
            penalty.add_task(FisherStatistics(mu, None, 1.0, 1), params)
        learners[f"rank1_k{k}"] = learner_with(scheduler, penalty=penalty.to(device))

    def step(learner):
        return lambda: learner.training_step(
            accelerator, model, optimizer, x, y, step_generator(0, device=device), check_finite=False
        )

    med = interleaved_medians({k: step(v) for k, v in learners.items()}, 3 if args.tiny else 10, device)
    return {
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": n,
        "precision": accelerator.mixed_precision,
        "step_seconds": med,
        "penalty_overhead_k4": med["rank1_k4"] / med["plain"] - 1,
        "penalty_overhead_k19": med["rank1_k19"] / med["plain"] - 1,
    }


def fp64_loop_seconds_per_sample(model, scheduler, x0, y) -> float:
    """The authors' approach, timed: batch-size-1 float64 backward passes (the sample's gradient, then mu^T g)."""
    model64 = __import__("copy").deepcopy(model).double()
    params = [p for p in model64.parameters() if p.requires_grad]
    device = x0.device
    g = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for i in range(x0.shape[0]):
        t = torch.randint(0, 1000, (1,), generator=g).to(device)
        eps = torch.randn((1, *x0.shape[1:]), generator=g).to(device, torch.float64)
        x_t = scheduler.add_noise(x0[i : i + 1].double(), eps, t)
        loss = (model64(x_t, t, class_labels=y[i : i + 1]).sample - eps).pow(2).mean()
        grads = torch.autograd.grad(loss, params)
        sum(float(gr.pow(2).sum()) for gr in grads)  # the per-sample use (diag / projection) forces the work
    sync(device)
    return (time.perf_counter() - start) / x0.shape[0]


def check_fisher(args, device) -> dict:
    model = paper_unet(args).to(device).eval()
    scheduler = training_noise_scheduler()
    n = 32 if args.tiny else 512
    x, y = batch(n, model, device, seed=1)
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]
    devices = set()

    def recording_reduce(t):
        devices.add(str(t.device))
        return t

    out = {}
    for kinds, name in ((("rank1",), "rank1"), (("rank1", "diag"), "rank1_diag")):
        sync(device)
        start = time.perf_counter()
        stats = estimate_fisher(
            model,
            scheduler,
            loader,
            kinds=kinds,
            reduce_sum=recording_reduce,
            chunk_size=8 if args.tiny else 32,
            show_progress=False,
        )
        sync(device)
        out[f"{name}_seconds"] = time.perf_counter() - start
        out[f"{name}_c_star"] = stats.c_star
        del stats
        torch.cuda.empty_cache() if device.type == "cuda" else None
    loop = fp64_loop_seconds_per_sample(model, scheduler, x[: 4 if args.tiny else 16], y[: 4 if args.tiny else 16])
    authors_seconds = 2 * loop * n  # one fp64 pass for mu, a second one for c* (diag rides along)
    out.update(
        num_samples=n,
        fp64_loop_seconds_per_sample_pass=loop,
        authors_seconds_extrapolated=authors_seconds,
        speedup_rank1_diag_vs_fp64_loop=authors_seconds / out["rank1_diag_seconds"],
        speedup_rank1_vs_fp64_loop=authors_seconds / out["rank1_seconds"],
        reduced_tensor_devices=sorted(devices),
        reduce_on_parameter_device=devices == {str(next(model.parameters()).device)},
    )
    return out


SAMPLING_VARIANTS = {
    "ours_bf16": "bf16",
    "ours_channels_last_bf16": "bf16 channels_last",
    "ours_fp32": "fp32",
    "ours_channels_last": "fp32 channels_last",
    "reference": "plain fp32 DDIMScheduler loop",
}


def check_sampling(args, device) -> dict:
    from bench_sampling import sampling_results

    model = paper_unet(args).to(device).eval()
    labels = torch.arange(16 if args.tiny else 500, device=device) % 10
    results = sampling_results(
        model, training_noise_scheduler(), labels, 2 if args.tiny else 10, 1 if args.tiny else 2, device
    )
    results["note"] = "10 timed steps, images/s reported per 50-step image"
    return results


GEOMETRY_TIMESTEPS = (100, 300, 500, 700, 900)
# the paper's protocols: (tasks, optimizer steps per task, classes per task, replay images per class)
PROTOCOLS = {"Fashion-MNIST / CIFAR-10": (5, 18_750, 2, 5000), "ImageNet 32x32": (20, 50_000, 50, 1300)}


def check_throughput(args, device) -> dict:
    from _common import OPTIMIZER, learner_with
    from accelerate import Accelerator
    from bench_throughput import counted_flops, datasheet_peak, matmul_peak

    from hf_r1ewc.continual import ContinualLearner, make_optimizer, step_generator
    from hf_r1ewc.distill import ReplayPool, frozen_teacher
    from hf_r1ewc.pipeline import sample, sampling_scheduler

    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    model = paper_unet(args).to(device)
    n = 8 if args.tiny else 128
    x, y = batch(n, model, device)
    scheduler = training_noise_scheduler()
    size = model.config.sample_size
    g = torch.Generator().manual_seed(1)
    pool = ReplayPool((torch.rand(4 * n, 1, size, size, generator=g) * 2 - 1).half(), torch.arange(4 * n) % 10)
    teacher = frozen_teacher(model)
    plain, gd = ContinualLearner(scheduler), learner_with(scheduler, teacher, pool.to(device), 10, replay_batch_size=n)
    prepared, optimizer = accelerator.prepare(model, make_optimizer(model, **OPTIMIZER, device=device))
    # (name, model, the step as before #26: loss terms read back every step, noise drawn on the host)
    variants = [("eager, host read + host noise", prepared, True), ("eager", prepared, False)]
    if device.type == "cuda":
        variants.append(("compiled", torch.compile(prepared, dynamic=False), False))
        variants.append(
            ("compiled + CUDA graphs", torch.compile(prepared, mode="reduce-overhead", dynamic=False), False)
        )
    counter = {"step": 0}

    def step(learner, m, before=False):
        def run_step():
            counter["step"] += 1
            generator = step_generator(0, counter["step"], device="cpu" if before else device)
            learner.training_step(accelerator, m, optimizer, x, y, generator, check_finite=before)

        return run_step

    flops = {"plain": counted_flops(step(plain, prepared)), "GD": counted_flops(step(gd, prepared))}
    workloads, warm_up_seconds, errors = {}, {}, {}
    for name, m, before in variants:
        for kind, learner in (("plain", plain), ("GD", gd)):
            fn = step(learner, m, before)
            try:
                start = time.perf_counter()
                for _ in range(3):  # warm-up: compilation and graph capture happen here
                    fn()
                sync(device)
                workloads[f"{kind} step, {name}"] = fn
                warm_up_seconds[f"{kind} step, {name}"] = time.perf_counter() - start
            except Exception:  # a variant that does not compile is recorded, the others still run
                errors[f"{kind} step, {name}"] = traceback.format_exc()[-1500:]
    seconds = interleaved_medians(workloads, 3 if args.tiny else 10, device)
    sampler = sampling_scheduler("ddim", scheduler.config)
    labels = torch.arange(16 if args.tiny else 500, device=device) % 10
    steps = 2 if args.tiny else 10
    sample_seconds = interleaved_medians(
        {"ddim": lambda: sample(teacher, sampler, labels, steps, torch.Generator().manual_seed(0), torch.bfloat16)},
        1 if args.tiny else 2,
        device,
    )["ddim"]
    images_per_s = len(labels) / sample_seconds * steps / 50  # per 50-step image
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured_peak = matmul_peak(device, peak_dtype, 8192 if device.type == "cuda" else 1024)
    sheet = datasheet_peak(device)
    steps_out = {
        name: {
            "seconds": s,
            "tflops_per_s": flops[name.split(" ")[0]] / s / 1e12,
            "mfu_datasheet": flops[name.split(" ")[0]] / s / sheet if sheet else None,
            "mfu_measured_peak": flops[name.split(" ")[0]] / s / measured_peak,
        }
        for name, s in seconds.items()
    }
    best = {kind: min(s for k, s in seconds.items() if k.startswith(kind)) for kind in ("plain", "GD")}
    projection = {}
    for protocol, (tasks, per_task, classes, per_class) in PROTOCOLS.items():
        training = per_task * (best["plain"] + (tasks - 1) * best["GD"])
        for schedule, images in (
            ("regenerate", per_class * classes * tasks * (tasks - 1) // 2),
            ("accumulate", per_class * classes * (tasks - 1)),
        ):
            projection[f"{protocol}, {schedule}"] = {
                "training_hours": training / 3600,
                "pool_images": images,
                "pool_hours": images / images_per_s / 3600,
                "total_hours": (training + images / images_per_s) / 3600,
            }
    out = {
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": n,
        "flops_per_step": flops,
        "steps": steps_out,
        "ddim50_images_per_s": images_per_s,
        "measured_peak_tflops_per_s": measured_peak / 1e12,
        "datasheet_peak_tflops_per_s": sheet / 1e12 if sheet else None,
        "projection_hours": projection,
        "warm_up_seconds": warm_up_seconds,  # compilation and CUDA-graph capture included
        "errors": errors,
    }
    write_throughput_markdown(out, Path(args.out) / "throughput_gpu.md", device)
    return out


def write_throughput_markdown(out: dict, path: Path, device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [
        f"# Throughput on {name} (issue 26)\n",
        f"The paper's UNet ({out['params_millions']:.2f}M), batch {out['batch']} (+ {out['batch']} replay for GD), "
        f"bf16 autocast on CUDA; FLOPs counted with FlopCounterMode (plain {out['flops_per_step']['plain'] / 1e12:.2f}"
        f" TFLOP, GD {out['flops_per_step']['GD'] / 1e12:.2f} TFLOP per step). Peaks: measured matmul "
        f"{out['measured_peak_tflops_per_s']:.0f} TFLOP/s, datasheet {out['datasheet_peak_tflops_per_s']} TFLOP/s.\n",
        "| step | ms | TFLOP/s | MFU (datasheet) | MFU (measured peak) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for step_name, r in out["steps"].items():
        mfu = f"{100 * r['mfu_datasheet']:.1f} %" if r["mfu_datasheet"] else "—"
        lines.append(
            f"| {step_name} | {1e3 * r['seconds']:.1f} | {r['tflops_per_s']:.1f} | {mfu} | "
            f"{100 * r['mfu_measured_peak']:.1f} % |"
        )
    lines += [
        f"\nDDIM-50 sampling at batch 500: {out['ddim50_images_per_s']:.0f} images/s.\n",
        "Projection of each protocol from the fastest variant's step times (task 1 plain, later tasks GD; ImageNet's "
        "UNet, 3 channels and 1000 classes, has 1.4 % more parameters and is not timed separately):\n",
        "| protocol, pool schedule | training h | pool images | pool h | total h |",
        "| --- | --- | --- | --- | --- |",
    ]
    for protocol, p in out["projection_hours"].items():
        lines.append(
            f"| {protocol} | {p['training_hours']:.2f} | {p['pool_images']:,} | {p['pool_hours']:.2f} | "
            f"{p['total_hours']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def train_to_plateau(model, images, labels, device, seconds: float, batch_size: int, lr: float) -> dict:
    """Task 1 alone: Adam on ``images`` until the epoch-mean denoising loss falls < 2 % over the last quarter of the
    epochs (at least 8 epochs) or ``seconds`` pass; bf16 autocast on CUDA. Returns the loss per epoch and why it
    stopped."""
    from accelerate import Accelerator

    from hf_r1ewc.continual import ContinualLearner, step_generator

    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=True
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    learner = ContinualLearner(training_noise_scheduler())
    losses, start, reason = [], time.perf_counter(), "time budget"
    while time.perf_counter() - start < seconds:
        epoch = [
            float(
                learner.training_step(accelerator, prepared, optimizer, x, y, step_generator(0, len(losses), i)).terms[
                    0
                ]
            )
            for i, (x, y) in enumerate(loader)
        ]
        losses.append(sum(epoch) / len(epoch))
        q = max(1, len(losses) // 4)
        if len(losses) >= 8 and 1 - sum(losses[-q:]) / sum(losses[-2 * q : -q]) < 0.02:
            reason = "plateau"
            break
    accelerator.free_memory()
    return {"loss_per_epoch": losses, "stopped": reason, "seconds": time.perf_counter() - start}


def check_geometry(args, device) -> dict:
    from hf_r1ewc.analysis import analyse_checkpoint
    from hf_r1ewc.data import images_to_model_input, load_labeled_images

    if args.tiny:
        from _common import unet

        source, resolution, n, timesteps = "digits", 8, 16, GEOMETRY_TIMESTEPS[::4]
        models = {"small": unet(block_out_channels=(8, 16), sample_size=8), "large": unet(sample_size=8)}
    else:
        source, resolution, n, timesteps = "/usr/share/datasets/fashion-mnist", 32, 1024, GEOMETRY_TIMESTEPS
        models = {"cpu-small": unet_from_preset("cpu-small", 32, 1, 10), "paper": unet_from_preset("paper", 32, 1, 10)}
    train = load_labeled_images(source, "train").subset([0, 1])
    if args.tiny:  # an epoch of a few steps, so that the time budget ends training within seconds
        train = train.head_per_class(n)
    images, labels = images_to_model_input(train.images, resolution, False), train.labels
    out = {"timesteps": list(timesteps), "num_samples": n, "models": {}}
    for name, model in models.items():
        model.to(device)
        budget = 2 if args.tiny else 100
        training = train_to_plateau(model, images, labels, device, budget, 8 if args.tiny else 128, 2e-4)
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(labels), generator=g)[:n]
        result = analyse_checkpoint(
            model.float().eval(),
            images[pick],
            labels[pick],
            timesteps,
            chunk_size=8 if args.tiny else 64,
            memory_bytes=2e8 if args.tiny else 40e9,
        )
        per_t = {
            t: {
                "eigengap_ratio": r["eigengap_ratio"],
                "rel_error_rank1": r["rel_frobenius_error_rank1"],
                "rel_error_diag": r["rel_frobenius_error_diag"],
                "median_abs_cos": float(torch.tensor(r["abs_cos_to_mean"]).median()),
            }
            for t, r in result["per_timestep"].items()
        }
        params = sum(p.numel() for p in model.parameters())
        out["models"][name] = {"parameters": params, "training": training, "per_timestep": per_t}
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_geometry_markdown(out, Path(args.out) / "geometry_by_size.md")
    return out


def write_geometry_markdown(out: dict, path: Path) -> None:
    lines = [
        "# Fisher geometry by model size (issue 30)\n",
        f"Task 1 of Fashion-MNIST (classes 0, 1) trained to a plateau of the denoising loss, then the exact Fisher "
        f"geometry on {out['num_samples']} training images per timestep (`benchmarks/gpu_check.py --only geometry`). "
        "The paper (figs. 3, 6): λ2/λ1 = 0.022 at t = 700 for its UNet; the rank-1 structure strengthens with size.\n",
        "| model | parameters | epochs (stopped by) | t | λ2/λ1 | rank-1 rel. error | diag rel. error | median abs cos(g_i, μ) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in out["models"].items():
        tr = m["training"]
        for t, r in m["per_timestep"].items():
            lines.append(
                f"| {name} | {m['parameters'] / 1e6:.2f}M | {len(tr['loss_per_epoch'])} ({tr['stopped']}) | {t} | "
                f"{r['eigengap_ratio']:.3f} | {r['rel_error_rank1']:.3f} | {r['rel_error_diag']:.3f} | "
                f"{r['median_abs_cos']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def fresh(folder: Path) -> Path:
    """A check's run folder, emptied: a folder left by an earlier check would be resumed (or refused, were its
    settings different) instead of trained."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def run(cmd, env=None, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
    )


SCRIPT_FLAGS = [
    "--dataset_name",
    "digits",
    "--preset",
    "demo",
    "--no-use_ema",
    "--tasks",
    "0,1;2,3;4,5",
    "--num_epochs_per_task",
    "2",
    "--train_batch_size",
    "32",
    "--replay_per_class",
    "32",
    "--num_inference_steps",
    "10",
    "--fisher_num_samples",
    "64",
    "--max_train_per_class",
    "64",
    "--fid_num_samples",
    "64",
    "--ewc_type",
    "rank1",
]
# --tiny: the same run at sizes a CPU finishes in seconds (later flags override earlier ones)
TINY_SCRIPT_FLAGS = [
    "--num_epochs_per_task",
    "1",
    "--max_train_per_class",
    "16",
    "--fisher_num_samples",
    "16",
    "--replay_per_class",
    "8",
    "--fid_num_samples",
    "16",
    "--num_inference_steps",
    "4",
]


def check_script_bf16(args, device, out_dir: Path) -> dict:
    from hf_r1ewc.continual import fisher_loader
    from hf_r1ewc.data import images_to_model_input, load_labeled_images
    from hf_r1ewc.fisher import load_fisher
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    run_dir = fresh(out_dir / "gpu_check_run")
    config = "single_gpu_bf16.yaml" if device.type == "cuda" else "cpu.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"accelerate_configs/{config}",
        "train_continual_ddpm.py",
        *SCRIPT_FLAGS,
        *(TINY_SCRIPT_FLAGS if args.tiny else []),
        "--output_dir",
        str(run_dir),
    ]
    if device.type == "cpu":
        cmd[cmd.index("--output_dir") : cmd.index("--output_dir")] = ["--mixed_precision", "bf16"]
    proc = run(cmd)
    log = proc.stdout + proc.stderr
    result = {
        "rc": proc.returncode,
        "error_lines": [line for line in log.splitlines() if line.startswith("error:")],
        "log_tail": log[-1500:],
    }
    if proc.returncode != 0:
        return result
    metrics = json.loads((run_dir / "task_03" / "metrics.json").read_text())
    folder = run_dir / "task_01"
    pipe = ClassConditionalPipeline.from_pretrained(folder).to(device)
    saved = load_fisher(str(folder / "fisher.safetensors"), model=pipe.unet)
    n = 16 if args.tiny else 64  # --max_train_per_class and --fisher_num_samples of the run
    data = load_labeled_images("digits", "train").head_per_class(n).subset([0, 1])
    loader = fisher_loader(images_to_model_input(data.images), data.labels, n, n, seed=0 + 1)
    fp32 = estimate_fisher(
        pipe.unet,
        training_noise_scheduler(),
        loader,
        kinds=("rank1",),
        generator=torch.Generator().manual_seed(1),
        show_progress=False,
    )
    mu_error = sum(float((saved.mu[n].to(device) - fp32.mu[n]).double().pow(2).sum()) for n in fp32.mu) ** 0.5
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 1, 2, 3], num_inference_steps=10, output_type="pt").images
    result.update(
        fid=metrics["fid"],
        accuracy=metrics.get("accuracy"),
        sampling=metrics.get("sampling"),
        c_star_saved=saved.c_star,
        c_star_fp32=fp32.c_star,
        c_star_relative_error=abs(saved.c_star - fp32.c_star) / abs(fp32.c_star),
        mu_relative_error=mu_error / fp32.mu_norm(),
        fisher_matches_fp32=abs(saved.c_star - fp32.c_star) <= 1e-5 * abs(fp32.c_star)
        and mu_error <= 1e-5 * fp32.mu_norm(),
        pipeline_samples_on=str(images.device),
        pipeline_samples_finite=bool(torch.isfinite(images).all()),
    )
    return result


def check_fsdp(args, device, out_dir: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "FSDP needs a GPU (Accelerate builds no FSDP Accelerator on CPU)"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/fsdp.yaml",
        "--num_processes",
        "1",
        "train_continual_ddpm.py",
        *SCRIPT_FLAGS,
        "--fid_backend",
        "none",
        "--output_dir",
        str(fresh(out_dir / "gpu_check_fsdp")),
    ]
    proc = run(cmd)
    folder = out_dir / "gpu_check_fsdp" / "task_03"
    log = proc.stdout + proc.stderr
    return {
        "rc": proc.returncode,
        "task_03_written": (folder / "fisher.safetensors").exists(),
        "error_lines": [line for line in log.splitlines() if line.startswith("[rank0]:")][-25:],
        "log_tail": log[-1500:],
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# GPU check",
        "",
        f"Machine: {results['machine'].get('gpu', 'no GPU')} (torch "
        f"{results['machine']['torch']}); `python benchmarks/gpu_check.py`.",
        "",
    ]
    t = results.get("train_step", {})
    if "step_seconds" in t:
        lines += [
            f"- Training step, paper UNet ({t['params_millions']:.2f}M params), batch {t['batch']}, "
            f"{t['precision']}: {t['step_seconds']['plain'] * 1e3:.1f} ms; rank-1 penalty overhead K=4 "
            f"{100 * t['penalty_overhead_k4']:.1f} %, K=19 {100 * t['penalty_overhead_k19']:.1f} %."
        ]
    f = results.get("fisher", {})
    if "rank1_diag_seconds" in f:
        lines += [
            f"- Exact Fisher on {f['num_samples']} samples: mu + c* {f['rank1_seconds']:.1f} s, mu + c* + diag "
            f"{f['rank1_diag_seconds']:.1f} s; authors' fp64 batch-1 loop {f['fp64_loop_seconds_per_sample_pass']:.3f}"
            f" s per sample and pass, {f['authors_seconds_extrapolated']:.0f} s extrapolated: speed-up "
            f"{f['speedup_rank1_diag_vs_fp64_loop']:.1f}x (mu + c* + diag), {f['speedup_rank1_vs_fp64_loop']:.1f}x "
            f"(mu + c*). All-reduced tensors on {f['reduced_tensor_devices']}."
        ]
    s = results.get("sampling", {})
    if "images_per_second_ddim50" in s:
        ips = s["images_per_second_ddim50"]
        # (bf16 is measured only where it runs natively: a CPU without it has no bf16 rows)
        measured = [f"{label} {ips[key]:.0f} img/s" for key, label in SAMPLING_VARIANTS.items() if key in ips]
        lines += [
            f"- DDIM-50 sampling at batch {s['batch']}: {', '.join(measured)} "
            f"(speed-up {s['sampling_speedup_vs_reference']:.2f}x); hand-written DDIM update vs scheduler.step "
            f"{s['handwritten_vs_scheduler_step']:.3f}x."
        ]
    b = results.get("script_bf16", {})
    if "fisher_matches_fp32" in b:
        lines += [
            f"- 3-task script run with single_gpu_bf16.yaml: saved Fisher vs fp32 re-estimate: c* relative error "
            f"{b['c_star_relative_error']:.1e}, mu {b['mu_relative_error']:.1e} (match: {b['fisher_matches_fp32']});"
            f" saved pipeline sampled on {b['pipeline_samples_on']} (finite: {b['pipeline_samples_finite']})."
        ]
    elif b:
        lines += [f"- 3-task script run with single_gpu_bf16.yaml: FAILED (rc {b.get('rc')}); see the JSON log tail."]
    fs = results.get("fsdp", {})
    if fs:
        lines += [
            "- FSDP (fsdp.yaml, 1 process): "
            + (fs.get("skipped") or f"rc {fs['rc']}, task_03 written: {fs['task_03_written']}")
        ]
    for name, err in results.get("errors", {}).items():
        lines += [f"- {name}: ERROR `{err.splitlines()[-1]}`"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: a dry run of every section on CPU")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work_dir", default="/tmp/hf_r1ewc_gpu_check", help="where the script runs write their folders")
    p.add_argument("--only", default=None, help="comma-separated sections to run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "tiny": args.tiny, "errors": {}}
    sections = {
        "train_step": lambda: check_train_step(args, device),
        "fisher": lambda: check_fisher(args, device),
        "sampling": lambda: check_sampling(args, device),
        "script_bf16": lambda: check_script_bf16(args, device, Path(args.work_dir)),
        "fsdp": lambda: check_fsdp(args, device, Path(args.work_dir)),
        "geometry": lambda: check_geometry(args, device),
        "throughput": lambda: check_throughput(args, device),
    }
    for name, section in sections.items():
        if args.only and name not in args.only.split(","):
            continue
        start = time.perf_counter()
        try:
            results[name] = section()
        except Exception:  # record and go on: one broken section must not hide the others
            results["errors"][name] = traceback.format_exc()[-3000:]
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        print(
            f"[{name}] {time.perf_counter() - start:.1f} s",
            json.dumps(results.get(name), default=str)[:600],
            flush=True,
        )
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_markdown(results, out_dir / "gpu_check.md")
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print((out_dir / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
