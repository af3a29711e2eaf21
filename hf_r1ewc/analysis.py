"""Fisher geometry of a diffusion UNet at fixed timesteps (paper section 3.2, figures 1-3 and 6).

For n samples at one timestep t with per-sample gradients G (n x P), the empirical Fisher is F = G^T G / n. Nothing
P x P is ever formed: with the n x n Gram matrix K = G G^T (accumulated over parameter groups, so G never has to be
held whole) and the diagonal d = diag(F) = sum_j g_j^2 / n::

    eigenvalues of F       = eigenvalues of K / n
    ||F||_F^2              = ||K||_F^2 / n^2
    G mu                   = K 1 / n,       ||mu||^2 = 1^T K 1 / n^2,      mu^T F mu = ||G mu||^2 / n
    ||F - c* mu mu^T||_F^2 = ||F||^2 - 2 c* mu^T F mu + c*^2 ||mu||^4,     c* = mu^T F mu / ||mu||^4
    ||F - diag(F)||_F^2    = ||F||^2 - ||d||^2
    cos(g_i, mu)           = (G mu)_i / (sqrt(K_ii) ||mu||)

    python -m hf_r1ewc.analysis --checkpoint runs/x/task_01 --train_data_dir DIR --task 1 \
        --timesteps 100,200,...,900 --num_samples 1024 --output_dir analysis/
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from .fisher import forward_ad_safe, per_sample_losses
from .progress import progress_bar


def _parameter_groups(unet: nn.Module, num_samples: int, memory_bytes: float) -> list[list[str]]:
    """Split the trainable parameters into groups whose n x |group| float32 gradients fit in ``memory_bytes``."""
    budget = max(1, int(memory_bytes // (4 * num_samples)))
    groups, current, size = [], [], 0
    for name, p in unet.named_parameters():
        if not p.requires_grad:
            continue
        if current and size + p.numel() > budget:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += p.numel()
    if current:
        groups.append(current)
    return groups


def gram_and_diagonal(
    unet: nn.Module,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    chunk_size: int = 64,
    memory_bytes: float = 2e9,
    return_mean_gradient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """``K = G G^T`` (float64 ``[n, n]``), ``||d||^2`` (float64 scalar, d = diag(F)) and optionally mu, from
    per-sample gradients streamed in sample chunks and parameter groups (at most ``memory_bytes`` of gradients)."""
    n = noisy_images.shape[0]
    params = {k: v.detach() for k, v in unet.named_parameters() if v.requires_grad}
    device = next(iter(params.values())).device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    diag_sq = torch.zeros((), dtype=torch.float64, device=device)
    mean_grad = {} if return_mean_gradient else None
    with forward_ad_safe(unet):
        for group in _parameter_groups(unet, n, memory_bytes):
            frozen = {k: v for k, v in params.items() if k not in group}

            def loss_one(trainable, xi, ti, yi, ni):
                return per_sample_losses(unet, {**frozen, **trainable}, xi[None], ti[None], yi[None], ni[None])[0]

            rows = []
            for s in range(0, n, chunk_size):
                sl = slice(s, s + chunk_size)
                g = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(
                    {k: params[k] for k in group}, noisy_images[sl], timesteps[sl], class_labels[sl], noise[sl]
                )
                rows.append(torch.cat([g[k].flatten(1) for k in group], dim=1))
            G = torch.cat(rows)  # [n, |group|] float32
            gram += G.double() @ G.double().T
            diag_sq += (G.double().pow(2).sum(0) / n).pow(2).sum()
            if mean_grad is not None:
                offset = 0
                mean = G.double().mean(0)
                for k in group:
                    mean_grad[k] = mean[offset : offset + params[k].numel()].view_as(params[k]).float()
                    offset += params[k].numel()
    return gram, diag_sq, mean_grad


def geometry_from_gram(gram: torch.Tensor, diag_sq: torch.Tensor, top_k: int = 5) -> dict:
    """Every quantity of ``fisher_geometry`` from K and ||diag(F)||^2 (see the module docstring)."""
    n = gram.shape[0]
    ones = torch.ones(n, dtype=gram.dtype, device=gram.device)
    eig = torch.linalg.eigvalsh(gram / n).flip(0)  # descending
    fro_sq = gram.pow(2).sum() / n**2
    g_mu = gram @ ones / n
    mu_sq = ones @ gram @ ones / n**2
    mu_f_mu = g_mu.pow(2).sum() / n
    c_star = mu_f_mu / mu_sq**2
    rank1_err_sq = (fro_sq - 2 * c_star * mu_f_mu + c_star**2 * mu_sq**2).clamp_min(0)
    diag_err_sq = (fro_sq - diag_sq).clamp_min(0)
    cos = g_mu / (torch.diagonal(gram).clamp_min(1e-300).sqrt() * mu_sq.sqrt())
    top = eig[:top_k]
    return {
        "top_eigenvalues": [float(v) for v in top],
        "eigengap_ratio": float(eig[1] / eig[0]) if n > 1 else 0.0,
        "rel_frobenius_error_rank1": float(rank1_err_sq.sqrt() / fro_sq.sqrt()),
        "rel_frobenius_error_diag": float(diag_err_sq.sqrt() / fro_sq.sqrt()),
        "abs_cos_to_mean": [float(v) for v in cos.abs()],
        "c_star": float(c_star),
    }


def fisher_geometry(
    unet: nn.Module,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    top_k: int = 5,
    chunk_size: int = 64,
    memory_bytes: float = 2e9,
) -> dict:
    """Fisher geometry on exactly these n inputs (one timestep in the paper's use): ``top_eigenvalues``,
    ``eigengap_ratio`` (lambda2/lambda1), ``rel_frobenius_error_rank1`` (of c* mu mu^T), ``rel_frobenius_error_diag``,
    ``abs_cos_to_mean`` (per sample) and ``mse_scaled_identity`` (fig. 1: mean (x_t - sqrt(1 - abar_t) eps_hat)^2;
    needs ``unet.alphas_cumprod`` or uses the DDPM linear schedule)."""
    gram, diag_sq, _ = gram_and_diagonal(unet, noisy_images, timesteps, class_labels, noise, chunk_size, memory_bytes)
    out = geometry_from_gram(gram, diag_sq, top_k)
    out["mse_scaled_identity"] = scaled_identity_mse(unet, noisy_images, timesteps, class_labels)
    return out


@torch.no_grad()
def scaled_identity_mse(
    unet: nn.Module,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    alphas_cumprod: torch.Tensor | None = None,
) -> float:
    """mean over samples and pixels of (x_t - sqrt(1 - abar_t) eps_hat)^2 (paper fig. 1, Proposition 1)."""
    if alphas_cumprod is None:
        from .models import training_noise_scheduler

        alphas_cumprod = training_noise_scheduler().alphas_cumprod
    eps_hat = unet(noisy_images, timesteps, class_labels=class_labels).sample.float()
    scale = (1 - alphas_cumprod.to(noisy_images.device)[timesteps]).sqrt().view(-1, 1, 1, 1)
    return float((noisy_images.float() - scale * eps_hat).pow(2).mean())


def analyse_checkpoint(
    unet: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    top_k: int = 5,
    chunk_size: int = 64,
    memory_bytes: float = 2e9,
) -> dict:
    """Geometry at each timestep (fresh eps per sample, same x0) plus pairwise cos(mu_t, mu_s) (fig. 3a)."""
    from .models import training_noise_scheduler

    scheduler = training_noise_scheduler()
    device = next(unet.parameters()).device
    per_t, means = {}, {}
    for t in progress_bar(list(timesteps), desc="timesteps"):
        g = torch.Generator().manual_seed(seed * 1009 + t)
        noise = torch.randn(x0.shape, generator=g).to(device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
        x_t = scheduler.add_noise(x0.to(device), noise, tt)
        gram, diag_sq, mu = gram_and_diagonal(
            unet, x_t, tt, labels.to(device), noise, chunk_size, memory_bytes, return_mean_gradient=True
        )
        per_t[t] = geometry_from_gram(gram, diag_sq, top_k)
        per_t[t]["mse_scaled_identity"] = scaled_identity_mse(unet, x_t, tt, labels.to(device))
        means[t] = torch.cat([v.flatten().double() for v in mu.values()]).cpu()
    ts = list(timesteps)
    cos = [[float(means[a] @ means[b] / (means[a].norm() * means[b].norm())) for b in ts] for a in ts]
    return {"timesteps": ts, "per_timestep": per_t, "mean_gradient_cosine": cos, "num_samples": int(x0.shape[0])}


def plot_analysis(result: dict, output_dir: Path) -> None:
    """The figures of paper section 3.2 (figs. 1, 2, 3a-d) from ``analyse_checkpoint``'s result, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ts = result["timesteps"]
    per = [result["per_timestep"][t] for t in ts]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(ts, [p["mse_scaled_identity"] for p in per], marker="o")
    ax.set(xlabel="timestep t", ylabel="MSE(x_t, sqrt(1-abar) eps_hat)", title="fig. 1")
    fig.tight_layout()
    fig.savefig(output_dir / "fig1_scaled_identity_mse.png", dpi=120)
    plt.close(fig)

    cos = np.array([p["abs_cos_to_mean"] for p in per])
    side = int(math.ceil(math.sqrt(cos.shape[1])))
    fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 1.9))
    for ax, t, row in zip(np.atleast_1d(axes), ts, cos):
        padded = np.full(side * side, np.nan)
        padded[: len(row)] = row
        ax.imshow(padded.reshape(side, side), cmap="Reds", vmin=0, vmax=1)
        ax.set_title(f"t={t}", fontsize=7)
        ax.axis("off")
    fig.suptitle("fig. 2: |cos(g_i, mu)|", fontsize=8)
    fig.savefig(output_dir / "fig2_abs_cos_to_mean.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    im = axes[0].imshow(np.array(result["mean_gradient_cosine"]), cmap="viridis", vmin=-1, vmax=1)
    axes[0].set(
        xticks=range(len(ts)), xticklabels=ts, yticks=range(len(ts)), yticklabels=ts, title="(a) cos(mu_t, mu_s)"
    )
    axes[0].tick_params(labelsize=6)
    fig.colorbar(im, ax=axes[0])
    tops = np.array([p["top_eigenvalues"] for p in per])
    for j in range(tops.shape[1]):
        axes[1].semilogy(ts, tops[:, j], marker="o", label=f"lambda{j + 1}")
    axes[1].set(title="(b) top eigenvalues of F_t", xlabel="t")
    axes[1].legend(fontsize=6)
    axes[2].plot(ts, [p["eigengap_ratio"] for p in per], marker="o")
    axes[2].set(title="(c) lambda2 / lambda1", xlabel="t")
    axes[3].plot(ts, [p["rel_frobenius_error_rank1"] for p in per], marker="o", label="rank-1 c* mu mu^T")
    axes[3].plot(ts, [p["rel_frobenius_error_diag"] for p in per], marker="o", label="diagonal")
    axes[3].set(title="(d) ||F - F_hat||_F / ||F||_F", xlabel="t")
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(output_dir / "fig3_fisher_geometry.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_r1ewc.analysis``: the Fisher geometry of a task folder on its task's data."""
    from .data import images_to_model_input, load_labeled_images, parse_tasks
    from .hub import resolve_task_source
    from .pipeline import ClassConditionalPipeline

    p = argparse.ArgumentParser(
        prog="python -m hf_r1ewc.analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a task folder (or REPO_ID@REVISION)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset_name")
    src.add_argument("--train_data_dir")
    p.add_argument("--task", type=int, default=1, help="which task's training images (1-based)")
    p.add_argument("--classes_per_task", type=int, default=2)
    p.add_argument("--tasks", default=None)
    p.add_argument("--timesteps", default="100,200,300,400,500,600,700,800,900")
    p.add_argument("--num_samples", type=int, default=1024)
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--memory_gb", type=float, default=2.0, help="memory for per-sample gradients of one group")
    p.add_argument(
        "--resize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rescale the images to the model's resolution (default: as the run that wrote the folder "
        "did, from its training_state.json; else zero-pad)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    folder = resolve_task_source(args.checkpoint)
    unet = ClassConditionalPipeline.from_pretrained(folder).denoiser.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet.to(device)
    source = args.dataset_name or args.train_data_dir
    train = load_labeled_images(source, "train")
    tasks = parse_tasks(args.tasks, None if args.tasks else args.classes_per_task, train.classes)
    data = train.subset(tasks[args.task - 1])
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
    resolution = unet.config.sample_size
    resize = args.resize
    if resize is None:  # the images as the run trained on them
        state = Path(folder) / "training_state.json"
        resize = bool(json.loads(state.read_text()).get("run_config", {}).get("resize")) if state.exists() else False
    x0 = images_to_model_input(data.images[order], resolution if resolution != data.image_size else None, resize)
    result = analyse_checkpoint(
        unet,
        x0,
        data.labels[order],
        [int(t) for t in args.timesteps.split(",")],
        args.seed,
        args.top_k,
        args.chunk_size,
        args.memory_gb * 1e9,
    )
    result.update(
        checkpoint=str(args.checkpoint),
        task=args.task,
        classes=tasks[args.task - 1],
        num_parameters=sum(p.numel() for p in unet.parameters()),
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    plot_analysis(result, out)
    for t in result["timesteps"]:
        r = result["per_timestep"][t]
        print(
            f"t={t:4d}  lambda2/lambda1={r['eigengap_ratio']:.3f}  rank-1 err={r['rel_frobenius_error_rank1']:.3f}  "
            f"diag err={r['rel_frobenius_error_diag']:.3f}  median|cos|="
            f"{sorted(r['abs_cos_to_mean'])[len(r['abs_cos_to_mean']) // 2]:.3f}"
        )
    print(f"wrote {out / 'analysis.json'} and figures")


if __name__ == "__main__":
    main()
