"""Knowledge distillation / LwF for diffusion models: the frozen teacher theta*_{k-1} on the CURRENT real noisy batch,
``weight * mean_pixels (eps_theta(x_t, t, y) - eps_teacher(x_t, t, y))^2`` over the step's real rows. No replay, no
pool: the teacher sees exactly the x_t, t and y the student sees (CLoG's KD, weight 1)."""

from __future__ import annotations

import torch
from torch import nn

from ..distill import distillation_loss, frozen_teacher
from ..sharding import full_model_copy
from .base import ContinualMethod, Expected, StepForward, TaskStart, Term, compile_like_student


class KnowledgeDistillation(ContinualMethod):
    """Distil the previous task's model on the real batch with weight ``weight`` (nothing during task 1)."""

    name = term = "kd"

    def __init__(self, weight: float = 1.0) -> None:
        if not 0 <= weight < float("inf"):
            raise ValueError(f"the KD weight must be finite and >= 0, got {weight}")
        self.weight = float(weight)
        self.teacher: nn.Module | None = None

    def label(self) -> str:
        return f"KD on the real batch (weight {self.weight:g})"

    def settings(self) -> dict:
        return {"kd_weight": self.weight}

    def join(self, expected: Expected) -> str:
        return "its teacher is the model each task starts from (it keeps nothing across tasks)"

    def start_task(self, task: TaskStart) -> None:
        """The teacher: a frozen copy of theta*_{k-1} (whole weights; compiled as the student), from task 2 on."""
        model = full_model_copy(task.model)  # every process: an all-gather under FSDP
        self.teacher = compile_like_student(frozen_teacher(model), task.accelerator) if task.old_classes else None

    def loss_terms(self, step: StepForward) -> dict[str, Term]:
        if self.teacher is None or self.weight <= 0:
            return {}
        rows = step.slices["real"]
        with torch.no_grad():
            teacher_eps = self.teacher(step.noisy[rows], step.timesteps[rows], class_labels=step.labels[rows]).sample
        kd = distillation_loss(step.prediction[rows], teacher_eps)
        return {self.term: Term(self.weight * kd, kd.detach())}
