"""The training script's steps from its settings: the argparse namespace of ``hf_r1ewc.config`` turned into the
library's typed objects (the methods, the learner, the data, the model, the optimizer, the FID scorer) and the task
folder's content. With ``config``, the only reader of the namespace; every function here is one line of the recipe
in ``train_continual_ddpm.py``."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ModelMixin, SchedulerMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from . import __version__
from .config import METHODS, run_config
from .continual import ContinualLearner, bare_model, make_optimizer
from .data import TaskData, check_pool_budget, load_task_data, task_loader
from .distill import frozen_teacher
from .hub import (
    TaskArtifacts,
    read_learned,
    resolve_task_source,
    task_folder_name,
    write_json,
    write_task_artifacts,
)
from .integrity import sha256_tensors
from .methods import ContinualMethod, TaskEnd, TaskStart, TrainingSplit
from .methods.exemplars import IMAGE_FILES
from .metrics import REFERENCE_FOLDER, TaskFID, accuracy_summary, make_evaluator, read_carried_references, summarize
from .models import build_model
from .pipeline import ClassConditionalPipeline, sample
from .plots import evenly_chosen
from .run import RunState, finished_tasks, resume_advice
from .sharding import full_model_copy


# ------------------------------------------------------------------------------------------------ the method


def build_methods(args: argparse.Namespace, noise_scheduler: SchedulerMixin) -> list[ContinualMethod]:
    """``--method``'s components in composition order (``config.METHODS``), built from their flags; naive and joint
    are the empty composition (joint trains one task of all classes)."""
    specs = [METHODS[name] for name in args.method.split("+")]
    return [spec.build(args, noise_scheduler) for spec in specs if spec.build is not None]


def make_learner(args: argparse.Namespace, noise_scheduler: SchedulerMixin) -> ContinualLearner:
    return ContinualLearner(noise_scheduler, build_methods(args, noise_scheduler), args.max_grad_norm)


def method_description(args: argparse.Namespace, learner: ContinualLearner) -> str:
    """What ran, with its weights: the label in results, cards, reports and ``evaluate``'s grouping."""
    return "non-continual upper bound (all classes at once)" if args.joint else learner.label()


def training_tasks(args: argparse.Namespace, data: TaskData) -> list[list[int]]:
    """The classes of each task trained in order: the data's tasks, or one task of all of them with --joint."""
    return [sorted(c for t in data.tasks for c in t)] if args.joint else data.tasks


# ----------------------------------------------------------------------------------------- data, model, optimiser


def load_data(args: argparse.Namespace) -> TaskData:
    """The data and tasks of the flags, with the replay pool's disk and memory budget checked before any work. A run
    that continues a model (--resume_from_task, or OUTPUT_DIR's newest task folder) maps the data's classes onto the
    model's by name and plans its tasks after the learned ones (``data.label_space``, ``data.continued_tasks``)."""
    done = finished_tasks(Path(args.output_dir))
    try:
        source = resolve_task_source(args.resume_from_task) if args.resume_from_task else None
        source = source or (Path(args.output_dir) / task_folder_name(done) if done and not args.joint else None)
        learned = read_learned(source) if source is not None else None
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    data = load_task_data(
        args.dataset_name or args.train_data_dir,
        eval_split=args.eval_split,
        image_column=args.image_column,
        label_column=args.label_column,
        streaming=args.streaming,
        max_train_per_class=args.max_train_per_class,
        resolution=args.resolution or (learned.sample_size if learned else None),  # a continued model's size
        resize=args.resize,
        tasks=args.tasks,
        classes_per_task=args.classes_per_task,
        need_test_classes=args.fid_backend != "none",
        class_names=args.class_names,
        learned_tasks=learned.tasks if learned else None,
        model_names=learned.names if learned else None,
        learned_sources=learned.sources if learned else None,
    )
    if "gd" in args.method.split("+") and args.replay_mode == "pool":
        check_pool_budget(data, args.replay_per_class, args.output_dir)
    return data


def make_model(args: argparse.Namespace, data: TaskData) -> ModelMixin:
    return build_model(data, args.preset, args.model_config_name_or_path, args.gradient_checkpointing)


def make_task_loader(args: argparse.Namespace, accelerator, data: TaskData, classes: list[int], task_index: int):
    """(training loader, number of training images, Fisher loader) of task ``task_index``."""
    return task_loader(
        accelerator,
        data,
        classes,
        batch_size=args.train_batch_size,
        seed=args.seed + task_index,
        fisher_num_samples=args.fisher_num_samples,
        fisher_batch_size=args.fisher_batch_size,
        streaming=args.streaming,
        image_column=args.image_column,
        label_column=args.label_column,
        resize=args.resize,
        num_workers=args.dataloader_num_workers,
    )


def make_ema(args: argparse.Namespace, denoiser: ModelMixin) -> EMAModel | None:
    if not args.use_ema:
        return None
    return EMAModel(
        denoiser.parameters(), decay=args.ema_decay, model_cls=type(denoiser), model_config=denoiser.config
    )


def optimizer_for(args: argparse.Namespace, model: torch.nn.Module, device: torch.device | str = "cpu"):
    """--learning_rate, --adam_beta1/2, --adam_epsilon, --adam_weight_decay (``continual.make_optimizer``)."""
    return make_optimizer(
        model,
        args.learning_rate,
        (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon,
        args.adam_weight_decay,
        device,
    )


def make_lr_scheduler(args: argparse.Namespace, accelerator, optimizer, batches_per_epoch: int):
    """This task's LR schedule over its optimizer steps, prepared by Accelerate (so it is checkpointed), or None for
    a constant rate without warm-up (checkpoints then hold no scheduler, as before the flag existed). Accelerate
    steps a prepared schedule once per process for each optimizer step, hence the factor (as diffusers' examples)."""
    if args.lr_scheduler == "constant" and args.lr_warmup_steps == 0:
        return None
    steps = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) * args.num_epochs_per_task
    schedule = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=steps * accelerator.num_processes,
    )
    return accelerator.prepare(schedule)


def make_task_evaluator(args: argparse.Namespace, accelerator, data: TaskData, run: RunState) -> TaskFID | None:
    """The FID scorer of the run; the tasks learned before it continued are scored from the statistics that the
    task folder it continues from carries, where the data lacks their test images."""
    output_dir = Path(args.output_dir)
    classifier_dir = Path(args.fid_classifier or output_dir / "fid_classifier")
    carried = {}
    if run.continued_from is not None and args.fid_backend != "none":
        try:
            carried = read_carried_references(run.continued_from, run.tasks[: run.start_task - 1])
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        tested = set(data.test.labels.tolist())
        lacking = [i for i, t in enumerate(run.tasks[: run.start_task - 1], 1) if not tested & set(t)]
        if lacking and args.fid_backend == "classifier" and not (classifier_dir / "model.safetensors").exists():
            raise SystemExit(
                f"error: tasks {lacking} are scored from the FID statistics {run.continued_from} carries, which "
                f"the FID classifier of the run that learned them computed; a classifier trained here on other data "
                f"would not compare. Pass that run's --fid_classifier RUN/fid_classifier (or --fid_backend none)"
            )
    try:
        return make_evaluator(
            args.fid_backend,
            accelerator,
            data,
            classifier_dir=classifier_dir,
            reference_dir=args.fid_reference_dir or output_dir / "fid_reference",
            num_samples=args.fid_num_samples,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
            fid_weights=args.fid_weights,
            dinov2_model=args.dinov2_model,
            carried=carried,
        )
    except ValueError as err:  # tasks without test images or carried statistics, or another extractor
        raise SystemExit(f"error: {err}") from None


def carried_reference_files(evaluator: TaskFID, task_index: int, earlier: Path | None) -> dict[str, object]:
    """``fid_reference/task_XX.safetensors`` of every task so far (``metrics.CarriedReference``), linked from the
    ``earlier`` task folder where it holds the file already (the same bytes in every folder), else written."""
    files = {}
    for i in range(1, task_index + 1):
        name = f"{REFERENCE_FOLDER}/{task_folder_name(i)}.safetensors"
        there = earlier / name if earlier is not None else None
        files[name] = (
            there if i < task_index and there is not None and there.exists() else evaluator.reference(i).payload()
        )
    return files


# -------------------------------------------------------------------------------------------- a task's ends


def training_split(learner: ContinualLearner, data: TaskData) -> TrainingSplit | None:
    """The training split for the methods that keep exemplars of it (None when none does, or the data streams)."""
    if data.train is None or not any(m.needs_training_split for m in learner.methods):
        return None
    return TrainingSplit(data.train_inputs, data.train.labels, sha256_tensors(data.train.images, data.train.labels))


def start_task(
    args: argparse.Namespace,
    accelerator,
    learner: ContinualLearner,
    denoiser,
    sampler,
    tasks: list,
    task_index: int,
    train: TrainingSplit | None = None,
) -> None:
    """The methods' start of task ``task_index`` (the teacher and its replay pool in OUTPUT_DIR/replay, written in
    shares by every process), from theta*_{k-1} = ``denoiser``."""
    task = TaskStart(
        task_index,
        denoiser,
        sorted({c for t in tasks[: task_index - 1] for c in t}),
        tasks[task_index - 1],
        sampler,
        Path(args.output_dir) / "replay",
        args.seed,
        accelerator,
        accelerator.is_local_main_process,
        train,
    )
    try:
        learner.start_task(task)
    except ValueError as err:
        raise SystemExit(
            f"error: task {task_index}: {err}; re-run with --replay_pool regenerate to sample every old class again"
            if args.replay_pool == "accumulate"
            else f"error: task {task_index}: {err}"
        ) from None


def end_task(
    args: argparse.Namespace,
    accelerator,
    learner: ContinualLearner,
    trained,
    fisher_batches,
    tasks: list,
    index: int,
    train: TrainingSplit | None = None,
) -> dict:
    """The methods' consolidation of the finished task at theta*_k = ``trained`` (EWC: its Fisher -> a new penalty
    term); returns what they report for ``metrics.json``. A non-finite estimate ends the run, saying how to resume."""
    streamed_share = -(-args.fisher_num_samples // accelerator.num_processes) if args.fisher_num_samples else None
    task = TaskEnd(
        index,
        trained,
        fisher_batches,
        tasks[index - 1],
        args.seed,
        streamed_share if args.streaming else None,
        accelerator,
        accelerator.is_local_main_process,
        train,
    )
    try:
        return learner.end_task(task)
    except ValueError as err:
        raise SystemExit(f"error: task {index}: {err}. {resume_advice(Path(args.output_dir))}") from None


def theta_star(accelerator, model, ema: EMAModel | None, sampler) -> tuple:
    """The end of a task's training: (the fp32 model to continue from (the EMA weights with --use_ema), its whole
    weights (gathered once under FSDP, else itself), the pipeline to save, a frozen copy to sample from)."""
    denoiser = bare_model(accelerator, model, keep_fp32_wrapper=False)  # no autocast wrapper: fp32 from here
    accelerator.free_memory()
    if ema is not None:
        ema.copy_to(denoiser.parameters())
    denoiser.eval()
    trained = full_model_copy(denoiser)
    return denoiser, trained, ClassConditionalPipeline.for_model(trained, sampler), frozen_teacher(trained)


# ------------------------------------------------------------------------------------------- the task folder


@dataclass
class TaskOutcome:
    """What one task produced, for its folder: the pipeline to save and the model FID was sampled with (it draws
    ``samples.png``), what the methods reported at the task's end (``metrics.json``), the FID scores by task i, the
    per-epoch curves (loss, denoising loss, penalty-gradient ratio) and the task's wall seconds by phase."""

    pipeline: object
    eval_model: torch.nn.Module
    method_metrics: dict
    scores: dict
    curves: list
    seconds: dict[str, float]


CARD_SETTINGS = ("preset", "method", "replay_scheduler", "num_epochs_per_task", "train_batch_size", "learning_rate")


def write_task_folder(
    args: argparse.Namespace,
    accelerator,
    data: TaskData,
    run: RunState,
    outcome: TaskOutcome,
    task_index: int,
    learner: ContinualLearner,
    evaluator: TaskFID | None,
    ema: EMAModel | None,
) -> tuple[Path, torch.Tensor]:
    """OUTPUT_DIR/task_XX (atomically, with the methods' files) and results.json; main process only. The pipeline's
    model as sampled for FID draws the ``samples.png`` grid, returned with the folder: ``(folder, [8 * classes, C, H,
    W] samples in [-1, 1])``."""
    output_dir, tasks = Path(args.output_dir), run.tasks
    classes, seen = tasks[task_index - 1], sorted({c for t in tasks[:task_index] for c in t})
    sampling = {
        "sampler": args.replay_scheduler,
        "num_inference_steps": args.num_inference_steps,
        "precision": evaluator.precision if evaluator else "fp32",
    }
    metrics = task_metrics(args, run, outcome, task_index, classes, sampling)
    outcome.pipeline.register_to_config(learned_classes=seen)  # the pipeline warns when asked for another class
    outcome.pipeline.set_class_names(data.id2label)  # samples by name: pipe(class_labels=["Sneaker", 3])
    outcome.pipeline.set_routes(learner.routes(task_index))  # with a model or adapter per task: which serves a class
    grid = sample(
        outcome.eval_model,
        outcome.pipeline.scheduler,
        torch.tensor(evenly_chosen(seen)).repeat_interleave(8),
        args.num_inference_steps,
        torch.Generator().manual_seed(args.seed),
        evaluator.autocast_dtype if evaluator else None,
    )
    label = method_description(args, learner)
    state = {
        "task_index": task_index,
        "tasks": tasks,
        "task_sources": data.task_sources,
        "seen_classes": seen,
        "run_config": run_config(args),
        "global_step": run.global_step,
        "method": label,
        "num_processes": accelerator.num_processes,
        "ema_optimization_step": ema.optimization_step if ema else None,
        "hf_r1ewc_version": __version__,
    }
    comparable = bool(evaluator and evaluator.extractor.comparable_to_inception)
    card = dict(
        task_index=task_index,
        num_tasks=len(tasks),
        seen_classes=seen,
        dataset_name=data.source,
        method_description=label,
        hyperparameters={k: getattr(args, k) for k in CARD_SETTINGS}
        | {k: v for m in learner.methods for k, v in m.settings().items()}
        | {"num_inference_steps": args.num_inference_steps, "seed": args.seed},
        command=f"accelerate launch --num_processes {accelerator.num_processes} --mixed_precision "
        f"{accelerator.mixed_precision} " + " ".join(shlex.quote(a) for a in sys.argv),
        matrix=run.matrix,
        summary=summarize(run.matrix) if not args.joint else {},
        fid_backend=args.fid_backend,
        fid_comparable=comparable,
        fid_num_samples=metrics["fid_num_samples"],
        accuracy=metrics["accuracy"],
        sampling=f"{args.replay_scheduler}, {args.num_inference_steps} steps, {sampling['precision']}",
        hub_model_id=args.hub_model_id,
        transfer=accuracy_summary(run.accuracy),
        class_kl=run.class_kl.get(task_index),
        class_names=data.id2label,
    )
    card["hyperparameters"]["mixed_precision"] = accelerator.mixed_precision
    files = learner.task_files(task_index, classes)
    if evaluator is not None and not args.joint:  # a later run scores these tasks without their data
        earlier = output_dir / task_folder_name(task_index - 1)
        files |= carried_reference_files(evaluator, task_index, earlier if earlier.exists() else run.continued_from)
    card["exemplar_files"] = {name: args.push_exemplars for name in files if name in IMAGE_FILES}
    card["routes"] = learner.routes(task_index)
    artifacts = TaskArtifacts(outcome.pipeline, metrics, grid, card, state, files)
    folder = write_task_artifacts(output_dir / task_folder_name(task_index), artifacts)
    results = {
        "method": label,
        "fid_backend": args.fid_backend,
        "fid_comparable_to_inception": comparable,
        "tasks": data.tasks,
        "class_names": data.id2label,
        "task_sources": data.task_sources,
        "tasks_done": task_index,
        "dataset": data.source,
        "resolution": data.resolution,
        "joint": args.joint,
        "seed": args.seed,
        "sampling": sampling,
        "fid": run.matrix,
        "accuracy": run.accuracy,
        "class_kl": run.class_kl,
    }
    if args.joint and outcome.scores:
        results["afid_final"] = sum(s.fid for s in outcome.scores.values()) / len(outcome.scores)
    else:
        results.update(summarize(run.matrix))
        results.update(accuracy_summary(run.accuracy))
    if metrics["accuracy_per_class"] and task_index == len(tasks):
        results["final_accuracy_per_class"] = metrics["accuracy_per_class"]
    write_json(output_dir / "results.json", results)
    return folder, grid


def task_metrics(
    args: argparse.Namespace, run: RunState, outcome: TaskOutcome, task_index: int, classes: list, sampling: dict
) -> dict:
    """The task folder's ``metrics.json``: FID and accuracy of every task so far, the curves, the seconds by phase,
    what the methods reported (EWC: c*, ||mu||) and the summary so far (AFID@k, F, P)."""
    scores, curves = outcome.scores, outcome.curves
    return {
        "task": task_index,
        "classes": classes,
        "fid": {i: s.fid for i, s in scores.items()},
        "fid_num_samples": {i: s.num_samples for i, s in scores.items()},
        "accuracy": {i: s.accuracy for i, s in scores.items() if s.accuracy is not None},
        "accuracy_per_class": {c: a for s in scores.values() for c, a in (s.accuracy_per_class or {}).items()},
        "class_kl": run.class_kl.get(task_index),
        "fid_backend": args.fid_backend,
        "sampling": sampling,
        "loss_per_epoch": curves[0],
        "denoise_loss_per_epoch": curves[1],
        "ewc_grad_ratio_per_epoch": curves[2],
        "seconds_by_phase": dict(outcome.seconds),  # this task's wall time in this process (writing not included)
        "history": {"fid": run.matrix, "accuracy": run.accuracy, "class_kl": run.class_kl},  # rows 1..k: a run
        # continued from this folder alone reports from task 1
        **outcome.method_metrics,
        **(summarize(run.matrix) if not args.joint else {}),
    }
