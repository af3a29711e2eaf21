"""Training-step speed of the script's step against a minimal diffusers-style loop, measured in one run.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda]

Keys written to benchmarks/results/bench_train.json (``--quick``: bench_train_quick.json):

* step_vs_plain_loop: our step (Accelerator-prepared model and optimizer, ``accelerator.accumulate``,
  ``ContinualLearner.loss`` with a per-step generator; no penalty, no replay) over a minimal loop (randn noise, randint t,
  add_noise, UNet, MSE, backward, Adam) with the same model, batch and optimizer.
* speedup_bf16_autocast, speedup_channels_last, speedup_compile: each option alone over the plain fp32 loop
  (torch.compile: steady-state step time; its compile time is recorded separately).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator


sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, print_table, sync, unet, write_results  # noqa: E402

from hf_r1ewc.continual import ContinualLearner  # noqa: E402
from hf_r1ewc.models import training_noise_scheduler  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and batch: < 60 s on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of every part, for the tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    channels, batch, repeats = (
        ((8, 8, 8), 4, 1) if args.tiny else ((16, 32, 32), 32, 5) if args.quick else ((32, 64, 64), 128, 5)
    )
    scheduler = training_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 1, 32, 32, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def plain_step_fn(model, autocast_dtype=None, memory_format=torch.contiguous_format):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        xb = x.contiguous(memory_format=memory_format)

        def step():
            noise = torch.randn_like(xb)
            t = torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                pred = model(scheduler.add_noise(xb, noise, t), t, class_labels=y).sample
            loss = (pred.float() - noise).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    base = unet(block_out_channels=channels).to(device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    ours_model = copy.deepcopy(base)
    ours_model, ours_opt = accelerator.prepare(ours_model, torch.optim.Adam(ours_model.parameters(), lr=1e-4))
    counter = [0]

    def ours_step():
        generator = torch.Generator().manual_seed(counter[0])
        counter[0] += 1
        with accelerator.accumulate(ours_model):
            parts = ContinualLearner(scheduler).loss(ours_model, x, y, generator, check_finite=False)
            accelerator.backward(parts["loss"])
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)

    variants = {
        "plain": plain_step_fn(copy.deepcopy(base)),
        "ours": ours_step,
        "bf16_autocast": plain_step_fn(copy.deepcopy(base), torch.bfloat16),
        "channels_last": plain_step_fn(
            copy.deepcopy(base).to(memory_format=torch.channels_last), memory_format=torch.channels_last
        ),
    }
    compile_seconds = None
    if not args.skip_compile:
        compiled = torch.compile(copy.deepcopy(base))
        compiled_step = plain_step_fn(compiled)
        start = time.perf_counter()
        compiled_step()
        sync(device)
        compile_seconds = time.perf_counter() - start
        variants["compile"] = compiled_step
    med = interleaved_medians(variants, repeats, device)
    results = {
        "batch": batch,
        "device": str(device),
        "step_seconds": med,
        "compile_seconds": compile_seconds,
        "step_vs_plain_loop": med["ours"] / med["plain"],
    }
    for k in ("bf16_autocast", "channels_last", "compile"):
        if k in med:
            results[f"speedup_{k}"] = med["plain"] / med[k]
    rows = [("step_vs_plain_loop", f"{results['step_vs_plain_loop']:.3f}", "<= 1.02")]
    rows += [
        (f"speedup_{k}", f"{results[f'speedup_{k}']:.3f}", "(option alone)")
        for k in ("bf16_autocast", "channels_last", "compile")
        if f"speedup_{k}" in results
    ]
    print_table(rows)
    if compile_seconds is not None:
        print(f"torch.compile: first step (compilation) {compile_seconds:.1f} s")
    print(
        f"wrote {write_results('bench_train' + ('_tiny' if args.tiny else '_quick' if args.quick else ''), results)}"
    )


if __name__ == "__main__":
    main()
