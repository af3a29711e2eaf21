"""Fault injection on the tiny digits run: crashes at each phase boundary, corrupt artifacts, changed settings, a
second run on the same folder, a diverged run, planted pickles. Every case asserts that nothing finished is redone,
nothing is lost, each refusal names the problem and the fix, and the final weights equal the uninterrupted run.

The script runs in this process (``main(argv)``) so that a crash can be injected at an exact boundary by
monkeypatching the function that starts the phase; the exception stands in for a kill there (what is on disk at that
moment is what a resume sees). ``test_train.py`` kills real launched runs between optimizer steps.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conftest import FAST, run, tiny_unet_config, unet_weights  # noqa: E402

import hf_r1ewc.hub as hub  # noqa: E402
import hf_r1ewc.metrics as metrics  # noqa: E402
import train_continual_ddpm as script  # noqa: E402
from hf_r1ewc.config import parse_args  # noqa: E402
from hf_r1ewc.continual import ContinualLearner  # noqa: E402
from hf_r1ewc.integrity import write_checkpoint_digests  # noqa: E402
from hf_r1ewc.recipe import optimizer_for  # noqa: E402
from hf_r1ewc.run import RunPosition, checkpoint_dirs  # noqa: E402


COMMON = [*FAST, "--fid_num_samples", "16", "--checkpointing_steps", "2", "--ewc_type", "rank1"]


class Crash(Exception):
    """Stands in for a kill at an injected point."""


def max_difference(a: Path, b: Path) -> float:
    wa, wb = unet_weights(a), unet_weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run([*COMMON, "--output_dir", str(out)])
    return out


def copy_run(reference: Path, target: Path) -> Path:
    shutil.copytree(reference, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def crash_on_call(monkeypatch, owner, name: str, call: int = 1) -> None:
    """Make ``owner.name`` raise ``Crash`` on its ``call``-th call."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash(f"injected at {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# the phase boundaries of task 2: (owner, function, call that crashes)
PHASES = {
    "replay pool": (ContinualLearner, "start_task", 2),  # task 2's teacher and pool
    "training": (ContinualLearner, "training_step", 9),  # mid task 2, after checkpoint-8
    "FID": (metrics.TaskFID, "__call__", 2),  # FID_1(m_2): task 1 scored one task, task 2 starts with task 1
    "Fisher": (ContinualLearner, "end_task", 2),
    "folder write": (hub, "write_training_state", 2),  # task_02 is half written (.partial)
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_crash_at_each_phase_resumes_without_redoing_or_losing_work(reference, tmp_path, monkeypatch, phase, caplog):
    out = tmp_path / "out"
    owner, name, call = PHASES[phase]
    with monkeypatch.context() as patch:
        crash_on_call(patch, owner, name, call)
        with pytest.raises(Crash):
            run([*COMMON, "--output_dir", str(out)])
    task1 = (out / "task_01" / "training_state.json").read_bytes()
    task1_mtime = (out / "task_01" / "training_state.json").stat().st_mtime_ns
    assert not (out / "task_02").exists()
    caplog.clear()
    run([*COMMON, "--output_dir", str(out)])  # a plain re-run resumes; no flag needed
    # task 1 was not redone (its folder is untouched), task 2 equals the uninterrupted run
    assert (out / "task_01" / "training_state.json").read_bytes() == task1
    assert (out / "task_01" / "training_state.json").stat().st_mtime_ns == task1_mtime
    assert max_difference(reference / "task_02", out / "task_02") == 0.0
    # the step count went on from where it was (a restart at 0 had its new checkpoints pruned by the older ones)
    assert [d.name for d in checkpoint_dirs(out)] == [d.name for d in checkpoint_dirs(reference)]
    fid = [json.loads((run / "results.json").read_text())["fid"] for run in (reference, out)]
    assert fid[0] == fid[1]
    # the per-epoch losses of the interrupted task are not lost either
    metrics = [json.loads((run / "task_02" / "metrics.json").read_text()) for run in (reference, out)]
    assert metrics[0]["loss_per_epoch"] == metrics[1]["loss_per_epoch"]
    assert len(metrics[1]["loss_per_epoch"]) == 2
    assert metrics[0]["ewc_grad_ratio_per_epoch"] == metrics[1]["ewc_grad_ratio_per_epoch"]
    assert len(metrics[1]["ewc_grad_ratio_per_epoch"]) == 2
    if phase == "replay pool":  # the newest checkpoint (task 1's) is older than the finished task_01
        assert "is older than the finished task 1: continuing after task 1" in caplog.text
    else:  # mid task 2, or its end (checkpoint-12) when the crash came after training
        assert f"resuming from the newest, checkpoint-{8 if phase == 'training' else 12}" in caplog.text


@pytest.mark.parametrize(
    "damage, message",
    [
        ("delete ewc_penalty.safetensors", "ewc_penalty.safetensors is missing"),
        ("flip ewc_penalty.safetensors", "ewc_penalty.safetensors differs from the SHA-256"),
        ("truncate ewc_penalty.safetensors", "ewc_penalty.safetensors differs from the SHA-256"),
        ("flip unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors differs"),
        ("delete fisher.safetensors", "fisher.safetensors is missing"),
        ("truncate training_state.json", "training_state.json cannot be read"),
    ],
)
def test_damaged_task_folder_is_refused_with_the_file_named(reference, tmp_path, damage, message):
    folder = tmp_path / "task_01"
    shutil.copytree(reference / "task_01", folder)
    action, name = damage.split(" ", 1)
    path = folder / name
    if action == "delete":
        path.unlink()
    elif action == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
        path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as err:
        run([*COMMON, "--output_dir", str(tmp_path / "next"), "--resume_from_task", str(folder)])
    assert message in str(err.value) and (
        "Copy the folder again" in str(err.value) or "copy the folder" in str(err.value)
    )
    assert not (tmp_path / "next" / "task_02").exists()


def test_penalty_missing_from_a_folder_without_digests_is_refused(reference, tmp_path):
    """Folders written before digests were recorded: the missing penalty is still an error, not ewc = 0."""
    folder = tmp_path / "task_01"
    shutil.copytree(reference / "task_01", folder)
    state = json.loads((folder / "training_state.json").read_text())
    del state["sha256"]
    (folder / "training_state.json").write_text(json.dumps(state))
    (folder / "ewc_penalty.safetensors").unlink()
    with pytest.raises(SystemExit, match="has no ewc_penalty.safetensors"):
        run([*COMMON, "--output_dir", str(tmp_path / "next"), "--resume_from_task", str(folder)])


def test_load_fisher_verifies_the_recorded_digest(reference, tmp_path):
    from hf_r1ewc.fisher import load_fisher
    from hf_r1ewc.integrity import IntegrityError

    folder = shutil.copytree(reference / "task_01", tmp_path / "task_01")
    load_fisher(str(folder / "fisher.safetensors"))  # intact: loads
    data = bytearray((folder / "fisher.safetensors").read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    (folder / "fisher.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="fisher.safetensors differs from the SHA-256"):
        load_fisher(str(folder / "fisher.safetensors"))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--ewc_lambda", "10"], "--ewc_lambda: 15000.0 in the folder, 10.0 now"),
        (["--seed", "1"], "--seed: 0 in the folder, 1 now"),
        (["--resolution", "16"], "model but --resolution is 16"),
        (["--max_train_per_class", "40"], "--max_train_per_class: 48 in the folder, 40 now"),  # other images
        (["--replay", "off"], "--replay: 'on' in the folder, 'off' now"),
    ],
)
def test_changed_result_settings_are_refused(reference, tmp_path, flags, named):
    out = copy_run(reference, tmp_path / "out")
    before = (out / "run_manifest.json").read_bytes()
    argv = [a for a in COMMON]
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as err:
        run([*argv, "--output_dir", str(out)])
    assert named in str(err.value) and "another --output_dir" in str(err.value)
    assert (out / "run_manifest.json").read_bytes() == before  # the record is not overwritten


@pytest.mark.parametrize(
    "case",
    [
        "other prefix",
        "learned class again",
        "learned name in new data",
        "resolution",
        "channels",
        "method",
        "id2label",
    ],
)
def test_a_continuation_that_cannot_be_is_refused_before_any_work(reference, tmp_path, case):
    """Each way of continuing a finished run that cannot work is refused with an error that names it, before any
    work, the folder left as it was: tasks that do not start with the run's, a learned class asked for again (by
    --tasks, or by new data that holds its name), new data of another size (without --resize) or channel count,
    another method, a task folder whose id2label does not fit its model."""
    from conftest import named_shapes_parquet

    out = copy_run(reference, tmp_path / "out")
    argv, data = list(COMMON), {"resolution": 8, "channels": 1, "names": ("circle", "square")}
    if case == "learned name in new data":
        data["names"] = ("circle", "3")
    data["resolution"] = 10 if case == "resolution" else 8
    data["channels"] = 3 if case == "channels" else 1
    shapes = named_shapes_parquet(tmp_path / "shapes", data["names"], data["resolution"], data["channels"])
    tasks = {"other prefix": "0,1;4,5", "learned class again": "circle,3"}.get(case, "0,1;2,3;circle,square")
    argv[argv.index("--tasks") + 1] = tasks
    if case != "other prefix":
        argv[argv.index("--dataset_name") + 1] = str(shapes)
    if case == "learned name in new data":
        del argv[argv.index("--tasks") : argv.index("--tasks") + 2]
    if case == "method":
        del argv[argv.index("--ewc_type") : argv.index("--ewc_type") + 2]
        argv += ["--method", "gd"]
    if case == "id2label":  # an altered folder, its digests rewritten to match
        index = out / "task_02" / "model_index.json"
        config = json.loads(index.read_text())
        config["id2label"].pop("9")
        index.write_text(json.dumps(config))
        state = json.loads((out / "task_02" / "training_state.json").read_text())
        hub.write_training_state(out / "task_02", {k: v for k, v in state.items() if k != "sha256"})
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as err:
        run([*argv, "--output_dir", str(out)])
    expected = {
        "other prefix": "trained on the tasks [[0, 1], [2, 3]], and --tasks gives [[0, 1], [4, 5]]: classes ['0', '1']",
        "learned class again": "classes ['3'] were learned already, and a class-incremental run never returns",
        "learned name in new data": "the new data holds classes ['3'] that the model learned already",
        "resolution": "images are 10x10 but --resolution is 8: padding cannot shrink images",  # the model's size
        "channels": "holds a model that takes 1-channel images and the data's are 3-channel",
        "method": "was trained with other settings (setting: (folder, this run)) {'ewc_type': ('rank1', 'none')}",
        "id2label": "model_index.json names 9 classes but its model's label table has 10 ids",
    }[case]
    assert expected in str(err.value)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_settings_that_may_change_do_not_refuse(reference, tmp_path):
    out = copy_run(reference, tmp_path / "out")
    run([*COMMON, "--output_dir", str(out), "--checkpointing_steps", "7", "--checkpoints_total_limit", "5"])


def test_recovery_learning_rate_takes_effect_on_resume_and_is_recorded(reference, tmp_path):
    """The advised recovery from a divergence (lower --learning_rate, resume) must actually change the rate:
    Accelerate restores the optimizer's stored rate, which would make the resumed run equal the original."""
    out = tmp_path / "out"
    run([*COMMON, "--output_dir", str(out), "--stop_after_steps", "8"])
    run([*COMMON, "--output_dir", str(out), "--learning_rate", "1e-4"])
    assert max_difference(reference / "task_02", out / "task_02") > 1e-4
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert [(c["setting"], c["from"], c["to"]) for c in manifest["changes"]] == [("learning_rate", 0.002, 0.0001)]


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    from hf_r1ewc.integrity import OutputLock

    holder = OutputLock(tmp_path / "out")
    assert holder.acquire()
    try:
        with pytest.raises(SystemExit, match=f"another run \\(process {os.getpid()}\\) is writing"):
            run([*COMMON, "--output_dir", str(tmp_path / "out")])
    finally:
        holder.release()


def test_checkpoint_written_by_another_process_count_is_refused(tmp_path):
    out = tmp_path / "out"
    run([*COMMON, "--output_dir", str(out), "--stop_after_steps", "8"])
    position = out / "checkpoints" / "checkpoint-8" / "position.json"
    assert json.loads(position.read_text())["num_processes"] == 1
    position.write_text(json.dumps({**json.loads(position.read_text()), "num_processes": 2}))
    write_checkpoint_digests(position.parent)  # as a two-process run would have recorded it
    with pytest.raises(SystemExit, match="written by 2 processes and this run has 1"):
        run([*COMMON, "--output_dir", str(out)])


def test_checkpoint_named_relative_to_the_output_folder(reference, tmp_path, caplog):
    out = tmp_path / "out"
    run([*COMMON, "--output_dir", str(out), "--stop_after_steps", "8"])
    caplog.set_level(logging.INFO)
    run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-8"])
    assert "checkpoint-8 (task 2, epoch 0, step 2)" in caplog.text
    assert max_difference(reference / "task_02", out / "task_02") == 0.0
    with pytest.raises(SystemExit, match="no such checkpoint .* available: \\["):
        run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-99"])


def test_latest_without_checkpoints_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run([*COMMON, "--tasks", "0,1", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])
    assert "holds no checkpoint; starting after the finished task folders" in caplog.text


def test_non_finite_loss_names_the_term_and_what_a_resume_does(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as err:
        run(
            [
                *COMMON,
                "--num_epochs_per_task",
                "1",
                "--fid_backend",
                "none",
                "--ewc_type",
                "rank1_unscaled",
                "--ewc_mode",
                "loss",
                "--ewc_lambda",
                "1e300",
                "--output_dir",
                str(out),
            ]
        )
    message = str(err.value)
    assert "the ewc term of the loss is inf at task 2" in message
    # where the resume starts depends on the step the term overflowed at: a checkpoint of task 2, or task_01
    saved = [d.name for d in checkpoint_dirs(out) if json.loads((d / "position.json").read_text())["task"] == 2]
    where = f"restarts at {saved[-1]} (task 2" if saved else "starts task 2 from the finished task_01"
    assert where in message and "--max_grad_norm" in message
    assert (out / "task_01" / "model_index.json").exists() and not (out / "task_02").exists()


def test_upload_failures_are_recorded_when_the_run_ends_in_an_error(tmp_path, monkeypatch):
    class FailingUploader:
        def __init__(self, repo_id, private=None, push_exemplars=False):
            self.submitted = []

        def submit(self, folder, task_index):
            self.submitted.append(task_index)

        def close(self):
            return [{"folder": "task_01", "task": task, "error": "offline"} for task in self.submitted]

    for name in ("__init__", "submit", "close"):
        monkeypatch.setattr(hub.TaskUploader, name, getattr(FailingUploader, name))
    crash_on_call(monkeypatch, metrics.TaskFID, "__call__", 2)
    with pytest.raises(Crash):
        run([*COMMON, "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "user/model"])
    failures = json.loads((tmp_path / "out" / "upload_failures.json").read_text())["failures"]
    assert [f["task"] for f in failures] == [1]


def test_planted_pickle_in_a_checkpoint_runs_no_code(tmp_path):
    """Accelerate reads its checkpoint pickles (optimizer.bin, random_states_0.pkl) with torch.load(weights_only=True):
    a planted object that would run a command on unpickling is refused, and the command never runs."""
    out = tmp_path / "out"
    run([*COMMON, "--output_dir", str(out), "--stop_after_steps", "8"])
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = out / "checkpoints" / "checkpoint-8"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Exploit()))
    # the digests catch corruption, not an adversary, who can rewrite digests.json too: weights_only must hold alone
    write_checkpoint_digests(checkpoint)
    with pytest.raises(SystemExit, match="checkpoint-8 cannot be loaded .*Weights only load failed"):
        run([*COMMON, "--output_dir", str(out)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image_column", "img"], "the builtin digits data has no columns"),
        (["--hub_model_id", "not a repo id"], "is not a valid Hub repo id"),
    ],
)
def test_flags_refused_up_front(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(["--dataset_name", "digits", "--output_dir", "unused", *flags])


def test_missing_relative_train_data_dir_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(SystemExit, match="--train_data_dir data/none is not a folder"):
        parse_args(["--train_data_dir", "data/none", "--output_dir", str(tmp_path)])


def test_unwritable_output_dir_fails_before_any_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    trained = []
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit, match="cannot write to --output_dir"):
        run([*COMMON, "--output_dir", str(tmp_path / "file" / "out")])
    assert not trained


def test_config_without_class_embedding_is_refused(tmp_path):
    config = {
        "_class_name": "UNet2DModel",
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "num_class_embeds": None,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    (tmp_path / "unet.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="no class embedding \\(num_class_embeds: null\\)"):
        run([*COMMON, "--model_config_name_or_path", str(tmp_path / "unet.json"), "--output_dir", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ round two (checkpoints, manifest,
# non-finite statistics, budgets, evaluation beside a running run, write errors)


def _flip_tail(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after step 8 of 12, mid task 2 (checkpoint-6 and checkpoint-8 kept)."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    run([*COMMON, "--output_dir", str(out), "--stop_after_steps", "8"])
    return out


@pytest.mark.parametrize(
    "damage",
    [
        "flip unet_ema/diffusion_pytorch_model.safetensors",
        "flip optimizer.bin",
        "truncate position.json",
        "empty position.json",
        "delete model.safetensors",
    ],
)
def test_checkpoint_damage_is_found(stopped, tmp_path, damage):
    from hf_r1ewc.integrity import checkpoint_problem

    checkpoint = shutil.copytree(stopped / "checkpoints" / "checkpoint-8", tmp_path / "checkpoint-8")
    assert checkpoint_problem(checkpoint) is None
    action, name = damage.split(" ", 1)
    path = checkpoint / name
    if action == "flip":
        _flip_tail(path)
    elif action == "delete":
        path.unlink()
    else:
        path.write_text(path.read_text()[: len(path.read_text()) // 2] if action == "truncate" else "")
    assert name in checkpoint_problem(checkpoint)


def test_damaged_checkpoint_is_skipped_for_the_previous_intact_one(reference, stopped, tmp_path, caplog):
    """Checkpoints carry the SHA-256 of their files: a damaged newest checkpoint is named and skipped, the run resumes
    from the one before and still ends bit for bit where the uninterrupted run did; naming it explicitly is refused
    with the intact one offered."""
    out = copy_run(stopped, tmp_path / "out")
    _flip_tail(out / "checkpoints" / "checkpoint-8" / "model.safetensors")
    with pytest.raises(SystemExit, match="checkpoint-8 is damaged .*Resume from an intact one \\(checkpoint-6"):
        run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-8"])
    caplog.set_level(logging.INFO)
    run([*COMMON, "--output_dir", str(out)])
    assert "checkpoint-8 is damaged (model.safetensors differs" in caplog.text
    assert "resuming from the newest, checkpoint-6" in caplog.text
    assert max_difference(reference / "task_02", out / "task_02") == 0.0


def test_folder_with_work_but_no_manifest_is_refused_until_adopted(reference, stopped, tmp_path):
    """Without run_manifest.json nothing would say what settings the checkpoints were trained with: other flags must
    not continue them silently. --adopt_manifest with the original flags records them and continues."""
    out = copy_run(stopped, tmp_path / "out")
    (out / "run_manifest.json").unlink()
    changed = [*COMMON, "--ewc_lambda", "100", "--learning_rate", "5e-4", "--output_dir", str(out)]
    with pytest.raises(
        SystemExit,
        match="holds earlier work \\(checkpoint-6, checkpoint-8, task_01\\) but no "
        "run_manifest.json.*--adopt_manifest",
    ):
        run(changed)
    assert not (out / "run_manifest.json").exists()
    run([*COMMON, "--output_dir", str(out), "--adopt_manifest"])
    assert json.loads((out / "run_manifest.json").read_text())["settings"]["ewc_lambda"] == 15000.0
    assert max_difference(reference / "task_02", out / "task_02") == 0.0


@pytest.mark.parametrize("content", ["{}", '{"settings": {', ""])
def test_unreadable_manifest_is_a_message(reference, tmp_path, content):
    out = copy_run(reference, tmp_path / "out")
    (out / "run_manifest.json").write_text(content)
    with pytest.raises(SystemExit, match="run_manifest.json cannot be read .*--adopt_manifest"):
        run([*COMMON, "--output_dir", str(out)])


def test_manifest_is_written_only_after_every_check(tmp_path, monkeypatch):
    """A new run that stops at a later check leaves no manifest behind to block the corrected command."""

    def refuse(*args, **kwargs):
        raise SystemExit("error: a later check failed")

    monkeypatch.setattr(metrics, "train_classifier", refuse)  # the evaluator trains its classifier first
    with pytest.raises(SystemExit, match="a later check failed"):
        run([*COMMON, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "run_manifest.json").exists()


def test_non_finite_penalty_in_a_folder_without_digests_is_refused(reference, tmp_path):
    """Older task folders carry no digests: a penalty with NaN in it is still refused, never trained on."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(reference / "task_01", tmp_path / "task_01")
    state = json.loads((folder / "training_state.json").read_text())
    del state["sha256"]
    (folder / "training_state.json").write_text(json.dumps(state))
    penalty = load_file(str(folder / "ewc_penalty.safetensors"))
    name = next(k for k in penalty if k.startswith("mu."))
    penalty[name] = torch.full_like(penalty[name], float("nan"))
    save_file(penalty, str(folder / "ewc_penalty.safetensors"))
    with pytest.raises(SystemExit, match="ewc_penalty.safetensors cannot be used.*non-finite values"):
        run([*COMMON, "--output_dir", str(tmp_path / "next"), "--resume_from_task", str(folder)])
    assert not (tmp_path / "next" / "task_02").exists()


def test_non_finite_fisher_is_refused_where_estimated_and_where_loaded(reference, tmp_path, monkeypatch):
    from hf_r1ewc.fisher import load_fisher, save_fisher
    from hf_r1ewc.methods import ewc

    stats = load_fisher(str(reference / "task_01" / "fisher.safetensors"))
    name = next(iter(stats.mu))
    stats.mu[name] = torch.full_like(stats.mu[name], float("inf"))
    save_fisher(str(tmp_path / "fisher.safetensors"), stats)
    with pytest.raises(ValueError, match="fisher.safetensors: .* non-finite Fisher values \\(mu "):
        load_fisher(str(tmp_path / "fisher.safetensors"))
    monkeypatch.setattr(ewc, "estimate_fisher", lambda *a, **k: stats)
    with pytest.raises(SystemExit, match="task 1: the finished task's Fisher estimate: .* non-finite Fisher values"):
        run([*COMMON, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "task_01").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--replay_per_class", "1000000000"],
            "the replay pool before the last task \\(2 classes x 1000000000 images",
        ),
        (["--resolution", "100000"], "--resolution 100000: the .* images in memory as float32 need"),
    ],
)
def test_impossible_budgets_are_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run([*COMMON, *flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--resolution", "0"),
        ("--max_train_per_class", "0"),
        ("--replay_batch_size", "0"),
        ("--stop_after_steps", "0"),
        ("--stop_after_steps", "-1"),
        ("--fisher_num_samples", "0"),
        ("--fid_num_samples", "0"),
    ],
)
def test_zero_or_negative_counts_are_refused_not_defaulted(flag, value):
    with pytest.raises(SystemExit, match=f"{flag} must be >= 1, got {value} \\(leave it out for the default\\)"):
        parse_args(["--dataset_name", "digits", "--output_dir", "unused", flag, value])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ema_decay", "2"], "--ema_decay must be a number in \\[0, 1\\], got 2.0"),
        (["--ema_decay", "nan"], "--ema_decay must be a number in \\[0, 1\\], got nan"),
        (["--report_to", "nonsense"], "--report_to 'nonsense' is no Accelerate tracker; choose from"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be >= 0, got -1"),
        (["--adam_beta2", "1"], "--adam_beta2 must be a number in \\[0, 1\\), got 1.0"),
        (["--adam_weight_decay", "-0.1"], "--adam_epsilon must be a finite number > 0 and --adam_weight_decay"),
        (["--lr_warmup_steps", "10"], "has no effect with --lr_scheduler constant .*constant_with_warmup"),
        (["--fid_num_samples", "1"], "--fid_num_samples 1: FID .* needs at least 2 samples"),
    ],
)
def test_invalid_values_are_refused_up_front(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(["--dataset_name", "digits", "--output_dir", "unused", *flags])


def test_write_error_is_a_message_with_the_way_back(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large", str(tmp_path / "out" / "task_01.partial" / "metrics.json"))

    monkeypatch.setattr(hub, "write_training_state", full)
    with pytest.raises(
        SystemExit, match="cannot write .*metrics.json: File too large. Make room .*re-run the same command"
    ):
        run([*COMMON, "--output_dir", str(tmp_path / "out")])


def test_evaluate_never_writes_into_a_run_that_is_training(reference, stopped, tmp_path):
    """--complete takes the run's lock (a training run holds it) and writes results_completed.json, never the run's
    results.json; unfinished runs are refused unless asked for, and then marked."""
    from hf_r1ewc import evaluate
    from hf_r1ewc.integrity import OutputLock

    out = copy_run(reference, tmp_path / "out")
    lock = OutputLock(out)
    assert lock.acquire()  # stands in for the training process
    try:
        with pytest.raises(SystemExit, match=f"is being written by process {os.getpid()} \\(a training run\\)"):
            evaluate.main(["--run_dir", str(out), "--complete", "--output_dir", str(tmp_path / "s")])
    finally:
        lock.release()
    before = (out / "results.json").read_bytes()
    evaluate.main(["--run_dir", str(out), "--complete", "--output_dir", str(tmp_path / "s")])
    assert (out / "results.json").read_bytes() == before and (out / "results_completed.json").exists()
    partial = stopped
    with pytest.raises(SystemExit, match=f"runs that have not finished: {partial} \\(1 of 2 tasks\\)"):
        evaluate.main(["--run_dir", str(out), str(partial), "--output_dir", str(tmp_path / "s")])
    evaluate.main(["--run_dir", str(out), str(partial), "--output_dir", str(tmp_path / "s"), "--include_unfinished"])
    assert any(m.endswith("[unfinished]") for m in json.loads((tmp_path / "s" / "summary.json").read_text()))


def test_evaluate_grid_on_an_altered_folder_is_a_message(reference, tmp_path):
    from hf_r1ewc import evaluate

    out = copy_run(reference, tmp_path / "out")
    _flip_tail(out / "task_02" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match="--grid_classes: .*diffusion_pytorch_model.safetensors differs"):
        evaluate.main(["--run_dir", str(out), "--grid_classes", "0,2", "--output_dir", str(tmp_path / "s")])


def test_lr_schedule_restarts_per_task_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """--lr_scheduler linear --lr_warmup_steps 2: the rate of every optimizer step follows diffusers' schedule over
    each task's own steps (2 epochs of 3 batches: 6 steps), restarting at task 2; a run stopped after step 4 resumes
    the schedule where it was (the checkpoint holds it) and ends with the same rates and weights, bit for bit."""
    from hf_r1ewc.continual import ContinualLearner

    rates: list[float] = []
    original = ContinualLearner.training_step

    def recording(self, accelerator, model, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return original(self, accelerator, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(ContinualLearner, "training_step", recording)
    flags = [*COMMON, "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--fid_backend", "none"]
    run([*flags, "--output_dir", str(tmp_path / "whole")])
    lr = json.loads((tmp_path / "whole" / "run_manifest.json").read_text())["settings"]["learning_rate"]
    per_task = [lr * f for f in (0.0, 0.5, 1.0, 0.75, 0.5, 0.25)]
    assert rates == pytest.approx(per_task * 2, rel=1e-12)
    whole, rates[:] = list(rates), []
    run([*flags, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "4"])
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / "scheduler.bin").exists()
    run([*flags, "--output_dir", str(tmp_path / "resumed")])
    assert rates == whole
    assert max_difference(tmp_path / "whole" / "task_02", tmp_path / "resumed" / "task_02") == 0.0


def test_adam_flags_reach_the_optimizer():
    """Adam with the paper's defaults; AdamW (decoupled decay, as diffusers' examples) once --adam_weight_decay > 0."""
    from conftest import make_tiny_unet

    base = ["--dataset_name", "digits", "--output_dir", "unused", "--learning_rate", "1e-3"]
    plain = optimizer_for(parse_args(base), make_tiny_unet())
    assert type(plain) is torch.optim.Adam and plain.defaults["betas"] == (0.9, 0.999)
    flags = ["--adam_weight_decay", "0.01", "--adam_beta1", "0.8", "--adam_epsilon", "1e-6"]
    decayed = optimizer_for(parse_args([*base, *flags]), make_tiny_unet())
    assert type(decayed) is torch.optim.AdamW
    assert (decayed.defaults["weight_decay"], decayed.defaults["betas"], decayed.defaults["eps"]) == (
        0.01,
        (0.8, 0.999),
        1e-6,
    )


@pytest.mark.parametrize("method", ["si+kd+gd", "mas+er+agem", "l2", "er+der", "ensemble", "lora"])
def test_the_fields_methods_resume_bit_for_bit(tmp_path, method):
    """A run of each method stopped mid task 2 (after SI's path integral and A-GEM's count have moved, with KD's
    teacher, MAS's anchor, ER's and A-GEM's exemplars and DER's kept predictions in place) and re-run ends with the weights of the
    uninterrupted run, bit for bit: what changes during a task comes back from the checkpoint, the rest from task_01
    (SI's omega and A-GEM's count in continual_methods.safetensors; L2 keeps nothing there)."""
    flags = [*FAST, "--num_epochs_per_task", "1", "--method", method, "--fid_backend", "none"]
    flags += ["--no-use_ema"] if method == "lora" else []  # (refused with lora: a new adapter every task)
    run([*flags, "--output_dir", str(tmp_path / "whole")])
    run([*flags, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "5"])
    from safetensors.torch import load_file

    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-5"
    path = checkpoint / "continual_methods.safetensors"
    changing = {"si+kd+gd": {"si"}, "mas+er+agem": {"agem"}, "l2": set(), "er+der": set()}.get(method, set())
    assert {k.split(".")[0] for k in load_file(str(path))} == changing if changing else not path.exists()
    run([*flags, "--output_dir", str(tmp_path / "resumed")])
    assert max_difference(tmp_path / "whole" / "task_02", tmp_path / "resumed" / "task_02") == 0.0
    routes = sorted((tmp_path / "whole" / "task_02").rglob("routes/*/*.safetensors"))  # an ensemble's, LoRA's
    assert len(routes) == {"ensemble": 1, "lora": 1}.get(method, 0)
    for path in routes:
        whole, resumed = (
            load_file(str(path)),
            load_file(str(tmp_path / "resumed" / path.relative_to(tmp_path / "whole"))),
        )
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


# ------------------------------------------------------------------------------ round three (a jammed checkpoint
# folder, a signal in every phase, unverifiable checkpoints)


def test_a_kill_while_a_checkpoint_is_digested_leaves_a_folder_that_resumes(reference, tmp_path, monkeypatch):
    """A kill during the digest pass leaves checkpoint-8.partial holding position.json: the re-run, plain or with
    --resume_from_checkpoint latest, resumes from the newest complete checkpoint and ends where the uninterrupted
    run did."""
    import hf_r1ewc.run as run_module

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_on_call(patch, run_module, "write_checkpoint_digests", 4)
        with pytest.raises(Crash):
            run([*COMMON, "--output_dir", str(out)])
    assert (out / "checkpoints" / "checkpoint-8.partial" / "position.json").exists()
    assert [d.name for d in checkpoint_dirs(out)] == ["checkpoint-4", "checkpoint-6"]
    run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert max_difference(reference / "task_02", out / "task_02") == 0.0
    assert [d.name for d in checkpoint_dirs(out)] == [d.name for d in checkpoint_dirs(reference)]


def test_a_checkpoint_without_digests_is_not_resumed_unverified(reference, stopped, tmp_path, caplog):
    """digests.json deleted and a byte of the EMA weights flipped: the checkpoint cannot be verified, so it is refused
    by name and skipped for the one before, and the run still ends bit for bit where the uninterrupted run did."""
    out = copy_run(stopped, tmp_path / "out")
    checkpoint = out / "checkpoints" / "checkpoint-8"
    (checkpoint / "digests.json").unlink()
    _flip_tail(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match="checkpoint-8 is damaged \\(digests.json is missing"):
        run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-8"])
    caplog.set_level(logging.INFO)
    run([*COMMON, "--output_dir", str(out)])
    assert "digests.json is missing" in caplog.text and "resuming from the newest, checkpoint-6" in caplog.text
    assert max_difference(reference / "task_02", out / "task_02") == 0.0


def signal_on_call(monkeypatch, owner, name: str, call: int = 1, when=None) -> None:
    """Make ``owner.name`` send this process SIGTERM on its ``call``-th call (or on the first call for which
    ``when(*args)`` holds), then go on."""
    import signal

    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if (when(*args) if when else len(calls) == call) and not getattr(wrapper, "sent", False):
            wrapper.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# where SIGTERM arrives: (owner, function, call, extra flags, the finished task folders when the run stops)
SIGNAL_PHASES = {
    # after task 1's last step was checked, while its log is read; with checkpoints every 4 steps, none was due
    "the last step's log": (
        script,
        "log_losses",
        lambda run, *a: run.state.global_step == 6,
        ["--checkpointing_steps", "4"],
        0,
    ),
    "replay pool": (ContinualLearner, "start_task", 2, [], 1),
    "FID": (metrics.TaskFID, "__call__", 1, [], 1),
}  # (Fisher and the folder write end at the FID's boundary, the task's end: one case stands for the three)


@pytest.mark.parametrize("phase", sorted(SIGNAL_PHASES))
def test_a_signal_in_any_phase_stops_the_run_and_the_rerun_ends_where_the_whole_run_did(
    reference, tmp_path, monkeypatch, phase
):
    """SIGTERM is never lost: in training it checkpoints the step (at the task's end if the last step's check had
    passed), elsewhere the pool or the task in progress is finished; the run exits with 75 and its re-run ends bit
    for bit where the uninterrupted run did."""
    owner, name, call, flags, done = SIGNAL_PHASES[phase]
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        if callable(call):
            signal_on_call(patch, owner, name, when=call)
        else:
            signal_on_call(patch, owner, name, call)
        with pytest.raises(SystemExit) as stopped:
            run([*COMMON, *flags, "--output_dir", str(out)])
    assert stopped.value.code == script.EXIT_STOPPED
    assert [(out / f"task_{k:02d}").exists() for k in (1, 2)] == [k <= done for k in (1, 2)]
    if phase == "the last step's log":
        assert (out / "checkpoints" / "checkpoint-6" / "digests.json").exists()
    run([*COMMON, *flags, "--output_dir", str(out)])
    assert max_difference(reference / "task_02", out / "task_02") == 0.0
    assert (out / "report.html").exists()


def test_a_signal_in_the_report_is_held_and_a_kill_there_is_mended_by_the_rerun(reference, tmp_path, monkeypatch):
    """SIGTERM while the report is written: the report is finished. A kill there (the injected crash): the re-run of
    the finished run writes the report it lacks."""
    out = copy_run(reference, tmp_path / "signalled")
    (out / "report.html").unlink()
    shutil.rmtree(out / "task_02")
    with monkeypatch.context() as patch:
        signal_on_call(patch, script, "write_report", 1)
        run([*COMMON, "--output_dir", str(out)])
    assert (out / "report.html").exists()
    killed = copy_run(reference, tmp_path / "killed")
    (killed / "report.html").unlink()
    with monkeypatch.context() as patch:
        crash_on_call(patch, script, "write_report", 1)
        with pytest.raises(Crash):
            run([*COMMON, "--output_dir", str(killed)])
    run([*COMMON, "--output_dir", str(killed)])
    assert (killed / "report.html").exists()


def test_a_run_on_other_data_is_refused_before_it_continues_from_its_task_folder_or_checkpoint(
    reference, stopped, tmp_path
):
    """--resume_from_task of a model with a larger class table than this run's, and --resume_from_checkpoint of
    another run's checkpoint with another --max_train_per_class (a checkpoint stops inside a task, in that task's
    data): each refused by name, not a size-mismatch traceback. A task folder continues with other data for the
    tasks after it: another --max_train_per_class is taken."""
    argv = [*COMMON, "--max_train_per_class", "32", "--stop_after_steps", "1", "--output_dir", str(tmp_path / "a")]
    run([*argv, "--resume_from_task", str(reference / "task_01")])
    assert [RunPosition.read(c).task for c in checkpoint_dirs(tmp_path / "a")] == [2]  # task 2 went on
    from diffusers import UNet2DModel

    from hf_r1ewc.run import restore_task_folder

    config = json.loads((reference / "task_01" / "unet" / "config.json").read_text())
    narrower = UNet2DModel.from_config({**config, "num_class_embeds": config["num_class_embeds"] - 6})
    saved = json.loads((reference / "task_01" / "training_state.json").read_text())
    with pytest.raises(SystemExit, match="configured otherwise .*num_class_embeds"):  # a table never shrinks
        restore_task_folder(reference / "task_01", narrower, None, None, saved, config["sample_size"])
    with pytest.raises(SystemExit, match="belongs to a run with other settings .*max_train_per_class"):
        run(
            [
                *COMMON,
                "--max_train_per_class",
                "32",
                "--output_dir",
                str(tmp_path / "c"),
                "--resume_from_checkpoint",
                str(stopped / "checkpoints" / "checkpoint-8"),
            ]
        )


def test_evaluate_complete_refuses_data_other_than_the_runs(reference, tmp_path):
    """--complete loads the test split again: data whose SHA-256 differs from the manifest's is refused before any
    FID is computed on it."""
    from hf_r1ewc import evaluate

    out = copy_run(reference, tmp_path / "out")
    manifest = json.loads((out / "run_manifest.json").read_text())
    manifest["dataset"]["test_sha256"] = "0" * 64  # as if the data at the same path had changed since
    (out / "run_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="is not the data .* was evaluated on"):
        evaluate.main(["--run_dir", str(out), "--complete", "--output_dir", str(tmp_path / "s")])
    assert not (out / "results_completed.json").exists()


# ------------------------------------------------------------------------------ round four (method state from outside)

SI_ER = [
    *FAST,
    "--num_epochs_per_task",
    "1",
    "--method",
    "si+er",
    "--fid_backend",
    "none",
    "--checkpointing_steps",
    "2",
]


@pytest.fixture(scope="module")
def si_er_runs(tmp_path_factory) -> tuple[Path, Path]:
    """An SI + ER run of two tasks (3 steps each), and the same run stopped at step 5 (checkpoints 2, 4 and 5)."""
    base = tmp_path_factory.mktemp("si_er")
    run([*SI_ER, "--output_dir", str(base / "whole")])
    run([*SI_ER, "--output_dir", str(base / "stopped"), "--stop_after_steps", "5"])
    return base / "whole", base / "stopped"


def rewrite_task_digests(folder: Path) -> None:
    """What anyone who alters a task folder and republishes it can do: record the altered files' SHA-256."""
    from hf_r1ewc.hub import write_training_state

    state = json.loads((folder / "training_state.json").read_text())
    write_training_state(folder, {k: v for k, v in state.items() if k != "sha256"})


@pytest.mark.parametrize(
    "name, tamper, message",
    [
        ("er_buffer.json", lambda r: r["indices"].__setitem__(0, 10**6), r"indices must lie in \[0, 480\)"),
        ("er_buffer.json", lambda r: r["indices"].__setitem__(0, -3), r"indices must lie in \[0, 480\)"),
        (
            "er_buffer.json",
            lambda r: r.__setitem__("indices", list(range(96))),
            r"exemplars of classes \[2, 3, 4, 5, 6\], which the 1 finished tasks",
        ),
        ("er_buffer.json", lambda r: r.__setitem__("train_sha256", "0" * 64), "indexes a dataset with SHA-256 0000"),
        ("si.safetensors", "nan", "importance.conv_in.weight holds non-finite values"),
        ("si.safetensors", "shape", r"importance.conv_in.weight has shape \[1\]"),
    ],
    ids=["er_out_of_range", "er_negative", "er_unseen_classes", "er_other_data", "si_nan", "si_shape"],
)
def test_a_task_folder_with_valid_digests_but_invalid_method_state_is_refused_before_any_work(
    si_er_runs, tmp_path, name, tamper, message
):
    """A task folder from the Hub brings its own digests: rewritten to match the altered file, each of these used to
    train (silently, or until an IndexError, or until task 2 stopped on NaN). Now an error: line naming the file,
    and the new output folder is left as it was found: not there."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(si_er_runs[0] / "task_01", tmp_path / "task_01")
    if name.endswith(".json"):  # as pulled from the Hub: without the exemplars' images
        (folder / "er_buffer_images.safetensors").unlink()
        record = json.loads((folder / name).read_text())
        tamper(record)
        (folder / name).write_text(json.dumps(record))
    else:
        tensors = load_file(str(folder / name))
        key = "importance.conv_in.weight"
        tensors[key] = torch.zeros(1) if tamper == "shape" else tensors[key].fill_(float("nan"))
        save_file(tensors, str(folder / name))
    rewrite_task_digests(folder)
    out = tmp_path / "next"
    with pytest.raises(SystemExit, match=message) as raised:
        run([*SI_ER, "--output_dir", str(out), "--resume_from_task", str(folder)])
    assert str(raised.value).startswith("error: ") and f"{folder / name} cannot be used" in str(raised.value)
    assert not out.exists()


def test_a_checkpoint_without_the_method_state_is_skipped_for_an_older_one(si_er_runs, tmp_path, caplog):
    """continual_methods.safetensors deleted from the newest checkpoint and its digests rewritten: the run used to
    resume from it with SI's path integral reset (task_02's si.safetensors off by up to 0.1). Now the checkpoint is
    refused as damaged, the one before it resumes, and the run ends where the uninterrupted one did, SI included."""
    from safetensors.torch import load_file

    whole, stopped = si_er_runs
    out = copy_run(stopped, tmp_path / "out")
    newest = out / "checkpoints" / "checkpoint-5"
    (newest / "continual_methods.safetensors").unlink()
    write_checkpoint_digests(newest)
    with caplog.at_level("WARNING"):
        run([*SI_ER, "--output_dir", str(out)])
    assert "checkpoint-5 is damaged (continual_methods.safetensors is missing" in caplog.text
    assert max_difference(whole / "task_02", out / "task_02") == 0.0
    ours, theirs = (
        load_file(str(out / "task_02" / "si.safetensors")),
        load_file(str(whole / "task_02" / "si.safetensors")),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(SystemExit, match="checkpoint-5 is damaged \\(continual_methods.safetensors is missing"):
        run(
            [
                *SI_ER,
                "--output_dir",
                str(copy_run(stopped, tmp_path / "named")),
                "--resume_from_checkpoint",
                str(newest),
            ]
        )


def test_a_checkpoint_whose_method_state_does_not_fit_is_refused_before_any_work(si_er_runs, tmp_path):
    from safetensors.torch import load_file, save_file

    out = copy_run(si_er_runs[1], tmp_path / "out")
    newest = out / "checkpoints" / "checkpoint-5"
    state = load_file(str(newest / "continual_methods.safetensors"))
    state["si.omega.conv_in.weight"] = state["si.omega.conv_in.weight"].fill_(float("inf"))
    save_file(state, str(newest / "continual_methods.safetensors"))
    write_checkpoint_digests(newest)
    with pytest.raises(
        SystemExit, match="continual_methods.safetensors cannot be used: si: omega.conv_in.weight holds"
    ):
        run([*SI_ER, "--output_dir", str(out)])
    assert not (out / "replay").exists() and not (out / "task_02").exists()


# ------------------------------------------------------------------------------ experience replay on streamed data


def streamed_er_flags(source: Path, config: Path) -> list[str]:
    return [
        *("--train_data_dir", str(source), "--streaming", "--eval_split", "validation", "--classes_per_task", "5"),
        *("--resolution", "8", "--model_config_name_or_path", str(config), "--num_epochs_per_task", "1"),
        *("--train_batch_size", "8", "--method", "er+agem", "--er_per_class", "3", "--num_inference_steps", "2"),
        *("--agem_per_class", "2", "--agem_batch_size", "4"),
        *("--fid_backend", "none", "--checkpointing_steps", "2", "--fisher_batch_size", "8"),
    ]


@pytest.fixture(scope="module")
def streamed_er(tmp_path_factory) -> tuple[list[str], Path]:
    """A local parquet stand-in of ImageNet-32 (10 classes, 8 training images each, 8x8 RGB, the train split in 2
    files), a 3-channel tiny UNet config, and a whole 2-task streamed ER + A-GEM run on it (each its own buffer)."""
    from test_train import _imagenet32_like_parquet

    base = tmp_path_factory.mktemp("streamed_er")
    source = _imagenet32_like_parquet(base / "data", num_classes=10, train_per_class=8)
    config = base / "unet.json"
    config.write_text(json.dumps({"_class_name": "UNet2DModel", **tiny_unet_config(3, 10)}))
    flags = streamed_er_flags(source, config)
    run([*flags, "--output_dir", str(base / "whole")])
    return flags, base / "whole"


def test_streamed_er_keeps_each_classes_images_with_their_provenance(streamed_er):
    """--method er with --streaming (refused before: it kept indices into a split that streaming never holds): each
    task folder keeps er_buffer.safetensors, min(per class, its examples) uint8 images of every seen class as the
    model sees them, with the dataset's name and each exemplar's SHA-256; the next task replays them."""
    from safetensors import safe_open

    from hf_r1ewc.methods.exemplars import exemplar_sha256

    flags, whole = streamed_er
    for k, seen in ((1, range(5)), (2, range(10))):
        with safe_open(str(whole / f"task_{k:02d}" / "er_buffer.safetensors"), "pt") as file:
            metadata, images, labels = file.metadata(), file.get_tensor("images"), file.get_tensor("labels")
        assert images.dtype == torch.uint8 and images.shape == (3 * len(seen), 3, 8, 8)
        assert sorted(labels.tolist()) == sorted(c for c in seen for _ in range(3))
        assert metadata["source"] == flags[1] and metadata["split"] == "train"
        assert json.loads(metadata["sha256"]) == [exemplar_sha256(x) for x in images]
        assert json.loads(metadata["counts"]) == {str(c): 8 for c in seen}
        assert not (whole / f"task_{k:02d}" / "er_buffer.json").exists()
        with safe_open(str(whole / f"task_{k:02d}" / "agem_memory.safetensors"), "pt") as file:
            assert sorted(file.get_tensor("labels").tolist()) == sorted(c for c in seen for _ in range(2))
    card = (whole / "task_02" / "README.md").read_text()
    assert "`er_buffer.safetensors` holds real training images" in card and "not uploaded to the Hub" in card
    assert "`agem_memory.safetensors` holds real training images" in card
    metrics = json.loads((whole / "task_02" / "metrics.json").read_text())
    assert metrics["er_buffer_size"] == 30


def test_a_kill_mid_stream_resumes_to_the_same_weights_and_buffer(streamed_er, tmp_path, monkeypatch):
    """Killed halfway through task 2's pass over its stream (filling ER's buffer): the re-run resumes from the
    checkpoint at task 2's last step (A-GEM's memory images and counts in it, checked as they load), redoes the task's
    end and ends with the weights and the exemplar images of the uninterrupted run."""
    from safetensors.torch import load_file

    import hf_r1ewc.methods.exemplars as exemplars

    flags, whole = streamed_er
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_on_call(patch, exemplars, "to_uint8", 13)  # 5 batches per pass, ER's then A-GEM's: task 2's ER, 3rd
        with pytest.raises(Crash):
            run([*flags, "--output_dir", str(out)])
    assert (out / "task_01").exists() and not (out / "task_02").exists()
    state = load_file(str(out / "checkpoints" / "checkpoint-10" / "continual_methods.safetensors"))
    assert state["agem.images"].shape == (10, 3, 8, 8) and state["agem.images"].dtype == torch.uint8
    run([*flags, "--output_dir", str(out)])
    assert max_difference(whole / "task_02", out / "task_02") == 0.0
    ours, theirs = (load_file(str(d / "task_02" / "er_buffer.safetensors")) for d in (out, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_exemplars_of_another_dataset_are_refused_before_any_work(streamed_er, tmp_path):
    """A continued run streams another dataset than the one its task folder's exemplars came from: an error: line
    naming the file and both datasets, and the new output folder is not made."""
    from test_train import _imagenet32_like_parquet

    flags, whole = streamed_er
    other = _imagenet32_like_parquet(tmp_path / "other", num_classes=10, train_per_class=8)
    changed = [str(other) if f == flags[1] else f for f in flags]
    out = tmp_path / "next"
    with pytest.raises(
        SystemExit, match="er_buffer.safetensors cannot be used.*its exemplars come from dataset"
    ) as err:
        run([*changed, "--output_dir", str(out), "--resume_from_task", str(whole / "task_01")])
    assert str(other) in str(err.value) and not out.exists()
