"""hf_r1ewc.methods.ensemble and the routing it needs (pipeline.RoutedDenoiser): a 3-task run forgets nothing (every
earlier class samples bit-identically from each later task folder, the FID of an old task never moves), a mixed-label
batch equals row by row what each route samples alone, plain diffusers loads a task folder and samples classes of
task 1 and task 3, a task start from scratch is seeded, and task-folder state that does not fit is refused."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    ISOLATION_TASKS,
    assert_nothing_forgotten,
    assert_plain_diffusers_samples_each_route_alone,
    isolation_run,
    make_tiny_unet,
    quiet_pipeline,
)
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from hf_r1ewc.methods import Ensemble, Expected, TaskStart
from hf_r1ewc.pipeline import RoutedDenoiser


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> Path:
    return isolation_run(tmp_path_factory.mktemp("ensemble") / "out", "--method", "ensemble")  # with the demo's EMA


def test_every_earlier_class_samples_bit_identically_after_every_later_task(ensemble_run):
    """Zero forgetting asserted (with --use_ema on): task folder k samples the classes of tasks 1..k-1 exactly as
    task folder k-1 did, each FID_i(m_k) equals FID_i(m_i), and task k's folder keeps task 1's weights unchanged."""
    assert_nothing_forgotten(ensemble_run)
    first = load_file(str(ensemble_run / "task_01" / "unet" / "diffusion_pytorch_model.safetensors"))
    kept = load_file(str(ensemble_run / "task_03" / "routes" / "task_01" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == kept.keys() and all(torch.equal(first[k], kept[k]) for k in first)
    later = load_file(str(ensemble_run / "task_03" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(first[k], later[k]) for k in first)  # task 3 trained a model of its own


def test_plain_diffusers_samples_classes_of_task_1_and_3_row_by_row_as_each_route_alone(ensemble_run):
    """Task 3's folder through diffusers alone: classes of task 1 (routes/task_01/) and task 3 (the own model)."""
    assert_plain_diffusers_samples_each_route_alone(ensemble_run / "task_03", {"task_01": [0, 2], "denoiser": [1, 3]})


def test_a_routed_denoiser_splits_by_route_and_refuses_a_class_without_one():
    a, b = make_tiny_unet(seed=1).eval(), make_tiny_unet(seed=2).eval()
    routed = RoutedDenoiser({"a": a, "b": b}, {0: "a", 1: "b"})
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = routed(x, torch.tensor(10), class_labels=labels).sample  # a scalar timestep too
        assert torch.equal(out[[0, 2]], b(x[[0, 2]], torch.tensor([10, 10]), class_labels=labels[[0, 2]]).sample)
        assert torch.equal(out[[1]], a(x[[1]], torch.tensor([10]), class_labels=labels[[1]]).sample)
        with pytest.raises(ValueError, match=r"class labels \[3\] have no route"):
            routed(x, torch.tensor(10), class_labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"routes name models \['c'\] that are not given"):
        RoutedDenoiser({"a": a}, {0: "a", 1: "c"})


def test_a_task_from_scratch_starts_from_a_seeded_fresh_model_and_task_1_is_untouched():
    def start(k: int, seed: int) -> UNet2DModel:
        model = make_tiny_unet(seed=5)
        Ensemble(from_scratch=True).start_task(TaskStart(k, model, [], [2, 3], seed=seed))
        return model

    previous, state = make_tiny_unet(seed=5), lambda m: torch.cat([p.flatten() for p in m.parameters()])
    assert torch.equal(state(start(1, 0)), state(previous))
    assert torch.equal(state(start(2, 0)), state(start(2, 0)))  # seeded: every process draws the same
    assert not torch.equal(state(start(2, 0)), state(previous)) and not torch.equal(
        state(start(2, 0)), state(start(2, 1))
    )
    rng = torch.get_rng_state()
    start(2, 0)
    assert torch.equal(rng, torch.get_rng_state())  # the run's own random stream is not consumed


def _tamper_routes(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["routes"]["0"] = "task_07"
    (folder / "model_index.json").write_text(json.dumps(index))


def _tamper_missing_class(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    del index["routes"]["3"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _tamper_weights(folder: Path, change) -> None:
    path = folder / "routes" / "task_01" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _tamper_class(folder: Path) -> None:
    path = folder / "routes" / "task_01" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_tamper_routes, "do not send each class learned so far"),
        (_tamper_missing_class, "do not send each class learned so far"),
        (lambda f: _tamper_weights(f, lambda s: s[next(iter(s))].fill_(float("nan"))), "non-finite"),
        (lambda f: _tamper_weights(f, lambda s: s.update({"conv_in.weight": torch.zeros(2, 2)})), "has shape"),
        (lambda f: _tamper_weights(f, lambda s: s.pop("conv_in.weight")), "missing"),
        (_tamper_class, "names 'UNet2DConditionModel'"),
        (lambda f: shutil.rmtree(f / "routes" / "task_01"), "cannot be read"),
    ],
)
def test_a_task_folder_that_does_not_fit_is_refused_before_anything_is_taken(ensemble_run, tmp_path, tamper, message):
    folder = shutil.copytree(ensemble_run / "task_02", tmp_path / "task_02")
    model = UNet2DModel.from_pretrained(folder / "unet")
    expected = Expected.of(model, ISOLATION_TASKS, 2)
    Ensemble().load_task_folder(folder, expected)  # the folder as written loads
    tamper(folder)
    method = Ensemble()
    with pytest.raises(ValueError, match=message):
        method.load_task_folder(folder, expected)
    assert not method.models and not method.class_routes


def test_a_pipeline_loaded_without_its_route_folders_says_how_to_get_them(ensemble_run, tmp_path):
    folder = shutil.copytree(ensemble_run / "task_02", tmp_path / "task_02")
    shutil.rmtree(folder / "routes")
    pipe = quiet_pipeline(folder)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="load it from the whole task folder"):
        pipe([0, 2], 2)
