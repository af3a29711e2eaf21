"""Replay-pool sampling and distillation-step speed, as ratios measured in one run.

    python benchmarks/bench_sampling.py [--quick] [--device cpu|cuda]

Keys written to benchmarks/results/bench_sampling.json (``--quick``: bench_sampling_quick.json):

* sampling_speedup_vs_reference: DDIM-50 images per second of ``hf_r1ewc.pipeline.sample`` (what the replay pool,
  FID and the saved pipeline use) over a plain fp32 ``torch.no_grad`` loop over diffusers' ``DDIMScheduler.step``
  (the authors' approach), same model and batch. Also each ingredient alone (channels_last, bf16 autocast).
* handwritten_vs_scheduler_step: the same sampler with the DDIM update written out by hand (what hf_r1ewc used
  before) over ``DDIMScheduler.step``, both under the pool's default precision: the hand-written update is kept
  only if this is >= 1.05 at equal outputs (``max_abs_diff_handwritten``).
* gd_step_vs_arithmetic: one training step with generative distillation (``ContinualLearner.loss``: student forward +
  backward on real + replay, teacher forward on replay, Adam) over the sum of those parts timed alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler


sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, learner_with, print_table, unet, write_results  # noqa: E402

from hf_r1ewc.distill import ReplayPool, frozen_teacher  # noqa: E402
from hf_r1ewc.pipeline import default_autocast_dtype, sample, sampling_scheduler  # noqa: E402


@torch.no_grad()
def reference_sampling(model, scheduler, labels, steps, seed):
    """The plain loop: fp32, no_grad, diffusers' DDIMScheduler.step."""
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    size = model.config.sample_size
    x = torch.randn(
        (len(labels), model.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed)
    ).to(labels.device)
    for t in sched.timesteps:
        eps = model(x, t, class_labels=labels).sample
        x = sched.step(eps, t, x).prev_sample
    return x


@torch.inference_mode()
def handwritten_ddim(unet, scheduler, class_labels, num_inference_steps, generator, autocast_dtype=None):
    """The DDIM (eta 0) update written out by hand, as hf_r1ewc sampled before it used ``scheduler.step``."""
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    x = torch.randn((class_labels.shape[0], unet.config.in_channels, size, size), generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    alphas, final_alpha = sched.alphas_cumprod.to(device), sched.final_alpha_cumprod.to(device)
    step = sched.config.num_train_timesteps // num_inference_steps
    for t in sched.timesteps:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            eps = unet(x, t.to(device), class_labels=class_labels).sample.float()
        alpha_t, prev = alphas[t], int(t) - step
        alpha_prev = alphas[prev] if prev >= 0 else final_alpha
        x0 = ((x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()).clamp(-1, 1)
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    return x.clamp(-1, 1).float()


def sampling_variants(model, scheduler, labels, steps) -> dict:
    """The timed sampling variants (each a no-argument callable) on one model and batch."""
    ddim = sampling_scheduler("ddim", scheduler.config)
    lean_cl = __import__("copy").deepcopy(model).to(memory_format=torch.channels_last)
    teacher = frozen_teacher(model)  # what the pool samples with: channels_last on the CPU only
    fast = default_autocast_dtype(labels.device) or None

    def seed():
        return torch.Generator().manual_seed(0)

    variants = {
        "reference": lambda: reference_sampling(model, scheduler, labels, steps, 0),
        "ours_fp32": lambda: sample(model, ddim, labels, steps, seed()),
        "ours_channels_last": lambda: sample(lean_cl, ddim, labels, steps, seed()),
        "handwritten_default": lambda: handwritten_ddim(teacher, scheduler, labels, steps, seed(), fast),
        "ours_default": lambda: sample(teacher, ddim, labels, steps, seed(), fast),
    }
    # bf16 only where it runs natively: emulated bf16 (AVX2 CPUs) is what no run uses and what made the default
    # run pass 30 minutes on 2 cores
    if labels.device.type == "cuda" or fast is not None:
        variants["ours_bf16"] = lambda: sample(model, ddim, labels, steps, seed(), torch.bfloat16)
        variants["ours_channels_last_bf16"] = lambda: sample(lean_cl, ddim, labels, steps, seed(), torch.bfloat16)
    return variants


def sampling_results(model, scheduler, labels, steps, repeats, device) -> dict:
    """Images/s per variant, the speed-ups over the reference loop, and the hand-written update's ratio."""
    variants = sampling_variants(model, scheduler, labels, steps)
    med = interleaved_medians(variants, repeats, device)
    batch = labels.shape[0]
    results = {
        "batch": batch,
        "steps": steps,
        "device": str(device),
        "images_per_second_ddim50": {k: batch / v * steps / 50 for k, v in med.items()},
        "max_abs_diff_ours_fp32_vs_reference": float(
            (variants["reference"]().clamp(-1, 1) - variants["ours_fp32"]()).abs().max()
        ),
        "max_abs_diff_handwritten": float(
            (variants["handwritten_default"]() - variants["ours_default"]()).abs().max()
        ),
    }
    for k in variants:
        if k != "reference":
            results[f"speedup_{k}"] = med["reference"] / med[k]
    results["pool_default"] = ("ours_channels_last" if device.type == "cpu" else "ours") + (
        "_bf16" if default_autocast_dtype(device) else ("" if device.type == "cpu" else "_fp32")
    )
    results["sampling_speedup_vs_reference"] = med["reference"] / med["ours_default"]
    results["handwritten_vs_scheduler_step"] = med["ours_default"] / med["handwritten_default"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, batch and step count: < 60 s on 2 cores")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of every part, for the tests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        channels, batch, steps, repeats = (8, 8, 8), 4, 2, 1
    elif args.quick:
        channels, batch, steps, repeats = (16, 32, 32), 100, 10, 2
    else:
        # batch 500 as the authors; 10 timed DDIM steps (sampling cost is linear in the step count, so the ratios
        # are those of DDIM-50 and images/s are reported per 50-step image)
        channels, batch, steps, repeats = (32, 64, 64), 500, 10, 1
    model = unet(block_out_channels=channels).to(device).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    labels = (torch.arange(batch) % 10).to(device)
    print(
        f"UNet {channels}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {batch}, "
        f"DDIM {steps} steps, {device}"
    )
    results = sampling_results(model, scheduler, labels, steps, repeats, device)
    default = results["pool_default"]

    # distillation step vs the sum of its parts
    student = unet(block_out_channels=channels).to(device)
    teacher = frozen_teacher(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    train_batch = 4 if args.tiny else 32 if args.quick else 128
    g = torch.Generator().manual_seed(0)
    real = (
        torch.rand(train_batch, 1, 32, 32, generator=g).to(device) * 2 - 1,
        torch.randint(0, 10, (train_batch,), generator=g).to(device),
    )
    replay = (
        torch.rand(train_batch, 1, 32, 32, generator=g).to(device) * 2 - 1,
        torch.randint(0, 10, (train_batch,), generator=g).to(device),
    )
    both = (torch.cat([real[0], replay[0]]), torch.cat([real[1], replay[1]]))
    t_all = torch.randint(0, 1000, (2 * train_batch,), device=device)

    learner = learner_with(scheduler, teacher, ReplayPool(replay[0].half(), replay[1]), classes=10)

    def full_step():
        loss = learner.loss(student, *real, torch.Generator(device).manual_seed(0), check_finite=False)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def student_part():
        noise = torch.randn_like(both[0])
        loss = (
            (student(scheduler.add_noise(both[0], noise, t_all), t_all, class_labels=both[1]).sample - noise)
            .pow(2)
            .mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def teacher_part():
        with torch.no_grad():
            teacher(replay[0], t_all[train_batch:], class_labels=replay[1])

    parts = interleaved_medians(
        {"full": full_step, "student": student_part, "teacher": teacher_part}, 1 if args.tiny else 7, device
    )
    results["gd_step_seconds"] = parts
    results["gd_step_vs_arithmetic"] = parts["full"] / (parts["student"] + parts["teacher"])

    targets = {
        "sampling_speedup_vs_reference": ">= 1.2 (CPU), >= 2.5 (GPU)",
        "handwritten_vs_scheduler_step": "< 1.05 keeps scheduler.step",
        "speedup_ours_fp32": "(inference mode)",
        "speedup_ours_channels_last": "(channels_last alone)",
        "speedup_ours_bf16": "(bf16 autocast)",
        "speedup_ours_channels_last_bf16": "(both: the pool's default where bf16 is fast)",
        "gd_step_vs_arithmetic": "<= 1.05",
    }
    # (the bf16 rows exist only where bf16 runs natively: a CPU without it measures no bf16 variant)
    print_table([(k, f"{results[k]:.3f}", v) for k, v in targets.items() if k in results])
    print(
        f"pool default on {device.type}: {default}; max |ours - reference| = "
        f"{results['max_abs_diff_ours_fp32_vs_reference']:.2e}, |hand-written - scheduler.step| = "
        f"{results['max_abs_diff_handwritten']:.2e}"
    )
    suffix = "_tiny" if args.tiny else "_quick" if args.quick else ""
    print(f"wrote {write_results('bench_sampling' + suffix, results)}")


if __name__ == "__main__":
    main()
