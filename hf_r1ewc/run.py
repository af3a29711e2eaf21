"""The run directory of a continual training run: its lock, its manifest, its checkpoints and where a resume starts.

OUTPUT_DIR holds ``run_manifest.json`` (the settings, data and tasks of the run), ``checkpoints/checkpoint-N``
(Accelerate state + ``position.json`` + ``digests.json``) and the finished ``task_XX`` folders (``hub.py`` writes
and verifies those; ``integrity.py`` is the digest layer under both). A finished task folder is newer than every
checkpoint of its task, so finished work is never redone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, broadcast_object_list
from safetensors import SafetensorError

from . import __version__
from .hub import is_complete_task_folder, read_training_state, resolve_task_source, task_folder_name
from .integrity import OutputLock, checkpoint_problem, manifest_differences, write_checkpoint_digests
from .methods import Expected, Growth, TrainingSplit
from .metrics import class_distribution_kl, matrix_from_json
from .models import MODEL_SUBFOLDERS, grow_class_embedding
from .pipeline import num_classes_of


logger = get_logger(__name__, log_level="INFO")
MANIFEST = "run_manifest.json"


@dataclass
class RunPosition:
    """Where a checkpoint stands: the task, the epoch and micro-step within it, the optimizer-step count, and the
    losses logged so far in the task (per finished epoch, and each micro-step of the epoch it stopped in)."""

    task: int
    epoch: int
    step_in_epoch: int
    global_step: int
    loss_per_epoch: list[float] = field(default_factory=list)
    denoise_per_epoch: list[float] = field(default_factory=list)
    ewc_grad_ratio_per_epoch: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    epoch_denoise: list[float] = field(default_factory=list)
    num_processes: int | None = None
    max_abs_weight: float | None = None

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "curves": [self.loss_per_epoch, self.denoise_per_epoch, self.ewc_grad_ratio_per_epoch],
            "epoch_losses": [self.epoch_losses, self.epoch_denoise],
            "num_processes": self.num_processes,
            "max_abs_weight": self.max_abs_weight,
        }

    @classmethod
    def from_json(cls, record: dict) -> RunPosition:
        """Also reads older ``position.json`` files (two curves, or none)."""
        curves = list(record.get("curves", [])) + [[], [], []]
        carried = list(record.get("epoch_losses", [])) + [[], []]
        return cls(
            record["task"],
            record["epoch"],
            record["step_in_epoch"],
            record["global_step"],
            *curves[:3],
            *carried[:2],
            record.get("num_processes"),
            record.get("max_abs_weight"),
        )

    @classmethod
    def read(cls, checkpoint: Path) -> RunPosition:
        return cls.from_json(json.loads((checkpoint / "position.json").read_text()))


@dataclass
class RunState:
    """What the task loop carries: the FID and accuracy matrices, the step counter, where a resumed run picks up."""

    start_task: int
    matrix: dict
    accuracy: dict
    class_kl: dict = field(default_factory=dict)  # k -> KL of m_k's class frequencies (metrics.class_distribution_kl)
    global_step: int = 0
    steps_this_process: int = 0
    resume_dir: Path | None = None
    resume_position: RunPosition | None = None
    manifest: dict | None = None  # the run_manifest.json to write once every check has passed (None: unchanged)
    checkpoint_expected: Expected | None = None  # what the resumed checkpoint's method state must fit
    tasks: list = field(default_factory=list)  # the classes of each training task, in order
    continued_from: Path | None = None  # the task folder the run continues after (its own or --resume_from_task's)

    def record(self, scores: dict, task_index: int) -> None:
        """Row k = ``task_index`` of the FID and accuracy matrices from ``scores`` (task i -> ``TaskScore``), and
        the class-distribution KL of m_k."""
        self.matrix[task_index] = {i: s.fid for i, s in scores.items()}
        self.accuracy[task_index] = {i: s.accuracy for i, s in scores.items() if s.accuracy is not None}
        if (kl := class_distribution_kl(scores.values())) is not None:
            self.class_kl[task_index] = kl


# ------------------------------------------------------------------------------------------ lock and manifest


def lock_output_dir(accelerator, output_dir: Path) -> OutputLock | None:
    """Create OUTPUT_DIR and hold its lock (main process) for the run: a second run on the same folder, or a folder
    that cannot be written, stops here, before any expensive work."""
    lock = OutputLock(output_dir) if accelerator.is_main_process else None
    try:
        held = [lock.acquire() if lock is not None else True]
    except OSError as err:
        raise SystemExit(f"error: cannot write to --output_dir {output_dir}: {err}") from None
    if accelerator.num_processes > 1:
        broadcast_object_list(held)
    if not held[0]:
        holder = lock.holder() if lock is not None else "see the main process"
        raise SystemExit(
            f"error: another run (process {holder}) is writing {output_dir}; wait for it to finish or "
            f"use another --output_dir"
        )
    return lock


@contextlib.contextmanager
def released_on_error(lock: OutputLock | None) -> Iterator[None]:
    """Release OUTPUT_DIR's lock if the block fails (a refusal before the task loop), so that the same process (a
    test, a notebook) can run again (the OS releases it when a process dies), and remove the lock file and the
    folders the lock made where nothing else was written: a refused run leaves OUTPUT_DIR as it found it."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release(undo=True)
        raise


def check_manifest(
    accelerator,
    output_dir: Path,
    current: dict,
    *,
    recovery_settings: tuple[str, ...],
    may_change: tuple[str, ...],
    added_settings: Callable[[dict], dict] | None = None,
    adopt: bool = False,
    task_list_settings: tuple[str, ...] = (),
    data_settings: tuple[str, ...] = (),
) -> dict | None:
    """Compare ``OUTPUT_DIR/run_manifest.json`` with ``current`` (``{"settings", "dataset", "tasks"}``) and refuse
    any difference except in ``recovery_settings``, whose changes are logged and recorded, and a task list that
    starts with the recorded one (the run continues with the appended tasks: recorded as a change of ``tasks``).
    The flags of ``task_list_settings`` only spell the task list, which is compared instead of them. The appended
    tasks may come from other data: then the dataset and the flags of ``data_settings`` change with them, recorded,
    and ``task_sources`` names each task's data.

    Returns the manifest to write (a new run's, or the folder's with the recovery changes appended; None when
    nothing changes), for the caller to write once every other check has passed. Every process reads the file
    before one barrier that every process reaches, so none reads what the main process writes afterwards. A
    folder that holds checkpoints or task folders but no readable manifest is refused unless ``adopt``: nothing
    would say what settings its work was trained with. ``added_settings`` gives, for a recorded folder's settings, the
    values of settings introduced after it was recorded that reproduce its run; a manifest without them is read as
    having those values.
    """
    path = output_dir / MANIFEST
    fix = (
        f"restore {path}, or re-run with the flags that run was started with and --adopt_manifest to record "
        f"them, or use another --output_dir"
    )
    if not path.exists():
        work = [d.name for d in checkpoint_dirs(output_dir)] + [d.name for d in sorted(output_dir.glob("task_[0-9]*"))]
        if work and not adopt:
            raise SystemExit(
                f"error: {output_dir} holds earlier work ({', '.join(work[:4])}"
                f"{', ...' if len(work) > 4 else ''}) but no {MANIFEST}, which records the "
                f"settings it was trained with, so continuing could mix settings silently: {fix}"
            )
        accelerator.wait_for_everyone()
        return {**current, "changes": [], "hf_r1ewc_version": __version__}
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or not {"settings", "dataset", "tasks", "changes"} <= set(recorded):
            raise ValueError("it lacks the settings, dataset, tasks or changes of a run")
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {path} cannot be read ({type(err).__name__}: {err}): {fix}") from None
    recorded_settings = {**(added_settings(recorded["settings"]) if added_settings else {}), **recorded["settings"]}
    spelled = {k: v for k, v in recorded_settings.items() if k not in task_list_settings}
    now = {k: v for k, v in current["settings"].items() if k not in task_list_settings}
    differences = {f"--{k}": d for k, d in manifest_differences(spelled, now).items()}
    differences |= {
        f"dataset {k}": d for k, d in manifest_differences(recorded["dataset"], current["dataset"]).items()
    }
    old_tasks, new_tasks = recorded["tasks"], current["tasks"]
    extended = len(new_tasks) > len(old_tasks) and new_tasks[: len(old_tasks)] == old_tasks
    if old_tasks != new_tasks and not extended:
        differences["tasks"] = (old_tasks, new_tasks)
    recovery = {k: d for k, d in differences.items() if k[2:] in recovery_settings}
    new_data = {
        k: d for k, d in differences.items() if extended and (k[2:] in data_settings or k.startswith("dataset"))
    }
    refused = {k: d for k, d in differences.items() if k not in recovery and k not in new_data}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} in the folder, {new!r} now" for k, (old, new) in refused.items())
        tasks = " (more tasks: --tasks lists the run's tasks first, then the new ones)" if "tasks" in refused else ""
        raise SystemExit(
            f"error: {output_dir} holds a run with other settings ({MANIFEST}):\n{lines}\n"
            f"Continue it with the recorded settings{tasks}, or start the new run in another --output_dir. "
            f"Settings that may change when a run continues: "
            f"{', '.join('--' + k for k in may_change + recovery_settings)}."
        )
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, (old, new) in recovery.items():
        logger.warning("%s changes from %r to %r from here on (recorded in %s)", key, old, new, MANIFEST)
        recorded["settings"][key[2:]] = new
        recorded["changes"].append({"setting": key[2:], "from": old, "to": new, "at": at})
    if extended:
        record_extension(recorded, current, new_data, task_list_settings, at)
    accelerator.wait_for_everyone()
    return recorded if recovery or extended else None


def record_extension(
    recorded: dict, current: dict, new_data: dict, task_list_settings: tuple[str, ...], at: str
) -> None:
    """Into the ``recorded`` manifest: the ``current`` run's longer task list, the flags that spell it, each task's
    data source, and (``new_data``: ``{"--flag" or "dataset key": (old, new)}``) the data the appended tasks come
    from, each as a change made ``at``."""
    old_tasks, new_tasks = recorded["tasks"], current["tasks"]
    sources = recorded.get("task_sources") or [recorded["dataset"].get("source")] * len(old_tasks)
    appended = current.get("task_sources", [])[len(old_tasks) :]
    if new_data:
        logger.info("the appended tasks come from other data: %s", ", ".join(sorted(new_data)))
        recorded["settings"] |= {k[2:]: new for k, (_, new) in new_data.items() if k.startswith("--")}
        recorded["dataset"] = current["dataset"]
        changes = {k.removeprefix("--"): {"from": old, "to": new} for k, (old, new) in new_data.items()}
        recorded["changes"].append({"setting": "data", "from_task": len(old_tasks) + 1, **changes, "at": at})
    recorded["task_sources"] = sources + (
        appended or [current["dataset"]["source"]] * (len(new_tasks) - len(old_tasks))
    )
    logger.info(
        "the run's %d tasks are extended by %s (recorded in %s)", len(old_tasks), new_tasks[len(old_tasks) :], MANIFEST
    )
    recorded["tasks"] = new_tasks
    recorded["settings"] |= {k: v for k, v in current["settings"].items() if k in task_list_settings}
    recorded["changes"].append({"setting": "tasks", "from": old_tasks, "to": new_tasks, "at": at})


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``OUTPUT_DIR/checkpoints/checkpoint-N`` folders with a position, oldest first (a ``checkpoint-N.partial`` that a
    kill left while it was written is not one)."""
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        (d for d in root.iterdir() if re.fullmatch(r"checkpoint-\d+", d.name) and (d / "position.json").exists()),
        key=lambda d: int(d.name.split("-")[1]),
    )


def save_checkpoint(accelerator, model, output_dir: Path, position: RunPosition, limit: int | None) -> None:
    """Accelerate state + ``position.json`` (with the process count and the largest weight) + the SHA-256 of every
    file, atomically; all but the newest ``limit`` checkpoints pruned. Weights that are no longer finite are never
    saved."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    largest = torch.stack([p.detach().abs().max().float() for p in local if p.numel()]).max()
    largest = float(accelerator.gather(largest.reshape(1)).max())
    if not math.isfinite(largest):
        raise SystemExit(
            f"error: the weights are no longer finite at step {position.global_step}, so no checkpoint was saved "
            f"there. {resume_advice(output_dir)}"
        )
    position.num_processes, position.max_abs_weight = accelerator.num_processes, largest
    root = output_dir / "checkpoints"
    target = root / f"checkpoint-{position.global_step}"
    tmp = root / f"checkpoint-{position.global_step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random states are written
    if accelerator.is_main_process:
        (tmp / "position.json").write_text(json.dumps(position.to_json()))
        write_checkpoint_digests(tmp)  # last: a checkpoint with digests.json is complete
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in checkpoint_dirs(output_dir)[:-limit] if limit else []:
            shutil.rmtree(old)
        logger.info("saved %s (task %d)", target, position.task)
    accelerator.wait_for_everyone()


def set_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make ``learning_rate`` the rate a resumed run goes on with (a recovery may lower it): the optimizer's rate,
    or, under a prepared LR schedule (``LambdaLR``, as all of diffusers' are), its base rate with the rate at the
    schedule's current step."""
    if lr_scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        return
    schedule = lr_scheduler.scheduler
    schedule.base_lrs = [learning_rate for _ in schedule.base_lrs]
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    schedule._last_lr = rates


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    """Accelerate's ``load_state``, with an unloadable checkpoint turned into a message."""
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, SafetensorError) as err:
        raise SystemExit(
            f"error: {checkpoint} cannot be loaded ({type(err).__name__}: {str(err)[:300]}). "
            f"Delete it to resume from the checkpoint or task folder before it."
        ) from None


def finished_tasks(output_dir: Path, num_tasks: int | None = None) -> int:
    """How many tasks of OUTPUT_DIR are finished (at most ``num_tasks``): the newest of the unbroken run of complete
    task_XX folders from the first one present (task_01; a later one in a run continued from another run's task
    folder, which holds the tasks after it)."""
    done = {int(p.name[5:]) for p in output_dir.glob("task_[0-9][0-9]") if is_complete_task_folder(p)}
    k = min(done, default=0)
    while k + 1 in done and (num_tasks is None or k < num_tasks):
        k += 1
    return k if num_tasks is None else min(k, num_tasks)


def resume_advice(output_dir: Path) -> str:
    """What a resume of OUTPUT_DIR will do now, and how to get past a divergence (for error messages)."""
    saved = [d for d in checkpoint_dirs(output_dir) if checkpoint_problem(d) is None]
    done = finished_tasks(output_dir)
    position = RunPosition.read(saved[-1]) if saved else None
    if position is not None and position.task > done:
        largest = position.max_abs_weight if position.max_abs_weight is not None else float("nan")
        where = (
            f"A resume (re-run the command, or --resume_from_checkpoint latest) restarts at {saved[-1].name} "
            f"(task {position.task}, step {position.global_step}; its weights were checked finite, "
            f"largest |w| = {largest:.3g}), with the same data and noise"
        )
    elif done:
        where = f"A resume (re-run the command) starts task {done + 1} from the finished task_{done:02d}"
    else:
        where = "No checkpoint or task folder was saved yet: a re-run starts from the beginning"
    return (
        f"{where}. To get past this point change the optimisation as you resume: add --max_grad_norm 1.0 or "
        f"lower --learning_rate (both may change on resume; the optimizer's stored learning rate is replaced and "
        f"{MANIFEST} records the change)."
    )


def find_checkpoint(spec: str | None, output_dir: Path, required: dict[str, str] | None = None) -> Path | None:
    """The checkpoint to resume from: a path, a name under OUTPUT_DIR/checkpoints (``checkpoint-26``, the diffusers
    form), or the newest intact one for ``latest`` and for a re-run into a folder that holds checkpoints (a damaged
    one, whose files differ from its digests or which lacks a file of ``required``, is skipped with a warning)."""
    available = checkpoint_dirs(output_dir)
    if spec is None or spec == "latest":
        for candidate in reversed(available):
            problem = checkpoint_problem(candidate, required)
            if problem is None:
                if spec is None:
                    logger.info(
                        "%s holds checkpoints: resuming from the newest, %s (a new run needs another --output_dir)",
                        output_dir,
                        candidate.name,
                    )
                return candidate
            logger.warning("%s is damaged (%s): skipping it for an older one", candidate, problem)
        if spec == "latest":
            logger.info(
                "--resume_from_checkpoint latest: %s holds no %scheckpoint; starting after the finished "
                "task folders, if any",
                output_dir / "checkpoints",
                "intact " if available else "",
            )
        return None
    for candidate in (Path(spec), output_dir / "checkpoints" / spec, output_dir / spec):
        if (candidate / "position.json").exists():
            problem = checkpoint_problem(candidate, required)
            if problem is not None:
                intact = [d.name for d in available if d != candidate and checkpoint_problem(d, required) is None]
                raise SystemExit(
                    f"error: --resume_from_checkpoint {spec}: {candidate} is damaged ({problem}). "
                    f"Resume from an intact one ({intact[-1] if intact else 'none left'}; "
                    f"--resume_from_checkpoint latest picks the newest intact) or delete it."
                )
            return candidate
    raise SystemExit(
        f"error: --resume_from_checkpoint {spec}: no such checkpoint (looked for it as given and in "
        f"{output_dir / 'checkpoints'}); available: {[d.name for d in available] or 'none'}"
    )


METHODS_STATE = "continual_methods.safetensors"


def methods_state_required(learner) -> dict[str, str]:
    """``{METHODS_STATE: what it holds}`` when a method of ``learner`` changes its state during a task (a checkpoint
    without the file cannot resume it), else {}."""
    changing = [m.name for m in learner.methods if m.changes_during_task]
    return {METHODS_STATE: f"the state that {', '.join(changing)} changes at every step"} if changing else {}


def register_methods(accelerator, learner, expected: Expected | None) -> None:
    """Checkpoints hold the state of the learner's methods that changes during a task (``changes_during_task``) as
    ``continual_methods.safetensors`` (nothing pickled), loaded back checked against ``expected`` (the resumed
    checkpoint's: ``RunState.checkpoint_expected``); the rest comes from the last task folder. A checkpoint without
    the file is refused when a method needs it."""
    from safetensors.torch import save_file

    def save_hook(models, weights, output_dir):
        state = learner.state_dict(changing_only=True)
        if accelerator.is_main_process and state:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, METHODS_STATE)
            )

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, METHODS_STATE)
        if methods_state_required(learner):
            load_methods_state(learner, Path(input_dir), expected)
        elif os.path.exists(path):
            raise ValueError(f"{path} holds state of methods this run does not compose ({learner.label()})")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_methods_state(learner, checkpoint: Path, expected: Expected | None) -> None:
    """The methods' changing state from ``checkpoint``, checked against ``expected`` (``ValueError`` naming the file
    and the problem, nothing taken by a method that refuses)."""
    from safetensors.torch import load_file

    path = checkpoint / METHODS_STATE
    if expected is None:
        raise ValueError(f"{path}: no run position to check it against (resume through resume_run)")
    try:
        learner.load_state_dict(load_file(str(path)), expected, changing_only=True)
    except (OSError, SafetensorError, ValueError) as err:
        raise ValueError(f"{path} cannot be used: {err}") from None


def register_ema(accelerator, ema) -> None:
    """Checkpoints hold the EMA as ``unet_ema/`` (diffusers' ``save_pretrained`` layout, safetensors: nothing
    pickled), written and read through Accelerate's save/load state hooks, as diffusers' training examples do."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_hook(models, input_dir):
        loaded = type(ema).from_pretrained(os.path.join(input_dir, "unet_ema"), ema.model_cls)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------- resume


def resume_run(
    accelerator,
    output_dir: Path,
    denoiser,
    learner,
    ema,
    training_tasks: list[list[int]],
    resolution: int,
    *,
    checkpoint_spec: str | None,
    task_source: str | None,
    must_match: dict,
    train: TrainingSplit | None = None,
    checkpoint_must_match: dict | None = None,
) -> RunState:
    """Where to start: after the newest of (a finished task folder of OUTPUT_DIR, ``task_source``, a checkpoint).

    The task folder continued from restores the weights, what the learner's methods keep there (the EWC penalty, at
    the run's lambda) and the EMA's warm-up position, after its files are checked against their SHA-256 and the
    methods' state against the model and the training split ``train`` (``Expected``); its recorded ``run_config``
    must agree with ``must_match`` (keys it records) and its learned tasks must begin ``training_tasks``. Another
    run's checkpoint must agree with ``checkpoint_must_match`` (default ``must_match``): a checkpoint stops inside
    a task, in that task's data. A checkpoint's method state is checked here too; the checkpoint itself is loaded
    by ``load_checkpoint`` when its task starts.
    """
    state = RunState(start_task=1, matrix={}, accuracy={})
    checkpoint = find_checkpoint(checkpoint_spec, output_dir, methods_state_required(learner))
    if checkpoint is not None and checkpoint.resolve().parent.parent != output_dir.resolve():
        check_other_runs_checkpoint(checkpoint, must_match if checkpoint_must_match is None else checkpoint_must_match)
    done = finished_tasks(output_dir, len(training_tasks))
    previous = output_dir / task_folder_name(done) if done else None
    try:
        saved = read_training_state(previous) if previous else None
        if task_source:
            external = resolve_task_source(task_source)
            external_state = read_training_state(external)
            if saved is None or external_state["task_index"] > saved["task_index"]:
                previous, saved = external, external_state
    except ValueError as err:  # a missing, corrupt or altered artifact
        raise SystemExit(f"error: {err}") from None
    finished = saved["task_index"] if saved else 0
    if checkpoint is not None:
        position = RunPosition.read(checkpoint)
        processes = position.num_processes or accelerator.num_processes
        if position.task <= finished:
            logger.info(
                "%s (task %d) is older than the finished task %d: continuing after task %d",
                checkpoint.name,
                position.task,
                finished,
                finished,
            )
        elif position.task != finished + 1:
            raise SystemExit(
                f"error: {checkpoint} is in task {position.task}, which continues from task folder "
                f"{task_folder_name(position.task - 1)}, but the newest finished task is {finished}: "
                f"restore that folder in {output_dir}"
            )
        elif processes != accelerator.num_processes:
            raise SystemExit(
                f"error: {checkpoint} was written by {processes} processes and this run "
                f"has {accelerator.num_processes}: the data order and random states are per process. "
                f"Resume with {processes} processes, or drop the checkpoints to restart "
                f"task {position.task} from the finished task folder."
            )
        else:
            state.resume_dir, state.resume_position = checkpoint, position
            state.start_task, state.global_step = position.task, position.global_step
    if saved is not None:
        recorded = saved["run_config"]
        conflicts = {k: (recorded[k], v) for k, v in must_match.items() if k in recorded and recorded[k] != v}
        if conflicts:
            raise SystemExit(
                f"error: {previous} was trained with other settings "
                f"(setting: (folder, this run)) {conflicts}; match them or use another --output_dir"
            )
        learned = saved["tasks"][:finished]
        if training_tasks[:finished] != learned:
            raise SystemExit(
                f"error: {previous} learned the tasks {learned}, and this run's tasks are {training_tasks}: list "
                f"its tasks first (then any new ones), or use another --output_dir"
            )
        if state.resume_position is None:
            state.start_task, state.global_step = finished + 1, saved.get("global_step", 0)
        grew = restore_task_folder(previous, denoiser, learner, ema, saved, resolution, train)
        if grew and accelerator.distributed_type == DistributedType.FSDP:
            raise SystemExit(
                "error: growing the model's label table for new classes is not tested under FSDP: continue onto new "
                "classes under DDP (accelerate_configs/multi_gpu_ddp.yaml) or on one device"
            )
        state.continued_from = previous
    if state.resume_dir is not None and methods_state_required(learner):
        state.checkpoint_expected = Expected.of(denoiser, training_tasks, state.start_task - 1, train, True)
        try:  # before any work; the load hook takes the same file again when the task starts
            load_methods_state(learner, state.resume_dir, state.checkpoint_expected)
        except ValueError as err:
            raise SystemExit(
                f"error: {err}. Delete {state.resume_dir} to resume from the checkpoint or task folder before it"
            ) from None
    read_history(state, output_dir / "results.json")
    return state


def read_history(state: RunState, results_path: Path) -> None:
    """The FID and accuracy rows and class KL of the tasks before ``state.start_task``: from the run's
    ``results_path``, or the ``history`` in the ``metrics.json`` of the task folder it continues from."""
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    if results is None and state.continued_from is not None:  # another run's folder: the history it recorded
        results = json.loads((state.continued_from / "metrics.json").read_text()).get("history")
    if not results:
        return
    earlier = lambda rows: {k: r for k, r in rows.items() if int(k) < state.start_task}  # noqa: E731
    try:
        state.matrix = earlier(matrix_from_json(results["fid"]))
        state.accuracy = earlier(matrix_from_json(results.get("accuracy", {})))
        state.class_kl = {int(k): float(v) for k, v in earlier(results.get("class_kl", {})).items()}
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise SystemExit(
            f"error: the FID history of {results_path} or the task folder cannot be read ({err!r})"
        ) from None


def _plain(value):
    """A config value as JSON would give it back (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def check_other_runs_checkpoint(checkpoint: Path, must_match: dict) -> None:
    """A checkpoint from another output folder resumes only where that run's ``run_manifest.json`` (two levels up)
    records the settings of ``must_match`` as this run has them."""
    manifest = checkpoint.parent.parent / MANIFEST
    try:
        recorded = json.loads(manifest.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(
            f"error: --resume_from_checkpoint {checkpoint} belongs to another run whose {MANIFEST} cannot be read "
            f"({type(err).__name__}), so its settings cannot be compared with this run's. Resume that run in its own "
            f"folder, or continue from one of its task folders with --resume_from_task."
        ) from None
    conflicts = {k: (recorded[k], v) for k, v in must_match.items() if k in recorded and recorded[k] != v}
    if conflicts:
        raise SystemExit(
            f"error: --resume_from_checkpoint {checkpoint} belongs to a run with other settings "
            f"(setting: (that run, this run)) {conflicts}; match them or start from scratch"
        )


MODEL_KEYS_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def grown_label_space(folder: Path, model, num_classes: int | None, learned: list[int]) -> tuple[Growth, ...]:
    """The label tables of ``model`` (task folder ``folder``'s) grown to ``num_classes`` ids when the run brings new
    classes (``models.grow_class_embedding``: every old id keeps its row); its ``id2label`` must name exactly its ids.
    Returns what grew (nothing when the label space is the model's)."""
    id2label = json.loads((folder / "model_index.json").read_text()).get("id2label")
    size = num_classes_of(model)
    if id2label is not None and len(id2label) != size:
        raise SystemExit(
            f"error: {folder}/model_index.json names {len(id2label)} classes but its model's label table has {size} "
            f"ids: the folder was altered; copy it again"
        )
    if num_classes is None or size is None or num_classes <= size:
        return ()
    try:
        growth = grow_class_embedding(model, num_classes, learned)
    except ValueError as err:
        raise SystemExit(f"error: {folder}: {err}, so it cannot learn new classes") from None
    logger.info(
        "the model's label space grows from %d to %d classes (new rows: the mean learned row)", size, num_classes
    )
    return growth


def restore_task_folder(
    folder: Path, denoiser, learner, ema, saved: dict, resolution: int, train: TrainingSplit | None = None
) -> tuple[Growth, ...]:
    """Weights, the learner's methods (``load_task_folder``: the EWC penalty, ... checked against the model and the
    training split ``train``) and EMA position of a verified task folder, whose model must be configured as this
    run's (channels, size, blocks; a smaller label table grows: ``grown_label_space``). Returns what grew."""
    loaded = type(denoiser).from_pretrained(folder / MODEL_SUBFOLDERS[type(denoiser).__name__])
    if loaded.config.sample_size != resolution:
        size = loaded.config.sample_size
        raise SystemExit(
            f"error: {folder} holds a {size}x{size} model but --resolution is {resolution}; match it (with --resize "
            f"to rescale other data's images to {size}x{size}) or use another --output_dir"
        )
    if loaded.config.in_channels != denoiser.config.in_channels:
        raise SystemExit(
            f"error: {folder} holds a model that takes {loaded.config.in_channels}-channel images and the data's are "
            f"{denoiser.config.in_channels}-channel: continue it on data of its channel count, or use another "
            f"--output_dir"
        )
    learned = sorted({c for t in saved["tasks"][: saved["task_index"]] for c in t})
    growth = grown_label_space(folder, loaded, num_classes_of(denoiser), learned)
    ours, theirs = dict(denoiser.config), dict(loaded.config)
    differs = {
        k: (theirs.get(k), ours.get(k))
        for k in sorted((set(ours) | set(theirs)) - set(MODEL_KEYS_IGNORED))
        if _plain(theirs.get(k)) != _plain(ours.get(k))
    }
    if differs:
        raise SystemExit(
            f"error: {folder} holds a model configured otherwise than this run's (setting: (folder, this run)) "
            f"{differs}: it was trained on other data (class count, channels) or with another model; match the "
            f"data and --model_config_name_or_path/--preset, or use another --output_dir"
        )
    denoiser.load_state_dict(loaded.state_dict())
    used = saved["run_config"].get("method")  # (folders of older versions do not say)
    joining = sorted({m.name for m in learner.methods} - set(used.split("+"))) if used else []
    expected = Expected.of(denoiser, saved["tasks"], saved["task_index"], train, growth=growth)
    try:
        for name, start in learner.load_task_folder(folder, expected, joining).items():
            logger.info("--method adds %s, which %s's run did not use: %s", name, folder, start)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if ema is not None:
        ema.shadow_params = [p.detach().clone() for p in denoiser.parameters()]
        ema.optimization_step = saved.get("ema_optimization_step", 0)
    return growth
