"""Memory Aware Synapses (Aljundi et al. 2018) for a diffusion model.

At the end of task k, Omega_k,i = mean over the task's samples of |d/dtheta_i mean_pixels(eps_theta(x_t, t, y)^2)|:
the sensitivity of the squared output norm (pixel mean, as the loss) of each sample, taken per sample (explicit
per-sample gradients, not a batch gradient). Each sample's t ~ U{0..999} and eps are the Fisher's seeded draws (seed +
task index and the sample's index), so the estimate does not depend on batching or the process count. Omega sums
over tasks; the penalty is ``weight * sum_i Omega_i (theta_i - theta*_i)^2`` with theta* the last task's weights
(CLoG's weight 5)."""

from __future__ import annotations

import os

import torch
from diffusers import SchedulerMixin
from torch import nn
from torch.func import functional_call, grad, vmap

from ..fisher import forward_ad_safe, noised_batches, trainable_parameters
from ..progress import progress_bar
from .base import (
    ContinualMethod,
    Expected,
    SafetensorsFile,
    TaskEnd,
    load_task_file,
    parameter_parts,
    quadratic_penalty,
    refused,
    trainable_weights,
)


MAS_FILE = "mas.safetensors"  # Omega (summed over tasks 1..k) and theta*_k


def output_norm_sensitivity(
    model: nn.Module,
    noise_scheduler: SchedulerMixin,
    batches,
    seed: int,
    num_samples: int | None = None,
    reduce_sum=None,
    chunk_size: int = 64,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{name: [*shape]}`` float32: mean over samples of |grad_theta mean_pixels(eps_theta(x_t, t, y)^2)|, each
    sample's (t, eps) drawn from ``seed`` and its index (``fisher.noised_batches``); ``reduce_sum`` all-reduces the
    partial sums (None: one process)."""
    params = trainable_parameters(model)
    device, dtype = next(iter(params.values())).device, next(iter(params.values())).dtype
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0

    def one(p, xi, ti, yi):
        out = functional_call(model, p, (xi[None], ti[None]), {"class_labels": yi[None], "return_dict": False})[0]
        return out.float().pow(2).mean()

    was_training = model.training
    model.eval()
    try:
        with forward_ad_safe(model):
            stream = noised_batches(batches, noise_scheduler, device, dtype, num_samples, (0, 1000), seed)
            for x_t, t, y, _ in progress_bar(stream, desc="MAS importance", show=show_progress, leave=False):
                for i in range(0, x_t.shape[0], chunk_size):
                    s = slice(i, i + chunk_size)
                    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x_t[s], t[s], y[s])
                    for n, g in per_sample.items():
                        sums[n] += g.double().abs().sum(0)
                count += int(x_t.shape[0])
    finally:
        model.train(was_training)
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    if reduce_sum is not None:
        total = reduce_sum(total)
        sums = {n: reduce_sum(v) for n, v in sums.items()}
    if float(total) == 0:
        raise ValueError("no samples: MAS's importance needs at least one example")
    return {n: (v / total).float().cpu() for n, v in sums.items()}


class MAS(ContinualMethod):
    """MAS with penalty weight ``weight``; ``noise_scheduler``: the training schedule that noises the samples."""

    name = term = "mas"

    def __init__(self, noise_scheduler: SchedulerMixin, weight: float = 5.0) -> None:
        if not 0 <= weight < float("inf"):
            raise ValueError(f"the MAS weight must be finite and >= 0, got {weight}")
        self.noise_scheduler, self.weight = noise_scheduler, float(weight)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def label(self) -> str:
        return f"MAS (weight {self.weight:g})"

    def settings(self) -> dict:
        return {"mas_weight": self.weight}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.importance:
            return None
        return self.weight * quadratic_penalty(model, self.anchor, self.importance)

    def end_task(self, task: TaskEnd) -> dict:
        omega = output_norm_sensitivity(
            task.model,
            self.noise_scheduler,
            task.batches,
            task.seed + task.task_index,
            task.num_samples,
            task.reduce_sum(),
            show_progress=task.show_progress,
        )
        for name, value in omega.items():
            self.importance[name] = self.importance[name] + value if name in self.importance else value
        self.anchor = trainable_weights(task.model)
        return {"mas_importance_mean": float(torch.cat([v.flatten() for v in omega.values()]).mean())}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        return {MAS_FILE: SafetensorsFile(self.state_dict())}

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        try:
            self.load_state_dict(load_task_file(folder, MAS_FILE, "MAS's importances and anchor", expected), expected)
        except ValueError as err:
            raise refused(folder, MAS_FILE, err) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{n}": v for part in ("importance", "anchor") for n, v in getattr(self, part).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """Omega (>= 0: a mean of absolute gradients) and theta*, the model's shapes, finite; nothing before the
        first task ends."""
        parts = ["importance", "anchor"] if expected.finished else []
        loaded = parameter_parts(state, expected, parts, nonnegative=["importance"])
        self.importance, self.anchor = loaded.get("importance", {}), loaded.get("anchor", {})
