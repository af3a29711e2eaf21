"""Synaptic Intelligence (Zenke et al. 2017) for a diffusion model.

During task k, at every optimizer step that happened, omega_i += -g_i * dtheta_i, with g the gradient of the loss
WITHOUT SI's own penalty (the task's denoising loss and any replay or distillation terms composed with it; SI takes
no other weight penalty beside it) as backward left it (after DDP's all-reduce, before clipping), and dtheta the
step the optimizer actually took (Adam's, not -lr * g). At the task's end, with theta*_k its weights and theta*_{k-1}
those it started from, Omega_i += omega_i / ((theta*_k,i - theta*_{k-1},i)^2 + xi) and omega restarts at 0. The
penalty is ``weight * sum_i Omega_i (theta_i - theta*_k,i)^2`` (no 1/2; CLoG's weight 5, xi 0.01). omega changes at
every step, so checkpoints keep it (``changes_during_task``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import (
    ContinualMethod,
    Expected,
    SafetensorsFile,
    TaskEnd,
    TaskStart,
    load_task_file,
    parameter_parts,
    quadratic_penalty,
    refused,
    trainable_weights,
)


SI_FILE = "si.safetensors"  # Omega and theta*_k after task k


class SynapticIntelligence(ContinualMethod):
    """SI with penalty weight ``weight`` (c) and damping ``xi``."""

    name = term = "si"
    changes_during_task = True

    def __init__(self, weight: float = 5.0, xi: float = 0.01) -> None:
        if not 0 <= weight < float("inf") or not 0 < xi < float("inf"):
            raise ValueError(f"SI needs a finite weight >= 0 and xi > 0, got {weight} and {xi}")
        self.weight, self.xi = float(weight), float(xi)
        self.importance: dict[str, torch.Tensor] = {}  # Omega, summed over the finished tasks
        self.anchor: dict[str, torch.Tensor] = {}  # theta*_k of the last finished task
        self.omega: dict[str, torch.Tensor] = {}  # this task's path integral so far
        self.start: dict[str, torch.Tensor] = {}  # theta*_{k-1}: where this task started
        self._step: tuple[dict, dict] | None = None  # (g, theta before the step) between backward and the step

    def label(self) -> str:
        return f"SI (weight {self.weight:g}, xi {self.xi:g})"

    def settings(self) -> dict:
        return {"si_weight": self.weight, "si_xi": self.xi}

    def start_task(self, task: TaskStart) -> None:
        """theta*_{k-1} and a fresh omega (a resumed checkpoint then restores the omega it saved)."""
        self.start = trainable_weights(task.model)
        self.omega = {n: torch.zeros_like(w) for n, w in self.start.items()}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.importance:
            return None
        return self.weight * quadratic_penalty(model, self.anchor, self.importance)

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        """g = the gradient backward left minus SI's own penalty's (2 c Omega (theta - theta*)), and theta now."""
        grads, before = {}, {}
        for name, p in model.named_parameters():
            if name not in self.omega:
                continue
            g = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float().clone()
            if self.importance:
                own = (
                    2 * self.weight * self.importance[name].to(p.device) * (p.float() - self.anchor[name].to(p.device))
                )
                g -= own
            grads[name], before[name] = g, p.detach().float().clone()
        self._step = (grads, before)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        """omega += -g * (theta after - theta before): the step the optimizer took."""
        if self._step is None:
            return
        grads, before = self._step
        for name, p in model.named_parameters():
            if name in grads:
                omega = self.omega[name]
                omega -= (grads[name] * (p.detach().float() - before[name])).to(omega.device)
        self._step = None

    def end_task(self, task: TaskEnd) -> dict:
        """Omega += omega / ((theta*_k - theta*_{k-1})^2 + xi); theta*_k becomes the anchor; omega restarts."""
        if not self.start:
            raise ValueError("SI's end_task needs its start_task first: the weights the task started from")
        theta = trainable_weights(task.model)
        for name, w in theta.items():
            part = self.omega[name] / ((w - self.start[name]).pow(2) + self.xi)
            self.importance[name] = self.importance[name] + part if name in self.importance else part
        self.anchor, self.start = theta, dict(theta)
        self.omega = {n: torch.zeros_like(w) for n, w in theta.items()}
        return {}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        return {SI_FILE: SafetensorsFile(self._prefixed("importance", "anchor"))}

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        try:
            self.load_state_dict(load_task_file(folder, SI_FILE, "SI's importances and anchor", expected), expected)
        except ValueError as err:
            raise refused(folder, SI_FILE, err) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._prefixed("importance", "anchor", "omega", "start")

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """Omega and theta*_k once a task is finished; within a task (a checkpoint's state) also omega and the
        weights it started from. Each the model's shapes and finite (Omega may be negative: a path integral)."""
        parts = (["importance", "anchor"] if expected.finished else []) + (
            ["omega", "start"] if expected.within_task else []
        )
        loaded = parameter_parts(state, expected, parts)
        for part in ("importance", "anchor", "omega", "start"):
            setattr(self, part, loaded.get(part, {}))

    def _prefixed(self, *parts: str) -> dict[str, torch.Tensor]:
        return {f"{part}.{n}": v.contiguous() for part in parts for n, v in getattr(self, part).items()}
