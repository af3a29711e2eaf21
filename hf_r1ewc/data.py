"""Class-incremental image data: sources, task splits, model-ready tensors and streaming.

Every source ends up as either

* a :class:`LabeledImages` (uint8 ``[N, C, H, W]`` images and int64 ``[N]`` labels held in memory) — MNIST,
  Fashion-MNIST, CIFAR-10, the builtin ``digits`` and anything else that fits in RAM; or
* a streamed :class:`datasets.IterableDataset` of model-ready examples (:func:`stream_task`) — ImageNet 32x32.

Model inputs are float tensors in ``[-1, 1]``. Images smaller than ``resolution`` are zero-padded (black, i.e.
``-1`` after scaling) symmetrically, as the paper pads 28x28 MNIST to 32x32; resizing happens only when asked.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.data_loader import DataLoaderStateMixin


if TYPE_CHECKING:
    import datasets

BUILTIN_DIGITS = "digits"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "class", "class_label", "fine_label", "target", "y")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
# Fashion-MNIST's IDX files carry no names; these are its standard ten, by id
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(ValueError):
    """Bad data input, raised before any training starts. The message names the problem and the fix."""


@dataclass
class LabeledImages:
    """An in-memory split: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, and the source's class
    ``names`` by id where it has them (a ``ClassLabel``'s names, an imagefolder's subfolders; None: it has none)."""

    images: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_channels(self) -> int:
        """C of the ``[N, C, H, W]`` images."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """W of the ``[N, C, H, W]`` images (square images)."""
        return int(self.images.shape[-1])

    @property
    def classes(self) -> list[int]:
        """The sorted labels present."""
        return sorted(int(c) for c in torch.unique(self.labels))

    def subset(self, classes: Iterable[int]) -> "LabeledImages":
        """The examples whose label is in ``classes``, in their original order."""
        mask = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=self.labels.dtype))
        return LabeledImages(self.images[mask], self.labels[mask], self.names)

    def head_per_class(self, n: int | None) -> "LabeledImages":
        """The first ``n`` examples of every class (all when ``n`` is None): smaller, still balanced, deterministic."""
        if n is None:
            return self
        keep = torch.zeros_like(self.labels, dtype=torch.bool)
        for c in self.classes:
            keep[torch.nonzero(self.labels == c).flatten()[:n]] = True
        return LabeledImages(self.images[keep], self.labels[keep], self.names)

    def to_model_input(self, resolution: int | None = None, resize: bool = False) -> torch.utils.data.TensorDataset:
        """A ``TensorDataset`` of ``(pixel_values float [C, R, R] in [-1, 1], label)`` pairs."""
        return torch.utils.data.TensorDataset(images_to_model_input(self.images, resolution, resize), self.labels)


def images_to_model_input(images: torch.Tensor, resolution: int | None = None, resize: bool = False) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``[N, C, R, R]`` in ``[-1, 1]``; zero-padded up to ``R`` (or resized if asked)."""
    x = images.float().div_(127.5).sub_(1.0)
    height, size = images.shape[-2], images.shape[-1]
    if height != size and not resize:
        raise DataError(
            f"images are {height}x{size} (height x width), not square, and the model samples square images: pass "
            f"--resize (with --resolution R) to rescale them to R x R"
        )
    if resolution is None or (resolution == size and height == size):
        return x
    if resize:
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if resolution < size:
        raise DataError(
            f"images are {size}x{size} but --resolution is {resolution}: padding cannot shrink images. "
            f"Pass --resolution {size} (or larger), or --resize to rescale them."
        )
    before = (resolution - size) // 2
    after = resolution - size - before
    return F.pad(x, (before, after, before, after), value=-1.0)


def default_resolution(image_size: int) -> int:
    """The paper's rule: 28x28 (MNIST, Fashion-MNIST) is padded to 32x32; other sizes are kept."""
    return 32 if image_size == 28 else image_size


# ----------------------------------------------------------------------------------------------------- sources


def load_labeled_images(
    source: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    resize_to: int | None = None,
) -> LabeledImages:
    """Load a whole split into memory.

    ``source`` is ``"digits"`` (scikit-learn's 8x8 digits), a local folder (raw IDX files, a ``save_to_disk``
    folder, an imagefolder or parquet files) or a Hub dataset id. ``split`` is ``"train"`` or ``"test"``. Images of
    different sizes are resized to ``resize_to`` x ``resize_to`` where it is given (``--resize``), else refused; a
    split that mixes grayscale and colour is colour. An image that cannot be decoded is named.
    """
    if source == BUILTIN_DIGITS:
        return _load_digits(split)
    path = Path(source)
    if path.is_dir() and _idx_files(path, split) is not None:
        return _load_idx(path, split)
    dataset = load_hf_dataset(source, split, streaming=False)
    image_column, label_column = resolve_columns(dataset.column_names, image_column, label_column)
    dataset = dataset.select_columns([image_column, label_column])
    images = [_to_chw_uint8(img) for img in _decoded_images(dataset, image_column, f"{source!r} ({split})")]
    channels = {img.shape[0] for img in images}
    if len(channels) > 1:  # mixed grayscale / colour: promote to RGB
        images = [img.expand(3, -1, -1) if img.shape[0] == 1 else img for img in images]
    if len({img.shape for img in images}) > 1:
        if resize_to is None:
            raise DataError(
                f"{source!r} ({split}) holds images of different sizes; pass --resize (with --resolution R) to "
                f"rescale them to R x R."
            )
        images = [_resized_uint8(img, resize_to) for img in images]
    labels = torch.as_tensor(dataset[label_column], dtype=torch.int64)
    return LabeledImages(torch.stack(images), labels, label_names(dataset.features[label_column]))


def label_names(feature) -> tuple[str, ...] | None:
    """The class names of a ``datasets`` label feature: a ``ClassLabel``'s ``names`` (an imagefolder's are its
    subfolders, sorted), else None."""
    import datasets

    return tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _decoded_images(dataset, image_column: str, where: str) -> list:
    """The column's images, decoded one by one so that a truncated or corrupt file is named (an Image column), or
    as stored (arrays)."""
    import datasets
    from PIL import Image

    if not isinstance(dataset.features[image_column], datasets.Image):
        return dataset[image_column]
    images = []
    for i, item in enumerate(dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]):
        name = item.get("path") or f"image {i} (embedded bytes)"
        try:
            image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            image.load()
        except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated, corrupt, not an image
            raise DataError(f"{where}: {name} cannot be decoded ({err}); remove or replace that file") from None
        images.append(image)
    return images


def _resized_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> uint8 ``[C, size, size]`` (bilinear, antialiased as ``images_to_model_input``)."""
    x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def load_hf_dataset(source: str, split: str, streaming: bool = False, **config_kwargs) -> "datasets.Dataset":
    """A ``datasets`` split from a local folder (``save_to_disk``, imagefolder, parquet) or a Hub id."""
    import datasets

    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, source)
            return loaded.to_iterable_dataset() if streaming else loaded
        try:
            return datasets.load_dataset(str(path), split=split, streaming=streaming, **config_kwargs)
        except (ValueError, FileNotFoundError) as err:
            raise DataError(
                f"could not read split {split!r} from folder {source!r}: {err}. Expected raw IDX files "
                f"(train-images-idx3-ubyte[.gz], ...), a save_to_disk folder, an imagefolder or parquet files."
            ) from err
    if path.exists():
        raise DataError(f"{source!r} is a file; pass the folder that holds the dataset instead.")
    if not _REPO_ID.match(source):
        raise DataError(
            f"unknown dataset {source!r}: not an existing folder, not the builtin 'digits', and not a Hub id of "
            f"the form 'owner/name' (e.g. zalando-datasets/fashion_mnist). Check the spelling or the path."
        )
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming, **config_kwargs)
    except Exception as err:  # the Hub client raises many kinds; all mean the same to the user
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise DataError(
            f"could not load Hub dataset {source!r} split {split!r}{hint}: {type(err).__name__}: {err}. If this "
            f"machine is offline, download it elsewhere with `datasets.load_dataset(...).save_to_disk(DIR)` and "
            f"pass --train_data_dir DIR."
        ) from err


def _pick_split(dataset_dict, split: str, source: str):
    if split in dataset_dict:
        return dataset_dict[split]
    raise DataError(f"{source!r} has splits {sorted(dataset_dict)} but not {split!r}.")


def resolve_columns(
    column_names: Sequence[str], image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Pick the image and label columns (explicit names win); a clear error lists the available columns."""

    def pick(explicit: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
        if explicit is not None:
            if explicit not in column_names:
                raise DataError(
                    f"{what} column {explicit!r} not found; available columns: {list(column_names)}. Fix {flag}."
                )
            return explicit
        for name in candidates:
            if name in column_names:
                return name
        raise DataError(
            f"no {what} column found among {list(column_names)}; name it with {flag} (tried {list(candidates)})."
        )

    return (
        pick(image_column, IMAGE_COLUMN_CANDIDATES, "image", "--image_column"),
        pick(label_column, LABEL_COLUMN_CANDIDATES, "label", "--label_column"),
    )


def _to_chw_uint8(image) -> torch.Tensor:
    """A PIL image or array (H, W[, C]) -> uint8 ``[C, H, W]`` with 1 (grayscale) or 3 (RGB) channels."""
    if hasattr(image, "mode"):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.asarray(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise DataError(f"cannot read an image of shape {array.shape}")
    if array.shape[-1] == 4:
        array = array[..., :3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _load_digits(split: str) -> LabeledImages:
    """scikit-learn's 1,797 8x8 digits; a fixed split: every 5th image of each class is held out for test."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise DataError(f"the builtin digits data has splits 'train' and 'test', not {split!r}.")
    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rank_in_class = torch.zeros_like(labels)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        rank_in_class[idx] = torch.arange(len(idx))
    held_out = rank_in_class % 5 == 4
    keep = held_out if split == "test" else ~held_out
    return LabeledImages(images[keep].contiguous(), labels[keep].contiguous(), tuple(map(str, range(10))))


def _idx_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX.get(split)
    if prefix is None:
        return None
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
        hit = next((p for p in candidates if p.exists()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}. The file is corrupt or truncated.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its own {ndim}-dimension header.")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims} but holds {data.size} bytes of data.")
    return data.reshape(dims)


def _load_idx(folder: Path, split: str) -> LabeledImages:
    image_path, label_path = _idx_files(folder, split)
    images = _read_idx(image_path)
    labels = _read_idx(label_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_path.name} has {images.shape[0]} images but {label_path.name} {labels.shape[0]} labels."
        )
    names = FASHION_MNIST_NAMES if "fashion" in folder.resolve().name.lower() else None
    return LabeledImages(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), names)


# ------------------------------------------------------------------------------------------------ task splits


def parse_tasks(
    tasks: str | None,
    classes_per_task: int | None,
    available_classes: Sequence[int],
    num_class_embeds: int | None = None,
    class_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """The class-incremental task list.

    ``tasks`` like ``"0,1;2,3;4,5"`` (or by name: ``"Sneaker,Bag;3,4"``, ``class_names`` giving each id's name) wins;
    otherwise contiguous groups of ``classes_per_task`` labels in label order (the paper's splits). Validates: no
    empty or overlapping tasks, every label present in the data, every label inside the model's class embedding
    (``0 <= label < num_class_embeds``).
    """
    available = sorted(int(c) for c in available_classes)
    if tasks:
        parsed = [
            [class_id(c.strip(), class_names) for c in group.split(",") if c.strip()] for group in tasks.split(";")
        ]
        if any(len(group) == 0 for group in parsed):
            raise DataError(f"--tasks {tasks!r} has an empty task; every task needs at least one class.")
    else:
        if not classes_per_task or classes_per_task < 1:
            raise DataError("pass --classes_per_task N (N >= 1) or an explicit --tasks '0,1;2,3;...'.")
        if len(available) % classes_per_task:
            raise DataError(
                f"{len(available)} classes do not split into tasks of {classes_per_task}; "
                f"choose a divisor or give --tasks explicitly."
            )
        parsed = [available[i : i + classes_per_task] for i in range(0, len(available), classes_per_task)]
    seen: dict[int, int] = {}
    for index, group in enumerate(parsed):
        for c in group:
            if c in seen:
                raise DataError(
                    f"class {c} appears in task {seen[c] + 1} and task {index + 1}: class-incremental tasks must "
                    f"not overlap. Fix --tasks."
                )
            seen[c] = index
    absent = sorted(set(seen) - set(available))
    if absent:
        raise DataError(f"--tasks names classes {absent} that are absent from the data (present: {available}).")
    if num_class_embeds is not None:
        outside = sorted(c for c in seen if not 0 <= c < num_class_embeds)
        if outside:
            raise DataError(
                f"classes {outside} lie outside the model's class embedding (num_class_embeds={num_class_embeds}); "
                f"use a model config with num_class_embeds > {max(outside)}."
            )
    return parsed


def class_id(token: str, class_names: Sequence[str] | None = None) -> int:
    """The id of one entry of --tasks: a class name (its index in ``class_names``) or an integer id."""
    if class_names is not None and token in class_names:
        return list(class_names).index(token)
    try:
        return int(token)
    except ValueError:
        names = f"the classes are {list(class_names)}" if class_names else "this data names no classes"
        raise DataError(
            f"--tasks names class {token!r}, which does not exist: {names}; use a name or an id."
        ) from None


def resolve_class_names(source_names: Sequence[str] | None, num_classes: int, flag: str | None = None) -> list[str]:
    """The name of every id ``0 .. num_classes - 1``: ``--class_names`` (comma-separated, one per id), else the
    source's (``LabeledImages.names``), else the id itself; none empty (``check_class_names`` checks the label space
    they end up in)."""
    if flag is not None:
        names = [n.strip() for n in flag.split(",")]
        if len(names) != num_classes:
            raise DataError(
                f"--class_names gives {len(names)} names but the data has {num_classes} class ids (0..{num_classes - 1}): "
                f"give one name per id, in id order, separated by commas"
            )
    else:
        names = [*(source_names or ())][:num_classes]
        names += [str(i) for i in range(len(names), num_classes)]
    if "" in names:
        raise DataError(f"class id {names.index('')} has an empty name; name every class (--class_names)")
    return names


def check_class_names(names: Sequence[str]) -> None:
    """Refuses (``DataError``) a label space where two ids share a name, or a name reads as another id's number."""
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(
            f"class names {twice} are given to several ids; every class needs its own name (--class_names)"
        )
    for i, name in enumerate(names):
        if name.lstrip("-").isdigit() and int(name) != i:
            raise DataError(
                f"class id {i} is named {name!r}, another id's number: --tasks could not tell them apart; rename it"
            )


def continued_tasks(
    learned: list[list[int]], planned: list[list[int]], class_names: Sequence[str] | None = None
) -> list[list[int]]:
    """The task list of a run that continues a model trained on the tasks ``learned``: ``planned`` itself when it
    starts with them, or ``learned`` followed by ``planned`` (the new tasks alone). A new task may not hold a learned
    class: class-incremental learning never returns to a class (``DataError``, showing both lists)."""
    new = planned[len(learned) :] if planned[: len(learned)] == learned else planned
    again = sorted({c for t in new for c in t} & {c for t in learned for c in t})
    if again:
        named = [class_names[c] if class_names and c < len(class_names) else c for c in again]
        raise DataError(
            f"the model was trained on the tasks {learned}, and --tasks gives {planned}: classes {named} were learned "
            f"already, and a class-incremental run never returns to a class (that is another protocol). List the "
            f"learned tasks first and append new ones, or give the new tasks alone"
        )
    return planned if new is not planned else learned + planned


def check_mapping(
    names: Sequence[str], ids: Sequence[int], learned: Sequence[int], streaming: bool, tasks_given: bool
) -> None:
    """Refuses (``DataError``) data whose classes ``label_space`` moved to other ids (``ids``: each data id's) when
    it streams (its labels are read as stored), or when it holds a learned class and no --tasks picks the new ones."""
    moved = [n for i, n in enumerate(ids) if i != n]
    if moved and streaming:
        raise DataError(
            "a streamed dataset cannot yet bring new classes to a continued model (its labels are read as they are "
            "stored): save the new data to disk and continue without --streaming"
        )
    again = sorted(set(ids) & set(learned))
    if moved and again and not tasks_given:
        raise DataError(
            f"the new data holds classes {[names[c] for c in again]} that the model learned already: give --tasks "
            f"with the new classes to learn (a class-incremental run never returns to a class)"
        )


def planned_tasks(
    tasks: str | None,
    classes_per_task: int,
    classes: Sequence[int],
    names: Sequence[str],
    learned_tasks: list[list[int]] | None,
) -> list[list[int]]:
    """The run's tasks from --tasks or groups of ``classes_per_task`` of the data's ``classes``, after the
    ``learned_tasks`` of a continued model (``continued_tasks``): by default its groups are of the classes not
    learned yet; --tasks may list the learned tasks first, which the new data need not hold."""
    learned = {c for t in learned_tasks or [] for c in t}
    if not learned:
        return parse_tasks(tasks, None if tasks else classes_per_task, classes, class_names=names)
    available = sorted(set(classes) | learned) if tasks else [c for c in classes if c not in learned]
    planned = parse_tasks(tasks, None if tasks else classes_per_task, available, class_names=names)
    return continued_tasks(learned_tasks, planned, names)


def label_space(model_names: Sequence[str], data_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """(the names of the continued model's label space, the id there of each of the data's class ids): a class keeps
    the id of the model's class of its name; a new name takes the next free id, in the data's id order."""
    names, ids = list(model_names), []
    for name in data_names:
        if name not in names:
            names.append(name)
        ids.append(names.index(name))
    return names, ids


# ------------------------------------------------------------------------------------------------ streaming


def _filtered_stream(
    source: str, split: str, classes: Sequence[int], image_column: str | None, label_column: str | None
):
    """(streamed dataset holding only ``classes``, image column, label column); parquet gets the filter pushed down."""
    wanted = [int(c) for c in classes]
    try:
        dataset = load_hf_dataset(source, split, streaming=True, filters=[(label_column or "label", "in", wanted)])
    except (DataError, TypeError, ValueError):
        dataset = load_hf_dataset(source, split, streaming=True)
    image_column, label_column = resolve_columns(
        list(dataset.features or {}) or dataset.column_names, image_column, label_column
    )
    wanted_set = set(wanted)
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.filter(lambda label: int(label) in wanted_set, input_columns=[label_column])
    return dataset, image_column, label_column


def stream_task(
    source: str,
    split: str,
    classes: Sequence[int],
    *,
    resolution: int,
    num_channels: int,
    image_column: str | None = None,
    label_column: str | None = None,
    resize: bool = False,
    shuffle: bool = True,
    shuffle_buffer_size: int = 10_000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> "datasets.IterableDataset":
    """A streamed, label-filtered, shuffled and sharded task: an ``IterableDataset`` of
    ``{"pixel_values": float [C, R, R] in [-1, 1], "class_labels": int}``.

    Parquet sources get the label filter pushed down to the reader; every source is also filtered per example.
    The stream is split across processes here with ``datasets.distributed.split_dataset_by_node``: build the
    ``DataLoader`` from it directly and do NOT pass that loader through ``accelerator.prepare`` (that would shard
    it a second time). Call ``.set_epoch(epoch)`` each epoch to reseed the shuffle buffer; ``shuffle=False`` keeps
    the source order (the Fisher's two passes need the same order).
    """
    from datasets.distributed import split_dataset_by_node

    dataset, image_column, label_column = _filtered_stream(source, split, classes, image_column, label_column)
    if shuffle:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)

    def to_model_input(example):
        image = _to_chw_uint8(example[image_column])
        if image.shape[0] != num_channels:
            image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:1]
        pixels = images_to_model_input(image[None], resolution, resize)[0]
        return {"pixel_values": pixels, "class_labels": int(example[label_column])}

    return dataset.map(to_model_input, remove_columns=[image_column, label_column])


def count_task_examples(source: str, split: str, classes: Sequence[int], label_column: str | None = None) -> int:
    """How many examples of ``classes`` a streamed split holds (one pass over the label column only)."""
    dataset, _, label_column = _filtered_stream(source, split, classes, None, label_column)
    return sum(1 for _ in dataset.select_columns([label_column]))


class StreamedTaskLoader(DataLoaderStateMixin):
    """Batches ``(pixel_values [B, C, R, R], class_labels [B][, index [B]])`` on ``device`` from a ``stream_task``.

    With ``num_batches``, every process takes exactly that many batches per epoch, re-reading its shard if it runs
    short: data-parallel processes must step together, while a streamed shard's size is only known after reading it
    (``split_dataset_by_node`` may hand out whole files). ``num_batches=None`` is one pass over the shard, with each
    sample's global index (position in this process's stream * world_size + rank) for ``estimate_fisher``.

    The loader is not passed through ``accelerator.prepare`` (the stream is already sharded), so it reports its
    epoch boundaries to Accelerate's ``GradientState`` itself (``DataLoaderStateMixin``), as a prepared loader does:
    under gradient accumulation the last micro-batch of an epoch closes the window, nothing spills into the next.
    """

    def __init__(
        self,
        stream,
        batch_size: int,
        num_batches: int | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from accelerate.state import GradientState

        self.stream, self.batch_size, self.num_batches = stream, batch_size, num_batches
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.gradient_state, self._drop_last = GradientState(), True

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a one-pass StreamedTaskLoader has no length")
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Reseed the stream's shuffle buffer for ``epoch``."""
        self.stream.set_epoch(epoch)

    def __iter__(self):
        return self.skip_first(0)

    def skip_first(self, num_batches: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Iterate from batch ``num_batches`` on (resuming mid-epoch re-reads the same seeded stream)."""
        if self.num_batches is None:
            yield from self._batches(num_batches)
            return
        self.begin()
        try:
            for step, batch in enumerate(self._batches(num_batches), start=num_batches):
                self.end_of_dataloader = step == self.num_batches - 1
                yield batch
        finally:
            self.end()

    def _batches(self, num_batches: int):
        step, position = 0, 0
        while self.num_batches is None or step < self.num_batches:
            read = 0
            pin = self.device.type == "cuda"  # pinned batches copy to the GPU without blocking the host
            for batch in torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, pin_memory=pin):
                if self.num_batches is not None and step >= self.num_batches:
                    return
                n = batch["pixel_values"].shape[0]
                if step >= num_batches:
                    out = tuple(batch[k].to(self.device, non_blocking=pin) for k in ("pixel_values", "class_labels"))
                    if self.num_batches is None:
                        out += (torch.arange(position, position + n) * self.world_size + self.rank,)
                    yield out
                step, position, read = step + 1, position + n, read + 1
            if self.num_batches is None:
                return
            if read == 0:
                raise DataError(
                    f"process {self.rank}'s share of the streamed task is empty; use fewer processes "
                    f"or a dataset with more files"
                )


# ------------------------------------------------------------------------------------ a training run's data


class InMemoryTask(torch.utils.data.Dataset):
    """A task's training images ``[N, C, H, W]`` and labels ``[N]`` in memory (the host's or a GPU's), read a batch at a
    time: a DataLoader's index list becomes one gather there (``__getitems__``) instead of N single-image reads and a
    stack (the same batches, in the same order: the loader's sampler, Accelerate's sharding and its resume skip are
    unchanged). Load it with ``collate_fn=whole_batch``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate function of ``InMemoryTask``: its batches come gathered already."""
    return batch


@dataclass
class TaskData:
    """The data of a run: the eval split in memory, the training split in memory (None when streaming), tasks, and
    the name of every class id (``resolve_class_names``)."""

    source: str
    test: object
    train: object | None
    train_inputs: torch.Tensor | None
    test_inputs: torch.Tensor
    resolution: int
    num_channels: int
    num_classes: int
    tasks: list[list[int]]
    class_names: list[str] = field(default_factory=list)
    task_sources: list[str] = field(default_factory=list)  # the data each task comes from (continued runs: several)

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name (diffusers' ``id2label``), for every id of the label space."""
        return dict(enumerate(self.class_names or map(str, range(self.num_classes))))


def load_task_data(
    source: str,
    *,
    eval_split: str = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    max_train_per_class: int | None = None,
    resolution: int | None = None,
    resize: bool = False,
    tasks: str | None = None,
    classes_per_task: int = 2,
    need_test_classes: bool = True,
    class_names: str | None = None,
    learned_tasks: list[list[int]] | None = None,
    model_names: Sequence[str] | None = None,
    learned_sources: Sequence[str] | None = None,
) -> TaskData:
    """Read and check the data of ``source`` and its class-incremental tasks (``tasks`` as '0,1;2,3' or by name,
    else groups of ``classes_per_task`` in label order; after ``learned_tasks``, the tasks a continued model has
    learned, as ``continued_tasks`` reads them); ``model_names``: that model's class names by id, onto which the
    data's classes are mapped by name (``label_space``: new names take new ids; its labels are relabelled);
    ``learned_sources``: the data each learned task came from (``TaskData.task_sources``); ``class_names``:
    --class_names; ``need_test_classes``: every class must have test images (FID), but those a
    continued model learned (their statistics are carried). Every data error raises ``SystemExit`` here, before any
    model is built."""
    try:
        resize_to = resolution if resize else None
        test = load_labeled_images(source, eval_split, image_column, label_column, resize_to)
        train = None if streaming else load_labeled_images(source, "train", image_column, label_column, resize_to)
        if train is not None and train.num_channels != test.num_channels:  # one split mixes colour in: all colour
            test, train = (
                LabeledImages(s.images.expand(-1, 3, -1, -1).contiguous(), s.labels, s.names) for s in (test, train)
            )
        if max_train_per_class:
            train = train.head_per_class(max_train_per_class)
        known = test if streaming else train  # streamed: the eval split names the classes and the image shape
        resolution = resolution or default_resolution(known.image_size)
        count = len(test) + (len(train) if train is not None else 0)
        held = count * known.num_channels * resolution**2 * 4
        if held > memory_bytes():
            raise ValueError(
                f"--resolution {resolution}: the {count} images in memory as "
                f"float32 need {held / 2**30:.3g} GiB, more than this machine's "
                f"{memory_bytes() / 2**30:.3g} GiB; lower --resolution (or use --streaming)"
            )
        num_classes = max(known.classes) + 1  # the class embedding covers every label of the dataset
        names = resolve_class_names(test.names or known.names, num_classes, class_names)
        learned = [c for t in learned_tasks or [] for c in t]
        if model_names is not None:  # a continued model: its label space, grown by the data's new names
            names, ids = label_space(model_names, names)
            check_mapping(names, ids, learned, streaming, tasks_given=bool(tasks))
            test, train = (None if s is None else relabelled(s, ids) for s in (test, train))
            known, num_classes = (test if streaming else train), len(names)
        check_class_names(names)
        sources = list(learned_sources or [source] * len(learned_tasks or []))
        data = TaskData(
            source,
            test,
            train,
            None if train is None else images_to_model_input(train.images, resolution, resize),
            images_to_model_input(test.images, resolution, resize),
            resolution,
            known.num_channels,
            num_classes,
            planned := planned_tasks(tasks, classes_per_task, known.classes, names, learned_tasks),
            names,
            sources + [source] * (len(planned) - len(sources)),
        )
    except ValueError as err:  # DataError: stop before any training
        raise SystemExit(f"error: {err}") from None
    missing = [c for t in data.tasks for c in t if c not in test.classes and c not in learned]  # learned: carried
    if missing and need_test_classes:
        raise SystemExit(
            f"error: the test split has no images of classes {missing}: FID needs them (or pass --fid_backend none)"
        )
    return data


def relabelled(split: LabeledImages, ids: Sequence[int]) -> LabeledImages:
    """``split`` with each label ``c`` replaced by ``ids[c]`` (the data's classes in a continued model's label
    space)."""
    return LabeledImages(split.images, torch.as_tensor(ids, dtype=torch.int64)[split.labels], split.names)


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_pool_budget(data: TaskData, per_class: int, output_dir: str | os.PathLike) -> None:
    """Refuse, before any training, a replay pool of ``per_class`` images per old class that cannot fit: it is
    written to ``output_dir`` (float16 images, int64 labels) and then held whole in memory, once for the largest set
    of old classes (before the last task)."""
    if len(data.tasks) < 2:
        return
    old_classes = sum(len(t) for t in data.tasks[:-1])
    pool = per_class * old_classes * (2 * data.num_channels * data.resolution**2 + 8)
    free = shutil.disk_usage(
        next(p for p in (Path(output_dir), *Path(output_dir).resolve().parents) if p.exists())
    ).free
    for where, limit in (("free disk space in --output_dir", free), ("this machine's memory", memory_bytes())):
        if pool > limit:
            raise SystemExit(
                f"error: --replay_per_class {per_class}: the replay pool before the last "
                f"task ({old_classes} classes x {per_class} images at {data.resolution}x"
                f"{data.resolution}) needs {pool / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB "
                f"of {where}; lower --replay_per_class (the paper: 5000, ImageNet 1300)"
            )


def task_loader(
    accelerator,
    data: TaskData,
    classes: list[int],
    *,
    batch_size: int,
    seed: int,
    fisher_num_samples: int | None,
    fisher_batch_size: int,
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    resize: bool = False,
    num_workers: int = 0,
):
    """(training loader, number of training images, Fisher loader) of the task of ``classes``: shuffled with
    ``seed`` (the run's seed + the task index), ``batch_size`` images per process; the Fisher loader yields a seeded
    subset of ``fisher_num_samples`` (``fisher_loader``), this process's share."""
    from .continual import fisher_loader

    if streaming:

        def streamed(shuffle: bool, shuffle_seed: int = 0):
            return stream_task(
                data.source,
                "train",
                classes,
                resolution=data.resolution,
                num_channels=data.num_channels,
                image_column=image_column,
                label_column=label_column,
                resize=resize,
                shuffle=shuffle,
                seed=shuffle_seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
            )

        num_examples = count_task_examples(data.source, "train", classes, label_column)
        num_batches = num_examples // (batch_size * accelerator.num_processes)
        if num_batches == 0:
            raise SystemExit(
                f"error: the task of classes {classes} has {num_examples} training images, fewer than one batch "
                f"of {batch_size} per process; lower --train_batch_size"
            )
        loader = StreamedTaskLoader(streamed(True, seed), batch_size, num_batches, accelerator.device)
        fisher = StreamedTaskLoader(
            streamed(False),
            fisher_batch_size,
            None,
            accelerator.device,
            accelerator.process_index,
            accelerator.num_processes,
        )
        return loader, num_examples, fisher
    mask = torch.isin(data.train.labels, torch.tensor(classes))
    images, labels = data.train_inputs[mask], data.train.labels[mask]
    # on a GPU the task's images live there and each batch is gathered there (no copy per step), unless loader
    # workers (which cannot hold CUDA tensors) are asked for: then pinned host batches, copied without blocking
    on_device = accelerator.device.type == "cuda" and not num_workers
    place = accelerator.device if on_device else images.device
    loader = torch.utils.data.DataLoader(
        InMemoryTask(images.to(place), labels.to(place)),
        batch_size=batch_size,
        collate_fn=whole_batch,
        shuffle=True,
        drop_last=len(labels) > batch_size,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda" and not on_device,
    )
    fisher = fisher_loader(
        images,
        labels,
        fisher_num_samples,
        fisher_batch_size,
        seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    return loader, len(labels), fisher


# ---------------------------------------------------------------------------------------------------- preview


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hf_r1ewc.data``: print a dataset's class-incremental split and save a sample grid per task."""
    import argparse

    from .plots import save_image_grid

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset_name", default=BUILTIN_DIGITS, help="'digits', a Hub id or a local folder")
    parser.add_argument("--tasks", default=None, help="explicit tasks, e.g. '0,1;2,3'")
    parser.add_argument("--classes_per_task", type=int, default=2)
    parser.add_argument("--output", default="data_preview.png")
    args = parser.parse_args(argv)
    train = load_labeled_images(args.dataset_name, "train")
    test = load_labeled_images(args.dataset_name, "test")
    tasks = parse_tasks(args.tasks, args.classes_per_task, train.classes)
    rows = []
    for index, classes in enumerate(tasks, start=1):
        task_train, task_test = train.subset(classes), test.subset(classes)
        print(f"task {index}: classes {classes}  train {len(task_train)}  test {len(task_test)}")
        rows.append(images_to_model_input(task_train.head_per_class(4).images, default_resolution(train.image_size)))
    save_image_grid(torch.cat(rows), args.output, nrow=len(rows[0]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
