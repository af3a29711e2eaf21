from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import pytest
import torch

from hf_r1ewc.data import (
    DataError,
    LabeledImages,
    images_to_model_input,
    load_labeled_images,
    parse_tasks,
    resolve_columns,
    stream_task,
)


# ------------------------------------------------------------------------------------ real Fashion-MNIST (IDX)


def test_idx_loader_reads_real_fashion_mnist(fashion_mnist_dir):
    train = load_labeled_images(str(fashion_mnist_dir), "train")
    test = load_labeled_images(str(fashion_mnist_dir), "test")
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10_000
    assert train.labels.bincount().tolist() == [6_000] * 10
    assert test.labels.bincount().tolist() == [1_000] * 10
    # Real pictures, not a constant stand-in: dark background, bright objects, many grey levels.
    assert train.images.float().mean().item() == pytest.approx(72.94, abs=0.5)  # Fashion-MNIST's known mean pixel
    assert len(torch.unique(train.images[:100])) > 200


def test_fashion_mnist_padded_to_32_in_unit_range(fashion_mnist_dir):
    subset = load_labeled_images(str(fashion_mnist_dir), "test").subset([0, 1])
    x = subset.to_model_input(32).tensors[0]
    assert x.shape == (2_000, 1, 32, 32)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # zero padding: a two-pixel black frame (-1 after scaling), the 28x28 original inside
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, -2:] == -1) and torch.all(x[:, :, :, :2] == -1)
    assert torch.equal(x[:, :, 2:30, 2:30], subset.images.float() / 127.5 - 1)


def test_idx_truncated_file_is_a_clear_error(fashion_mnist_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fashion_mnist_dir / name, tmp_path / name)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_labeled_images(str(tmp_path), "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:6])  # cut inside the header
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is truncated: 6 bytes"):
        load_labeled_images(str(tmp_path), "test")


# ------------------------------------------------------------------------------------------- other sources


def test_builtin_digits_split_is_disjoint_and_balanced():
    train, test = load_labeled_images("digits", "train"), load_labeled_images("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.classes == list(range(10))
    assert test.labels.bincount().min() >= 34
    flat_train = {bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(train.images, train.labels)}
    overlap = sum(bytes(x.numpy()) + bytes([int(y)]) in flat_train for x, y in zip(test.images, test.labels))
    assert overlap < 5  # identical digits can exist in the raw data; the split itself holds no index twice


def _tiny_hf_dataset(num=40, num_classes=4, size=6, channels=3, image_col="img", label_col="label"):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    mode = "RGB" if channels == 3 else "L"
    images = [
        Image.fromarray(
            rng.integers(0, 256, (size, size, channels) if channels == 3 else (size, size), np.uint8), mode
        )
        for _ in range(num)
    ]
    labels = [i % num_classes for i in range(num)]
    return datasets.Dataset.from_dict({image_col: images, label_col: labels}).cast_column(image_col, datasets.Image())


def test_save_to_disk_folder_with_detected_columns(tmp_path):
    import datasets

    ds = _tiny_hf_dataset()
    datasets.DatasetDict({"train": ds, "test": ds.select(range(8))}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_labeled_images(str(tmp_path / "saved"), "train")
    assert loaded.images.shape == (40, 3, 6, 6) and loaded.classes == [0, 1, 2, 3]
    assert len(load_labeled_images(str(tmp_path / "saved"), "test")) == 8
    first = np.asarray(ds[0]["img"]).transpose(2, 0, 1)
    assert torch.equal(loaded.images[0], torch.from_numpy(first))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((5, 5), 40 * i, np.uint8), "L").save(folder / f"{i}.png")
    loaded = load_labeled_images(str(tmp_path), "train")
    assert loaded.images.shape == (6, 1, 5, 5) and loaded.classes == [0, 1]
    assert loaded.names == ("cat", "dog")  # an imagefolder's subfolders name its classes


def test_class_names_come_from_the_flag_the_source_or_the_ids(fashion_mnist_dir, tmp_path):
    """digits are named 0-9, Fashion-MNIST's IDX files its standard ten, a ClassLabel by its names, a plain integer
    label by its ids; --class_names wins, one name per id, unique, and a number only as its own id."""
    from hf_r1ewc.data import FASHION_MNIST_NAMES, check_class_names, load_task_data, resolve_class_names

    assert load_labeled_images("digits", "test").names == tuple("0123456789")
    assert load_labeled_images(str(fashion_mnist_dir), "test").names == FASHION_MNIST_NAMES
    plain = tmp_path / "IDX"  # the same files in a folder not named for Fashion-MNIST: no names
    shutil.copytree(fashion_mnist_dir, plain)
    assert load_labeled_images(str(plain), "test").names is None
    assert resolve_class_names(None, 3) == ["0", "1", "2"]
    assert resolve_class_names(("a", "b", "c", "d"), 3) == ["a", "b", "c"]  # the label space is the data's
    assert resolve_class_names(("a",), 3, "x, y,z") == ["x", "y", "z"]
    for flag, problem in (
        ("x,y", "gives 2 names but the data has 3 class ids"),
        ("x,x,z", "class names ['x'] are given to several ids"),
        ("x,,z", "class id 1 has an empty name"),
        ("x,2,z", "class id 1 is named '2', another id's number"),
    ):
        with pytest.raises(DataError, match=re.escape(problem)):
            check_class_names(resolve_class_names(None, 3, flag))
    data = load_task_data("digits", tasks="3,4;five", class_names="0,1,2,3,4,five,6,7,8,9", resolution=8)
    assert data.tasks == [[3, 4], [5]] and data.id2label[5] == "five"


def test_tasks_take_class_names_and_ids():
    from hf_r1ewc.data import FASHION_MNIST_NAMES

    assert parse_tasks("Sneaker,Bag;3, 4", None, range(10), class_names=FASHION_MNIST_NAMES) == [[7, 8], [3, 4]]
    with pytest.raises(DataError, match=r"class 'Snekaer', which does not exist: the classes are \['T-shirt/top'"):
        parse_tasks("Snekaer,Bag", None, range(10), class_names=FASHION_MNIST_NAMES)
    with pytest.raises(DataError, match="this data names no classes"):
        parse_tasks("cat", None, range(10))


def test_a_continued_run_appends_new_tasks_to_the_learned_ones():
    """--tasks after a model that learned [[0,1],[2,3]]: the whole list (learned first) or the new tasks alone;
    anything else is refused, showing both lists."""
    from hf_r1ewc.data import continued_tasks

    learned = [[0, 1], [2, 3]]
    assert continued_tasks(learned, [[0, 1], [2, 3], [4, 5]]) == [[0, 1], [2, 3], [4, 5]]
    assert continued_tasks(learned, [[4, 5], [6]]) == [[0, 1], [2, 3], [4, 5], [6]]
    assert continued_tasks(learned, learned) == learned
    for planned in ([[0, 1], [4, 5]], [[2, 3], [4, 5]], [[0, 1]], [[3, 4]]):
        with pytest.raises(DataError, match=re.escape(f"trained on the tasks {learned}, and --tasks gives {planned}")):
            continued_tasks(learned, planned)


def test_missing_column_lists_available_columns(tmp_path):
    ds = _tiny_hf_dataset(image_col="picture_data", label_col="kind")
    ds.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match=r"no image column found among \['picture_data', 'kind'\].*--image_column"):
        load_labeled_images(str(tmp_path / "odd"), "train")
    with pytest.raises(DataError, match=r"label column 'nope' not found; available columns"):
        load_labeled_images(str(tmp_path / "odd"), "train", image_column="picture_data", label_column="nope")
    ok = load_labeled_images(str(tmp_path / "odd"), "train", image_column="picture_data", label_column="kind")
    assert len(ok) == 40


def test_unknown_dataset_and_path_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'not a dataset'"):
        load_labeled_images("not a dataset")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_labeled_images(str(tmp_path / "file.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="could not read split"):
        load_labeled_images(str(empty))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # datasets and huggingface_hub read HF_HUB_OFFLINE at import time: set the variable and their constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load Hub dataset 'someone/no-such-data'.*--train_data_dir"):
        load_labeled_images("someone/no-such-data")


def test_resolve_columns_prefers_explicit_names():
    assert resolve_columns(["img", "label"]) == ("img", "label")
    assert resolve_columns(["image", "fine_label", "coarse_label"]) == ("image", "fine_label")
    assert resolve_columns(["a", "b"], "b", "a") == ("b", "a")


# --------------------------------------------------------------------------------------------- conversion


def test_padding_resizing_and_errors():
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    padded = images_to_model_input(images, 12)
    assert padded.shape == (2, 1, 12, 12) and padded[0, 0, 2, 2] == 1 and padded[0, 0, 0, 0] == -1
    assert images_to_model_input(images, 16, resize=True).shape == (2, 1, 16, 16)
    with pytest.raises(DataError, match="--resize"):
        images_to_model_input(images, 4)


def test_head_per_class_and_subset():
    data = LabeledImages(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2] * 4))
    assert data.subset([0, 2]).labels.tolist() == [0, 2] * 4
    assert data.head_per_class(2).labels.tolist() == [0, 1, 2, 0, 1, 2]


# -------------------------------------------------------------------------------------------------- splits


def test_paper_splits_and_explicit_tasks():
    assert parse_tasks(None, 2, range(10)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert parse_tasks(None, 50, range(1000))[19] == list(range(950, 1000))
    assert parse_tasks("3,1; 0", None, range(4)) == [[3, 1], [0]]


@pytest.mark.parametrize(
    "tasks, per_task, embeds, message",
    [
        ("0,1;1,2", None, None, "class 1 appears in task 1 and task 2"),
        ("0,1;11", None, None, r"absent from the data"),
        ("0,1;;2", None, None, "empty task"),
        ("0,a", None, None, "class 'a', which does not exist"),
        (None, 3, None, "do not split into tasks of 3"),
        (None, None, None, "--classes_per_task"),
        ("0,1;8,9", None, 5, r"classes \[8, 9\] lie outside the model's class embedding"),
    ],
)
def test_split_errors(tasks, per_task, embeds, message):
    with pytest.raises(DataError, match=message):
        parse_tasks(tasks, per_task, range(10), num_class_embeds=embeds)


# ----------------------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    """A local parquet dataset with the ImageNet-32 schema (image, label), 120 classes, tiny images, 4 shards."""
    root = tmp_path_factory.mktemp("parquet") / "data"
    root.mkdir()
    ds = _tiny_hf_dataset(num=480, num_classes=120, size=4, image_col="image")
    for shard in range(4):
        ds.shard(4, shard, contiguous=True).to_parquet(str(root / f"train-{shard:05d}-of-00004.parquet"))
    return root.parent, ds


def _collect(stream):
    return [(ex["class_labels"], ex["pixel_values"]) for ex in stream]


def test_streaming_filters_labels_and_converts(parquet_dataset):
    folder, source = parquet_dataset
    classes = list(range(50, 100))
    stream = stream_task(str(folder), "train", classes, resolution=8, num_channels=3, seed=0)
    items = _collect(stream)
    assert sorted(label for label, _ in items) == sorted(l for l in source["label"] if 50 <= l < 100)
    pixels = items[0][1]
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and torch.all(pixels[:, 0] == -1)  # padded 4 -> 8


def test_streaming_shards_across_processes_without_overlap(parquet_dataset):
    folder, _ = parquet_dataset
    classes = list(range(0, 120, 3))
    whole = sorted(
        float(p.sum()) for _, p in _collect(stream_task(str(folder), "train", classes, resolution=4, num_channels=3))
    )
    parts = [
        [
            float(p.sum())
            for _, p in _collect(
                stream_task(str(folder), "train", classes, resolution=4, num_channels=3, rank=r, world_size=2)
            )
        ]
        for r in range(2)
    ]
    assert len(parts[0]) > 0 and len(parts[1]) > 0
    assert sorted(parts[0] + parts[1]) == whole  # a partition: every example exactly once


def test_streaming_shuffle_reseeded_per_epoch(parquet_dataset):
    folder, _ = parquet_dataset
    stream = stream_task(str(folder), "train", list(range(120)), resolution=4, num_channels=3, shuffle_buffer_size=64)
    first = [label for label, _ in _collect(stream)]
    stream.set_epoch(1)
    second = [label for label, _ in _collect(stream)]
    assert sorted(first) == sorted(second) and first != second
    stream.set_epoch(0)
    assert [label for label, _ in _collect(stream)] == first


@pytest.mark.parametrize("num_workers", [0, 2])
def test_in_memory_task_batches_are_the_per_image_loaders_batches(num_workers):
    """A task read one gather per batch gives, through Accelerate's prepared loader and its resume skip, exactly the
    batches (and order) the per-image TensorDataset loader gave: runs and resumes are unchanged by it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    from hf_r1ewc.data import InMemoryTask, whole_batch

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(100, 1, 8, 8, generator=g), torch.randint(0, 10, (100,), generator=g)
    batches = {}
    for name, dataset, extra in (
        ("per image", torch.utils.data.TensorDataset(images, labels), {}),
        ("gathered", InMemoryTask(images, labels), {"collate_fn": whole_batch}),
    ):
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=16,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(7),
            num_workers=num_workers,
            **extra,
        )
        loader = accelerator.prepare(loader)
        loader.set_epoch(2)
        batches[name] = list(loader) + list(accelerator.skip_first_batches(loader, 4))
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(batches["gathered"]) == 6 + 2
    for (a, b), (c, d) in zip(batches["per image"], batches["gathered"]):
        assert torch.equal(a, c) and torch.equal(b, d)


def _imagefolder(root, images_by_split):
    """An imagefolder: ROOT/SPLIT/CLASS/i.png from {split: {class: [PIL images]}}."""
    for split, by_class in images_by_split.items():
        for name, images in by_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(images):
                image.save(folder / f"{i}.png")


def test_imagefolder_with_a_truncated_png_names_the_file(tmp_path):
    from PIL import Image

    gray = lambda v: Image.fromarray(np.full((5, 5), v, np.uint8), "L")  # noqa: E731
    _imagefolder(tmp_path, {"train": {"cat": [gray(10), gray(20)], "dog": [gray(30)]}})
    broken = tmp_path / "train" / "dog" / "0.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DataError, match="dog/0.png cannot be decoded .*remove or replace that file"):
        load_labeled_images(str(tmp_path), "train")


def test_channels_are_decided_once_for_all_splits_and_mixed_sizes_resize_when_asked(tmp_path):
    from PIL import Image

    from hf_r1ewc.data import load_task_data

    gray = lambda v, n=5: Image.fromarray(np.full((n, n), v, np.uint8), "L")  # noqa: E731
    rgb = Image.fromarray(np.full((5, 5, 3), 90, np.uint8), "RGB")
    _imagefolder(
        tmp_path,
        {
            "train": {"cat": [gray(10), rgb], "dog": [gray(30, 7)]},  # colour and a bigger image in train only
            "test": {"cat": [gray(40)], "dog": [gray(50)]},
        },
    )
    with pytest.raises(SystemExit, match="different sizes; pass --resize"):
        load_task_data(str(tmp_path), tasks="0;1")
    data = load_task_data(str(tmp_path), tasks="0;1", resolution=8, resize=True)
    assert data.num_channels == 3 and data.test.images.shape[1] == 3 and data.train.images.shape[1:] == (3, 8, 8)
    assert data.test_inputs.shape == (2, 3, 8, 8)  # what FID compares the 3-channel samples with


def test_non_square_images_are_refused_up_front_unless_resized(tmp_path):
    """An imagefolder of 8x6 images used to be accepted without --resize: task 1 trained and was written, then task
    2's first step crashed (`Sizes of tensors must match`: the replay was sampled square)."""
    from PIL import Image

    from hf_r1ewc.data import load_task_data

    gray = lambda v: Image.fromarray(np.full((8, 6), v, np.uint8), "L")  # noqa: E731  (8 high, 6 wide)
    _imagefolder(
        tmp_path,
        {"train": {"cat": [gray(10), gray(20)], "dog": [gray(30)]}, "test": {"cat": [gray(40)], "dog": [gray(50)]}},
    )
    with pytest.raises(SystemExit, match=r"error: images are 8x6 \(height x width\), not square.*pass --resize"):
        load_task_data(str(tmp_path), tasks="0;1")
    data = load_task_data(str(tmp_path), tasks="0;1", resolution=8, resize=True)
    assert data.train_inputs.shape == (3, 1, 8, 8) and data.test_inputs.shape == (2, 1, 8, 8)
    assert load_task_data(str(tmp_path), tasks="0;1", resize=True).train_inputs.shape == (3, 1, 6, 6)
