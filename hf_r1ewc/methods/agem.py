"""Averaged GEM (Chaudhry et al. 2019) for a diffusion model.

Once the window's gradient g is all-reduced (and before clipping and the optimizer step), a reference gradient g_ref
of the denoising loss on a batch of the episodic memory (``exemplars``: real exemplars of the classes seen so far,
kept as indices into the training split, or for streamed data as images) is taken at the same weights; when g^T g_ref < 0, g is
projected: g <- g - (g^T g_ref / g_ref^T g_ref) g_ref, so the step does not increase the memory's loss to first order.
Under DDP every process draws its own memory batch and g_ref is all-reduced (mean) before the projection. The memory
batch's noise and timesteps come from a generator seeded by (seed, task, process, the count of projections so far);
the count is kept in checkpoints. The projection is invariant to g_ref's scale, so gradient accumulation's scaling
does not matter; under fp16's gradient scaler g is still scaled when the hook runs, which the projection also does not
mind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import SchedulerMixin
from torch import nn

from .base import ContinualMethod, Expected, TaskEnd, TaskStart, check_count
from .exemplars import exemplar_buffer


MEMORY_FILE = "agem_memory.json"


class AGEM(ContinualMethod):
    """A-GEM with an episodic memory of ``per_class`` exemplars per seen class and reference batches of
    ``batch_size``; ``noise_scheduler``: the training schedule that noises the memory batch."""

    name = "agem"
    needs_training_split = True
    changes_during_task = True  # the count of projections seeds the next memory batch

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        per_class: int = 20,
        batch_size: int = 64,
        stream_source: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"A-GEM's reference batch needs batch_size >= 1, got {batch_size}")
        self.noise_scheduler, self.batch_size = noise_scheduler, batch_size
        self.memory = exemplar_buffer(per_class, None, stream_source)
        self.file = Path(MEMORY_FILE).with_suffix(self.memory.suffix).name
        self.count, self.seed, self.task_index, self.accelerator = 0, 0, 0, None
        self.projected = 0  # steps whose gradient was projected, this task (reported in metrics.json)

    def label(self) -> str:
        return f"A-GEM ({self.memory.per_class} per class, reference batch {self.batch_size})"

    def settings(self) -> dict:
        return {"agem_per_class": self.memory.per_class, "agem_batch_size": self.batch_size}

    def start_task(self, task: TaskStart) -> None:
        self.memory.gather(task)
        self.count, self.projected = 0, 0
        self.seed, self.task_index, self.accelerator = task.seed, task.task_index, task.accelerator

    def reference_gradient(self, model: nn.Module, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradient of the denoising loss (pixel mean, batch mean) on one memory batch, all-reduced (mean)."""
        rank = self.accelerator.process_index if self.accelerator is not None else 0
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.task_index * 10_007 + rank) * 1_000_033 + self.count
        )
        device = params[0].device
        images, labels = self.memory.sample(self.batch_size, generator, device)
        noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(images),), generator=generator)
        t = t.to(device)
        pred = model(self.noise_scheduler.add_noise(images, noise, t), t, class_labels=labels).sample
        loss = (pred.float() - noise.float()).pow(2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), "mean")
            grads = [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in params]), params)]
        return grads

    def after_backward(self, model: nn.Module) -> None:
        """Project the step's gradient when it would raise the memory's loss (g^T g_ref < 0)."""
        if self.memory.images is None:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        reference = self.reference_gradient(model, params)
        self.count += 1
        with torch.no_grad():
            dot = sum((p.grad.double() * r.double()).sum() for p, r in zip(params, reference))
            if dot < 0:
                scale = dot / sum(r.double().pow(2).sum() for r in reference)
                for p, r in zip(params, reference):
                    p.grad.sub_((scale * r.double()).to(p.grad.dtype))
                self.projected += 1

    def end_task(self, task: TaskEnd) -> dict:
        projected = self.projected
        self.memory.add_task(task)
        return {"agem_projected_steps": projected, "agem_memory_size": len(self.memory)}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        return self.memory.files(self.file)

    def join(self, expected: Expected) -> str:
        self.memory.join(expected)
        return "its buffer starts empty: no exemplars of the classes learned so far"

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        self.memory.load(folder, self.file, expected)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **self.memory.state_dict(),
            "count": torch.tensor(self.count),
            "projected": torch.tensor(self.projected),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """The memory (checked as a task folder's) and this task's counts (projected <= count)."""
        counts = {k: state[k] for k in ("count", "projected") if k in state}
        if len(counts) != 2:
            raise ValueError(f"A-GEM's state holds {sorted(state)}, without 'count' and 'projected'")
        count = check_count(counts, "count")
        projected = check_count(counts, "projected", 0, count)
        self.memory.load_state_dict({k: v for k, v in state.items() if k not in counts}, expected)
        self.count, self.projected = count, projected
