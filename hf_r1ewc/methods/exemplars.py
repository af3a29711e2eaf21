"""A buffer of real exemplars of the classes seen so far (experience replay's and A-GEM's episodic memory).

After task k, ``per_class`` exemplars of each of its classes are drawn (seeded: seed + task index) from the training
split; or, as a reservoir of ``reservoir`` exemplars in all, the task's training examples stream through reservoir
sampling (Vitter's algorithm R, in a seeded order), so that the buffer is a uniform sample of every example seen so
far and the classes share it as their examples did.

In-memory data (``ExemplarBuffer``): the buffer is kept as the exemplars' indices into the training split with the
split's SHA-256, and, in a second file that Hub uploads leave out unless asked (``IMAGE_FILES``), as 8-bit images:
a run continued on other data replays the earlier exemplars from those images (``carried``) and indexes the new
data for the new ones; a folder without the images continues only on its own data. Streamed data cannot be read
back by index (``StreamedExemplarBuffer``): the buffer keeps the images
themselves, 8-bit, with their provenance, filled by one pass over the finished task's stream; a task folder keeps
them in a file the Hub upload leaves out unless asked (``IMAGE_FILES``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..progress import progress_bar
from .base import Expected, SafetensorsFile, TaskEnd, TaskStart, TrainingSplit, check_count, sample_shape


class ExemplarBuffer:
    """``per_class`` exemplars per seen class, or (``reservoir``) that many in all by reservoir sampling, kept as
    indices into the training split in memory; ``images``/``labels`` are gathered next to the model at a task's
    start. ``suffix``: the task-folder file's (``record``: JSON)."""

    suffix = ".json"

    def __init__(self, per_class: int, reservoir: int | None = None) -> None:
        if per_class < 1 or (reservoir is not None and reservoir < 1):
            raise ValueError(f"an exemplar buffer needs per_class and reservoir >= 1, got {per_class}, {reservoir}")
        self.per_class, self.reservoir = per_class, reservoir
        self.seen = 0  # training examples streamed through the reservoir so far
        self.indices = torch.zeros(0, dtype=torch.long)  # into the training split, in the order added
        self.dataset_sha256: str | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        # exemplars of data the run no longer reads (a run continued on other data), 8-bit, before the indexed ones
        self.carried = torch.zeros(0, 0, 0, 0, dtype=torch.uint8)
        self.carried_labels = torch.zeros(0, dtype=torch.long)
        self.indexed = torch.zeros(0, 0, 0, 0, dtype=torch.uint8)  # the indexed exemplars' 8-bit images
        self.indexed_labels = torch.zeros(0, dtype=torch.long)
        self.absent: list[int] = []  # classes learned before the buffer joined the run: none of their exemplars

    def join(self, expected: Expected) -> None:
        """Start empty after ``expected.finished`` tasks this buffer did not see: their classes stay absent."""
        if self.reservoir is not None:
            raise ValueError("a reservoir buffer cannot join a run after its first task yet")
        self.absent = list(expected.seen_classes)

    def gather(self, task: TaskStart) -> None:
        """The exemplars' images (the carried ones, then the indexed ones from the training split) on the model's
        device; refuses indices into another dataset."""
        _check_dataset(self.dataset_sha256 if len(self.indices) else None, task.train)
        self.dataset_sha256 = task.train.sha256
        device = next(task.model.parameters()).device
        images, labels = self.exemplars(0, task.train)
        self.images = images.to(device) if len(labels) else None
        self.labels = labels.to(device) if len(labels) else None

    def __len__(self) -> int:
        return len(self.carried_labels) + len(self.indices)

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
            self.keep_images(task.train)
            return
        chosen = []
        for c in task.classes:
            candidates = torch.nonzero(task.train.labels == c).flatten()
            pick = torch.randperm(len(candidates), generator=generator)[: self.per_class]
            chosen.append(candidates[pick.sort().values])
        self.indices = torch.cat([self.indices, *chosen])
        self.dataset_sha256 = task.train.sha256
        self.keep_images(task.train)

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
        """The task-folder JSON: the exemplars' indices into the training split and its SHA-256, and how many
        exemplars before them are carried from earlier data (their images: ``files``)."""
        return {
            "indices": self.indices.tolist(),
            "per_class": self.per_class,
            "reservoir": self.reservoir,
            "seen": self.seen,
            "train_sha256": self.dataset_sha256,
            "carried": len(self.carried_labels),
            "absent": self.absent,
        }

    def keep_images(self, train: TrainingSplit) -> None:
        """The indexed exemplars' 8-bit images and labels, for the task folder (``files``)."""
        self.indexed, self.indexed_labels = to_uint8(train.images[self.indices]), train.labels[self.indices].cpu()

    def files(self, name: str) -> dict[str, dict | SafetensorsFile]:
        """The task folder's files of the buffer kept as ``name``: the JSON record and every exemplar as an 8-bit
        image (``images_name``: carried ones first, then the indexed ones), with each one's SHA-256."""
        parts = [p for p in (self.carried, self.indexed) if len(p)]
        images = torch.cat(parts) if parts else torch.zeros(0, 0, 0, 0, dtype=torch.uint8)
        labels = torch.cat([self.carried_labels, self.indexed_labels])
        metadata = {"sha256": json.dumps([exemplar_sha256(x) for x in images])}
        return {
            name: self.record(),
            images_name(name): SafetensorsFile({"images": images, "labels": labels}, metadata),
        }

    def exemplars(self, start: int, train: TrainingSplit | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exemplars from buffer position ``start`` on: (float32 images ``[n, C, H, W]`` in [-1, 1], labels
        ``[n]``) on the CPU (a per-class buffer appends each task's exemplars: they follow the earlier ones; the
        carried ones come first)."""
        carried = len(self.carried_labels)
        images = [self.carried[start:].float() / 127.5 - 1.0] if start < carried else []
        labels = [self.carried_labels[start:]] if start < carried else []
        if len(self.indices):
            _check_dataset(self.dataset_sha256, train)
            index = self.indices[max(0, start - carried) :]
            images.append(train.images[index].float().cpu())
            labels.append(train.labels[index].cpu())
        if not labels:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(images), torch.cat(labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The indices (and, for a reservoir, the count seen) as tensors."""
        seen = {"seen": torch.tensor(self.seen)} if self.reservoir is not None else {}
        return {"indices": self.indices.clone(), **seen}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """``state_dict()`` back, checked as a task folder's record (into this run's training split)."""
        keys = {"indices", "seen"} if self.reservoir is not None else {"indices"}
        if set(state) != keys:
            raise ValueError(f"the buffer's state holds {sorted(state)}, not {sorted(keys)}")
        seen = check_count(state, "seen") if self.reservoir is not None else 0
        self.restore(state["indices"], seen, expected.train.sha256 if expected.train else None, expected)

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
            carried, sha, absent = record.get("carried", 0), str(record["train_sha256"]), record.get("absent", [])
            if type(carried) is not int or not 0 <= carried:
                raise ValueError(f"'carried' must be a count, got {carried!r}")
            if not isinstance(absent, list) or not set(absent) <= set(expected.seen_classes):
                raise ValueError(f"'absent' must list classes learned so far, got {absent!r}")
            self.absent = absent
            same_data = expected.train is not None and expected.train.sha256 == sha
            images = labels = None
            if carried or not same_data:
                images, labels = self.read_images(Path(folder), name, sha)
                if len(labels) != carried + len(indices):
                    raise ValueError(
                        f"{images_name(name)} holds {len(labels)} exemplars, not {carried + len(indices)}"
                    )
            if not same_data:  # another dataset: every exemplar replays from its image
                self.restore_carried(images, labels, expected)
                return
            if carried:
                self.carried, self.carried_labels = images[:carried].clone(), labels[:carried].clone()
            self.restore(torch.tensor(indices, dtype=torch.long), seen, sha, expected)
        except ValueError as err:
            self.carried, self.carried_labels = torch.zeros(0, 0, 0, 0, dtype=torch.uint8), torch.zeros(0).long()
            raise ValueError(f"{path} cannot be used as this run's exemplar buffer: {err}") from None

    def read_images(self, folder: Path, name: str, dataset_sha256: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images ``[N, C, R, R]``, labels ``[N]``) of ``images_name(name)``, each image checked against
        the SHA-256 recorded for it; a folder without the file (a Hub upload leaves it out unless asked) is
        refused, naming the fix."""
        from safetensors import SafetensorError, safe_open

        path = folder / images_name(name)
        if not path.exists():
            raise ValueError(
                f"it indexes a dataset with SHA-256 {dataset_sha256[:12]}..., not this run's, and its exemplars' "
                f"images ({path.name}) are not in {folder}: Hub uploads leave them out unless --push_exemplars. "
                f"Continue on the data it was trained on, or from the run's own local task folder"
            )
        try:
            with safe_open(str(path), "pt") as file:
                digests = json.loads((file.metadata() or {})["sha256"])
                images, labels = file.get_tensor("images"), file.get_tensor("labels")
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path} cannot be read as exemplar images ({err}); copy the folder again") from None
        if (
            images.dtype != torch.uint8
            or images.dim() != 4
            or labels.dtype != torch.long
            or labels.shape != (len(images),)
        ):
            raise ValueError(f"{path.name} must hold uint8 images [N, C, R, R] and int64 labels [N]")
        if digests != [exemplar_sha256(x) for x in images]:
            raise ValueError(f"{path.name}'s images differ from the SHA-256 recorded for each exemplar")
        return images, labels

    def restore_carried(self, images: torch.Tensor, labels: torch.Tensor, expected: Expected) -> None:
        """Take a buffer drawn from other data as carried images once they fit: the model's image shape, only seen
        classes, 1..per_class exemplars of each (a reservoir buffer cannot yet move to other data)."""
        if self.reservoir is not None:
            raise ValueError("a reservoir buffer cannot yet continue on other data; continue on the data it came from")
        if len(images) and expected.sample_shape is not None and tuple(images.shape[1:]) != expected.sample_shape:
            raise ValueError(f"its images are {list(images.shape[1:])}, the model's are {list(expected.sample_shape)}")
        _check_seen(labels, expected)
        counts = {c: int((labels == c).sum()) for c in expected.seen_classes if c not in self.absent}
        if any(not 0 < n <= self.per_class for n in counts.values()):
            raise ValueError(f"exemplars per class {counts}, not 1 to per_class {self.per_class} of each")
        self.carried, self.carried_labels = images.clone(), labels.clone()
        self.indices, self.seen, self.dataset_sha256 = torch.zeros(0, dtype=torch.long), 0, None
        self.indexed, self.indexed_labels = torch.zeros(0, 0, 0, 0, dtype=torch.uint8), torch.zeros(0).long()

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
        _check_seen(labels, expected)
        skipped = set(self.carried_labels.tolist()) | set(self.absent)  # from their images, or before it joined
        available = {c: int((train.labels == c).sum()) for c in expected.seen_classes if c not in skipped}
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
        self.keep_images(train)


def images_name(name: str) -> str:
    """The file of an in-memory buffer's 8-bit images beside its record ``name``: ``er_buffer.json`` ->
    ``er_buffer_images.safetensors``."""
    return f"{Path(name).stem}_images.safetensors"


def _check_seen(labels: torch.Tensor, expected: Expected) -> None:
    """Refuses exemplars of a class the finished tasks never showed."""
    unseen = sorted(set(labels.tolist()) - set(expected.seen_classes))
    if unseen:
        raise ValueError(
            f"it holds exemplars of classes {unseen[:5]}, which the {expected.finished} finished tasks (classes "
            f"{expected.seen_classes}) never showed"
        )


def _check_dataset(dataset_sha256: str | None, train: TrainingSplit | None) -> None:
    """Refuses a buffer of indices without the training split in memory, or into another dataset."""
    if train is None:
        raise ValueError("an exemplar buffer reads its images back by index: it needs the training split in memory")
    if dataset_sha256 not in (None, train.sha256):
        raise ValueError(
            f"the exemplar buffer indexes a dataset with SHA-256 {dataset_sha256[:12]}..., not this one "
            f"({train.sha256[:12]}...): continue the run on the data it was trained on"
        )


def exemplar_buffer(per_class: int, reservoir: int | None = None, stream_source: str | None = None) -> ExemplarBuffer:
    """The buffer for the data at hand: indices into the split in memory, or (``stream_source``, the streamed
    dataset's name) the images themselves."""
    if stream_source is None:
        return ExemplarBuffer(per_class, reservoir)
    return StreamedExemplarBuffer(per_class, reservoir, stream_source)


RESERVOIR_KEY = -1  # the one group of a reservoir buffer (classes are >= 0)
# the files of a streamed run's exemplar images (a dataset's images: not uploaded unless asked)
IMAGE_FILES = ("er_buffer.safetensors", "der_buffer.safetensors", "agem_memory.safetensors") + tuple(
    images_name(f"{stem}.json") for stem in ("er_buffer", "der_buffer", "agem_memory")
)


class StreamedExemplarBuffer(ExemplarBuffer):
    """The buffer of streamed data: the exemplars' images themselves, ``[N, C, R, R]`` uint8 as the model sees them
    at its resolution (exactly the dataset's pixels without ``--resize``), their labels, and per group (a class, or
    ``RESERVOIR_KEY`` for a reservoir) how many examples have been seen; recorded with their provenance (``source``:
    the dataset's name; the split; each exemplar's SHA-256).

    ``add_task`` reads the finished task's stream once (the end-of-task loader: this process's shard, in the
    stream's order). Each process keeps per group a reservoir (algorithm R, seeded by the run's seed, the task and
    the process), so each is a uniform sample of what its shard held; the processes then merge them
    (``merge_counts``: how many of the slots each part fills, multivariate hypergeometric over the parts' counts,
    then a uniform subset of that size from each part), seeded alike on every process, so that every process holds
    the same buffer: a uniform sample of each class (or of everything seen). A kill during the pass re-runs the
    task's end, and with it the same pass and the same draws."""

    suffix = ".safetensors"

    def __init__(self, per_class: int, reservoir: int | None = None, source: str = "") -> None:
        super().__init__(per_class, reservoir)
        self.source = source
        self.stored = torch.zeros(0, 0, 0, 0, dtype=torch.uint8)  # [N, C, R, R]
        self.stored_labels = torch.zeros(0, dtype=torch.long)
        self.counts: dict[int, int] = {}  # group -> examples seen

    def __len__(self) -> int:
        return len(self.stored_labels)

    def gather(self, task: TaskStart) -> None:
        """The exemplars as model inputs (float32 in [-1, 1]) on the model's device."""
        device = next(task.model.parameters()).device
        held = len(self.stored_labels) > 0
        self.images = (self.stored.float() / 127.5 - 1.0).to(device) if held else None
        self.labels = self.stored_labels.to(device) if held else None

    def add_task(self, task: TaskEnd) -> None:
        """One pass over the finished task's stream (``task.batches``, this process's shard) into per-group
        reservoirs, merged across processes with what the buffer held."""
        groups = sorted(task.classes) if self.reservoir is None else [RESERVOIR_KEY]
        capacity = self.per_class if self.reservoir is None else self.reservoir
        rank = task.accelerator.process_index if task.accelerator is not None else 0
        generator = torch.Generator().manual_seed(((task.seed * 1_000_003 + task.task_index) * 10_007 + rank))
        kept: dict[int, list] = {g: [] for g in groups}
        seen = dict.fromkeys(groups, 0)
        batches = progress_bar(task.batches, show=task.show_progress, desc="exemplars from the stream", unit="batch")
        for batch in batches:
            for x, y in zip(to_uint8(batch[0]), batch[1].tolist()):
                group = y if self.reservoir is None else RESERVOIR_KEY
                if group not in seen:
                    continue
                seen[group] += 1
                slots = kept[group]
                if len(slots) < capacity:
                    slots.append((x, y))
                elif (j := int(torch.randint(0, seen[group], (1,), generator=generator))) < capacity:
                    slots[j] = (x, y)
        shape = sample_shape_of(task.model, self.stored)
        parts = gathered_parts(kept, seen, groups, capacity, shape, task.accelerator)
        merging = torch.Generator().manual_seed(task.seed * 1_000_003 + task.task_index)  # alike on every process
        in_groups = (
            torch.isin(self.stored_labels, torch.tensor(groups))
            if self.reservoir is None
            else torch.ones_like(self.stored_labels, dtype=torch.bool)  # a reservoir merges everything it held
        )
        images, labels = [self.stored[~in_groups].reshape(-1, *shape)], [self.stored_labels[~in_groups]]
        for group in groups:
            held = self.stored_labels == group if self.reservoir is None else in_groups
            sources = [(self.stored[held], self.stored_labels[held], self.counts.get(group, 0))]
            sources += [part[group] for part in parts]
            total = sum(n for _, _, n in sources)
            takes = merge_counts([n for _, _, n in sources], min(capacity, total), merging)
            for (part_images, part_labels, _), take in zip(sources, takes):
                pick = torch.randperm(len(part_labels), generator=merging)[:take].sort().values
                images.append(part_images[pick].reshape(-1, *shape))
                labels.append(part_labels[pick])
            self.counts[group] = total
        self.stored, self.stored_labels = torch.cat(images), torch.cat(labels)
        self.seen = sum(self.counts.values())

    def exemplars(self, start: int, train: TrainingSplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``ExemplarBuffer.exemplars``, from the images held (a new class's exemplars follow the earlier ones:
        tasks never share a class)."""
        return self.stored[start:].float() / 127.5 - 1.0, self.stored_labels[start:].clone()

    def join(self, expected: Expected) -> None:
        raise ValueError("a streamed buffer cannot join a run after its first task yet")

    def files(self, name: str) -> dict[str, SafetensorsFile]:
        """The task folder's file of the buffer: ``record``."""
        return {name: self.record()}

    def record(self) -> SafetensorsFile:
        """The task-folder file: the images and labels, with the provenance and every exemplar's SHA-256."""
        metadata = {
            "source": self.source,
            "split": "train",
            "per_class": str(self.per_class),
            "reservoir": json.dumps(self.reservoir),
            "counts": json.dumps({str(g): n for g, n in sorted(self.counts.items())}),
            "sha256": json.dumps([exemplar_sha256(x) for x in self.stored]),
        }
        return SafetensorsFile(self.state_dict(), metadata)

    def state_dict(self) -> dict[str, torch.Tensor]:
        counts = torch.tensor(sorted(self.counts.items()), dtype=torch.long).reshape(-1, 2)
        return {"images": self.stored.contiguous(), "labels": self.stored_labels.clone(), "counts": counts}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        if set(state) != {"images", "labels", "counts"}:
            raise ValueError(f"the buffer's state holds {sorted(state)}, not 'images', 'labels' and 'counts'")
        self.restore_images(state["images"], state["labels"], state["counts"], expected)

    def load(self, folder: str | os.PathLike, name: str, expected: Expected) -> None:
        """The images kept in a task folder (``record``), checked against ``expected`` and their provenance."""
        from safetensors import SafetensorError, safe_open

        path = Path(folder) / name
        if not path.exists():
            raise ValueError(
                f"{folder} has no {name}, the exemplar images of a streamed run: they stay in the run's own task "
                f"folders unless it was pushed with --push_exemplars. Continue from the run's local folder"
            )
        try:
            with safe_open(str(path), "pt") as file:
                metadata = file.metadata() or {}
                tensors = {k: file.get_tensor(k) for k in file.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{path} cannot be read as exemplar images ({err}); copy the whole folder again"
            ) from None
        try:
            missing = sorted({"source", "reservoir", "sha256"} - set(metadata))
            if missing:
                raise ValueError(f"its metadata lacks {missing}")
            if metadata["source"] != self.source:
                raise ValueError(
                    f"its exemplars come from dataset {metadata['source']!r}, and this run streams {self.source!r}: "
                    f"continue the run on the data it was trained on"
                )
            if json.loads(metadata["reservoir"]) != self.reservoir:
                raise ValueError(f"it was kept with reservoir {metadata['reservoir']}, this run asks {self.reservoir}")
            images = tensors.get("images")
            if images is not None and images.dtype == torch.uint8 and images.dim() == 4:
                if json.loads(metadata["sha256"]) != [exemplar_sha256(x) for x in images]:
                    raise ValueError("its images differ from the SHA-256 recorded for each exemplar")
            self.load_state_dict(tensors, expected)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} cannot be used as this run's exemplar buffer: {err}") from None

    def restore_images(
        self, images: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, expected: Expected
    ) -> None:
        """Take images, labels and the counts seen per group once they fit: uint8 ``[N, C, R, R]`` of the model's
        shape, labels of the finished tasks' classes, at most per_class of a class (or reservoir in all) and never
        more than its count seen. Raises ``ValueError`` naming the problem, taking nothing."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, R, R], got {images.dtype} of shape {list(images.shape)}")
        if len(images) and expected.sample_shape is not None and tuple(images.shape[1:]) != expected.sample_shape:
            raise ValueError(f"images are {list(images.shape[1:])}, the model's are {list(expected.sample_shape)}")
        if labels.dtype != torch.long or labels.shape != (len(images),):
            raise ValueError(f"labels must be int64 [{len(images)}], got {labels.dtype} of shape {list(labels.shape)}")
        if counts.dtype != torch.long or counts.dim() != 2 or counts.shape[1] != 2:
            raise ValueError(f"counts must be int64 [groups, 2], got {counts.dtype} of shape {list(counts.shape)}")
        seen_counts = {int(g): int(n) for g, n in counts.tolist()}
        _check_seen(labels, expected)
        groups = (
            sorted(expected.seen_classes) if self.reservoir is None else ([RESERVOIR_KEY] if expected.finished else [])
        )
        if sorted(seen_counts) != groups or any(n < 0 for n in seen_counts.values()):
            raise ValueError(f"it counts examples seen for groups {sorted(seen_counts)}, this run's are {groups}")
        held = (
            {g: int((labels == g).sum()) for g in groups}
            if self.reservoir is None
            else {RESERVOIR_KEY: len(labels)}
            if groups
            else {}
        )
        capacity = self.per_class if self.reservoir is None else self.reservoir
        wrong = {g: (held[g], min(capacity, n)) for g, n in seen_counts.items() if held[g] != min(capacity, n)}
        if wrong:
            raise ValueError(f"exemplars per group (held, min(capacity {capacity}, examples seen)): {wrong}")
        self.stored, self.stored_labels, self.counts = images.clone(), labels.clone(), seen_counts
        self.seen = sum(seen_counts.values())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model inputs in [-1, 1] -> uint8 on the CPU, the nearest 8-bit value (exact for inputs made from 8-bit
    pixels without resizing)."""
    return ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def exemplar_sha256(image: torch.Tensor) -> str:
    """The SHA-256 of one uint8 exemplar's bytes (C, H, W order)."""
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def sample_shape_of(model, stored: torch.Tensor) -> tuple[int, int, int]:
    """(C, R, R) of the model's images (its config), else of the images stored."""
    shape = sample_shape(model)
    if shape is None:
        if not len(stored):
            raise ValueError("the model's config names no in_channels/sample_size and no exemplar is stored")
        shape = tuple(stored.shape[1:])
    return shape


def merge_counts(counts: list[int], size: int, generator: torch.Generator) -> list[int]:
    """How many of ``size`` draws without replacement from the union of parts of ``counts`` examples fall into each
    part: the multivariate hypergeometric distribution, drawn as a uniform ``size``-subset of the union's positions."""
    chosen = torch.randperm(sum(counts), generator=generator)[:size]
    bounds = torch.tensor([0, *counts]).cumsum(0)
    return [int(((chosen >= lo) & (chosen < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]


def gathered_parts(
    kept: dict[int, list], seen: dict[int, int], groups: list[int], capacity: int, shape: tuple, accelerator
) -> list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]]:
    """Every process's reservoirs, on every process: a list over processes of ``{group: (images [s, C, R, R] uint8,
    labels [s], examples seen)}`` (one all-gather of padded tensors)."""
    images = torch.zeros(len(groups), capacity, *shape, dtype=torch.uint8)
    labels = torch.zeros(len(groups), capacity, dtype=torch.long)
    sizes = torch.zeros(len(groups), 2, dtype=torch.long)  # (held, seen)
    for i, group in enumerate(groups):
        for j, (x, y) in enumerate(kept[group]):
            images[i, j], labels[i, j] = x, y
        sizes[i] = torch.tensor([len(kept[group]), seen[group]])
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather

        device = accelerator.device
        images, labels, sizes = (gather(t[None].to(device)).cpu() for t in (images, labels, sizes))
    else:
        images, labels, sizes = images[None], labels[None], sizes[None]
    return [
        {
            g: (images[p, i, : sizes[p, i, 0]], labels[p, i, : sizes[p, i, 0]], int(sizes[p, i, 1]))
            for i, g in enumerate(groups)
        }
        for p in range(len(sizes))
    ]
