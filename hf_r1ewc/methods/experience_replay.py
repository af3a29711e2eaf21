"""Experience replay (ER): real exemplars of the classes seen so far, kept across tasks, join every step's denoising
loss (Zajac et al. 2023: a strong baseline for DDPMs, with a reduced rehearsal coefficient).

The buffer (``exemplars``) gains ``per_class`` exemplars of each class after its task (or is a reservoir of
``reservoir`` exemplars in all, a uniform sample of every training example seen). In-memory data: it lives in task
folders as indices into the training split with the split's SHA-256 (``er_buffer.json``) and as 8-bit images
(``er_buffer_images.safetensors``, left out of Hub uploads unless asked), which a run continued on other data replays.
Streamed
data (``stream_source``, the dataset's name): it keeps the images, filled by one pass over each finished task's
stream, in ``er_buffer.safetensors`` with their provenance (left out of Hub uploads unless asked). Each step draws
``batch_size`` exemplars uniformly (the step's generator) into the one forward; their rows count ``weight`` each in
the denoising loss's mean (1: as a real row).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import ContinualMethod, Expected, ExtraBatch, TaskEnd, TaskStart
from .exemplars import exemplar_buffer


BUFFER_FILE = "er_buffer.json"


class ExperienceReplay(ContinualMethod):
    """A buffer of ``per_class`` real exemplars per seen class; ``batch_size`` buffer images per step (None: the
    real batch's size), each counted ``weight`` in the denoising loss; ``stream_source``: the streamed dataset's
    name (None: the training split is in memory)."""

    name = "er"
    needs_training_split = True

    def __init__(
        self,
        per_class: int = 20,
        weight: float = 1.0,
        batch_size: int | None = None,
        reservoir: int | None = None,
        stream_source: str | None = None,
    ) -> None:
        if not 0 < weight < float("inf"):
            raise ValueError(f"the ER weight must be finite and > 0, got {weight}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"the ER batch size must be >= 1 (None: the real batch's), got {batch_size}")
        self.buffer = exemplar_buffer(per_class, reservoir, stream_source)
        self.weight, self.batch_size = float(weight), batch_size
        self.file = Path(BUFFER_FILE).with_suffix(self.buffer.suffix).name

    def label(self) -> str:
        weight = f", weight {self.weight:g}" if self.weight != 1 else ""
        reservoir = self.buffer.reservoir
        size = f"{self.buffer.per_class} per class" if reservoir is None else f"reservoir of {reservoir}"
        return f"experience replay ({size}{weight})"

    def settings(self) -> dict:
        return {
            "er_per_class": self.buffer.per_class,
            "er_reservoir": self.buffer.reservoir,
            "er_weight": self.weight,
            "er_batch_size": self.batch_size,
        }

    def start_task(self, task: TaskStart) -> None:
        self.buffer.gather(task)

    def extra_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> ExtraBatch | None:
        if self.buffer.images is None:
            return None
        return ExtraBatch(*self.buffer.sample(self.batch_size or batch_size, generator, device), self.weight)

    def end_task(self, task: TaskEnd) -> dict:
        self.buffer.add_task(task)
        return {"er_buffer_size": len(self.buffer)}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        return self.buffer.files(self.file)

    def join(self, expected: Expected) -> str:
        self.buffer.join(expected)
        return "its buffer starts empty: no exemplars of the classes learned so far"

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        self.buffer.load(folder, self.file, expected)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        self.buffer.load_state_dict(state, expected)
