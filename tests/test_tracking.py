"""hf_r1ewc.tracking: the per-task scalars by hand, images through a real TensorBoard tracker read back from its event
files, and the validation grid's restoring of the model's mode and (EMA) weights."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import make_tiny_unet
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

from hf_r1ewc.tracking import grid_image, log_images, matrix_images, sample_grid, task_scalars


FID = {1: {1: 10.0}, 2: {1: 14.0, 2: 20.0}, 3: {1: 17.0, 2: 22.0, 3: 30.0}}
ACCURACY = {1: {1: 0.9}, 2: {1: 0.7, 2: 0.8}, 3: {1: 0.5, 2: 0.6, 3: 0.95}}


def test_task_scalars_by_hand():
    after_2 = task_scalars(FID, ACCURACY, {2: 0.1}, 2)
    assert after_2["fid/task_1"] == 14.0 and after_2["fid/task_2"] == 20.0 and "fid/task_3" not in after_2
    assert after_2["afid@k"] == pytest.approx(17.0)
    # F and P over tasks 1..2: ((14 - 10) + (20 - 20)) / 2 and (10 + 20) / 2
    assert after_2["forgetting"] == pytest.approx(2.0) and after_2["plasticity"] == pytest.approx(15.0)
    assert after_2["acc"] == pytest.approx(0.75) and after_2["bwt"] == pytest.approx(0.7 - 0.9)
    assert after_2["class_kl"] == 0.1
    after_3 = task_scalars(FID, ACCURACY, {}, 3)
    assert after_3["afid@k"] == pytest.approx(23.0) and "class_kl" not in after_3
    assert after_3["bwt"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert "acc" not in task_scalars(FID, {}, {}, 1) and "bwt" not in task_scalars(FID, ACCURACY, {}, 1)


def test_images_reach_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("t")
    images = {**matrix_images(FID, ACCURACY), "samples": grid_image(torch.rand(16, 1, 8, 8) * 2 - 1)}
    log_images(accelerator, images, step=7)
    accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "t"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"fid_matrix", "accuracy_matrix", "samples"}
    for tag, image in images.items():
        (logged,) = events.Images(tag)
        assert (logged.step, logged.height, logged.width) == (7, image.shape[0], image.shape[1])
    assert images["samples"].shape[1] >= 256  # 8x8 samples enlarged to stay visible


def test_sample_grid_restores_mode_and_weights_and_uses_the_ema():
    model = make_tiny_unet().train()
    ema = EMAModel(model.parameters(), decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the live weights drift away from the EMA's
    before = [p.detach().clone() for p in model.parameters()]
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    grid = sample_grid(model, scheduler, [0, 1], 3, seed=0, ema=ema)
    assert model.training and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert grid.dtype.name == "uint8" and grid.shape[2] == 3
    ema.copy_to(model.parameters())
    assert (sample_grid(model, scheduler, [0, 1], 3, seed=0) == grid).all()  # it sampled the EMA weights
