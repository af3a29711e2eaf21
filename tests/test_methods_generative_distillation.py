"""hf_r1ewc.methods.generative_distillation: the replay batch joins the one forward, distillation reads the same
noising, the switches (replay in the denoising loss, weight 0), the teacher and pool at a task's start."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner
from hf_r1ewc.distill import distillation_loss, frozen_teacher
from hf_r1ewc.methods import GenerativeDistillation, TaskStart
from hf_r1ewc.methods.generative_distillation import Replay
from hf_r1ewc.pipeline import sampling_scheduler


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)
SAMPLER = sampling_scheduler("ddim", SCHEDULER.config)


class FixedReplay(Replay):
    """Replay that hands out one given batch (draws nothing from the generator)."""

    def __init__(self, teacher, images, labels):
        super().__init__(teacher, sorted(set(labels.tolist())))
        self.images, self.labels = images, labels

    def batch(self, batch_size, generator, device):
        return self.images.to(device), self.labels.to(device)


def _gd(teacher, replay, weight=1.0, in_denoise=True) -> GenerativeDistillation:
    gd = GenerativeDistillation(per_class=1, distill_weight=weight, replay_in_denoise=in_denoise)
    gd.replay = FixedReplay(teacher, *replay)
    return gd


def _distill_by_hand(student, teacher, real, replay, seed):
    """The distillation term and its gradient by hand: real + replay noised together from the seed (noise, then t),
    the student on all of it in one forward, the teacher on the replay rows."""
    g = torch.Generator().manual_seed(seed)
    x0, labels = torch.cat([real[0], replay[0]]), torch.cat([real[1], replay[1]])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noisy = SCHEDULER.add_noise(x0, noise, t)
    n = real[0].shape[0]
    student_eps = student(noisy, t, class_labels=labels).sample[n:]
    with torch.no_grad():
        teacher_eps = teacher(noisy[n:], t[n:], class_labels=labels[n:]).sample
    loss = distillation_loss(student_eps, teacher_eps)
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    return float(loss.detach()), sum(float(g.abs().sum()) for g in grads if g is not None)


def _learner_distill(student, teacher, real, replay, seed) -> float:
    learner = ContinualLearner(SCHEDULER, [_gd(teacher, replay)])
    return float(learner.loss(student, *real, torch.Generator().manual_seed(seed))["distill"])


def test_distillation_term_is_the_hand_computed_one_and_vanishes_at_the_teacher():
    student = make_tiny_unet().eval()  # same mode as the teacher: the fused attention kernel differs in train mode
    teacher = frozen_teacher(student)
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    replay = (torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([2, 3, 2, 3, 2, 3]))
    value0, grad0 = _distill_by_hand(student, teacher, real, replay, seed=1)
    assert _learner_distill(student, teacher, real, replay, seed=1) == value0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    value, grad_norm = _distill_by_hand(student, teacher, real, replay, seed=1)
    assert _learner_distill(student, teacher, real, replay, seed=1) == value
    assert value > 1e-6 and grad_norm > 1e-4
    # Zero up to float rounding: the student runs real + replay as ONE batch and the teacher the replay alone, and
    # conv kernels round differently at other batch sizes (eps differ by ~1e-7), so "exactly 0" holds to 1e-9 of
    # the perturbed value (and the gradient, linear in that residual, to 1e-5) rather than bit for bit.
    assert value0 <= 1e-9 * value and grad0 <= 1e-5 * grad_norm


def test_loss_parts_and_the_replay_switches():
    student = make_tiny_unet()
    teacher = frozen_teacher(student)
    x, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0])
    replay = (torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([2] * 5))

    def terms(**kwargs):
        learner = ContinualLearner(SCHEDULER, [_gd(teacher, replay, **kwargs)])
        return learner.loss(student, x, y, torch.Generator().manual_seed(0))

    both, real_only, off = terms(weight=0.5), terms(weight=0.5, in_denoise=False), terms(weight=0.0)
    assert float(both["loss"]) == pytest.approx(float(both["denoise"] + 0.5 * both["distill"]), rel=1e-6)
    assert float(both["distill"]) == float(real_only["distill"])  # the same noising serves both terms
    assert float(both["denoise"]) != float(real_only["denoise"])
    assert float(off["distill"]) == 0 and float(off["loss"]) == float(off["denoise"]) == float(both["denoise"])
    # the denoising loss over real + replay is the mean over all 8 rows; without replay, over the 3 real ones
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat([x, replay[0]])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    with torch.no_grad():
        pred = student(SCHEDULER.add_noise(x0, noise, t), t, class_labels=torch.cat([y, replay[1]])).sample
    per_row = (pred - noise).pow(2).flatten(1).mean(1)
    assert float(both["denoise"]) == pytest.approx(float(per_row.mean()), rel=1e-6)
    assert float(real_only["denoise"]) == pytest.approx(float(per_row[:3].mean()), rel=1e-6)


def test_start_task_makes_a_frozen_teacher_and_a_pool_of_the_old_classes(tmp_path):
    model = make_tiny_unet()
    gd = GenerativeDistillation(per_class=3, num_inference_steps=2)
    gd.start_task(TaskStart(1, model, [], [0, 1], SAMPLER, tmp_path, seed=0, show_progress=False))
    assert gd.replay is None and gd.extra_batch(4, torch.Generator(), torch.device("cpu")) is None  # task 1
    gd.start_task(TaskStart(2, model, [0, 1], [2, 3], SAMPLER, tmp_path, seed=0, show_progress=False))
    assert gd.replay.classes == [0, 1] and len(gd.replay.pool) == 6 and (tmp_path / "task_02" / "pool.json").exists()
    assert not any(p.requires_grad for p in gd.replay.teacher.parameters()) and not gd.replay.teacher.training
    batch = gd.extra_batch(5, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch.images.shape == (5, 1, 8, 8) and set(batch.labels.tolist()) <= {0, 1} and batch.denoise_weight == 1
    with pytest.raises(ValueError, match="scratch_dir"):
        gd.start_task(TaskStart(2, model, [0, 1], [2, 3], SAMPLER, None, show_progress=False))


def test_online_replay_and_the_settings_that_cannot_go_together():
    gd = GenerativeDistillation(online_steps=2)
    gd.start_task(TaskStart(2, make_tiny_unet(), [0, 1], [2, 3], SAMPLER, None, show_progress=False))
    batch = gd.extra_batch(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch.images.shape == (3, 1, 8, 8) and gd.replay.pool is None
    with pytest.raises(ValueError, match="online replay has no pool"):
        GenerativeDistillation(online_steps=2, pool="accumulate")
    with pytest.raises(ValueError, match="per_class >= 1"):
        GenerativeDistillation(per_class=None)
    assert GenerativeDistillation(1, distill_weight=0).label() == "generative replay"
    assert GenerativeDistillation(1, pool="accumulate").label() == (
        "generative replay (accumulated pool) + distillation (weight 1)"
    )


def test_an_accumulated_pool_samples_only_the_new_classes_and_keeps_the_old_images(tmp_path):
    """pool="accumulate": at task 3 the classes of task 1 keep the images task 2's teacher sampled (unchanged, as
    many as before) and only task 2's classes are generated, by task 3's teacher; "regenerate" samples both again."""
    from hf_r1ewc.distill import ReplayPool

    old_teacher, teacher = make_tiny_unet(seed=1), make_tiny_unet(seed=2)

    def pools(mode: str):
        gd = GenerativeDistillation(per_class=6, num_inference_steps=2, pool=mode)
        gd.start_task(TaskStart(2, old_teacher, [0], [1], SAMPLER, tmp_path / mode, seed=7, show_progress=False))
        task2 = gd.replay.pool
        gd.start_task(TaskStart(3, teacher, [0, 1], [2], SAMPLER, tmp_path / mode, seed=7, show_progress=False))
        return task2, gd.replay.pool

    task2, pool = pools("accumulate")
    assert sorted(pool.labels.tolist()) == [0] * 6 + [1] * 6
    assert torch.equal(pool.images[pool.labels == 0], task2.images)
    assert ReplayPool.load(tmp_path / "accumulate" / "accumulated" / "task_02").classes == [1]  # only the new one
    regenerated_task2, other = pools("regenerate")
    assert torch.equal(regenerated_task2.images, task2.images)  # the same seed at task 2
    assert not torch.equal(pool.images[pool.labels == 0], other.images[other.labels == 0])  # the new teacher's
