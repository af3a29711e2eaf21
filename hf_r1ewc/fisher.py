"""Exact rank-1 and diagonal empirical Fisher statistics of a diffusion UNet's denoising loss.

Per-sample loss (the authors' normalisation, kept so that the paper's lambda carries over)::

    l_i(theta) = mean over pixels of (eps_i - eps_theta(x_t_i, t_i, y_i))^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

with one uniform t and one eps per sample. With g_i = grad_theta l_i, over N samples::

    mu   = (1/N) sum_i g_i                      (exactly the gradient of the batch-mean loss: one backward pass)
    c*   = (1/N) sum_i (mu^T g_i)^2 / ||mu||^4   (every mu^T g_i from ONE batched forward-mode JVP along mu)
    diag = (1/N) sum_i g_i * g_i                 (vmapped per-sample gradients, in chunks; never a squared batch mean)

Sums are accumulated in float64 and are mergeable (``FisherSums``), so processes can all-reduce them. Estimation
runs the UNet in float32 with a forward-AD-safe attention processor (the fused SDPA kernel has no forward-AD
formula) and contiguous GroupNorm inputs (group_norm's forward AD rejects the non-contiguous tangent that follows
the skip-connection concatenation); both are undone afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from diffusers import SchedulerMixin
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .progress import progress_bar


KINDS = ("rank1", "diag")
LOSS_NORMALIZATION = "mean_over_pixels"


@dataclass
class FisherStatistics:
    """Fisher statistics of one task. ``mu`` and ``diag`` map parameter names (as in ``named_parameters()``) to
    float32 tensors of the parameter's shape; ``c_star`` is E[(mu^T g)^2] / ||mu||^4."""

    mu: dict[str, torch.Tensor] | None
    diag: dict[str, torch.Tensor] | None
    c_star: float | None
    num_samples: int
    timestep_range: tuple[int, int] = (0, 1000)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The statistics present: ("rank1",), ("diag",) or both."""
        return tuple(k for k, v in (("rank1", self.mu), ("diag", self.diag)) if v is not None)

    def check_finite(self, source: str) -> "FisherStatistics":
        """Raise ``ValueError`` naming ``source`` if c* or any value of mu or diag is NaN or infinite; else self."""
        bad = {
            f"{kind} {name}": int((~torch.isfinite(v)).sum())
            for kind, store in (("mu", self.mu), ("diag", self.diag))
            for name, v in (store or {}).items()
            if not bool(torch.isfinite(v).all())
        }
        if self.c_star is not None and not math.isfinite(self.c_star):
            bad["c*"] = 1
        if bad:
            total = sum(bad.values())
            raise ValueError(
                f"{source}: {total} non-finite Fisher values ({', '.join(list(bad)[:3])}"
                f"{' ...' if len(bad) > 3 else ''}): the weights or losses they were estimated from "
                f"were not finite, or the file is damaged; a penalty built on them would be NaN"
            )
        return self

    def mu_norm(self) -> float:
        """||mu||_2 over all parameters (float64 sum); 0 without rank-1 statistics."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.mu.values())) if self.mu else 0.0


@dataclass
class FisherSums:
    """Mergeable float64 partial sums over samples: add two (or all-reduce each field) to merge processes."""

    count: int = 0
    grad_sum: dict[str, torch.Tensor] | None = None  # sum_i g_i
    proj_sq_sum: float = 0.0  # sum_i (mu^T g_i)^2, for a fixed mu
    grad_sq_sum: dict[str, torch.Tensor] | None = None  # sum_i g_i * g_i

    def all_reduce(
        self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str
    ) -> "FisherSums":
        """Sum every field across processes with ``reduce_sum`` (e.g. ``lambda t: accelerator.reduce(t, "sum")``).
        Every reduced tensor lives on ``device``, the parameters' device (NCCL reduces GPU tensors only)."""

        def reduce_dict(d):
            return None if d is None else {k: reduce_sum(v.to(device)) for k, v in d.items()}

        scalars = reduce_sum(torch.tensor([float(self.count), self.proj_sq_sum], dtype=torch.float64, device=device))
        return FisherSums(
            int(round(float(scalars[0]))), reduce_dict(self.grad_sum), float(scalars[1]), reduce_dict(self.grad_sq_sum)
        )


# ----------------------------------------------------------------------------------------- model plumbing


@contextlib.contextmanager
def fp32_forward(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` runs in its own dtype whatever the training precision: Accelerate's autocast wrapper
    (an instance-level ``forward`` that ``prepare`` installs and ``unwrap_model`` keeps by default, once per
    ``prepare``) is set aside and autocast is disabled; both are restored after."""
    wrapped = model.__dict__.pop("forward", None)
    device_type = next(model.parameters()).device.type
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        if wrapped is not None:
            model.forward = wrapped


@contextlib.contextmanager
def without_gradient_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Within the block a diffusers model runs without activation checkpointing (``torch.func``'s transforms do not
    support its saved-tensor hooks); restored after. The gradients are the same either way."""
    checkpointed = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True


@contextlib.contextmanager
def forward_ad_safe(unet: nn.Module) -> Iterator[None]:
    """Within the block the UNet supports forward-mode AD and vmap: plain attention, contiguous GroupNorm inputs,
    float32 (``fp32_forward``), no activation checkpointing."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    saved_processors = [m.processor for m in attention]
    for module in attention:
        module.set_processor(AttnProcessor())
    hooks = [
        module.register_forward_pre_hook(_contiguous_input)
        for module in unet.modules()
        if isinstance(module, nn.GroupNorm)
    ]
    try:
        with fp32_forward(unet), without_gradient_checkpointing(unet):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, processor in zip(attention, saved_processors):
            module.set_processor(processor)


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple:
    # A copy (not .contiguous(), a no-op on a contiguous primal) gives the tangent a contiguous layout too.
    return (args[0].clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def trainable_parameters(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Detached views of the parameters that require grad, keyed as in ``named_parameters()``."""
    return {name: p.detach() for name, p in unet.named_parameters() if p.requires_grad}


def per_sample_losses(
    unet: nn.Module,
    params: dict[str, torch.Tensor],
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` pixel-mean squared errors of the noise prediction, computed with ``params`` substituted."""
    pred = functional_call(
        unet, params, (noisy_images, timesteps), {"class_labels": class_labels, "return_dict": False}
    )[0]
    return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def _batch_grad_sum(unet, x_t, t, y, noise) -> dict[str, torch.Tensor]:
    """sum_i g_i over the batch: one ordinary backward pass of the summed loss (plain autograd on the module's own
    parameters is several times faster on CPU than ``torch.func.grad`` over ``functional_call``)."""
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    pred = unet(x_t, t, class_labels=y, return_dict=False)[0]
    total = (pred.float() - noise.float()).pow(2).flatten(1).mean(1).sum()
    grads = torch.autograd.grad(total, [p for _, p in named])
    return {n: g for (n, _), g in zip(named, grads)}


def _projections(unet, params, mu, x_t, t, y, noise) -> torch.Tensor:
    """``[B]`` float64 mu^T g_i from one forward-mode JVP of the per-sample losses along ``mu``."""
    tangent = {name: mu[name].to(params[name].dtype) for name in params}
    _, directional = jvp(lambda p: per_sample_losses(unet, p, x_t, t, y, noise), (params,), (tangent,))
    return directional.double()


def _per_sample_grads(unet, params, x_t, t, y, noise) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` per-sample gradients by ``vmap(grad(.))``."""

    def one(p, xi, ti, yi, ni):
        return per_sample_losses(unet, p, xi[None], ti[None], yi[None], ni[None])[0]

    return vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, x_t, t, y, noise)


def _chunks(batch_size: int, chunk_size: int | None) -> Iterable[slice]:
    step = chunk_size or batch_size
    return (slice(i, min(i + step, batch_size)) for i in range(0, batch_size, step))


def accumulate_first_pass(
    unet: nn.Module, sums: FisherSums, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: torch.Tensor
) -> None:
    """Pass 1: add sum_i g_i of this batch to ``sums`` (float64)."""
    batch = _batch_grad_sum(unet, x_t, t, y, noise)
    if sums.grad_sum is None:
        sums.grad_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in batch.items()}
    for k, v in batch.items():
        sums.grad_sum[k] += v
    sums.count += int(x_t.shape[0])


def accumulate_second_pass(
    unet: nn.Module,
    params: dict[str, torch.Tensor],
    mu: dict[str, torch.Tensor],
    sums: FisherSums,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    kinds: Sequence[str],
    chunk_size: int | None = None,
) -> None:
    """Pass 2 with mu fixed: add sum_i (mu^T g_i)^2 (if rank1) and sum_i g_i*g_i (if diag) to ``sums``."""
    if "diag" in kinds:
        if sums.grad_sq_sum is None:
            sums.grad_sq_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
        for s in _chunks(x_t.shape[0], chunk_size):
            per_sample = _per_sample_grads(unet, params, x_t[s], t[s], y[s], noise[s])
            if "rank1" in kinds:  # the per-sample gradients are at hand: project them instead of a JVP
                proj = sum((g.flatten(1).double() @ mu[k].flatten().double()) for k, g in per_sample.items())
                sums.proj_sq_sum += float(proj.pow(2).sum())
            for k, g in per_sample.items():
                sums.grad_sq_sum[k] += g.double().pow(2).sum(0)
    elif "rank1" in kinds:
        for s in _chunks(x_t.shape[0], chunk_size):
            sums.proj_sq_sum += float(_projections(unet, params, mu, x_t[s], t[s], y[s], noise[s]).pow(2).sum())


def _mean(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: (v / count).float() for k, v in sums.items()}


def finalize(sums: FisherSums, kinds: Sequence[str], timestep_range: tuple[int, int] = (0, 1000)) -> FisherStatistics:
    """Turn the merged sums of both passes into ``FisherStatistics``."""
    if sums.count == 0:
        raise ValueError("no samples: the Fisher estimate needs at least one example")
    mu64 = {k: v / sums.count for k, v in sums.grad_sum.items()}
    mu_norm_sq = sum(float(v.pow(2).sum()) for v in mu64.values())
    c_star = None
    if "rank1" in kinds:
        c_star = (sums.proj_sq_sum / sums.count) / mu_norm_sq**2 if mu_norm_sq > 0 else 0.0
    return FisherStatistics(
        mu={k: v.float() for k, v in mu64.items()} if "rank1" in kinds else None,
        diag=_mean(sums.grad_sq_sum, sums.count) if "diag" in kinds else None,
        c_star=c_star,
        num_samples=sums.count,
        timestep_range=tuple(timestep_range),
    )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown Fisher kinds {unknown or kinds}; choose from {KINDS}")
    return kinds


def fisher_statistics(
    unet: nn.Module,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    kinds: Sequence[str] = KINDS,
    chunk_size: int | None = None,
) -> FisherStatistics:
    r"""Exact Fisher statistics on exactly these B noised samples, with :math:`g_i = \nabla_\theta l_i`:

    .. math::

        \mu = \frac{1}{B}\sum_i g_i, \qquad c^* = \frac{1}{B}\sum_i \frac{(\mu^\top g_i)^2}{\|\mu\|^4},
        \qquad \mathrm{diag} = \frac{1}{B}\sum_i g_i \odot g_i

    Args:
        unet: the denoiser, called as ``unet(x_t, t, class_labels=y).sample``; its trainable parameters define θ.
        noisy_images: ``[B, C, H, W]`` x_t; timesteps: ``[B]``; class_labels: ``[B]``; noise: ``[B, C, H, W]`` ε.
        kinds: which statistics: ``"rank1"`` (μ, c*) and/or ``"diag"``.
        chunk_size: samples per vmap/JVP call (bounds memory); None: all at once.

    Returns:
        ``FisherStatistics`` in float32 (sums kept in float64), keyed like ``named_parameters()``.
    """
    kinds = _check_kinds(kinds)
    params = trainable_parameters(unet)
    sums = FisherSums()
    with fp32_forward(unet):
        accumulate_first_pass(unet, sums, noisy_images, timesteps, class_labels, noise)
        mu = {k: (v / sums.count).to(params[k].dtype) for k, v in sums.grad_sum.items()}
        with forward_ad_safe(unet):
            accumulate_second_pass(
                unet, params, mu, sums, noisy_images, timesteps, class_labels, noise, kinds, chunk_size
            )
    return finalize(sums, kinds)


def subset_indices(num_examples: int, num_samples: int | None, seed: int) -> torch.Tensor:
    """``[min(num_samples, num_examples)]`` sorted indices of a seeded uniform subset (all when ``num_samples`` is
    None): the same subset on every process count, never the first N of a class-sorted source."""
    if num_samples is None or num_samples >= num_examples:
        return torch.arange(num_examples)
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values


def sample_noise(
    index: int, seed: int, shape: Sequence[int], timestep_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, eps) of the sample with global ``index``: drawn from its own seed, so that the draws do not depend on
    batching or on how the samples are sharded across processes."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    t = torch.randint(timestep_range[0], timestep_range[1], (1,), generator=generator)
    return t, torch.randn(tuple(shape), generator=generator)


def noised_batches(
    dataloader: Iterable,
    noise_scheduler: SchedulerMixin,
    device: torch.device,
    dtype: torch.dtype,
    num_samples: int | None,
    timestep_range: tuple[int, int],
    seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x_t, t, y, eps)`` per batch. Batches are ``(x0, y)`` or ``(x0, y, global_index)`` (or dicts with keys
    ``pixel_values``, ``class_labels``, ``index``); without indices, samples are numbered in loader order."""
    seen = 0
    for batch in dataloader:
        if isinstance(batch, dict):
            x0, y, index = batch["pixel_values"], batch["class_labels"], batch.get("index")
        else:
            x0, y, index = batch[0], batch[1], batch[2] if len(batch) > 2 else None
        if index is None:
            index = torch.arange(seen, seen + x0.shape[0])
        if num_samples is not None:
            if seen >= num_samples:
                return
            x0, y, index = x0[: num_samples - seen], y[: num_samples - seen], index[: num_samples - seen]
        seen += x0.shape[0]
        draws = [sample_noise(int(i), seed, x0.shape[1:], timestep_range) for i in index]
        t = torch.cat([d[0] for d in draws])
        eps = torch.stack([d[1] for d in draws])
        x0, t, y, eps = x0.to(device, dtype), t.to(device), y.to(device), eps.to(device, dtype)
        yield noise_scheduler.add_noise(x0, eps, t), t, y, eps


def estimate_fisher(
    unet: nn.Module,
    noise_scheduler: SchedulerMixin,
    dataloader: Iterable,
    kinds: Sequence[str] = KINDS,
    num_samples: int | None = None,
    timestep_range: tuple[int, int] = (0, 1000),
    generator: torch.Generator | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = 64,
    show_progress: bool = True,
) -> FisherStatistics:
    """Exact Fisher statistics over a task's samples in two passes over ``dataloader`` (μ, then c* and diag; the
    formulas of ``fisher_statistics``), with the loss in float32 whatever precision the model trained in.

    Args:
        unet: the trained denoiser (put in eval mode for the passes, restored after).
        noise_scheduler: the training (DDPM) schedule that noises x0 into x_t.
        dataloader: yields ``(pixel_values [B, C, H, W] in [-1, 1], class_labels [B][, global_index [B]])``.
        kinds: ``"rank1"`` and/or ``"diag"``; num_samples: cap on this process's samples.
        timestep_range: t ~ U{lo, ..., hi - 1}; generator: its seed seeds every sample's (t, ε).
        reduce_sum: all-reduce of the partial sums across processes (None: one process).
        chunk_size: samples per vmap/JVP call; show_progress: a progress bar per pass.

    Returns:
        The global ``FisherStatistics`` on every process.

    The loader must yield ``(pixel_values, class_labels[, global_index])`` (or dicts) in the same order on both
    passes (no shuffling). t ~ U{timestep_range[0], ..., timestep_range[1] - 1} and eps ~ N(0, I) are drawn per
    sample from ``generator``'s seed and the sample's global index (``sample_noise``), so processes that each hold
    a shard with its global indices reproduce the one-process draws. ``num_samples`` caps this process's samples. ``reduce_sum`` all-reduces
    the partial sums across processes (identity when None), so every process ends with the global estimate.
    """
    kinds = _check_kinds(kinds)
    if not 0 <= timestep_range[0] < timestep_range[1] <= noise_scheduler.config.num_train_timesteps:
        raise ValueError(
            f"timestep_range {timestep_range} must lie in [0, {noise_scheduler.config.num_train_timesteps}]"
        )
    seed = int(generator.initial_seed()) if generator is not None else 0
    reduce_sum = reduce_sum or (lambda tensor: tensor)
    params = trainable_parameters(unet)
    device, dtype = next(iter(params.values())).device, next(iter(params.values())).dtype

    def batches(desc: str):
        stream = noised_batches(dataloader, noise_scheduler, device, dtype, num_samples, timestep_range, seed)
        try:
            total = len(dataloader) if num_samples is None else None
        except TypeError:  # a one-pass stream
            total = None
        return progress_bar(stream, desc=desc, total=total, show=show_progress, leave=False, unit="batch")

    was_training = unet.training
    unet.eval()
    try:
        with fp32_forward(unet), without_gradient_checkpointing(unet):
            first = FisherSums()
            labels_first = []
            for x_t, t, y, eps in batches("Fisher pass 1/2 (mean gradient)"):
                accumulate_first_pass(unet, first, x_t, t, y, eps)
                labels_first.append(y.cpu())
            first = first.all_reduce(reduce_sum, device)
            mu = {k: (v / first.count).to(dtype) for k, v in first.grad_sum.items()}
            second = FisherSums(count=first.count, grad_sum=first.grad_sum)
            labels_second = []
            with forward_ad_safe(unet):
                for x_t, t, y, eps in batches("Fisher pass 2/2 (" + " + ".join(kinds) + ")"):
                    accumulate_second_pass(unet, params, mu, second, x_t, t, y, eps, kinds, chunk_size)
                    labels_second.append(y.cpu())
        if not torch.equal(torch.cat(labels_first), torch.cat(labels_second)):
            raise ValueError(
                "the dataloader yielded different samples on the two Fisher passes; pass a loader without shuffling"
            )
        local = FisherSums(proj_sq_sum=second.proj_sq_sum, grad_sq_sum=second.grad_sq_sum)
        reduced = local.all_reduce(reduce_sum, device)
        merged = FisherSums(first.count, first.grad_sum, reduced.proj_sq_sum, reduced.grad_sq_sum)
    finally:
        unet.train(was_training)
    return finalize(merged, kinds, timestep_range)


# ------------------------------------------------------------------------------------------------ file format


def fisher_payload(
    stats: FisherStatistics,
    task_index: int | None = None,
    classes: Sequence[int] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``fisher.safetensors``'s content: (tensors ``mu.<param>`` / ``diag.<param>`` float32 on the CPU, string
    metadata: kinds, c*, sample count, timestep range, loss normalisation, task index and classes)."""
    import json

    from . import __version__

    tensors = {}
    for prefix, store in (("mu", stats.mu), ("diag", stats.diag)):
        for name, value in (store or {}).items():
            tensors[f"{prefix}.{name}"] = value.detach().float().cpu().contiguous()
    metadata = {
        **stats.metadata,
        **(extra_metadata or {}),
        "kinds": ",".join(stats.kinds),
        "c_star": json.dumps(stats.c_star),
        "num_samples": str(stats.num_samples),
        "timestep_range": json.dumps(list(stats.timestep_range)),
        "loss_normalization": LOSS_NORMALIZATION,
        "task_index": json.dumps(task_index),
        "classes": json.dumps(list(classes) if classes is not None else None),
        "hf_r1ewc_version": __version__,
    }
    return tensors, metadata


def save_fisher(
    path: str,
    stats: FisherStatistics,
    task_index: int | None = None,
    classes: Sequence[int] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write ``fisher.safetensors`` (``fisher_payload``) atomically."""
    import os

    from safetensors.torch import save_file

    tensors, metadata = fisher_payload(stats, task_index, classes, extra_metadata)
    tmp = f"{path}.{os.getpid()}.tmp"  # unique per process: runs may share a folder
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_fisher(path: str, model: nn.Module | None = None, device: str | torch.device = "cpu") -> FisherStatistics:
    """Read ``fisher.safetensors``; with ``model``, check every name and shape against its trainable parameters.
    Inside a task folder the file is first checked against the SHA-256 that ``training_state.json`` records."""
    import json

    from safetensors import SafetensorError, safe_open

    from .integrity import DIGESTS_KEY, verify_folder

    state_file = Path(path).parent / "training_state.json"
    if state_file.exists():
        digests = json.loads(state_file.read_text()).get(DIGESTS_KEY, {})
        if Path(path).name in digests:
            verify_folder(Path(path).parent, digests, only=(Path(path).name,))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot read Fisher file {path}: {err}. The file is truncated or corrupt; "
            f"re-estimate it or copy it again."
        ) from err
    for key in ("kinds", "c_star", "num_samples", "loss_normalization"):
        if key not in metadata:
            raise ValueError(f"{path} is not an hf_r1ewc Fisher file: metadata key {key!r} is missing")
    if metadata["loss_normalization"] != LOSS_NORMALIZATION:
        raise ValueError(
            f"{path} was estimated with loss normalisation {metadata['loss_normalization']!r}, "
            f"this version uses {LOSS_NORMALIZATION!r}"
        )
    kinds = [k for k in metadata["kinds"].split(",") if k]
    stores = {
        kind: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        for kind, prefix in (("rank1", "mu"), ("diag", "diag"))
    }
    if model is not None:
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        for kind in kinds:
            found = {n: tuple(v.shape) for n, v in stores[kind].items()}
            missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
            if missing or unexpected or wrong:
                detail = "; ".join(
                    f"{label}: {names[:3]}{' ...' if len(names) > 3 else ''}"
                    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if names
                )
                raise ValueError(
                    f"{path} does not match this model ({kind} statistics) — {detail}. "
                    f"Was it estimated for another UNet config?"
                )
    known = {"kinds", "c_star", "num_samples", "timestep_range", "loss_normalization"}
    stats = FisherStatistics(
        mu=stores["rank1"] if "rank1" in kinds else None,
        diag=stores["diag"] if "diag" in kinds else None,
        c_star=json.loads(metadata["c_star"]),
        num_samples=int(metadata["num_samples"]),
        timestep_range=tuple(json.loads(metadata.get("timestep_range", "[0, 1000]"))),
        metadata={k: v for k, v in metadata.items() if k not in known},
    )
    return stats.check_finite(str(path))
