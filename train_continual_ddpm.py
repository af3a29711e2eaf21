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

import errno
import math
import shutil
import statistics
import sys
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import (
    set_seed,
)
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel

from hf_r1ewc.config import (
    ADDED_SETTINGS,
    MAY_CHANGE,
    RECOVERY_SETTINGS,
    RESUME_MUST_MATCH,
    make_accelerator,
    method_description,
    parse_args,
    run_config,
    run_manifest,
)
from hf_r1ewc.continual import (
    ContinualLearner,
    LossLog,
    NonFiniteLossError,
    bare_model,
    consolidate_task,
    make_ema,
    make_learner,
    make_lr_scheduler,
    make_optimizer,
    start_replay,
    step_generator,
    theta_star,
)
from hf_r1ewc.data import TaskData, check_budgets, load_task_data, task_loader
from hf_r1ewc.evaluate import sample_grid_across_tasks
from hf_r1ewc.hub import TaskOutcome, TaskUploader, task_folder_name, write_json, write_task_folder
from hf_r1ewc.metrics import evaluate_task, make_evaluator, record_scores, run_summary_table
from hf_r1ewc.models import build_model, training_noise_scheduler
from hf_r1ewc.pipeline import sampling_scheduler
from hf_r1ewc.plots import evenly_chosen
from hf_r1ewc.progress import PhaseTimer, configure_logging, progress_bar
from hf_r1ewc.report import write_report
from hf_r1ewc.run import (
    MANIFEST,
    RunPosition,
    RunState,
    check_manifest,
    load_checkpoint,
    lock_output_dir,
    register_ema,
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


def prepare_task(args, accelerator, denoiser: ModelMixin, loader) -> tuple:
    """A fresh optimizer and LR schedule per task (the penalty and the teacher carry what earlier tasks taught),
    prepared by Accelerate: (model, optimizer, LR schedule or None, loader). A streamed loader is sharded by
    ``stream_task`` itself, so it does not go through prepare."""
    optimizer = make_optimizer(args, denoiser, accelerator.device)
    if args.streaming:
        model, optimizer = accelerator.prepare(denoiser, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    return model, optimizer, make_lr_scheduler(args, accelerator, optimizer, len(loader)), loader


def start_outputs(args, accelerator, ema: EMAModel | None) -> TaskUploader | None:
    """The EMA in checkpoints, the trackers of --report_to, and the Hub uploader (main process) of --push_to_hub."""
    if ema is not None:
        ema.to(accelerator.device)
        register_ema(accelerator, ema)
    if accelerator.is_main_process and args.report_to:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("continual-ddpm", config=config)
    if args.push_to_hub and accelerator.is_main_process:
        return TaskUploader(args.hub_model_id, private=args.hub_private or None)
    return None


def full_disk_message(err: OSError, output_dir: Path) -> str:
    """What a full disk, quota, file-size limit or read-only folder means for the run, and the way back."""
    return (
        f"error: cannot write {err.filename or 'to ' + str(output_dir)}: {err.strerror}. Make room "
        f"(or raise the file-size or quota limit) and re-run the same command: {resume_advice(output_dir)}"
    )


def open_run(args, accelerator, data: TaskData, denoiser, learner: ContinualLearner, ema, training_tasks) -> RunState:
    """Where this run starts in OUTPUT_DIR (restoring what it continues from) and its manifest checked; the
    manifest to write, if any, is ``run.manifest``."""
    run = resume_run(
        accelerator,
        Path(args.output_dir),
        denoiser,
        learner,
        ema,
        training_tasks,
        data.resolution,
        checkpoint_spec=args.resume_from_checkpoint,
        task_source=args.resume_from_task,
        must_match={k: v for k, v in run_config(args).items() if k in RESUME_MUST_MATCH},
        ewc_lambda=args.ewc_lambda,
    )
    run.manifest = check_manifest(
        accelerator,
        Path(args.output_dir),
        run_manifest(args, accelerator, data),
        recovery_settings=RECOVERY_SETTINGS,
        may_change=MAY_CHANGE,
        added_settings=ADDED_SETTINGS,
        adopt=args.adopt_manifest,
    )
    run.tasks = training_tasks
    return run


# ------------------------------------------------------------------------------------------ the task phases


def train_task(
    args,
    accelerator,
    learner: ContinualLearner,
    model,
    optimizer,
    lr_scheduler,
    loader,
    run: RunState,
    task_index: int,
    ema,
) -> tuple[list[float], list[float], list[float], str | None]:
    """The epochs of one task; returns (mean loss per epoch, mean denoising loss per epoch, ||grad lambda*EWC|| /
    ||grad of the rest of the loss|| at each epoch's first optimizer step (empty without a penalty), why it stopped
    early: None, "--stop_after_steps" or the signal's name). A SIGTERM/SIGINT finishes the optimizer step and
    checkpoints it."""
    output_dir = Path(args.output_dir)
    first_epoch, skip, loss_curve, denoise_curve, ratio_curve, carried = 0, 0, [], [], [], ([], [])
    position = run.resume_position
    if position is not None and position.task == task_index:
        load_checkpoint(accelerator, run.resume_dir)
        set_learning_rate(optimizer, lr_scheduler, args.learning_rate)  # the flag's, not the stored one (recovery)
        first_epoch, skip = position.epoch, position.step_in_epoch
        # the losses logged before the stop: per finished epoch, and of the epoch it stopped in
        loss_curve, denoise_curve = position.loss_per_epoch, position.denoise_per_epoch
        ratio_curve, carried = position.ewc_grad_ratio_per_epoch, (position.epoch_losses, position.epoch_denoise)
        if not skip and carried[0]:  # stopped at an epoch's end
            loss_curve, denoise_curve = (
                loss_curve + [sum(carried[0]) / len(carried[0])],
                denoise_curve + [sum(carried[1]) / len(carried[1])],
            )
            carried = ([], [])
        logger.info("resumed from %s (task %d, epoch %d, step %d)", run.resume_dir, task_index, first_epoch, skip)
        run.resume_position = None
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    progress = progress_bar(
        total=args.num_epochs_per_task * steps_per_epoch,
        initial=first_epoch * steps_per_epoch + skip // args.gradient_accumulation_steps,
        desc=f"task {task_index}/{len(run.tasks)}",
        show=accelerator.is_local_main_process,
    )
    ratio = ratio_curve[-1] if ratio_curve else None
    loss_log = LossLog()
    with StopRequest() as stop_request:  # the first SIGTERM/SIGINT: finish the step, checkpoint, stop
        for epoch in range(first_epoch, args.num_epochs_per_task):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = (
                loader
                if not skip
                else (loader.skip_first(skip) if args.streaming else accelerator.skip_first_batches(loader, skip))
            )
            step_in_epoch, skip = skip, 0
            (losses, denoise), carried = carried, ([], [])
            model.train()
            for images, labels in batches:
                generator = step_generator(
                    args.seed, task_index, epoch, step_in_epoch, accelerator.process_index, device=accelerator.device
                )
                out = learner.training_step(
                    accelerator,
                    model,
                    optimizer,
                    images,
                    labels,
                    generator,
                    ema,
                    # the epoch's first optimizer step (the window's closing micro-batch)
                    measure_penalty=step_in_epoch < args.gradient_accumulation_steps,
                    check_finite=False,  # read (and checked) with the log, not at every step
                )
                if lr_scheduler is not None:  # Accelerate's wrapper steps it only when the optimizer stepped
                    lr_scheduler.step()
                step_in_epoch += 1
                loss_log.append(out, run.global_step + 1)
                if not out.optimizer_stepped:
                    continue
                run.global_step += 1
                run.steps_this_process += 1
                progress.update(1)
                if out.penalty_gradient_ratio is not None:
                    ratio = out.penalty_gradient_ratio
                    ratio_curve.append(ratio)
                end_of_epoch = step_in_epoch == len(loader)
                stop = (
                    "--stop_after_steps"
                    if args.stop_after_steps is not None and run.steps_this_process >= args.stop_after_steps
                    else None
                )
                signalled = stop_request.signal_name is not None
                if accelerator.num_processes > 1:  # every process stops after the same step
                    if signalled:
                        accelerator.set_trigger()
                    signalled = accelerator.check_trigger()
                stop = (stop_request.signal_name or "a signal to another process") if signalled else stop
                checkpoint = run.global_step % args.checkpointing_steps == 0 or stop
                if end_of_epoch or checkpoint or run.global_step % args.logging_steps == 0:
                    window = read_losses(loss_log, task_index, epoch, output_dir)
                    losses += [w[0] for w in window]
                    denoise += [w[1] for w in window]
                    logs = dict(zip(("loss", "denoise", "distill", "ewc"), map(statistics.fmean, zip(*window))))
                    if lr_scheduler is not None:
                        logs["lr"] = lr_scheduler.get_last_lr()[0]
                    if ratio is not None:  # ||grad EWC|| / ||grad rest||, at each epoch's first optimizer step
                        logs["ewc_grad_ratio"] = ratio
                    progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
                    accelerator.log({**logs, "task": task_index}, step=run.global_step)
                if end_of_epoch and args.validation_epochs and (epoch + 1) % args.validation_epochs == 0:
                    seen = sorted({c for t in run.tasks[:task_index] for c in t})
                    log_validation_grid(args, accelerator, learner, model, ema, seen, run.global_step)
                position = RunPosition(
                    task_index,
                    epoch + end_of_epoch,
                    0 if end_of_epoch else step_in_epoch,
                    run.global_step,
                    loss_curve,
                    denoise_curve,
                    ratio_curve,
                    losses,
                    denoise,
                )
                if checkpoint:
                    save_checkpoint(accelerator, model, output_dir, position, args.checkpoints_total_limit)
                if stop:
                    progress.close()
                    return loss_curve, denoise_curve, ratio_curve, stop
            if losses:
                loss_curve.append(sum(losses) / len(losses))
                denoise_curve.append(sum(denoise) / len(denoise))
    progress.close()
    return loss_curve, denoise_curve, ratio_curve, None


def read_losses(loss_log: LossLog, task_index: int, epoch: int, output_dir: Path) -> list[list[float]]:
    """The logged micro-batches' (loss, denoise, distill, ewc); a non-finite term ends the run, naming it."""
    try:
        return loss_log.read()
    except NonFiniteLossError as err:
        raise SystemExit(
            f"error: {err} at task {task_index}, epoch {epoch}, step {err.step}; nothing after the last checkpoint "
            f"was saved. {resume_advice(output_dir)}"
        ) from None


def log_validation_grid(
    args, accelerator, learner, model, ema: EMAModel | None, classes: list[int], step: int
) -> None:
    """--validation_epochs: 8 samples of each of (at most GRID_MAX_CLASSES of) ``classes`` from the current weights
    (the EMA's with --use_ema) to the trackers, as diffusers' examples log their validation images. Every process
    samples (a sharded model's forward needs all of them); the main process logs."""
    scheduler = sampling_scheduler(args.replay_scheduler, learner.noise_scheduler.config)
    grid = sample_grid(
        bare_model(accelerator, model), scheduler, evenly_chosen(classes), args.num_inference_steps, args.seed, ema
    )
    log_images(accelerator, {"validation": grid}, step)


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    configure_logging()
    set_seed(args.seed)
    device = accelerator.device
    timer = PhaseTimer()  # wall seconds per phase in this process, reported per task and at the end
    with timer("data"):
        data = load_task_data(args)
    check_budgets(args, data)
    denoiser = build_model(args, data)
    noise_scheduler = training_noise_scheduler()
    sampler = sampling_scheduler(args.replay_scheduler, noise_scheduler.config)
    training_tasks = [sorted(c for t in data.tasks for c in t)] if args.joint else data.tasks
    num_tasks = len(training_tasks)
    learner = make_learner(args, noise_scheduler)
    penalty = learner.penalty
    ema = make_ema(args, denoiser)
    logger.info("method: %s; %d tasks", method_description(args), num_tasks)
    lock = lock_output_dir(accelerator, output_dir)
    with released_on_error(lock):
        run = open_run(args, accelerator, data, denoiser, learner, ema, training_tasks)
        with timer("FID classifier and reference statistics"):
            evaluator = make_evaluator(args, accelerator, data, device) if run.start_task <= num_tasks else None
    if run.manifest is not None and accelerator.is_main_process:  # written once every check has passed
        write_json(output_dir / MANIFEST, run.manifest)
    if run.start_task > num_tasks:
        logger.info("all %d tasks are finished in %s", num_tasks, output_dir)
        if lock is not None:
            lock.release()
        return
    uploader = start_outputs(args, accelerator, ema)
    denoiser.to(device)
    if penalty is not None:  # the statistics stay on the CPU; the penalty binds one flat copy (FSDP: the local
        penalty.to("cpu")  # shard's slice) to the model's device per task
    stopped: str | None = None

    try:
        for task_index in range(run.start_task, num_tasks + 1):
            phases = PhaseTimer()
            classes = training_tasks[task_index - 1]
            old_classes = sorted({c for t in training_tasks[: task_index - 1] for c in t})
            loader, num_examples, fisher_batches = task_loader(args, accelerator, data, classes, task_index)
            logger.info("task %d/%d: classes %s, %d training images", task_index, num_tasks, classes, num_examples)
            if args.replay == "on" and not args.joint:
                with phases("replay pool"):
                    start_replay(args, accelerator, learner, denoiser, sampler, old_classes, task_index)
            model, optimizer, lr_scheduler, loader = prepare_task(args, accelerator, denoiser, loader)
            with phases("training"):
                *curves, stopped = train_task(
                    args, accelerator, learner, model, optimizer, lr_scheduler, loader, run, task_index, ema
                )
            if stopped:
                message = "stopped by %s after step %d (checkpoint-%d saved); re-run the same command to continue"
                logger.info(message, stopped, run.global_step, run.global_step)
                break

            # ---- end of task: theta*_k, evaluation, consolidation, the task folder
            denoiser, trained, pipeline, eval_model = theta_star(accelerator, model, ema, sampler)
            with phases("FID"):
                eval_tasks = data.tasks if args.joint else data.tasks[:task_index]
                scores = evaluate_task(accelerator, evaluator, eval_model, sampler, eval_tasks, task_index)
            record_scores(run, scores, task_index)
            with phases("Fisher"):
                stats = consolidate_task(args, accelerator, learner, trained, fisher_batches, task_index)
            if accelerator.is_main_process:
                with phases("writing the task folder"):
                    outcome = TaskOutcome(pipeline, eval_model, stats, scores, curves, phases.seconds)
                    folder, grid = write_task_folder(
                        args, accelerator, data, run, outcome, task_index, training_tasks, evaluator, ema, penalty
                    )
                log_task(accelerator, run, task_index, grid)
                if uploader is not None:
                    uploader.submit(folder, task_index)
            timer.add(phases)
            logger.info("task %d took %s", task_index, phases.summary())
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # the pool served this task only; the task folder is safely written
                shutil.rmtree(output_dir / "replay" / task_folder_name(task_index), ignore_errors=True)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        raise SystemExit(full_disk_message(err, output_dir)) from None
    finally:  # also when the run ends in an error: the uploads so far are reported, the folder unlocked
        close_uploader(uploader, output_dir)
        if lock is not None:
            lock.release()

    accelerator.end_training()
    if stopped and stopped != "--stop_after_steps":
        sys.exit(EXIT_STOPPED)
    if accelerator.is_main_process and not stopped:
        finish_run(args, data, run)
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
        print("\n" + run_summary_table(run.matrix, run.accuracy, data.tasks, run.class_kl))
    print(
        f"\nDone. Task folders: {output_dir}/task_XX (pipeline, fisher.safetensors, samples.png, README.md); "
        f"classes x tasks: {output_dir / 'samples_by_task.png'}"
    )
    print(f"Results (FID matrix, AFID@k, forgetting, plasticity, sample accuracy): {output_dir / 'results.json'}")
    print(f"Everything on one page: {write_report([output_dir], output_dir / 'report.html')}")


if __name__ == "__main__":
    main()
