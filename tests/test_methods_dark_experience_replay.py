"""hf_r1ewc.methods.dark_experience_replay: the kept draws and predictions after a task (by hand, at the seeded
draws), the matching term and the denoising term of a step (by hand, with the step's own draws for the real rows and
the kept ones for DER's), the task-folder files and what they must fit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner
from hf_r1ewc.methods import DarkExperienceReplay, Expected, TaskEnd, TaskStart, TrainingSplit


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def _split() -> TrainingSplit:
    g = torch.Generator().manual_seed(0)
    return TrainingSplit(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 3] * 5), "abc")


def _after_one_task(train, unet):
    der = DarkExperienceReplay(SCHEDULER, per_class=2, weight=0.5, draws=3, batch_size=4)
    der.end_task(TaskEnd(1, unet, [], [0, 1], seed=5, train=train))
    return der


def test_the_kept_draws_are_the_models_predictions_at_seeded_draws():
    train, unet = _split(), make_tiny_unet().eval()
    der = _after_one_task(train, unet)
    assert len(der.buffer) == 4 and der.noise.shape == (4, 3, 1, 8, 8) and der.timesteps.shape == (4, 3)
    x0, y = train.images[der.buffer.indices], train.labels[der.buffer.indices]
    for p in range(4):  # by hand: exemplar p's generator, its 3 timesteps then its 3 noises, one forward per draw
        g = torch.Generator().manual_seed((5 * 1_000_003 + 1) * 1_000_033 + p)
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(3, 1, 8, 8, generator=g)
        assert torch.equal(der.timesteps[p], t) and torch.equal(der.noise[p], eps)
        for j in range(3):
            with torch.no_grad():
                x_t = SCHEDULER.add_noise(x0[p : p + 1], eps[j : j + 1], t[j : j + 1])
                expected = unet(x_t, t[j : j + 1], class_labels=y[p : p + 1]).sample[0]
            torch.testing.assert_close(der.targets[p, j], expected, rtol=1e-5, atol=1e-6)


def test_a_step_adds_the_matching_term_on_kept_draws_and_leaves_the_denoising_loss_to_the_real_rows():
    """denoise: the real rows only (DER's rows carry no weight there); der = mean over DER's rows and pixels of
    (eps_theta at the kept (t, eps) - the kept prediction)^2, weighted 0.5 in the loss."""
    train, unet = _split(), make_tiny_unet().eval()
    der = _after_one_task(train, unet)
    with torch.no_grad():  # the weights move after task 1, so the matching term is not zero
        for q in unet.parameters():
            q.add_(0.01 * torch.randn_like(q))
    der.start_task(TaskStart(2, unet, [0, 1], [2, 3], train=train))
    x, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([2, 3, 2])
    terms = ContinualLearner(SCHEDULER, [der]).loss(unet, x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    pair = torch.randint(0, 4 * 3, (4,), generator=g)  # extra_batch's draw, then the step's noise and timesteps
    i, j = pair // 3, pair % 3
    noise = torch.randn(7, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (7,), generator=g)
    noise[3:], t[3:] = der.noise[i, j], der.timesteps[i, j]
    x0 = torch.cat([x, train.images[der.buffer.indices[i]]])
    labels = torch.cat([y, train.labels[der.buffer.indices[i]]])
    with torch.no_grad():
        pred = unet(SCHEDULER.add_noise(x0, noise, t), t, class_labels=labels).sample
    denoise = (pred[:3] - noise[:3]).pow(2).mean()
    matched = (pred[3:] - der.targets[i, j]).pow(2).mean()
    assert float(terms["denoise"]) == pytest.approx(float(denoise), rel=1e-5)
    assert float(terms["der"]) == pytest.approx(float(matched), rel=1e-5) and float(matched) > 0
    assert float(terms["loss"]) == pytest.approx(float(denoise + 0.5 * matched), rel=1e-5)


def test_task_files_restore_the_buffer_and_draws_and_refuse_what_does_not_fit(tmp_path):
    import json

    from safetensors.torch import save_file

    train, unet = _split(), make_tiny_unet().eval()
    der = _after_one_task(train, unet)
    for name, payload in der.task_files(1, [0, 1]).items():
        if name.endswith(".json"):
            (tmp_path / name).write_text(json.dumps(payload))
        else:
            save_file(payload.tensors, str(tmp_path / name), payload.metadata)
    expected = Expected.of(unet, [[0, 1], [2, 3]], 1, train)
    restored = DarkExperienceReplay(SCHEDULER, per_class=2, weight=0.5, draws=3)
    restored.load_task_folder(tmp_path, expected)
    assert torch.equal(restored.targets, der.targets) and torch.equal(restored.buffer.indices, der.buffer.indices)
    with pytest.raises(ValueError, match=r"der_draws.safetensors cannot be used: noise has shape \[4, 3, 1, 8, 8\]"):
        DarkExperienceReplay(SCHEDULER, per_class=2, draws=2).load_task_folder(tmp_path, expected)
    draws = der.task_files(1, [0, 1])["der_draws.safetensors"].tensors
    save_file(
        {**draws, "targets": draws["targets"].clone().fill_(float("nan"))}, str(tmp_path / "der_draws.safetensors")
    )
    with pytest.raises(ValueError, match="targets holds non-finite values"):
        DarkExperienceReplay(SCHEDULER, per_class=2, draws=3).load_task_folder(tmp_path, expected)
    save_file({**draws, "timesteps": draws["timesteps"] + 1000}, str(tmp_path / "der_draws.safetensors"))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        DarkExperienceReplay(SCHEDULER, per_class=2, draws=3).load_task_folder(tmp_path, expected)


def test_a_streamed_der_keeps_its_exemplar_images_among_the_files_not_uploaded_unless_asked():
    from hf_r1ewc.methods.exemplars import IMAGE_FILES

    der = DarkExperienceReplay(SCHEDULER, stream_source="someone/data")
    assert der.file == "der_buffer.safetensors" and der.file in IMAGE_FILES
    assert DarkExperienceReplay(SCHEDULER).file == "der_buffer.json"
