#!/usr/bin/env python
"""Class-incremental training of a label-conditioned diffusers UNet2DModel (or DiTTransformer2DModel) with rank-1
(or diagonal) Fisher EWC and generative distillation — "Avoid catastrophic forgetting with rank-1 Fisher from
diffusion models".

    accelerate launch train_continual_ddpm.py --dataset_name digits --preset demo --output_dir runs/demo

Per task: train -> evaluate FID on every task so far -> consolidate (Fisher -> EWC term) -> write OUTPUT_DIR/task_XX
(a loadable pipeline with fisher.safetensors, ewc_penalty.safetensors, metrics.json, samples.png, README.md) -> the
next task starts with a frozen teacher and its replay pool. OUTPUT_DIR/results.json holds the FID matrix, AFID@k, F
and P; OUTPUT_DIR/report.html shows the run on one page. The flags, presets and checks live in hf_r1ewc.config, the
steps this recipe calls in the library. A quick run: --preset demo --num_epochs_per_task 2 --fid_num_samples 40.
"""

from __future__ import annotations

import argparse
import errno
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import ModelMixin, SchedulerMixin
from diffusers.training_utils import EMAModel

from hf_r1ewc.config import (
    DATA_SETTINGS,
    MAY_CHANGE,
    RECOVERY_SETTINGS,
    RESUME_MUST_MATCH,
    TASK_LIST_SETTINGS,
    make_accelerator,
    parse_args,
    recorded_defaults,
    run_config,
    run_manifest,
)
from hf_r1ewc.continual import ContinualLearner, LossLog, NonFiniteLossError, bare_model, step_generator
from hf_r1ewc.data import TaskData
from hf_r1ewc.evaluate import sample_grid_across_tasks
from hf_r1ewc.hub import TaskUploader, task_folder_name, write_json
from hf_r1ewc.methods import TrainingSplit
from hf_r1ewc.metrics import TaskFID, evaluate_task, run_summary_table
from hf_r1ewc.models import training_noise_scheduler
from hf_r1ewc.pipeline import sampling_scheduler
from hf_r1ewc.plots import evenly_chosen
from hf_r1ewc.progress import PhaseTimer, configure_logging, progress_bar
from hf_r1ewc.recipe import (
    TaskOutcome,
    end_task,
    load_data,
    make_ema,
    make_learner,
    make_lr_scheduler,
    make_model,
    make_task_evaluator,
    make_task_loader,
    method_description,
    optimizer_for,
    start_task,
    theta_star,
    training_split,
    training_tasks,
    write_task_folder,
)
from hf_r1ewc.report import write_report
from hf_r1ewc.run import (
    MANIFEST,
    RunPosition,
    RunState,
    check_manifest,
    load_checkpoint,
    lock_output_dir,
    register_ema,
    register_methods,
    released_on_error,
    resume_advice,
    resume_run,
    save_checkpoint,
    set_learning_rate,
)
from hf_r1ewc.stop import EXIT_STOPPED, StopRequest
from hf_r1ewc.tracking import log_images, log_task, sample_grid


logger = get_logger(__name__, log_level="INFO")


# -------------------------------------------------------------------------------------------------- set-up


@dataclass
class Run:
    """What every task of the run uses: the settings, the accelerator, the data, the method and its models, where
    the run stands, the FID scorer, the Hub uploader and the wall time by phase."""

    args: argparse.Namespace
    accelerator: Accelerator
    data: TaskData
    learner: ContinualLearner
    sampler: SchedulerMixin
    ema: EMAModel | None
    state: RunState
    evaluator: TaskFID | None = None
    uploader: TaskUploader | None = None
    train: TrainingSplit | None = None  # for the methods that keep exemplars of it
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    stop: StopRequest = field(default_factory=StopRequest)  # entered by main for the tasks and the report


def open_run(
    args, accelerator, data: TaskData, denoiser, learner: ContinualLearner, ema, tasks, train: TrainingSplit | None
) -> RunState:
    """Where this run starts in OUTPUT_DIR (restoring what it continues from, the methods' state checked against the
    model and the training split ``train``) and its manifest checked; the manifest to write, if any, is
    ``run.manifest``."""
    run = resume_run(
        accelerator,
        Path(args.output_dir),
        denoiser,
        learner,
        ema,
        tasks,
        data.resolution,
        checkpoint_spec=args.resume_from_checkpoint,
        task_source=args.resume_from_task,
        must_match={k: v for k, v in run_config(args).items() if k in RESUME_MUST_MATCH},
        train=train,
        checkpoint_must_match={k: v for k, v in run_config(args).items() if k in RESUME_MUST_MATCH + DATA_SETTINGS},
    )
    run.manifest = check_manifest(
        accelerator,
        Path(args.output_dir),
        run_manifest(args, accelerator, data),
        recovery_settings=RECOVERY_SETTINGS,
        may_change=MAY_CHANGE,
        added_settings=recorded_defaults,
        adopt=args.adopt_manifest,
        task_list_settings=TASK_LIST_SETTINGS,
        data_settings=DATA_SETTINGS,
    )
    run.tasks = tasks
    return run


def start_outputs(run: Run) -> None:
    """The EMA and the methods' changing state in checkpoints, the trackers of --report_to, and the Hub uploader
    (main process) of --push_to_hub."""
    args, accelerator = run.args, run.accelerator
    if run.ema is not None:
        run.ema.to(accelerator.device)
        register_ema(accelerator, run.ema)
    register_methods(accelerator, run.learner, run.state.checkpoint_expected)
    if accelerator.is_main_process and args.report_to:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("continual-ddpm", config=config)
    if args.push_to_hub and accelerator.is_main_process:
        run.uploader = TaskUploader(
            args.hub_model_id, private=args.hub_private or None, push_exemplars=args.push_exemplars
        )


def prepare_task(run: Run, denoiser: ModelMixin, loader) -> tuple:
    """A fresh optimizer and LR schedule per task (the methods carry what earlier tasks taught), prepared by
    Accelerate: (model, optimizer, LR schedule or None, loader). A streamed loader is sharded by ``stream_task``
    itself, so it does not go through prepare."""
    args, accelerator = run.args, run.accelerator
    optimizer = optimizer_for(args, denoiser, accelerator.device)
    if args.streaming:
        model, optimizer = accelerator.prepare(denoiser, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    return model, optimizer, make_lr_scheduler(args, accelerator, optimizer, len(loader)), loader


def full_disk_message(err: OSError, output_dir: Path) -> str:
    """What a full disk, quota, file-size limit or read-only folder means for the run, and the way back."""
    return (
        f"error: cannot write {err.filename or 'to ' + str(output_dir)}: {err.strerror}. Make room "
        f"(or raise the file-size or quota limit) and re-run the same command: {resume_advice(output_dir)}"
    )


# ------------------------------------------------------------------------------------------------ training


@dataclass
class TaskCurves:
    """The losses of a task: mean loss and denoising loss per finished epoch, ||grad penalties|| / ||grad rest|| at
    each epoch's first optimizer step, and the micro-batch losses of the epoch in progress."""

    loss: list[float] = field(default_factory=list)
    denoise: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    epoch_denoise: list[float] = field(default_factory=list)

    def close_epoch(self) -> None:
        if self.epoch_loss:
            self.loss.append(sum(self.epoch_loss) / len(self.epoch_loss))
            self.denoise.append(sum(self.epoch_denoise) / len(self.epoch_denoise))
        self.epoch_loss, self.epoch_denoise = [], []

    def position(self, task: int, epoch: int, step_in_epoch: int, global_step: int) -> RunPosition:
        return RunPosition(
            task,
            epoch,
            step_in_epoch,
            global_step,
            self.loss,
            self.denoise,
            self.ratio,
            self.epoch_loss,
            self.epoch_denoise,
        )


def resume_within_task(run: Run, optimizer, lr_scheduler, task_index: int) -> tuple[int, int, TaskCurves]:
    """(first epoch, micro-batches to skip in it, the curves so far): from the checkpoint the run resumes in, if
    it is in this task (its state loaded), else from the task's start."""
    position = run.state.resume_position
    if position is None or position.task != task_index:
        return 0, 0, TaskCurves()
    load_checkpoint(run.accelerator, run.state.resume_dir)
    set_learning_rate(optimizer, lr_scheduler, run.args.learning_rate)  # the flag's, not the stored one (recovery)
    curves = TaskCurves(
        position.loss_per_epoch,
        position.denoise_per_epoch,
        position.ewc_grad_ratio_per_epoch,
        position.epoch_losses,
        position.epoch_denoise,
    )
    if not position.step_in_epoch:  # stopped at an epoch's end
        curves.close_epoch()
    logger.info(
        "resumed from %s (task %d, epoch %d, step %d)",
        run.state.resume_dir,
        task_index,
        position.epoch,
        position.step_in_epoch,
    )
    run.state.resume_position = None
    return position.epoch, position.step_in_epoch, curves


def train_task(run: Run, model, optimizer, lr_scheduler, loader, task_index: int) -> tuple[TaskCurves, str | None]:
    """The epochs of one task; returns (its curves, why it stopped early: None, "--stop_after_steps" or the signal's
    name). A SIGTERM/SIGINT finishes the optimizer step and checkpoints it (one after the task's last step's check:
    a checkpoint at the task's end)."""
    args, accelerator, state = run.args, run.accelerator, run.state
    run.stop.doing = "the current optimizer step, then saving a checkpoint"
    first_epoch, skip, curves = resume_within_task(run, optimizer, lr_scheduler, task_index)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    progress = progress_bar(
        total=args.num_epochs_per_task * steps_per_epoch,
        initial=first_epoch * steps_per_epoch + skip // args.gradient_accumulation_steps,
        desc=f"task {task_index}/{len(state.tasks)}",
        show=accelerator.is_local_main_process,
    )
    loss_log = LossLog(run.learner.term_names)
    with progress:
        for epoch in range(first_epoch, args.num_epochs_per_task):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = loader
            if skip:
                batches = loader.skip_first(skip) if args.streaming else accelerator.skip_first_batches(loader, skip)
            step_in_epoch, skip = skip, 0
            model.train()
            for images, labels in batches:
                generator = step_generator(
                    args.seed, task_index, epoch, step_in_epoch, accelerator.process_index, device=accelerator.device
                )
                out = run.learner.training_step(
                    accelerator,
                    model,
                    optimizer,
                    images,
                    labels,
                    generator,
                    run.ema,
                    # the epoch's first optimizer step (the window's closing micro-batch)
                    measure_penalty=step_in_epoch < args.gradient_accumulation_steps,
                    check_finite=False,  # read (and checked) with the log, not at every step
                )
                if lr_scheduler is not None:  # Accelerate's wrapper steps it only when the optimizer stepped
                    lr_scheduler.step()
                step_in_epoch += 1
                loss_log.append(out, state.global_step + 1)
                if not out.optimizer_stepped:
                    continue
                state.global_step += 1
                state.steps_this_process += 1
                progress.update(1)
                if out.penalty_gradient_ratio is not None:
                    curves.ratio.append(out.penalty_gradient_ratio)
                end_of_epoch = step_in_epoch == len(loader)
                stop = stop_reason(run)
                checkpoint = state.global_step % args.checkpointing_steps == 0 or stop
                if end_of_epoch or checkpoint or state.global_step % args.logging_steps == 0:
                    log_losses(run, loss_log, curves, lr_scheduler, progress, task_index, epoch)
                if end_of_epoch and args.validation_epochs and (epoch + 1) % args.validation_epochs == 0:
                    log_validation_grid(run, model, task_index)
                if checkpoint:
                    position = curves.position(
                        task_index, epoch + end_of_epoch, 0 if end_of_epoch else step_in_epoch, state.global_step
                    )
                    save_checkpoint(accelerator, model, Path(args.output_dir), position, args.checkpoints_total_limit)
                if stop:
                    return curves, stop
            curves.close_epoch()
    stop = signalled(run)  # during the last step's log or checkpoint, after its check
    if stop and state.global_step % args.checkpointing_steps:
        position = curves.position(task_index, args.num_epochs_per_task, 0, state.global_step)
        save_checkpoint(accelerator, model, Path(args.output_dir), position, args.checkpoints_total_limit)
    return curves, stop


def stop_reason(run: Run) -> str | None:
    """Why training stops after this optimizer step: "--stop_after_steps", a signal's name (every process stops
    after the same step), or None."""
    args = run.args
    if stop := signalled(run):
        return stop
    if args.stop_after_steps is not None and run.state.steps_this_process >= args.stop_after_steps:
        return "--stop_after_steps"
    return None


def signalled(run: Run) -> str | None:
    """The name of the signal that asked the run to stop, agreed by every process (a signal to one stops all at the
    same point; every process must call this at the same point), or None."""
    accelerator, name = run.accelerator, run.stop.signal_name
    asked = name is not None
    if accelerator.num_processes > 1:
        if asked:
            accelerator.set_trigger()
        asked = accelerator.check_trigger()
    return (name or "a signal to another process") if asked else None


def log_losses(run: Run, loss_log: LossLog, curves: TaskCurves, lr_scheduler, progress, task_index: int, epoch: int):
    """Read the logged micro-batches' terms (a non-finite one ends the run, naming it), keep them in the epoch's
    curves and log their means (and the LR, the latest penalty-gradient ratio) to the bar and the trackers."""
    try:
        window = loss_log.read()
    except NonFiniteLossError as err:
        raise SystemExit(
            f"error: {err} at task {task_index}, epoch {epoch}, step {err.step}; nothing after the last checkpoint "
            f"was saved. {resume_advice(Path(run.args.output_dir))}"
        ) from None
    curves.epoch_loss += [w[0] for w in window]
    curves.epoch_denoise += [w[1] for w in window]
    logs = dict(zip(loss_log.names, map(statistics.fmean, zip(*window))))
    if lr_scheduler is not None:
        logs["lr"] = lr_scheduler.get_last_lr()[0]
    if curves.ratio:  # ||grad penalties|| / ||grad rest||, at each epoch's first optimizer step
        logs["ewc_grad_ratio"] = curves.ratio[-1]
    progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
    run.accelerator.log({**logs, "task": task_index}, step=run.state.global_step)


def log_validation_grid(run: Run, model, task_index: int) -> None:
    """--validation_epochs: 8 samples of each of (at most GRID_MAX_CLASSES of) the classes seen so far from the
    current weights (the EMA's with --use_ema) to the trackers, as diffusers' examples log their validation images.
    Every process samples (a sharded model's forward needs all of them); the main process logs."""
    args, accelerator = run.args, run.accelerator
    seen = sorted({c for t in run.state.tasks[:task_index] for c in t})
    grid = sample_grid(
        bare_model(accelerator, model),
        run.sampler,
        evenly_chosen(seen),
        args.num_inference_steps,
        args.seed,
        run.ema,
        serve=run.learner.serve,
    )
    log_images(accelerator, {"validation": grid}, run.state.global_step)


# ---------------------------------------------------------------------------------------------------- a task


def run_task(run: Run, denoiser: ModelMixin, task_index: int) -> tuple[ModelMixin, str | None]:
    """Task ``task_index``: start it (the teacher and its replay), train, evaluate FID on every task so far,
    consolidate (the Fisher -> a penalty term) and write its folder. Returns (theta*_k to continue from, why training
    stopped early or None)."""
    args, accelerator, learner, state = run.args, run.accelerator, run.learner, run.state
    phases = PhaseTimer()
    loader, num_examples, fisher_batches = make_task_loader(
        args, accelerator, run.data, state.tasks[task_index - 1], task_index
    )
    logger.info(
        "task %d/%d: classes %s, %d training images",
        task_index,
        len(state.tasks),
        state.tasks[task_index - 1],
        num_examples,
    )
    run.stop.doing = "the start of the task (the replay pool, written to OUTPUT_DIR/replay)"
    with phases("replay pool" if learner.method("gd") else "start of task"):
        start_task(args, accelerator, learner, denoiser, run.sampler, state.tasks, task_index, run.train)
    if stopped := signalled(run):
        logger.info("stopped by %s before training task %d; re-run the same command to continue", stopped, task_index)
        return denoiser, stopped
    model, optimizer, lr_scheduler, loader = prepare_task(run, denoiser, loader)
    with phases("training"):
        curves, stopped = train_task(run, model, optimizer, lr_scheduler, loader, task_index)
    if stopped:
        message = "stopped by %s after step %d (checkpoint-%d saved); re-run the same command to continue"
        logger.info(message, stopped, state.global_step, state.global_step)
        return denoiser, stopped

    run.stop.doing = f"task {task_index}'s evaluation, consolidation and folder"
    denoiser, trained, pipeline, eval_model = theta_star(accelerator, model, run.ema, run.sampler)
    eval_model = learner.serve(eval_model)  # with a model or adapter per task: every class by its own, routed by label
    with phases("FID"):
        eval_tasks = run.data.tasks if args.joint else run.data.tasks[:task_index]
        scores = evaluate_task(accelerator, run.evaluator, eval_model, run.sampler, eval_tasks, task_index)
    state.record(scores, task_index)
    with phases("Fisher" if any(m.term == "ewc" for m in learner.methods) else "end of task"):
        method_metrics = end_task(
            args, accelerator, learner, trained, fisher_batches, state.tasks, task_index, run.train
        )
    if accelerator.is_main_process:
        with phases("writing the task folder"):
            curve_lists = [curves.loss, curves.denoise, curves.ratio]
            outcome = TaskOutcome(pipeline, eval_model, method_metrics, scores, curve_lists, phases.seconds)
            folder, grid = write_task_folder(
                args, accelerator, run.data, state, outcome, task_index, learner, run.evaluator, run.ema
            )
        logger.info("wrote %s", folder)
        log_task(accelerator, state, task_index, grid)
        if run.uploader is not None:
            run.uploader.submit(folder, task_index)
    run.timer.add(phases)
    logger.info("task %d took %s", task_index, phases.summary())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the pool served this task only; the task folder is safely written
        shutil.rmtree(Path(args.output_dir) / "replay" / task_folder_name(task_index), ignore_errors=True)
    if (stopped := signalled(run)) and task_index < len(state.tasks):  # after the last task: the report, then exit
        logger.info("stopped by %s after task %d; re-run the same command to continue", stopped, task_index)
        return denoiser, stopped
    return denoiser, None


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)  # every flag checked before anything is loaded
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    configure_logging()
    set_seed(args.seed)
    timer = PhaseTimer()  # wall seconds per phase in this process, reported per task and at the end
    with timer("data"):
        data = load_data(args)
    denoiser = make_model(args, data)
    noise_scheduler = training_noise_scheduler()
    sampler = sampling_scheduler(args.replay_scheduler, noise_scheduler.config)
    learner, ema, tasks = make_learner(args, noise_scheduler), make_ema(args, denoiser), training_tasks(args, data)
    logger.info("method: %s; %d tasks", method_description(args, learner), len(tasks))
    lock = lock_output_dir(accelerator, output_dir)
    with released_on_error(lock):
        train = training_split(learner, data)
        state = open_run(args, accelerator, data, denoiser, learner, ema, tasks, train)
        run = Run(args, accelerator, data, learner, sampler, ema, state, timer=timer, train=train)
        with timer("FID classifier and reference statistics"):
            run.evaluator = (
                make_task_evaluator(args, accelerator, data, state) if state.start_task <= len(tasks) else None
            )
    if state.manifest is not None and accelerator.is_main_process:  # written once every check has passed
        write_json(output_dir / MANIFEST, state.manifest)
    if state.start_task > len(tasks):
        logger.info("all %d tasks are finished in %s", len(tasks), output_dir)
        with released_on_error(lock):
            if accelerator.is_main_process and not (output_dir / "report.html").exists():  # a kill in the report
                finish_run(args, data, state)
        if lock is not None:
            lock.release()
        return
    start_outputs(run)
    denoiser.to(accelerator.device)
    stopped: str | None = None
    try:
        with run.stop:  # the first SIGTERM/SIGINT holds until the step, the pool, the task or the report is done
            try:
                for task_index in range(state.start_task, len(tasks) + 1):  # train -> evaluate -> consolidate -> write
                    denoiser, stopped = run_task(run, denoiser, task_index)
                    if stopped:
                        break
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
                    raise
                raise SystemExit(full_disk_message(err, output_dir)) from None
            finally:  # also when the run ends in an error: the uploads so far are reported
                close_uploader(run.uploader, output_dir)
            accelerator.end_training()
            if accelerator.is_main_process and not stopped:
                run.stop.doing = "the run's report"
                finish_run(args, data, state)
    finally:  # the folder is unlocked however the run ends
        if lock is not None:
            lock.release()
    if stopped and stopped != "--stop_after_steps":
        sys.exit(EXIT_STOPPED)
    logger.info("wall time in this process by phase: %s", timer.summary())


def close_uploader(uploader: TaskUploader | None, output_dir: Path) -> None:
    """Wait for the queued uploads; record the ones that failed in OUTPUT_DIR/upload_failures.json."""
    if uploader is None:
        return
    failures = uploader.close()
    if failures:
        write_json(output_dir / "upload_failures.json", {"failures": failures})
        logger.warning(
            "%d uploads failed; see %s (local results are complete)",
            len(failures),
            output_dir / "upload_failures.json",
        )


def finish_run(args, data: TaskData, run: RunState) -> None:
    """The picture and the numbers of a finished run: OUTPUT_DIR/samples_by_task.png (rows: classes, at most 10,
    chosen evenly; columns: the model after each task), the summary table and OUTPUT_DIR/report.html."""
    output_dir = Path(args.output_dir)
    shutil.rmtree(output_dir / "replay" / "accumulated", ignore_errors=True)  # --replay_pool accumulate's pools
    rows = evenly_chosen(sorted({c for t in data.tasks for c in t}))
    sample_grid_across_tasks(output_dir, rows, output_dir / "samples_by_task.png", args.num_inference_steps, args.seed)
    if run.matrix and not args.joint:
        print("\n" + run_summary_table(run.matrix, run.accuracy, data.tasks, run.class_kl, data.id2label))
    print(
        f"\nDone. Task folders: {output_dir}/task_XX (pipeline, the methods' files, samples.png, README.md); "
        f"classes x tasks: {output_dir / 'samples_by_task.png'}"
    )
    print(f"Results (FID matrix, AFID@k, forgetting, plasticity, sample accuracy): {output_dir / 'results.json'}")
    print(f"Everything on one page: {write_report([output_dir], output_dir / 'report.html')}")


if __name__ == "__main__":
    main()
