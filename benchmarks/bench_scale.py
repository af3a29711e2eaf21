"""What the ImageNet 32x32 protocol (20 tasks of 50 classes) costs with the paper's UNet, and an H100 estimate.

    python benchmarks/bench_scale.py [--device cpu|cuda] [--batch 4]

Measured here, on the paper's UNet for ImageNet 32x32 (3 channels, 1000 class embeddings, 36.3M parameters):
forward FLOPs per image (torch.utils.flop_counter), the time of a training step (fwd + bwd + Adam) and of the EWC
penalty's value + backward at K = 19 tasks (rank-1 with fp32 or bf16 mu, merged diagonal), the penalty statistics'
memory, and DDIM sampling throughput (image-steps per second). From these: the protocol's total FLOPs and an H100
wall-clock estimate from an ASSUMED fraction of its bf16 peak (not a measurement). Writes
benchmarks/results/bench_scale[_DEVICE].json; benchmarks/results/scale.md explains the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, print_table, write_results  # noqa: E402

from hf_r1ewc.fisher import FisherStatistics  # noqa: E402
from hf_r1ewc.models import PRESETS, training_noise_scheduler, unet_from_preset  # noqa: E402
from hf_r1ewc.penalty import EWCPenalty  # noqa: E402
from hf_r1ewc.pipeline import sample, sampling_scheduler  # noqa: E402


# The protocol (the paper's ImageNet setting): ImageNet-1k 32x32, 20 tasks of 50 classes, ~1281 training images per class,
# 100 epochs per task, batch 128 real + 128 replay, replay pool of 1300 images per seen class by DDIM 50 steps.
TASKS, CLASSES_PER_TASK, IMAGES_PER_CLASS, EPOCHS, BATCH, POOL_PER_CLASS, DDIM_STEPS = 20, 50, 1281, 100, 128, 1300, 50
H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense, no sparsity)
H100_HBM_BYTES_PER_S = 3.35e12
ASSUMED_UTILISATION = (0.2, 0.4)  # fraction of peak a 32x32 conv UNet reaches in bf16: an assumption, not measured


def penalty_with_tasks(model, kind: str, num_tasks: int, mu_dtype=torch.float32) -> EWCPenalty:
    penalty = EWCPenalty(kind, ewc_lambda=15000.0, mu_dtype=mu_dtype)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for k in range(num_tasks):
        g = torch.Generator(device="cpu").manual_seed(k)
        mu = {n: torch.randn(p.shape, generator=g).mul_(1e-3).to(p.device) for n, p in params.items()}
        stats = FisherStatistics(
            mu=mu if kind != "diag" else None,
            diag={n: m.abs() for n, m in mu.items()} if kind == "diag" else None,
            c_star=1.0,
            num_samples=1,
        )
        penalty.add_task(stats, params)
        del mu, stats
    return penalty


def stored_bytes(penalty: EWCPenalty) -> int:
    return sum(v.numel() * v.element_size() for v in penalty.state_dict().values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--batch", type=int, default=None, help="real images per timed step (default: 4 on CPU, 128 on GPU)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--tiny", action="store_true", help="the demo preset instead of the paper's UNet, 1 repeat (for the tests)"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (BATCH if device.type == "cuda" else 4)
    preset = "demo" if args.tiny else "paper"
    repeats = 1 if args.tiny else args.repeats
    model = unet_from_preset(preset, 32, 3, 1000).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    scheduler = training_noise_scheduler()

    from torch.utils.flop_counter import FlopCounterMode

    x1, t1, y1 = (
        torch.randn(1, 3, 32, 32, device=device),
        torch.tensor([500], device=device),
        torch.tensor([3], device=device),
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x1, t1, class_labels=y1)
    forward_flops = counter.get_total_flops()

    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 3, 32, 32, generator=g).to(device)  # real + replay
    t = torch.randint(0, 1000, (2 * batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (2 * batch,), generator=g).to(device)
    teacher = unet_from_preset(preset, 32, 3, 1000).to(device).eval().requires_grad_(False)
    penalties = {
        "rank1_fp32": penalty_with_tasks(model, "rank1", 19),
        "rank1_bf16": penalty_with_tasks(model, "rank1", 19, torch.bfloat16),
        "diag": penalty_with_tasks(model, "diag", 19),
    }

    def train_step():
        noise = torch.randn_like(x)
        noisy = scheduler.add_noise(x, noise, t)
        with torch.no_grad():
            target_replay = teacher(noisy[batch:], t[batch:], class_labels=y[batch:]).sample
        out = model(noisy, t, class_labels=y).sample
        loss = F.mse_loss(out, noise) + F.mse_loss(out[batch:], target_replay)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def penalty_only(penalty):
        def run():
            penalty(model).backward()
            for p_ in model.parameters():
                p_.grad = None

        return run

    # two groups: the step's large activations would otherwise disturb the memory-bound penalty timings
    times = interleaved_medians({"step": train_step}, repeats, device)
    times.update(
        interleaved_medians({f"penalty_{k}": penalty_only(pen) for k, pen in penalties.items()}, repeats, device)
    )

    sample_batch = 64 if device.type == "cuda" else 8
    labels = torch.randint(0, 1000, (sample_batch,), generator=g)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    sample_time = interleaved_medians(
        {
            "ddim": lambda: sample(
                teacher,
                sampling_scheduler("ddim", scheduler.config),
                labels.to(device),
                5,
                torch.Generator().manual_seed(1),
                autocast,
            )
        },
        repeats,
        device,
    )["ddim"]
    image_steps_per_s = sample_batch * 5 / sample_time

    # the protocol's work, in forward-pass FLOPs (a training step on an image ~ 3 forward passes)
    images_per_task = CLASSES_PER_TASK * IMAGES_PER_CLASS
    steps_total = TASKS * EPOCHS * (images_per_task // BATCH)
    train_flops = steps_total * (2 * BATCH * 3 + BATCH) * forward_flops  # student on real+replay, teacher on replay
    pool_images = sum((k - 1) * CLASSES_PER_TASK * POOL_PER_CLASS for k in range(1, TASKS + 1))
    pool_flops = pool_images * DDIM_STEPS * forward_flops
    fisher_flops = TASKS * images_per_task * 2 * 3 * forward_flops  # two passes over the task, fwd + bwd/jvp
    # FID after every task on every seen task, as many samples as validation images (50 per class)
    eval_flops = sum(k for k in range(1, TASKS + 1)) * CLASSES_PER_TASK * 50 * DDIM_STEPS * forward_flops
    total_flops = train_flops + pool_flops + fisher_flops + eval_flops
    mu_bytes_fp32 = 19 * num_params * 4

    results = {
        "device": str(device),
        "batch_real": batch,
        "num_parameters": num_params,
        "forward_gflops_per_image": forward_flops / 1e9,
        "times_s": times,
        "ddim_image_steps_per_s": image_steps_per_s,
        "penalty_time_over_step_time_k19": {k: times[f"penalty_{k}"] / times["step"] for k in penalties},
        "penalty_stored_bytes_k19": {k: stored_bytes(pen) for k, pen in penalties.items()},
        "protocol": {
            "tasks": TASKS,
            "classes_per_task": CLASSES_PER_TASK,
            "images_per_class": IMAGES_PER_CLASS,
            "epochs": EPOCHS,
            "batch": BATCH,
            "pool_per_class": POOL_PER_CLASS,
            "ddim_steps": DDIM_STEPS,
            "optimizer_steps": steps_total,
            "pool_images_total": pool_images,
        },
        "protocol_pflops": {
            "train": train_flops / 1e15,
            "replay_pool": pool_flops / 1e15,
            "fisher": fisher_flops / 1e15,
            "fid_sampling": eval_flops / 1e15,
            "total": total_flops / 1e15,
        },
        "pool_generation_hours_at_measured_throughput": {
            f"task_{k}": (k - 1) * CLASSES_PER_TASK * POOL_PER_CLASS * DDIM_STEPS / image_steps_per_s / 3600
            for k in (2, 10, 20)
        },
        "h100_estimate_hours": {
            f"utilisation_{u}": total_flops / (u * H100_BF16_DENSE_PEAK) / 3600 for u in ASSUMED_UTILISATION
        },
        "h100_estimate_hours_by_part": {
            f"utilisation_{u}": {
                part: flops / (u * H100_BF16_DENSE_PEAK) / 3600
                for part, flops in (
                    ("train", train_flops),
                    ("replay_pool", pool_flops),
                    ("fisher", fisher_flops),
                    ("fid_sampling", eval_flops),
                    ("pool_task_20", 19 * CLASSES_PER_TASK * POOL_PER_CLASS * DDIM_STEPS * forward_flops),
                )
            }
            for u in ASSUMED_UTILISATION
        },
        # value + backward read the stacked fp32 mu twice; bf16 mu is up-cast per parameter, so it saves memory,
        # not traffic (see the CPU times)
        "h100_penalty_ms_k19_memory_bound_fp32": 2 * mu_bytes_fp32 / H100_HBM_BYTES_PER_S * 1e3,
        "h100_step_ms_at_utilisation": {
            f"utilisation_{u}": (2 * BATCH * 3 + BATCH) * forward_flops / (u * H100_BF16_DENSE_PEAK) * 1e3
            for u in ASSUMED_UTILISATION
        },
        "assumptions": {
            "h100_bf16_dense_peak_flops": H100_BF16_DENSE_PEAK,
            "h100_hbm_bytes_per_s": H100_HBM_BYTES_PER_S,
            "utilisation": ASSUMED_UTILISATION,
            "paper_preset": PRESETS["paper"].defaults,
        },
    }
    rows = [
        ("parameters", f"{num_params / 1e6:.1f}M", "paper UNet, 3 channels, 1000 classes"),
        ("forward GFLOPs/image", f"{forward_flops / 1e9:.3f}", "FlopCounterMode, 32x32"),
        ("step", f"{times['step']:.3f}", f"s, {batch} real + {batch} replay, teacher fwd, Adam"),
    ]
    rows += [
        (f"penalty {k} K=19", f"{v:.3f}", "penalty value + backward / training step")
        for k, v in results["penalty_time_over_step_time_k19"].items()
    ]
    rows += [(f"stored {k} K=19", f"{v / 2**30:.2f}", "GiB") for k, v in results["penalty_stored_bytes_k19"].items()]
    rows += [
        ("DDIM image-steps/s", f"{image_steps_per_s:.1f}", f"batch {sample_batch}, {device}"),
        ("protocol total PFLOPs", f"{total_flops / 1e15:.0f}", "train + pool + Fisher + FID sampling"),
    ]
    rows += [
        (f"H100 hours @ {u:.0%} of peak", f"{h:.1f}", "ASSUMED utilisation")
        for u, h in zip(ASSUMED_UTILISATION, results["h100_estimate_hours"].values())
    ]
    print_table(rows)
    suffix = "_tiny" if args.tiny else "" if device.type == "cpu" else f"_{device.type}"
    path = write_results("bench_scale" + suffix, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
