"""Generative replay and distillation (the paper's section 3.4): a frozen teacher, its replay, the distillation term.

At the start of task k a frozen copy of the model (the teacher, theta*_{k-1}) generates replay of the old classes:
a pool written in seeded chunks under ``scratch_dir`` (``pool="regenerate"``: every old class again, as the paper;
``"accumulate"``: only task k-1's classes, older ones keep the images sampled right after their own task), or, with
``online_steps``, a fresh few-step batch every step (Masip et al.). Each step's replay batch joins the student's one
forward; it joins the denoising loss (generative replay, as the authors' code) unless ``replay_in_denoise`` is False,
and ``distill_weight`` > 0 adds ``distill_weight * mean_pixels (eps_student(x~_t) - eps_teacher(x~_t))^2`` on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SchedulerMixin
from torch import nn

from ..distill import ReplayPool, distillation_loss, frozen_teacher, online_replay_batch
from ..sharding import full_model_copy
from .base import (
    ContinualMethod,
    Expected,
    ExtraBatch,
    StepForward,
    TaskStart,
    Term,
    compile_like_student,
    task_folder_name,
)


POOL_MODES = ("regenerate", "accumulate")


@dataclass
class Replay:
    """Where a step's replay batch comes from: the teacher's ``pool``, or (``pool`` None) fresh online samples."""

    teacher: nn.Module
    classes: list[int]
    pool: ReplayPool | None = None
    sampler: SchedulerMixin | None = None  # the sampling scheduler of online replay
    online_steps: int = 2

    def batch(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 ``[B, C, H, W]`` in [-1, 1], labels ``[B]``) on ``device``."""
        if self.pool is not None:
            return self.pool.sample(batch_size, generator, device)
        images, labels = online_replay_batch(
            self.teacher, self.sampler, self.classes, batch_size, self.online_steps, generator
        )
        return images.to(device), labels.to(device)


class GenerativeDistillation(ContinualMethod):
    """Replay from a frozen teacher (``per_class`` pool images per old class, sampled with ``num_inference_steps``
    steps) plus distillation on it with weight ``distill_weight`` (0: generative replay alone). ``batch_size``:
    replay images per step (None: the real batch's size)."""

    name = "gd"
    term = "distill"

    def __init__(
        self,
        per_class: int | None = None,
        distill_weight: float = 1.0,
        num_inference_steps: int = 50,
        pool: str = "regenerate",
        online_steps: int | None = None,
        batch_size: int | None = None,
        replay_in_denoise: bool = True,
    ) -> None:
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        if online_steps is None and (per_class is None or per_class < 1):
            raise ValueError(f"a replay pool needs per_class >= 1 images per class, got {per_class}")
        if pool == "accumulate" and online_steps is not None:
            raise ValueError("an accumulated pool keeps pool images; online replay has no pool")
        if not distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        self.per_class, self.distill_weight, self.num_inference_steps = (
            per_class,
            float(distill_weight),
            num_inference_steps,
        )
        self.pool, self.online_steps, self.batch_size = pool, online_steps, batch_size
        self.replay_in_denoise = replay_in_denoise
        self.replay: Replay | None = None

    def label(self) -> str:
        return (
            "generative replay"
            + (" (accumulated pool)" if self.pool == "accumulate" else "")
            + (f" + distillation (weight {self.distill_weight:g})" if self.distill_weight > 0 else "")
        )

    def settings(self) -> dict:
        return {
            "distill_weight": self.distill_weight,
            "replay_per_class": self.per_class,
            "replay_mode": "online" if self.online_steps is not None else "pool",
            "replay_pool": self.pool,
            "replay_batch_size": self.batch_size,
            "replay_in_denoise": self.replay_in_denoise,
        }

    def pool_directory(self, scratch_dir: Path, task_index: int) -> Path:
        """Where task ``task_index``'s new pool images go: ``scratch_dir/task_XX``, or with ``pool="accumulate"``
        ``scratch_dir/accumulated/task_{k-1}`` (the classes of task k-1, sampled by the teacher that just learned them;
        the seed is regenerate's, so at task 2 both pools are the same images)."""
        if self.pool == "accumulate":
            return scratch_dir / "accumulated" / task_folder_name(task_index - 1)
        return scratch_dir / task_folder_name(task_index)

    def join(self, expected: Expected) -> str:
        return "its teacher is the model each task starts from (it keeps nothing across tasks)"

    def start_task(self, task: TaskStart) -> None:
        """The teacher (whole weights: gathered once under FSDP; compiled as the accelerator compiles the student)
        and its replay of ``task.old_classes``; no old classes: no replay. Raises ``ValueError`` when an accumulated
        pool of an earlier task cannot be read."""
        self.replay = None
        model = full_model_copy(task.model)  # every process: an all-gather under FSDP
        if not task.old_classes:
            return
        teacher = compile_like_student(frozen_teacher(model), task.accelerator)
        if self.online_steps is not None:
            self.replay = Replay(teacher, list(task.old_classes), None, task.sampler, self.online_steps)
            return
        if task.scratch_dir is None:
            raise ValueError("a replay pool is written to disk: give the task a scratch_dir")
        directory, kept = self.pool_directory(Path(task.scratch_dir), task.task_index), None
        if self.pool == "accumulate":
            earlier = [directory.parent / task_folder_name(j) for j in range(1, task.task_index - 1)]
            try:
                kept = ReplayPool.concat([ReplayPool.load(d) for d in earlier]) if earlier else None
            except (OSError, ValueError) as err:
                raise ValueError(f"an earlier task's accumulated replay pool cannot be read ({err})") from None
        new_classes = [c for c in task.old_classes if kept is None or c not in kept.classes]
        pools = [kept] if kept is not None else []
        if new_classes:
            pools.append(
                ReplayPool.generate(
                    teacher,
                    task.sampler,
                    new_classes,
                    self.per_class,
                    directory,
                    self.num_inference_steps,
                    seed=task.seed * 100 + task.task_index,
                    rank=task.rank,
                    world_size=task.world_size,
                    barrier=task.accelerator.wait_for_everyone if task.accelerator else None,
                    show_progress=task.show_progress,
                )
            )
        pool = ReplayPool.concat(pools) if len(pools) > 1 else pools[0]
        self.replay = Replay(teacher, list(task.old_classes), pool.to(next(teacher.parameters()).device))

    def extra_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> ExtraBatch | None:
        if self.replay is None:
            return None
        images, labels = self.replay.batch(self.batch_size or batch_size, generator, device)
        return ExtraBatch(images, labels, 1.0 if self.replay_in_denoise else 0.0)

    def loss_terms(self, step: StepForward) -> dict[str, Term]:
        """The distillation term on the replay rows: the teacher sees the same noised replay batch as the student."""
        if self.replay is None or self.distill_weight <= 0:
            return {}
        rows = step.slices[self.name]
        with torch.no_grad():
            teacher_eps = self.replay.teacher(
                step.noisy[rows], step.timesteps[rows], class_labels=step.labels[rows]
            ).sample
        distill = distillation_loss(step.prediction[rows], teacher_eps)
        return {self.term: Term(self.distill_weight * distill, distill.detach())}
