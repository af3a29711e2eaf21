"""hf_r1ewc.run without a launch: the manifest check, checkpoint positions, saving, finding and resume advice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import make_tiny_unet

from hf_r1ewc.hub import write_json
from hf_r1ewc.integrity import write_checkpoint_digests
from hf_r1ewc.run import (
    MANIFEST,
    RunPosition,
    check_manifest,
    checkpoint_dirs,
    find_checkpoint,
    resume_advice,
    save_checkpoint,
)


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class BarrierCounter:
    """The parts of an Accelerator that the manifest check uses, counting its barriers."""

    def __init__(self, is_main_process: bool) -> None:
        self.is_main_process, self.barriers = is_main_process, 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


def manifest(learning_rate: float, ewc_lambda: float = 15000.0) -> dict:
    settings = {"learning_rate": learning_rate, "ewc_lambda": ewc_lambda}
    return {"settings": settings, "dataset": {"source": "digits", "num_test": 10}, "tasks": [[0, 1], [2, 3]]}


def check(accelerator, folder: Path, current: dict, adopt: bool = False) -> dict | None:
    return check_manifest(
        accelerator, folder, current, recovery_settings=("learning_rate",), may_change=("output_dir",), adopt=adopt
    )


@pytest.mark.parametrize("recorded", ["none", "earlier learning rate"])
def test_every_process_passes_the_same_barriers_whenever_it_reads_the_manifest(accelerator, tmp_path, recorded):
    """Multi-process: the main process writes run_manifest.json right after the check; a slower process that reads
    the folder only then must pass as many barriers as the main process did, or the run deadlocks (seen as a 900 s
    hang of the 2-process streamed test when each path had its own barriers)."""
    if recorded != "none":
        write_json(tmp_path / MANIFEST, check(BarrierCounter(True), tmp_path, manifest(5e-4)))
    main_process, other = BarrierCounter(True), BarrierCounter(False)
    written = check(main_process, tmp_path, manifest(1e-3))
    write_json(tmp_path / MANIFEST, written)  # what the caller does next on the main process
    assert check(other, tmp_path, manifest(1e-3)) is None  # the slower process reads the new file: no change
    assert main_process.barriers == other.barriers == 1
    changes = json.loads((tmp_path / MANIFEST).read_text())["changes"]
    assert [(c["setting"], c["from"], c["to"]) for c in changes] == (
        [] if recorded == "none" else [("learning_rate", 5e-4, 1e-3)]
    )


def test_manifest_refuses_a_result_setting_and_names_it(accelerator, tmp_path):
    write_json(tmp_path / MANIFEST, check(accelerator, tmp_path, manifest(1e-3)))
    with pytest.raises(SystemExit, match=r"--ewc_lambda: 15000.0 in the folder, 100.0 now(.|\n)*--output_dir"):
        check(accelerator, tmp_path, manifest(1e-3, ewc_lambda=100.0))


def test_a_longer_task_list_continues_the_run_and_is_recorded(accelerator, tmp_path):
    """The recorded tasks first, then new ones: the run goes on, the manifest's tasks grow (a change recorded) and
    the flags that spell the list follow it; any other list is refused, showing both."""
    recorded = manifest(1e-3)
    recorded["settings"]["tasks"] = "0,1;2,3"
    write_json(tmp_path / MANIFEST, check(accelerator, tmp_path, recorded))
    longer = manifest(1e-3)
    longer["settings"]["tasks"], longer["tasks"] = "0,1;2,3;4,5", [[0, 1], [2, 3], [4, 5]]
    written = check_manifest(
        accelerator,
        tmp_path,
        longer,
        recovery_settings=(),
        may_change=(),
        task_list_settings=("tasks",),
    )
    assert written["tasks"] == [[0, 1], [2, 3], [4, 5]] and written["settings"]["tasks"] == "0,1;2,3;4,5"
    assert [(c["setting"], c["from"], c["to"]) for c in written["changes"]] == [
        ("tasks", [[0, 1], [2, 3]], [[0, 1], [2, 3], [4, 5]])
    ]
    for tasks in ([[0, 1], [4, 5]], [[0, 1]]):
        other = manifest(1e-3)
        other["settings"]["tasks"], other["tasks"] = "", tasks
        with pytest.raises(SystemExit, match=re.escape(f"tasks: [[0, 1], [2, 3]] in the folder, {tasks!r} now")):
            check_manifest(
                accelerator, tmp_path, other, recovery_settings=(), may_change=(), task_list_settings=("tasks",)
            )


def test_work_without_a_manifest_is_refused_unless_adopted(accelerator, tmp_path):
    (tmp_path / "task_01").mkdir()
    with pytest.raises(SystemExit, match=r"holds earlier work \(task_01\) but no run_manifest.json"):
        check(accelerator, tmp_path, manifest(1e-3))
    assert check(accelerator, tmp_path, manifest(1e-3), adopt=True)["changes"] == []


@pytest.mark.parametrize(
    "record",
    [
        {"task": 2, "epoch": 1, "step_in_epoch": 3, "global_step": 9},  # the oldest checkpoints: no curves
        {
            "task": 2,
            "epoch": 1,
            "step_in_epoch": 3,
            "global_step": 9,
            "curves": [[0.5], [0.4]],
            "epoch_losses": [[0.3], [0.2]],
            "num_processes": 2,
        },  # two curves, before the penalty's gradient ratio
    ],
)
def test_older_positions_are_read(record):
    position = RunPosition.from_json(record)
    assert (position.task, position.epoch, position.step_in_epoch, position.global_step) == (2, 1, 3, 9)
    assert position.loss_per_epoch == record.get("curves", [[]])[0]
    assert position.ewc_grad_ratio_per_epoch == []
    assert position.epoch_losses == record.get("epoch_losses", [[]])[0]
    assert position.num_processes == record.get("num_processes")
    assert RunPosition.from_json(position.to_json()) == position


def test_saved_checkpoints_are_found_pruned_and_verified(accelerator, tmp_path, caplog):
    model = accelerator.prepare(make_tiny_unet())
    for step in (2, 4, 6):
        position = RunPosition(1, 0, step, step, [], [], [], [0.5] * step, [0.4] * step)
        save_checkpoint(accelerator, model, tmp_path, position, limit=2)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    saved = RunPosition.read(tmp_path / "checkpoints" / "checkpoint-6")
    assert saved.num_processes == 1 and saved.max_abs_weight > 0 and saved.epoch_losses == [0.5] * 6
    assert find_checkpoint("checkpoint-4", tmp_path) == tmp_path / "checkpoints" / "checkpoint-4"
    assert "restarts at checkpoint-6 (task 1, step 6" in resume_advice(tmp_path)
    newest = tmp_path / "checkpoints" / "checkpoint-6" / "position.json"
    newest.write_text(newest.read_text().replace('"global_step": 6', '"global_step": 7'))
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-4"  # the damaged one is skipped
    with pytest.raises(SystemExit, match="checkpoint-6 is damaged .*Resume from an intact one \\(checkpoint-4"):
        find_checkpoint("checkpoint-6", tmp_path)
    write_checkpoint_digests(newest.parent)  # as if its writer had written it so
    assert find_checkpoint(None, tmp_path).name == "checkpoint-6"


def test_non_finite_weights_are_never_checkpointed(accelerator, tmp_path):
    model = make_tiny_unet()
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(SystemExit, match="no longer finite at step 4, so no checkpoint was saved"):
        save_checkpoint(accelerator, model, tmp_path, RunPosition(1, 0, 4, 4), limit=2)
    assert not (tmp_path / "checkpoints").exists()


def test_a_setting_added_later_reads_as_its_old_behaviour(accelerator, tmp_path):
    """A folder recorded before --lr_scheduler existed resumes when the flag keeps the old behaviour, and is
    refused when it does not."""
    write_json(tmp_path / MANIFEST, check(accelerator, tmp_path, manifest(1e-3)))
    newer = manifest(1e-3)
    newer["settings"]["lr_scheduler"] = "constant"

    def check_with_added(current):
        return check_manifest(
            accelerator,
            tmp_path,
            current,
            recovery_settings=(),
            may_change=(),
            added_settings=lambda recorded: {"lr_scheduler": "constant"},
        )

    assert check_with_added(newer) is None
    newer["settings"]["lr_scheduler"] = "cosine"
    with pytest.raises(SystemExit, match="--lr_scheduler: 'constant' in the folder, 'cosine' now"):
        check_with_added(newer)


def test_a_checkpoint_keeps_the_state_that_methods_change_during_a_task(accelerator, tmp_path):
    """register_methods: a method with changes_during_task (its state moves at every step) is saved into
    continual_methods.safetensors and loaded back, checked; a method whose state changes only at a task's end is not
    written (the task folder keeps it); a checkpoint without the file is refused (it used to leave the methods as
    they were: SI's path integral silently reset), and so is one whose values do not fit."""
    from hf_r1ewc.continual import ContinualLearner
    from hf_r1ewc.methods import EWC, ContinualMethod, Expected
    from hf_r1ewc.run import METHODS_STATE, register_methods

    class Steps(ContinualMethod):
        name, changes_during_task = "steps", True

        def __init__(self):
            self.count = torch.zeros(3)

        def after_optimizer_step(self, model, lr):
            self.count += lr

        def state_dict(self):
            return {"count": self.count.clone()}

        def load_state_dict(self, state, expected):
            if state["count"].shape != (3,):
                raise ValueError(f"count has shape {list(state['count'].shape)}")
            self.count = state["count"].clone()

    steps = Steps()
    learner = ContinualLearner(None, [EWC(None, "rank1", 1.0), steps])
    register_methods(accelerator, learner, Expected({}, 0, [], within_task=True))
    model = accelerator.prepare(make_tiny_unet())
    learner.after_optimizer_step(model, 0.5)
    accelerator.save_state(str(tmp_path / "ckpt"))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "ckpt" / METHODS_STATE))) == {"steps.count"}  # not the EWC penalty
    learner.after_optimizer_step(model, 0.5)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert torch.equal(steps.count, torch.full((3,), 0.5))
    from safetensors.torch import save_file

    save_file({"steps.count": torch.zeros(4)}, str(tmp_path / "ckpt" / METHODS_STATE))
    with pytest.raises(ValueError, match=f"{METHODS_STATE} cannot be used: steps: count has shape \\[4\\]"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / METHODS_STATE).unlink()
    with pytest.raises(ValueError, match="No such file"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert torch.equal(steps.count, torch.full((3,), 0.5))
