"""Experience replay (ER): real exemplars of the classes seen so far, kept across tasks, join every step's denoising
loss (Zajac et al. 2023: a strong baseline for DDPMs, with a reduced rehearsal coefficient).

After task k, ``per_class`` exemplars of each of its classes are drawn (seeded: seed + task index) from the training
split and kept. Each step draws ``batch_size`` of them uniformly (the step's generator) into the one forward; their
rows count ``weight`` each in the denoising loss's mean (1: as a real row). The buffer is kept as the exemplars'
indices into the training split with the split's SHA-256: a task folder (which may go to the Hub) never republishes
the dataset's images, and a run on other data is refused. Streamed data cannot be read back by index: ER needs the
training split in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import ContinualMethod, ExtraBatch, TaskEnd, TaskStart


BUFFER_FILE = "er_buffer.json"


class ExperienceReplay(ContinualMethod):
    """A buffer of ``per_class`` real exemplars per seen class; ``batch_size`` buffer images per step (None: the
    real batch's size), each counted ``weight`` in the denoising loss."""

    name = "er"
    needs_training_split = True

    def __init__(self, per_class: int = 20, weight: float = 1.0, batch_size: int | None = None) -> None:
        if per_class < 1 or not weight > 0:
            raise ValueError(f"ER needs per_class >= 1 and weight > 0, got {per_class} and {weight}")
        self.per_class, self.weight, self.batch_size = per_class, float(weight), batch_size
        self.indices = torch.zeros(0, dtype=torch.long)  # into the training split, in the order added
        self.dataset_sha256: str | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def label(self) -> str:
        weight = f", weight {self.weight:g}" if self.weight != 1 else ""
        return f"experience replay ({self.per_class} per class{weight})"

    def settings(self) -> dict:
        return {"er_per_class": self.per_class, "er_weight": self.weight, "er_batch_size": self.batch_size}

    def start_task(self, task: TaskStart) -> None:
        """The buffer's images, gathered from the training split next to the model; refuses another dataset."""
        if task.train is None:
            raise ValueError(
                "experience replay reads its exemplars back by index: it needs the training split in memory"
            )
        if self.dataset_sha256 not in (None, task.train.sha256):
            raise ValueError(
                f"the replay buffer indexes a dataset with SHA-256 {self.dataset_sha256[:12]}..., not this one "
                f"({task.train.sha256[:12]}...): continue the run on the data it was trained on"
            )
        self.dataset_sha256 = task.train.sha256
        device = next(task.model.parameters()).device
        self.images = task.train.images[self.indices].to(device) if len(self.indices) else None
        self.labels = task.train.labels[self.indices].to(device) if len(self.indices) else None

    def extra_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> ExtraBatch | None:
        if self.images is None:
            return None
        draw_on = generator.device if generator is not None else self.images.device
        index = torch.randint(
            0, len(self.images), (self.batch_size or batch_size,), generator=generator, device=draw_on
        )
        index = index.to(self.images.device)
        return ExtraBatch(self.images[index].to(device), self.labels[index].to(device), self.weight)

    def end_task(self, task: TaskEnd) -> dict:
        """``per_class`` exemplars of each class of the finished task join the buffer (all of a smaller class)."""
        if task.train is None:
            raise ValueError(
                "experience replay reads its exemplars back by index: it needs the training split in memory"
            )
        generator = torch.Generator().manual_seed(task.seed + task.task_index)
        chosen = []
        for c in task.classes:
            candidates = torch.nonzero(task.train.labels == c).flatten()
            pick = torch.randperm(len(candidates), generator=generator)[: self.per_class]
            chosen.append(candidates[pick.sort().values])
        self.indices = torch.cat([self.indices, *chosen])
        self.dataset_sha256 = task.train.sha256
        return {"er_buffer_size": int(len(self.indices))}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        """``er_buffer.json``: the exemplars' indices into the training split, their labels and its SHA-256."""
        return {
            BUFFER_FILE: {
                "indices": self.indices.tolist(),
                "per_class": self.per_class,
                "train_sha256": self.dataset_sha256,
            }
        }

    def load_task_folder(self, folder: str | os.PathLike, task_index: int) -> None:
        path = Path(folder) / BUFFER_FILE
        try:
            record = json.loads(path.read_text())
            self.indices = torch.tensor([int(i) for i in record["indices"]], dtype=torch.long)
            self.dataset_sha256 = str(record["train_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} cannot be read as a replay buffer ({err}); copy the whole folder again"
            ) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.indices = state["indices"].clone().long()
