"""Fisher estimation and EWC penalty speed, as ratios measured in one run.

    python benchmarks/bench_fisher.py [--quick] [--device cpu|cuda] [--paper_model] [--backbone unet|dit]

Keys written to benchmarks/results/bench_fisher.json (``--quick`` writes bench_fisher_quick.json, ``--backbone dit``
bench_fisher_dit.json: a pixel-space DiT of about the UNet's parameter count, 4 blocks of width 128 at 32x32):

* fisher_speedup_vs_fp64_loop: batch-size-1 float64 loop (the authors' approach; the loop keeps every per-sample
  gradient, its fastest form) over ``estimate_fisher`` for mu + c* + diag on the same N samples.
* fisher_cost_vs_epoch: ``estimate_fisher`` for mu + c* over one training epoch (Adam, same samples and batch).
* penalty_overhead_k1 / _k19: training step with the rank-1 penalty over the step without, minus 1;
  penalty_overhead_cat_k19: the same for a penalty that concatenates all parameters every step.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler


sys.path.insert(0, str(Path(__file__).parent))
from _common import dit, interleaved_medians, print_table, sync, unet, write_results  # noqa: E402

from hf_r1ewc.fisher import FisherStatistics, estimate_fisher  # noqa: E402
from hf_r1ewc.penalty import EWCPenalty  # noqa: E402


def fp64_loop(model, scheduler, x0, y, seed):
    """The reference: per-sample backward passes in float64, one sample at a time."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(x0.shape[0]):
        t = torch.randint(0, 1000, (1,), generator=g)
        eps = torch.randn((1, *x0.shape[1:]), generator=g).to(x0.device, torch.float64)
        x_t = scheduler.add_noise(x0[i : i + 1].double(), eps, t.to(x0.device))
        loss = (model(x_t, t.to(x0.device), class_labels=y[i : i + 1]).sample - eps).pow(2).mean()
        grads.append(torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, params)]))
    G = torch.stack(grads)
    mu = G.mean(0)
    c_star = float((G @ mu).pow(2).mean() / mu.norm() ** 4)
    diag = G.pow(2).mean(0)
    return mu, c_star, diag


def train_epoch(model, optimizer, scheduler, x0, y, batch_size, penalty=None):
    for start in range(0, x0.shape[0], batch_size):
        xb, yb = x0[start : start + batch_size], y[start : start + batch_size]
        eps = torch.randn_like(xb)
        t = torch.randint(0, 1000, (xb.shape[0],), device=xb.device)
        loss = (model(scheduler.add_noise(xb, eps, t), t, class_labels=yb).sample - eps).pow(2).mean()
        if penalty is not None:
            loss = loss + penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class ConcatPenalty:
    """The common baseline: flatten all parameters with torch.cat at every step, then K dot products."""

    def __init__(self, mus, theta_stars, c):
        self.U = torch.stack(mus)  # [K, P]
        self.b = torch.stack([(m * t).sum() for m, t in zip(mus, theta_stars)])
        self.c, self.lam = c, 15000.0

    def __call__(self, model):
        theta = torch.cat([p.flatten() for p in model.parameters()])
        return 0.5 * self.lam * (self.c * (self.U @ theta - self.b).pow(2)).sum()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and N: under a minute on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of every part, for the tests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paper_model", action="store_true", help="the paper's 34M-parameter UNet (GPU)")
    parser.add_argument(
        "--backbone",
        choices=["unet", "dit"],
        default="unet",
        help="dit: a DiTTransformer2DModel (1.2M parameters; 0.3M with --quick) instead of the UNet",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        model_kw, n, batch, repeats = dict(block_out_channels=(8, 8, 8)), 8, 4, 1
    elif args.backbone == "dit":
        model_kw, n, batch, repeats = (
            (dict(num_layers=2, width=64), 64, 32, 3) if args.quick else (dict(num_layers=4, width=128), 256, 128, 3)
        )
    elif args.paper_model:
        model_kw, n, batch, repeats = dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2), 256, 128, 3
    elif args.quick:
        model_kw, n, batch, repeats = dict(block_out_channels=(16, 32, 32)), 64, 32, 3
    else:
        model_kw, n, batch, repeats = dict(block_out_channels=(32, 64, 64)), 256, 128, 3
    model = (dit if args.backbone == "dit" else unet)(**model_kw).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = [(x0[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    print(f"{type(model).__name__} {model_kw}: {num_params / 1e6:.2f}M parameters, N={n}, batch {batch}, {device}")

    def ours(kinds):
        return lambda: estimate_fisher(
            model, scheduler, loader, kinds=kinds, show_progress=False, chunk_size=32 if device.type == "cpu" else 128
        )

    # 1) against the float64 loop (one measurement each: the loop is long and steady)
    times = {}
    for name, fn in (("ours", ours(("rank1", "diag"))), ("fp64_loop", lambda: fp64_loop(model, scheduler, x0, y, 0))):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times[name] = time.perf_counter() - start
    results = {
        "backbone": type(model).__name__,
        "num_params": num_params,
        "num_samples": n,
        "batch_size": batch,
        "device": str(device),
        "fisher_seconds": times["ours"],
        "fp64_loop_seconds": times["fp64_loop"],
        "fisher_speedup_vs_fp64_loop": times["fp64_loop"] / times["ours"],
    }

    # 2) mu + c* against one training epoch
    train_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(train_model.parameters(), lr=2e-4)
    med = interleaved_medians(
        {
            "rank1": ours(("rank1",)),
            "epoch": lambda: train_epoch(train_model, optimizer, scheduler, x0, y, batch),
        },
        repeats,
        device,
    )
    results.update(
        fisher_rank1_seconds=med["rank1"], epoch_seconds=med["epoch"], fisher_cost_vs_epoch=med["rank1"] / med["epoch"]
    )

    # 3) penalty overhead on a training step
    def penalty_with(k):
        penalty = EWCPenalty("rank1", 15000.0)
        names = [n for n, _ in train_model.named_parameters()]
        for task in range(k):
            gen = torch.Generator().manual_seed(100 + task)
            mu = {
                n: (torch.randn(p.shape, generator=gen) * 1e-4).to(device) for n, p in train_model.named_parameters()
            }
            penalty.add_task(
                FisherStatistics(mu, None, 1.0, 1), {n: p.detach() for n, p in train_model.named_parameters()}
            )
        assert len(names) == len(penalty.terms.mu)
        return penalty

    p1, p19 = penalty_with(1), penalty_with(19)
    flat = [torch.cat([p19.terms.mu[n][k].flatten() for n, _ in train_model.named_parameters()]) for k in range(19)]
    theta = torch.cat([p.detach().flatten() for p in train_model.parameters()])
    cat19 = ConcatPenalty(flat, [theta] * 19, torch.ones(19, device=device))
    step_x, step_y = x0[:batch], y[:batch]
    steps = {
        "none": lambda: train_epoch(train_model, optimizer, scheduler, step_x, step_y, batch),
        "k1": lambda: train_epoch(train_model, optimizer, scheduler, step_x, step_y, batch, p1),
        "k19": lambda: train_epoch(train_model, optimizer, scheduler, step_x, step_y, batch, p19),
        "cat_k19": lambda: train_epoch(train_model, optimizer, scheduler, step_x, step_y, batch, cat19),
    }
    med = interleaved_medians(steps, repeats * 2 + 1, device)
    results.update(
        step_seconds=med,
        penalty_overhead_k1=med["k1"] / med["none"] - 1,
        penalty_overhead_k19=med["k19"] / med["none"] - 1,
        penalty_overhead_cat_k19=med["cat_k19"] / med["none"] - 1,
    )
    targets = {
        "fisher_speedup_vs_fp64_loop": ">= 1.3 (CPU), >= 20 (GPU, paper model)",
        "fisher_cost_vs_epoch": "<= 2.5",
        "penalty_overhead_k1": "<= 0.03",
        "penalty_overhead_k19": "<= 0.03",
        "penalty_overhead_cat_k19": "(baseline)",
    }
    print_table([(k, f"{results[k]:.3f}", targets[k]) for k in targets])
    name = (
        "bench_fisher"
        + ("_dit" if args.backbone == "dit" else "")
        + ("_paper_model" if args.paper_model else "_tiny" if args.tiny else "_quick" if args.quick else "")
    )
    print(f"wrote {write_results(name, results)}")


if __name__ == "__main__":
    main()
