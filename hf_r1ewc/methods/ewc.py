"""EWC with the exact Fisher of a diffusion model: rank-1 (the paper's eq. 6, with or without c*) or diagonal.

At each task's end the Fisher statistics are estimated at theta*_k (``hf_r1ewc.fisher``, fp32, exact per-sample
gradients) and become one more term of ``EWCPenalty``. ``mode="loss"`` adds lambda * EWC(theta) to the loss (the
paper); ``mode="decoupled"`` leaves it out of the loss and applies the exact proximal step
theta <- argmin ½||theta - theta~||² + lr * lambda * EWC(theta) after each optimizer step that happened.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import SchedulerMixin
from torch import nn

from ..fisher import FisherStatistics, estimate_fisher, fisher_payload
from ..penalty import PENALTY_KINDS, EWCPenalty
from .base import (
    ContinualMethod,
    Expected,
    SafetensorsFile,
    TaskEnd,
    check_count,
    check_tensors,
    load_task_file,
    refused,
)


logger = logging.getLogger(__name__)
EWC_MODES = ("loss", "decoupled")
PENALTY_FILE = "ewc_penalty.safetensors"  # the penalty over tasks 1..k, in task folder k
FISHER_FILE = "fisher.safetensors"  # task k's own statistics


class EWC(ContinualMethod):
    """EWC of ``kind`` in ``PENALTY_KINDS`` with weight ``ewc_lambda``, in the loss or ``decoupled``.

    ``noise_scheduler``: the training schedule the Fisher's noising uses. ``penalty`` (an ``EWCPenalty``) holds the
    consolidated tasks; its statistics stay on the CPU between tasks and are bound to the model's device per task.
    """

    term = "ewc"
    changes_during_task = False

    def __init__(
        self, noise_scheduler: SchedulerMixin, kind: str = "rank1", ewc_lambda: float = 15000.0, mode: str = "loss"
    ) -> None:
        if mode not in EWC_MODES:
            raise ValueError(f"the EWC mode must be one of {EWC_MODES}, got {mode!r}")
        if kind not in PENALTY_KINDS:
            raise ValueError(f"unknown EWC kind {kind!r}; choose from {PENALTY_KINDS}")
        self.name, self.noise_scheduler, self.mode = kind, noise_scheduler, mode
        self.penalty_in_loss = mode == "loss"
        self.penalty_module = EWCPenalty(kind, ewc_lambda).to("cpu")
        self.last_statistics: FisherStatistics | None = None

    @property
    def ewc_lambda(self) -> float:
        return self.penalty_module.ewc_lambda

    def label(self) -> str:
        return f"{self.name} EWC (lambda={self.ewc_lambda:g}, {self.mode})"

    def settings(self) -> dict:
        return {"ewc_type": self.name, "ewc_lambda": self.ewc_lambda, "ewc_mode": self.mode}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """lambda * EWC(theta), or None before the first consolidated task."""
        return self.penalty_module(model) if self.penalty_module.num_tasks else None

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        if self.mode == "decoupled":
            self.penalty_module.proximal_step(model, lr)

    def end_task(self, task: TaskEnd) -> dict:
        """The task's Fisher at theta*_k (seeded by ``seed + task_index``) -> a new penalty term. Raises
        ``ValueError`` on a non-finite estimate, before the penalty takes it."""
        stats = estimate_fisher(
            task.model,
            self.noise_scheduler,
            task.batches,
            kinds=("diag",) if self.name == "diag" else ("rank1",),
            num_samples=task.num_samples,
            generator=torch.Generator().manual_seed(task.seed + task.task_index),
            reduce_sum=task.reduce_sum(),
            show_progress=task.show_progress,
        ).check_finite("the finished task's Fisher estimate")
        self.penalty_module.add_task(stats, task.model)
        self.penalty_module.to("cpu")
        self.last_statistics = stats
        mu = f"c* = {stats.c_star:.4g}, ||mu|| = {stats.mu_norm():.4g}" if stats.mu else "diagonal"
        if task.accelerator is None or task.accelerator.is_main_process:
            logger.info("Fisher after task %d: %s, N = %d", task.task_index, mu, stats.num_samples)
        return {"c_star": stats.c_star, "mu_norm": stats.mu_norm() if stats.mu else None}

    def task_files(self, task_index: int, classes: list[int]) -> dict[str, SafetensorsFile]:
        """``fisher.safetensors`` (task k's statistics) and ``ewc_penalty.safetensors`` (the penalty over 1..k)."""
        files = {PENALTY_FILE: SafetensorsFile({k: v.cpu() for k, v in self.penalty_module.state_dict().items()})}
        if self.last_statistics is not None:
            files[FISHER_FILE] = SafetensorsFile(*fisher_payload(self.last_statistics, task_index, classes))
        return files

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        """The penalty over tasks 1..``expected.finished`` from the folder, checked, at this method's lambda."""
        what = f"the EWC penalty over tasks 1...{expected.finished} that a {self.name} run continues from"
        ewc_lambda = self.ewc_lambda
        try:
            self.load_state_dict(load_task_file(folder, PENALTY_FILE, what, expected), expected)
        except ValueError as err:
            raise refused(folder, PENALTY_FILE, err) from None
        self.penalty_module.ewc_lambda = ewc_lambda

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.penalty_module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """The penalty's tensors (``EWCPenalty.state_dict``) of this kind, one term per finished task, the model's
        shapes, finite; c*, lambda and the diagonal Fisher >= 0."""
        k = check_count(state, "num_tasks", expected.finished, expected.finished)
        shapes: dict[str, tuple[int, ...]] = {"ewc_lambda": ()}
        if self.name == "diag":
            shapes |= {"constant": (), **(expected.prefixed("precision", "anchor") if k else {})}
            nonnegative = {"ewc_lambda", *expected.prefixed("precision")}
        else:
            shapes |= {"b": (k,), "c": (k,), "gram": (k, k)}
            shapes |= {f"mu.{n}": (k, *shape) for n, shape in expected.shapes.items()} if k else {}
            if any(key.startswith("theta_star.") for key in state):  # (files written before it was stored lack it)
                shapes |= expected.prefixed("theta_star")
            nonnegative = {"ewc_lambda", "c"}
        check_tensors({key: v for key, v in state.items() if key != "num_tasks"}, shapes, nonnegative)
        self.penalty_module.load_state_dict(state)
