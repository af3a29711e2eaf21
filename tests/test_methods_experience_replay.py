"""hf_r1ewc.methods.experience_replay: the buffer after two tasks (by hand), its batches, its weight in the denoising
loss, its task-folder record (indices and the data's digest, no images) and the refusal of other data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner
from hf_r1ewc.methods import Expected, ExperienceReplay, TaskEnd, TaskStart, TrainingSplit


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def _split(sha="abc") -> TrainingSplit:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3] * 5)
    return TrainingSplit(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, labels, sha)


def test_the_buffer_after_two_tasks_and_its_batches(tmp_path):
    train, unet = _split(), make_tiny_unet()
    er = ExperienceReplay(per_class=2, weight=0.5, batch_size=3)
    er.start_task(TaskStart(1, unet, [], [0, 1], train=train))
    assert er.extra_batch(4, torch.Generator(), torch.device("cpu")) is None  # nothing to replay in task 1
    er.end_task(TaskEnd(1, unet, [], [0, 1], seed=5, train=train))
    er.end_task(TaskEnd(2, unet, [], [2, 3], seed=5, train=train))
    expected = []
    for task, classes in ((1, [0, 1]), (2, [2, 3])):  # by hand: each class's first 2 of a seeded permutation
        g = torch.Generator().manual_seed(5 + task)
        for c in classes:
            members = torch.nonzero(train.labels == c).flatten()
            expected.append(members[torch.randperm(len(members), generator=g)[:2]].sort().values)
    assert torch.equal(er.buffer.indices, torch.cat(expected))
    assert train.labels[er.buffer.indices].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    er.start_task(TaskStart(3, unet, [0, 1, 2, 3], [4], train=train))
    batch = er.extra_batch(8, torch.Generator().manual_seed(1), torch.device("cpu"))
    drawn = torch.randint(0, 8, (3,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(batch.images, train.images[er.buffer.indices[drawn]]) and batch.denoise_weight == 0.5
    record = er.task_files(2, [2, 3])["er_buffer.json"]
    assert (
        record["indices"] == er.buffer.indices.tolist() and record["train_sha256"] == "abc" and "images" not in record
    )
    (tmp_path / "er_buffer.json").write_text(json.dumps(record))
    restored = ExperienceReplay(per_class=2)
    restored.load_task_folder(tmp_path, Expected.of(unet, [[0, 1], [2, 3]], 2, train))
    assert torch.equal(restored.buffer.indices, er.buffer.indices)
    with pytest.raises(ValueError, match="buffer indexes a dataset with SHA-256 abc"):
        restored.start_task(TaskStart(3, unet, [0, 1, 2, 3], [4], train=_split("other")))
    with pytest.raises(ValueError, match="needs the training split in memory"):
        ExperienceReplay().start_task(TaskStart(1, unet, [], [0, 1]))


def test_exemplar_rows_count_with_their_weight_in_the_denoising_loss():
    """denoise = (sum of the real rows' losses + weight * sum of the exemplar rows') / (real + exemplar rows)."""
    train, unet = _split(), make_tiny_unet().eval()
    er = ExperienceReplay(per_class=1, weight=0.25, batch_size=2)
    er.end_task(TaskEnd(1, unet, [], [0, 1], train=train))
    er.start_task(TaskStart(2, unet, [0, 1], [2, 3], train=train))
    x, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([2, 3, 2])
    terms = ContinualLearner(SCHEDULER, [er]).loss(unet, x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 2, (2,), generator=g)
    x0 = torch.cat([x, train.images[er.buffer.indices[index]]])
    labels = torch.cat([y, train.labels[er.buffer.indices[index]]])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    with torch.no_grad():
        per_row = (
            (unet(SCHEDULER.add_noise(x0, noise, t), t, class_labels=labels).sample - noise).pow(2).flatten(1).mean(1)
        )
    assert float(terms["denoise"]) == pytest.approx(
        float((per_row[:3].sum() + 0.25 * per_row[3:].sum()) / 5), rel=1e-6
    )


def test_a_reservoir_buffer_is_a_uniform_sample_of_every_example_seen(tmp_path):
    """--er_reservoir M: after two tasks the buffer holds M exemplars, each training example of the seen classes
    equally likely to be among them (M / N, Monte Carlo over 600 seeds); the record keeps the count seen and refuses
    another buffer kind."""
    train, unet = _split(), make_tiny_unet()  # 5 examples per class
    counts = torch.zeros(len(train.labels))
    for seed in range(600):
        er = ExperienceReplay(reservoir=4)
        er.end_task(TaskEnd(1, unet, [], [0, 1], seed=seed, train=train))
        assert len(er.buffer.indices) == 4 and er.buffer.seen == 10
        er.end_task(TaskEnd(2, unet, [], [2, 3], seed=seed, train=train))
        assert len(er.buffer.indices) == 4 and len(set(er.buffer.indices.tolist())) == 4 and er.buffer.seen == 20
        counts[er.buffer.indices] += 1
    assert torch.allclose(counts / 600, torch.full((20,), 4 / 20), atol=0.06)  # 3.5 binomial SEs at p = 0.2
    assert er.label() == "experience replay (reservoir of 4)"
    (tmp_path / "er_buffer.json").write_text(json.dumps(er.task_files(2, [2, 3])["er_buffer.json"]))
    restored = ExperienceReplay(reservoir=4)
    restored.load_task_folder(tmp_path, Expected.of(unet, [[0, 1], [2, 3]], 2, train))
    assert torch.equal(restored.buffer.indices, er.buffer.indices) and restored.buffer.seen == 20
    with pytest.raises(ValueError, match="kept with reservoir 4, this run asks None"):
        ExperienceReplay(per_class=2).load_task_folder(tmp_path, Expected.of(unet, [[0, 1], [2, 3]], 2, train))


def _two_task_buffer(tmp_path):
    """An ER after tasks {0, 1} and {2, 3} (2 per class) with its er_buffer.json in ``tmp_path``."""
    train, unet = _split(), make_tiny_unet()
    er = ExperienceReplay(per_class=2)
    er.end_task(TaskEnd(1, unet, [], [0, 1], seed=5, train=train))
    er.end_task(TaskEnd(2, unet, [], [2, 3], seed=5, train=train))
    record = er.task_files(2, [2, 3])["er_buffer.json"]
    return record, Expected.of(unet, [[0, 1], [2, 3]], 2, train)


NO_CHANGE = lambda record, _: None  # noqa: E731  (a tamper that leaves the record as written)


@pytest.mark.parametrize(
    "tamper, tasks, message",
    [
        (lambda r, _: r["indices"].__setitem__(0, 20), None, r"indices must lie in \[0, 20\)"),
        (lambda r, _: r["indices"].__setitem__(0, -1), None, r"indices must lie in \[0, 20\)"),
        (NO_CHANGE, [[0, 1], [2]], r"exemplars of classes \[3\], which the 2 finished tasks"),
        (lambda r, _: r["indices"].__setitem__(0, 0.0), None, "'indices' must be a list of integers"),
        (lambda r, _: r["indices"].__setitem__(0, True), None, "'indices' must be a list of integers"),
        (lambda r, _: r.__setitem__("indices", list(range(20)) * 10_000), None, "appears twice"),
        (lambda r, _: r.__setitem__("indices", r["indices"][:-1]), None, r"exemplars per class .*3: \(1, 2\)"),
        (lambda r, _: r.__setitem__("train_sha256", "f" * 64), None, "indexes a dataset with SHA-256 ffffffffffff"),
        (lambda r, _: r.__setitem__("seen", 2.5), None, "'seen' must be an integer"),
        (lambda r, _: r.pop("indices"), None, "not a mapping with 'indices'"),
    ],
    ids=[
        "out_of_range",
        "negative",
        "class_not_seen",
        "float",
        "bool",
        "200000_indices",
        "one_short",
        "other_data",
        "float_seen",
        "no_indices",
    ],
)
def test_a_tampered_buffer_is_refused_naming_the_file_and_taking_nothing(tmp_path, tamper, tasks, message):
    """A task folder from the Hub brings its own digests, so a matching digest says nothing about the values. Out of
    range used to be an IndexError at the task's start; negative, unseen-class, 200,000 or float indices were taken
    silently."""
    record, expected = _two_task_buffer(tmp_path)
    tamper(record, None)
    if tasks is not None:
        expected = Expected.of(make_tiny_unet(), tasks, 2, expected.train)
    (tmp_path / "er_buffer.json").write_text(json.dumps(record))
    er = ExperienceReplay(per_class=2)
    with pytest.raises(ValueError, match=message) as raised:
        er.load_task_folder(tmp_path, expected)
    assert "er_buffer.json" in str(raised.value) and len(er.buffer.indices) == 0


# ------------------------------------------------------------------ streamed data: a buffer of the images themselves

CLASS_SIZES = {0: 10, 1: 4, 2: 7}  # examples per class in the synthetic stream; ids 0..20 in stream order
MODEL = __import__("types").SimpleNamespace(config=__import__("types").SimpleNamespace(in_channels=1, sample_size=2))


def stream_of(sizes: dict[int, int], rank: int = 0, world: int = 1, batch: int = 4) -> list:
    """A task's one-pass stream (this process's shard: every world-th example): batches of (model inputs [B, 1, 2, 2]
    in [-1, 1] whose pixels encode each example's id, labels, global index), as the end-of-task loader yields them."""
    labels = [c for c, n in sizes.items() for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7)).tolist()  # classes interleaved
    mine = order[rank::world]
    pixels = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(len(labels)) % 256
    pixels[:, 0, 0, 1] = torch.arange(len(labels)) // 256
    images = pixels.float() / 127.5 - 1.0
    return [
        (images[mine[i : i + batch]], torch.tensor(labels)[mine[i : i + batch]], torch.tensor(mine[i : i + batch]))
        for i in range(0, len(mine), batch)
    ]


def ids_of(stored: torch.Tensor) -> list[int]:
    return (stored[:, 0, 0, 0].long() + 256 * stored[:, 0, 0, 1].long()).tolist()


def test_a_streamed_buffer_is_a_uniform_sample_of_each_class_in_one_pass():
    """Each class's reservoir over one pass of the stream: after the task every class holds min(per_class, its
    examples), each example kept with probability per_class / n_c (Monte Carlo over 1000 seeds, within 4 SEs: a
    false alarm for one of the 21 examples has probability ~0.1 %)."""
    from hf_r1ewc.methods.exemplars import StreamedExemplarBuffer

    labels = torch.tensor([c for c, n in CLASS_SIZES.items() for _ in range(n)])
    kept = torch.zeros(len(labels))
    for seed in range(1000):
        buffer = StreamedExemplarBuffer(per_class=3, source="synthetic")
        buffer.add_task(TaskEnd(1, MODEL, stream_of(CLASS_SIZES), list(CLASS_SIZES), seed, show_progress=False))
        ids = ids_of(buffer.stored)
        assert len(set(ids)) == 9 and buffer.stored_labels.tolist() == labels[ids].tolist()
        assert sorted(buffer.stored_labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert buffer.counts == CLASS_SIZES
        kept[ids] += 1
    expected = torch.tensor([3 / CLASS_SIZES[int(c)] for c in labels])
    se = (expected * (1 - expected) / 1000).sqrt()
    assert ((kept / 1000 - expected).abs() <= 4 * se + 1e-9).all()


def test_a_streamed_reservoir_is_a_uniform_sample_of_everything_seen_across_tasks():
    """--er_reservoir on streamed data keeps its meaning: after two tasks, M exemplars, each example of both tasks
    kept with probability M / N (the old buffer is one part of the merge, weighted by its count)."""
    from hf_r1ewc.methods.exemplars import StreamedExemplarBuffer

    first = {0: 6, 1: 6}
    kept = torch.zeros(20)
    for seed in range(600):
        buffer = StreamedExemplarBuffer(per_class=1, reservoir=5, source="synthetic")
        buffer.add_task(TaskEnd(1, MODEL, stream_of(first), [0, 1], seed, show_progress=False))
        ids_first = ids_of(buffer.stored)
        task_two = [(x, y, i) for x, y, i in stream_of({0: 0, 1: 0, 2: 8})]  # ids 0..7 of task 2: shift by 12
        task_two = [
            (((x + 1) * 127.5 + torch.tensor([12.0, 0, 0, 0]).view(1, 2, 2)) / 127.5 - 1, y, i) for x, y, i in task_two
        ]
        buffer.add_task(TaskEnd(2, MODEL, task_two, [2], seed, show_progress=False))
        assert len(ids_first) == 5 and len(buffer) == 5 and buffer.counts == {-1: 20}
        kept[ids_of(buffer.stored)] += 1
    assert torch.allclose(kept / 600, torch.full((20,), 5 / 20), atol=4 * (0.25 * 0.75 / 600) ** 0.5)


def test_two_processes_hold_the_same_uniform_buffer(tmp_path):
    """2 gloo processes, each streaming its half: after the merge both hold the same exemplars, and each example
    is kept with probability per_class / n_c (400 seeds, within 4 SEs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "kept.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).resolve().parent / "exemplar_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run([*cmd, str(out), "400"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["differ"] == 0
    labels = [c for c, n in CLASS_SIZES.items() for _ in range(n)]
    expected = torch.tensor([3 / CLASS_SIZES[c] for c in labels])
    se = (expected * (1 - expected) / 400).sqrt()
    assert ((torch.tensor(result["kept"]) / 400 - expected).abs() <= 4 * se + 1e-9).all()
