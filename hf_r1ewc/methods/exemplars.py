"""A buffer of real exemplars of the classes seen so far (experience replay's and A-GEM's episodic memory).

After task k, ``per_class`` exemplars of each of its classes are drawn (seeded: seed + task index) from the training
split; or, as a reservoir of ``reservoir`` exemplars in all, the task's training examples stream through reservoir
sampling (Vitter's algorithm R, in a seeded order), so that the buffer is a uniform sample of every example seen so
far and the classes share it as their examples did. The buffer is kept as the exemplars' indices into the training
split with the split's SHA-256: a task folder (which may go to the Hub) never republishes the dataset's images, and a
run on other data is refused. Streamed data cannot be read back by index: the buffer needs the training split in
memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import Expected, TaskEnd, TaskStart, TrainingSplit


class ExemplarBuffer:
    """``per_class`` exemplars per seen class, or (``reservoir``) that many in all by reservoir sampling;
    ``images``/``labels`` are gathered next to the model at a task's start."""

    def __init__(self, per_class: int, reservoir: int | None = None) -> None:
        if per_class < 1 or (reservoir is not None and reservoir < 1):
            raise ValueError(f"an exemplar buffer needs per_class and reservoir >= 1, got {per_class}, {reservoir}")
        self.per_class, self.reservoir = per_class, reservoir
        self.seen = 0  # training examples streamed through the reservoir so far
        self.indices = torch.zeros(0, dtype=torch.long)  # into the training split, in the order added
        self.dataset_sha256: str | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def gather(self, task: TaskStart) -> None:
        """The exemplars' images from the training split, on the model's device; refuses another dataset."""
        _check_dataset(self.dataset_sha256, task.train)
        self.dataset_sha256 = task.train.sha256
        device = next(task.model.parameters()).device
        self.images = task.train.images[self.indices].to(device) if len(self.indices) else None
        self.labels = task.train.labels[self.indices].to(device) if len(self.indices) else None

    def sample(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform draw of ``batch_size`` exemplars (indices drawn on the generator's device): (images, labels)."""
        draw_on = generator.device if generator is not None else self.images.device
        index = torch.randint(0, len(self.images), (batch_size,), generator=generator, device=draw_on)
        index = index.to(self.images.device)
        return self.images[index].to(device), self.labels[index].to(device)

    def add_task(self, task: TaskEnd) -> None:
        """``per_class`` exemplars of each class of the finished task (all of a smaller class) join the buffer."""
        _check_dataset(None, task.train)
        generator = torch.Generator().manual_seed(task.seed + task.task_index)
        if self.reservoir is not None:
            self._stream(torch.nonzero(torch.isin(task.train.labels, torch.tensor(task.classes))).flatten(), generator)
            self.dataset_sha256 = task.train.sha256
            return
        chosen = []
        for c in task.classes:
            candidates = torch.nonzero(task.train.labels == c).flatten()
            pick = torch.randperm(len(candidates), generator=generator)[: self.per_class]
            chosen.append(candidates[pick.sort().values])
        self.indices = torch.cat([self.indices, *chosen])
        self.dataset_sha256 = task.train.sha256

    def _stream(self, candidates: torch.Tensor, generator: torch.Generator) -> None:
        """Algorithm R over ``candidates`` in a seeded order: the n-th example seen takes a uniform slot with
        probability reservoir / n."""
        slots = self.indices.tolist()
        for index in candidates[torch.randperm(len(candidates), generator=generator)].tolist():
            self.seen += 1
            if len(slots) < self.reservoir:
                slots.append(index)
            elif (j := int(torch.randint(0, self.seen, (1,), generator=generator))) < self.reservoir:
                slots[j] = index
        self.indices = torch.tensor(slots, dtype=torch.long)

    def record(self) -> dict:
        """The task-folder JSON: the exemplars' indices into the training split and its SHA-256 (no images)."""
        return {
            "indices": self.indices.tolist(),
            "per_class": self.per_class,
            "reservoir": self.reservoir,
            "seen": self.seen,
            "train_sha256": self.dataset_sha256,
        }

    def load(self, folder: str | os.PathLike, name: str, expected: Expected) -> None:
        """The buffer kept in a task folder (``record``), checked against ``expected`` (``restore``)."""
        path = Path(folder) / name
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} cannot be read as an exemplar buffer ({err}); copy the whole folder again"
            ) from None
        try:
            if not isinstance(record, dict) or not {"indices", "train_sha256"} <= set(record):
                raise ValueError("it is not a mapping with 'indices' and 'train_sha256'")
            indices, seen = record["indices"], record.get("seen", 0)
            if not isinstance(indices, list) or not all(type(i) is int for i in indices):
                raise ValueError("'indices' must be a list of integers")
            if type(seen) is not int:
                raise ValueError(f"'seen' must be an integer, got {seen!r}")
            if record.get("reservoir") != self.reservoir:
                raise ValueError(
                    f"it was kept with reservoir {record.get('reservoir')}, this run asks {self.reservoir}"
                )
            self.restore(torch.tensor(indices, dtype=torch.long), seen, str(record["train_sha256"]), expected)
        except ValueError as err:
            raise ValueError(f"{path} cannot be used as this run's exemplar buffer: {err}") from None

    def restore(self, indices: torch.Tensor, seen: int, dataset_sha256: str, expected: Expected) -> None:
        """Take ``indices`` into the training split (and the reservoir's count ``seen``) once they are what this
        buffer would hold after the finished tasks: the same dataset, in range, no exemplar twice, only the seen
        classes, min(per_class, the class's examples) of each (a reservoir: min(reservoir, examples seen) in all,
        every example of the finished tasks seen once). Raises ``ValueError`` naming the problem, taking nothing."""
        train = expected.train
        _check_dataset(dataset_sha256, train)
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(
                f"the indices must be a list of integers, got {indices.dtype} of shape {list(indices.shape)}"
            )
        indices = indices.long()
        size = len(train.labels)
        if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < size):
            raise ValueError(
                f"indices must lie in [0, {size}) (the training split's size), got {int(indices.min())} to "
                f"{int(indices.max())}"
            )
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("an exemplar appears twice, which sampling without replacement never gives")
        labels = train.labels[indices]
        unseen = sorted(set(labels.tolist()) - set(expected.seen_classes))
        if unseen:
            raise ValueError(
                f"it holds exemplars of classes {unseen[:5]}, which the {expected.finished} finished tasks (classes "
                f"{expected.seen_classes}) never showed"
            )
        available = {c: int((train.labels == c).sum()) for c in expected.seen_classes}
        if self.reservoir is None:
            wrong = {
                c: (int((labels == c).sum()), min(self.per_class, n))
                for c, n in available.items()
                if int((labels == c).sum()) != min(self.per_class, n)
            }
            if wrong:
                raise ValueError(
                    f"exemplars per class (held, this run keeps with per_class {self.per_class}): {wrong}"
                )
        elif seen != sum(available.values()) or len(indices) != min(self.reservoir, seen):
            raise ValueError(
                f"a reservoir of {self.reservoir} after {sum(available.values())} examples holds "
                f"{min(self.reservoir, sum(available.values()))}; this one counts {seen} seen and holds {len(indices)}"
            )
        self.indices, self.seen, self.dataset_sha256 = indices, seen, dataset_sha256


def _check_dataset(dataset_sha256: str | None, train: TrainingSplit | None) -> None:
    """Refuses a buffer of indices without the training split in memory, or into another dataset."""
    if train is None:
        raise ValueError("an exemplar buffer reads its images back by index: it needs the training split in memory")
    if dataset_sha256 not in (None, train.sha256):
        raise ValueError(
            f"the exemplar buffer indexes a dataset with SHA-256 {dataset_sha256[:12]}..., not this one "
            f"({train.sha256[:12]}...): continue the run on the data it was trained on"
        )
