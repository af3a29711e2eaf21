#!/usr/bin/env python
"""Class-incremental training of a label-conditioned diffusers UNet2DModel (or DiTTransformer2DModel) with rank-1
(or diagonal) Fisher EWC and generative distillation — "Avoid catastrophic forgetting with rank-1 Fisher from
diffusion models".

    accelerate launch train_continual_ddpm.py --dataset_name digits --preset demo --output_dir runs/demo

Per task: train -> evaluate FID on every task so far -> consolidate (Fisher -> EWC term) -> write OUTPUT_DIR/task_XX
(a loadable pipeline with fisher.safetensors, ewc_penalty.safetensors, metrics.json, samples.png, README.md) -> the
next task starts with a frozen teacher and its replay pool. OUTPUT_DIR/results.json holds the FID matrix, AFID@k, F
and P. A quick run: --preset demo --num_epochs_per_task 2 --fid_num_samples 40 (see the README).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from diffusers import ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from hf_r1ewc import __version__
from hf_r1ewc.continual import ContinualLearner, NonFiniteLossError, fisher_loader, step_generator
from hf_r1ewc.data import (
    StreamedTaskLoader,
    count_task_examples,
    default_resolution,
    images_to_model_input,
    load_labeled_images,
    parse_tasks,
    stream_task,
)
from hf_r1ewc.distill import frozen_teacher
from hf_r1ewc.evaluate import sample_grid_across_tasks
from hf_r1ewc.features import load_feature_extractor, train_classifier
from hf_r1ewc.hub import (
    TaskArtifacts,
    TaskUploader,
    task_folder_name,
    write_json,
    write_task_artifacts,
)
from hf_r1ewc.integrity import (
    sha256_tensors,
)
from hf_r1ewc.metrics import TaskFID, accuracy_summary, class_distribution_kl, run_summary_table, summarize
from hf_r1ewc.models import (
    PRESETS,
    model_from_config,
    model_from_preset,
    training_noise_scheduler,
)
from hf_r1ewc.penalty import EWCPenalty
from hf_r1ewc.pipeline import (
    SAMPLERS,
    ClassConditionalPipeline,
    default_autocast_dtype,
    num_classes_of,
    sample,
    sampling_scheduler,
)
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
from hf_r1ewc.sharding import full_model_copy
from hf_r1ewc.stop import EXIT_STOPPED, StopRequest
from hf_r1ewc.tracking import grid_image, log_images, matrix_images, sample_grid, task_scalars


logger = get_logger(__name__, log_level="INFO")
GRID_MAX_CLASSES = 10  # samples.png shows 8 samples of at most this many seen classes, chosen evenly
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# settings added after runs were recorded, with the value that reproduces those runs (an older manifest lacks them)
ADDED_SETTINGS = {
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "adam_weight_decay": 0.0,
    "allow_tf32": False,
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every default."""


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset_name",
        default=None,
        help="'digits' (builtin), a Hub dataset id (zalando-datasets/fashion_mnist, ylecun/mnist, "
        "uoft-cs/cifar10, ...) or a local folder",
    )
    g.add_argument(
        "--train_data_dir",
        default=None,
        help="a local folder: raw IDX files, a save_to_disk folder, an imagefolder or parquet files",
    )
    g.add_argument("--image_column", default=None, help="image column (detected when omitted)")
    g.add_argument("--label_column", default=None, help="label column (detected when omitted)")
    g.add_argument("--tasks", default=None, help="explicit class-incremental tasks, e.g. '0,1;2,3;4,5;6,7;8,9'")
    g.add_argument(
        "--classes_per_task",
        type=int,
        default=2,
        help="contiguous groups of labels in label order (the paper: 2; ImageNet: 50)",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="model resolution; default: 28x28 zero-padded to 32 (paper), otherwise the native size",
    )
    g.add_argument("--resize", action="store_true", help="resize images to --resolution instead of padding")
    g.add_argument(
        "--max_train_per_class",
        type=int,
        default=None,
        help="use only the first N training images of each class (small CPU runs; default: all)",
    )
    g.add_argument(
        "--streaming",
        action="store_true",
        help="stream the training split with `datasets` instead of reading it into memory (ImageNet): each "
        "task reads only its classes (label filter pushed down to parquet), a shuffle buffer "
        "reseeded per epoch, one shard per process. The --eval_split is still read into memory.",
    )
    g.add_argument(
        "--eval_split",
        default="test",
        help="the split that FID and the class list come from (ImageNet 32x32: validation)",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="worker processes of the in-memory training loader (0: the main process; the batches are the same)",
    )


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="model shape and the defaults of the flags marked 'preset': paper (35.7M params at 32x32, the "
        "paper's protocol), cpu-small (1.1M), demo (0.7M, 8x8 digits); DiTs (DiTTransformer2DModel, "
        "pixel space, patch 2): dit-paper-scale (35.2M at 32x32, the paper's protocol), dit-small "
        "(0.39M, cpu-small's settings)",
    )
    g.add_argument(
        "--model_config_name_or_path",
        default=None,
        help="a UNet2DModel or DiTTransformer2DModel config (json file or folder, by its _class_name) "
        "instead of the preset's model",
    )
    g = p.add_argument_group("continual learning (the paper's method and baselines)")
    g.add_argument(
        "--ewc_type",
        choices=["none", "diag", "rank1", "rank1_unscaled"],
        default="rank1",
        help="EWC penalty: rank1 = paper eq. 6 (with c*), rank1_unscaled = without c*, diag = diagonal",
    )
    g.add_argument("--ewc_lambda", type=float, default=15000.0, help="EWC weight lambda (paper: 15000)")
    g.add_argument(
        "--ewc_mode",
        choices=["loss", "decoupled"],
        default=None,
        help="loss: penalty added to the loss (paper); decoupled: exact proximal step after each "
        "optimizer step with step size = learning rate (preset: paper -> loss, demo and cpu-small -> "
        "decoupled, see the README's 'Choosing lambda')",
    )
    g.add_argument(
        "--fisher_num_samples",
        type=int,
        default=None,
        help="a seeded random subset of the task's samples for the Fisher (preset; default: all)",
    )
    g.add_argument("--fisher_batch_size", type=int, default=64, help="samples per Fisher batch (memory)")
    g.add_argument(
        "--distill_weight",
        type=float,
        default=1.0,
        help="generative distillation weight (paper: 1.0; 0 disables distillation)",
    )
    g.add_argument(
        "--replay",
        choices=["on", "off"],
        default="on",
        help="'off' disables the replay batch entirely (no GD): the 'w/o GD' baselines",
    )
    g.add_argument(
        "--no_replay_in_denoise",
        action="store_true",
        help="keep replay images out of the denoising loss (default: they join it, as in the authors' code)",
    )
    g.add_argument(
        "--replay_per_class", type=int, default=None, help="replay pool images per class (preset; paper: 5000)"
    )
    g.add_argument(
        "--replay_mode",
        choices=["pool", "online"],
        default="pool",
        help="pool: teacher-generated pool (paper); online: fresh few-step replay each step",
    )
    g.add_argument(
        "--replay_batch_size",
        type=int,
        default=None,
        help="replay images per step (preset: demo 32; default: the real batch)",
    )
    g.add_argument("--online_replay_steps", type=int, default=2, help="sampler steps of online replay")
    g.add_argument("--joint", action="store_true", help="non-continual upper bound: all classes at once")


def add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs_per_task", type=int, default=None, help="epochs over each task (preset)")
    g.add_argument("--train_batch_size", type=int, default=None, help="real images per step and process (preset)")
    g.add_argument("--learning_rate", type=float, default=None, help="Adam learning rate (preset)")
    g.add_argument(
        "--lr_scheduler",
        choices=list(LR_SCHEDULERS),
        default="constant",
        help="diffusers' get_scheduler, restarted at every task (each task warms up and decays on its own steps) "
        "and kept in checkpoints",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up optimizer steps at the start of each task")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument(
        "--adam_weight_decay",
        type=float,
        default=0.0,
        help="decoupled weight decay (AdamW, as diffusers' examples); 0 = Adam, as the paper",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, ~30 %% more compute; same results)",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs (faster)")
    g.add_argument("--max_grad_norm", type=float, default=None, help="gradient clipping (default: none, as the paper)")
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: the accelerate config's fp16/bf16 if it sets one, else bf16 on a CUDA GPU that "
        "supports it and no (fp32) on CPU. Weights, Adam, the penalty and the Fisher stay fp32",
    )
    g.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA of the weights (diffusers EMAModel; preset: on for demo). At the end of each task the EMA "
        "weights replace the model: they are theta*_k, where the Fisher is estimated, what is saved and "
        "evaluated, and what the next task starts from",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="the EMA's largest decay (preset: demo 0.95, others 0.999); diffusers warms it up as "
        "(1 + step) / (10 + step)",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds data order, noise, replay, Fisher and FID samples")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument(
        "--replay_scheduler",
        choices=sorted(SAMPLERS),
        default="ddim",
        help="diffusers scheduler for the replay pool, FID samples and the saved pipeline",
    )
    g.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="sampler steps for replay, samples and FID (preset: the paper's 50; demo 10, see the README)",
    )
    g.add_argument(
        "--fid_backend",
        choices=["classifier", "inception", "dinov2", "none"],
        default="classifier",
        help="classifier: a CNN trained on the dataset's training split (offline default, NOT comparable "
        "to Inception FID); inception: the paper's metric (needs --fid_weights offline); dinov2",
    )
    g.add_argument(
        "--fid_classifier",
        default=None,
        help="a trained feature classifier folder; default: train one into OUTPUT_DIR/fid_classifier",
    )
    g.add_argument("--fid_weights", default=None, help="Inception FID weights file for offline use")
    g.add_argument("--dinov2_model", default="facebook/dinov2-base")
    g.add_argument(
        "--fid_reference_dir",
        default=None,
        help="cache of real-image FID statistics (default OUTPUT_DIR/fid_reference); share one folder "
        "across runs of other methods and seeds to compute each task's statistics once",
    )
    g.add_argument(
        "--fid_num_samples",
        type=int,
        default=None,
        help="generated images per task for FID (preset; default: the task's test set size)",
    )
    g = p.add_argument_group("checkpoints, resume and logging")
    g.add_argument("--output_dir", default="runs/continual-ddpm", help="task folders, results.json, checkpoints")
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="save Accelerate state every N optimizer steps (also on SIGTERM/SIGINT during training, "
        "after the current step; the run then exits with status 75)",
    )
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the newest N checkpoints (0: all)")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument(
        "--adopt_manifest",
        action="store_true",
        help="record this run's settings as the run_manifest.json of an OUTPUT_DIR that holds work but "
        "lost its manifest (pass the flags that work was trained with)",
    )
    g.add_argument(
        "--resume_from_task",
        default=None,
        help="start after a finished task: a task folder or REPO_ID@REVISION (e.g. user/model@task-03)",
    )
    g.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="stop (after checkpointing) once this many optimizer steps ran in this process: for tests and "
        "for splitting long runs",
    )
    g.add_argument(
        "--report_to",
        default=None,
        help="tensorboard (pip install .[tensorboard]), wandb, ... (Accelerate trackers): the losses every step; "
        "per task the sample grid, the FID and accuracy matrices as heatmaps, fid/task_i, afid@k, forgetting, "
        "plasticity, acc, bwt and class_kl",
    )
    g.add_argument("--logging_dir", default="logs", help="the trackers' folder, inside OUTPUT_DIR")
    g.add_argument(
        "--validation_epochs",
        type=int,
        default=None,
        help="with --report_to: every N epochs of a task, a grid of 8 samples per seen class (at most 10 classes) "
        "from the current weights (the EMA's with --use_ema)",
    )
    g.add_argument("--push_to_hub", action="store_true", help="push each task folder to main and branch task-XX")
    g.add_argument("--hub_model_id", default=None, help="the Hub model repo, USER/NAME")
    g.add_argument("--hub_private", action="store_true")


def parse_args(argv=None) -> argparse.Namespace:
    """Flags (preset values fill the ones left unset), validated before anything is loaded."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for add in (add_data_arguments, add_method_arguments, add_optimisation_arguments, add_output_arguments):
        add(p)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading data or models."""

    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    if (args.dataset_name is None) == (args.train_data_dir is None):
        fail("pass exactly one of --dataset_name and --train_data_dir")
    for name in ("ewc_lambda", "distill_weight"):
        if not 0 <= getattr(args, name) < math.inf:
            fail(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    for name in (
        "num_epochs_per_task",
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_inference_steps",
        "replay_per_class",
        "fisher_batch_size",
        "checkpointing_steps",
        "online_replay_steps",
        "fisher_num_samples",
        "max_train_per_class",
        "replay_batch_size",
        "fid_num_samples",
        "stop_after_steps",
        "resolution",
        "classes_per_task",
        "validation_epochs",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)} (leave it out for the default)")
    if args.validation_epochs and not args.report_to:
        fail("--validation_epochs logs sample grids to the trackers: add --report_to tensorboard (or wandb)")
    if args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.streaming and args.dataloader_num_workers:
        fail("--dataloader_num_workers is for the in-memory loader; a streamed task reads through `datasets`")
    if args.ema_decay is not None and not 0 <= args.ema_decay <= 1:
        fail(f"--ema_decay must be a number in [0, 1], got {args.ema_decay}")
    if args.report_to:
        import accelerate.tracking as trackers

        for name in args.report_to.split(","):
            if name != "all" and name not in trackers.LOGGER_TYPE_TO_CLASS:
                fail(
                    f"--report_to {name!r} is no Accelerate tracker; choose from "
                    f"{', '.join(sorted(trackers.LOGGER_TYPE_TO_CLASS))} or all"
                )
            if name != "all" and not getattr(trackers, f"is_{name}_available")():
                fail(f"--report_to {name}: the {name} package is not installed (pip install {name})")
    if not 0 < args.learning_rate < math.inf:
        fail(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    if args.lr_warmup_steps < 0:
        fail(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            fail(f"--{flag} must be a number in [0, 1), got {getattr(args, flag)}")
    if not 0 < args.adam_epsilon < math.inf or not 0 <= args.adam_weight_decay < math.inf:
        fail("--adam_epsilon must be a finite number > 0 and --adam_weight_decay a finite number >= 0")
    if args.max_grad_norm is not None and not 0 < args.max_grad_norm < math.inf:
        fail(f"--max_grad_norm must be a finite number > 0, got {args.max_grad_norm}")
    if args.checkpoints_total_limit < 0:
        fail("--checkpoints_total_limit must be >= 0 (0 keeps every checkpoint)")
    if args.push_to_hub and not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id USER/NAME")
    if args.hub_model_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_model_id)
        except HFValidationError as err:
            fail(f"--hub_model_id {args.hub_model_id!r} is not a valid Hub repo id ({err}); write USER/NAME")
    if args.dataset_name == "digits" and (args.image_column or args.label_column):
        fail("the builtin digits data has no columns to choose: drop --image_column/--label_column")
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        fail(
            f"--train_data_dir {args.train_data_dir} is not a folder (resolved: {Path(args.train_data_dir).resolve()}); "
            f"for a Hub dataset use --dataset_name"
        )
    if args.joint and args.resume_from_task:
        fail("--joint trains all classes at once; it cannot continue from a task folder")
    if args.fid_backend == "inception" and args.fid_weights and not Path(args.fid_weights).exists():
        fail(f"--fid_weights {args.fid_weights} does not exist")
    if args.streaming and args.max_train_per_class:
        fail("--max_train_per_class reads the whole training split into memory; drop it with --streaming")
    if args.streaming and args.fid_backend == "classifier" and not args.fid_classifier:
        fail(
            "--streaming never holds the training split in memory, so the FID classifier cannot be trained here: "
            "train it with `python -m hf_r1ewc.evaluate train-classifier` and pass --fid_classifier DIR, or use "
            "--fid_backend inception, dinov2 or none"
        )
    if args.fid_classifier and not (Path(args.fid_classifier) / "model.safetensors").exists():
        fail(f"--fid_classifier {args.fid_classifier} holds no model.safetensors")


# -------------------------------------------------------------------------------------------------- set-up


def method_description(args) -> str:
    if args.joint:
        return "non-continual upper bound (all classes at once)"
    parts = []
    if args.ewc_type != "none":
        parts.append(f"{args.ewc_type} EWC (lambda={args.ewc_lambda:g}, {args.ewc_mode})")
    if args.replay == "on":
        parts.append(
            "generative replay"
            + (f" + distillation (weight {args.distill_weight:g})" if args.distill_weight > 0 else "")
        )
    return " + ".join(parts) or "plain fine-tuning"


RESUME_MUST_MATCH = ("preset", "model_config_name_or_path", "ewc_type", "ewc_mode", "joint", "resize")
# settings a run may change when it continues (none changes results); every other flag is in run_manifest.json
MAY_CHANGE = (
    "output_dir",
    "resume_from_checkpoint",
    "resume_from_task",
    "adopt_manifest",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "stop_after_steps",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "fid_reference_dir",
    "fisher_batch_size",
    "logging_dir",
    "validation_epochs",
    "gradient_checkpointing",
    "dataloader_num_workers",
)
# the recovery from a diverged run: these may change on resume, and run_manifest.json records each change
RECOVERY_SETTINGS = ("learning_rate", "max_grad_norm")


def run_config(args) -> dict:
    """The settings a run continued from a task folder (--resume_from_task) must share with that folder's run."""
    keys = (
        "dataset_name",
        "train_data_dir",
        "tasks",
        "classes_per_task",
        "resolution",
        "resize",
        "preset",
        "model_config_name_or_path",
        "ewc_type",
        "ewc_mode",
        "joint",
        "max_train_per_class",
    )
    return {k: getattr(args, k) for k in keys}


def run_manifest(args, accelerator, data: "TaskData") -> dict:
    """What the run in OUTPUT_DIR is: every result-changing setting (the resolved precision included), the dataset's
    identity (source, sizes, SHA-256 of the images and labels held in memory) and the tasks."""
    settings = {k: v for k, v in vars(args).items() if k not in MAY_CHANGE}
    settings["mixed_precision"] = accelerator.mixed_precision
    dataset = {
        "source": data.source,
        "num_test": len(data.test),
        "test_sha256": sha256_tensors(data.test.images, data.test.labels),
    }
    if data.train is not None:
        dataset |= {"num_train": len(data.train), "train_sha256": sha256_tensors(data.train.images, data.train.labels)}
    return {"settings": settings, "dataset": dataset, "tasks": data.tasks}


def resolve_mixed_precision(flag: str | None) -> str:
    """The fastest safe default per device: bf16 autocast on CUDA GPUs with bf16 (weights, optimizer, penalty and
    Fisher stay fp32); fp32 on CPU, where bf16 autocast was 1.19x faster on an AVX512-BF16 machine but would make CPU
    results depend on the processor. An explicit flag or an accelerate config's fp16/bf16 wins."""
    if flag is not None:
        return flag
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if configured != "no":
        return configured
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(args) -> Accelerator:
    """The Accelerator, with a process-group timeout long enough for the main-process phases of a task."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SystemExit(
            "error: the EWC penalty works on FSDP2's DTensor shards; set fsdp_version: 2 in the "
            "accelerate config (accelerate_configs/fsdp.yaml)"
        )
    if accelerator.distributed_type == DistributedType.FSDP and args.use_ema:
        raise SystemExit(
            "error: --use_ema keeps a full copy of the weights per process, which FSDP is meant to "
            "avoid; train without --use_ema under FSDP or use DDP (accelerate_configs/multi_gpu_ddp.yaml)"
        )
    return accelerator


def make_learner(args, noise_scheduler) -> ContinualLearner:
    """The method: the EWC penalty (none for --ewc_type none and --joint) and generative distillation."""
    penalty = EWCPenalty(args.ewc_type, args.ewc_lambda) if args.ewc_type != "none" and not args.joint else None
    return ContinualLearner(
        noise_scheduler,
        penalty,
        args.ewc_mode,
        args.distill_weight,
        not args.no_replay_in_denoise,
        args.replay_batch_size,
        args.max_grad_norm,
    )


def make_ema(args, denoiser: ModelMixin) -> EMAModel | None:
    if not args.use_ema:
        return None
    return EMAModel(
        denoiser.parameters(), decay=args.ema_decay, model_cls=type(denoiser), model_config=denoiser.config
    )


def prepare_task(args, accelerator, denoiser: ModelMixin, loader) -> tuple:
    """A fresh optimizer and LR schedule per task (the penalty and the teacher carry what earlier tasks taught),
    prepared by Accelerate: (model, optimizer, LR schedule or None, loader). A streamed loader is sharded by
    ``stream_task`` itself, so it does not go through prepare."""
    optimizer = make_optimizer(args, denoiser)
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


def make_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (the paper), or AdamW when --adam_weight_decay > 0 (diffusers' examples)."""
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.adam_weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), weight_decay=args.adam_weight_decay, **kwargs)
    return torch.optim.Adam(model.parameters(), **kwargs)


def make_lr_scheduler(args, accelerator, optimizer, batches_per_epoch: int):
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


@dataclass
class TaskData:
    """The data of a run: the eval split in memory, the training split in memory (None when streaming), tasks."""

    source: str
    test: object
    train: object | None
    train_inputs: torch.Tensor | None
    test_inputs: torch.Tensor
    resolution: int
    num_channels: int
    num_classes: int
    tasks: list[list[int]]


def load_task_data(args) -> TaskData:
    """Read and check the data and tasks; every data error stops here, before any model is built."""
    source = args.dataset_name or args.train_data_dir
    try:
        test = load_labeled_images(source, args.eval_split, args.image_column, args.label_column)
        train = None if args.streaming else load_labeled_images(source, "train", args.image_column, args.label_column)
        if args.max_train_per_class:
            train = train.head_per_class(args.max_train_per_class)
        known = test if args.streaming else train  # streamed: the eval split names the classes and the image shape
        resolution = args.resolution or default_resolution(known.image_size)
        count = len(test) + (len(train) if train is not None else 0)
        held = count * known.num_channels * resolution**2 * 4
        if held > memory_bytes():
            raise ValueError(
                f"--resolution {resolution}: the {count} images in memory as "
                f"float32 need {held / 2**30:.3g} GiB, more than this machine's "
                f"{memory_bytes() / 2**30:.3g} GiB; lower --resolution (or use --streaming)"
            )
        num_classes = max(known.classes) + 1  # the class embedding covers every label of the dataset
        tasks = parse_tasks(args.tasks, None if args.tasks else args.classes_per_task, known.classes)
        data = TaskData(
            source,
            test,
            train,
            None if train is None else images_to_model_input(train.images, resolution, args.resize),
            images_to_model_input(test.images, resolution, args.resize),
            resolution,
            known.num_channels,
            num_classes,
            tasks,
        )
    except ValueError as err:  # DataError: stop before any training
        raise SystemExit(f"error: {err}") from None
    missing = [c for t in data.tasks for c in t if c not in test.classes]
    if missing and args.fid_backend != "none":
        raise SystemExit(
            f"error: the test split has no images of classes {missing}: FID needs them (or pass --fid_backend none)"
        )
    return data


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_budgets(args, data: TaskData) -> None:
    """Refuse, before any training, a replay pool that cannot fit: it is written to OUTPUT_DIR (float16 images,
    int64 labels) and then held whole in memory, once for the largest set of old classes (before the last task)."""
    if args.replay != "on" or args.replay_mode != "pool" or args.joint or len(data.tasks) < 2:
        return
    old_classes = sum(len(t) for t in data.tasks[:-1])
    pool = args.replay_per_class * old_classes * (2 * data.num_channels * data.resolution**2 + 8)
    free = shutil.disk_usage(
        next(p for p in (Path(args.output_dir), *Path(args.output_dir).resolve().parents) if p.exists())
    ).free
    for where, limit in (("free disk space in --output_dir", free), ("this machine's memory", memory_bytes())):
        if pool > limit:
            raise SystemExit(
                f"error: --replay_per_class {args.replay_per_class}: the replay pool before the last "
                f"task ({old_classes} classes x {args.replay_per_class} images at {data.resolution}x"
                f"{data.resolution}) needs {pool / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB "
                f"of {where}; lower --replay_per_class (the paper: 5000, ImageNet 1300)"
            )


def build_model(args, data: TaskData) -> ModelMixin:
    """The denoiser: the preset's UNet or DiT, or a ``UNet2DModel`` / ``DiTTransformer2DModel`` config, checked
    against the data and the tasks."""
    try:
        if args.model_config_name_or_path:
            model = model_from_config(args.model_config_name_or_path)
        else:
            model = model_from_preset(args.preset, data.resolution, data.num_channels, data.num_classes)
        if num_classes_of(model) is None:
            raise ValueError(
                f"the model config has no class embedding (num_class_embeds: null); this method "
                f"trains a label-conditioned model: set num_class_embeds (a DiT: num_embeds_ada_norm) "
                f"to at least {data.num_classes}"
            )
        parse_tasks(
            args.tasks,
            None if args.tasks else args.classes_per_task,
            sorted({c for t in data.tasks for c in t}),
            num_classes_of(model),
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if model.config.sample_size != data.resolution:
        raise SystemExit(
            f"error: the model's sample_size {model.config.sample_size} differs from --resolution {data.resolution}"
        )
    if model.config.in_channels != data.num_channels:
        raise SystemExit(
            f"error: the model takes {model.config.in_channels} channels but the images have {data.num_channels}"
        )
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


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
    return run


def make_evaluator(args, accelerator, data: TaskData, device) -> TaskFID | None:
    """The FID scorer of every task (the main process trains the feature classifier once, if needed)."""
    if args.fid_backend == "none":
        return None
    output_dir = Path(args.output_dir)
    classifier_dir = args.fid_classifier or str(output_dir / "fid_classifier")
    if args.fid_backend == "classifier" and not (Path(classifier_dir) / "model.safetensors").exists():
        if accelerator.is_main_process:
            logger.info("training the FID feature classifier on the training split -> %s", classifier_dir)
            feature_dim = 64 if min(len(data.test.subset(t)) for t in data.tasks) > 64 else 32
            classifier = train_classifier(
                data.train_inputs,
                data.train.labels,
                data.num_classes,
                feature_dim=feature_dim,
                epochs=2 if len(data.train) > 20_000 else 20,
                seed=args.seed,
                show_progress=accelerator.is_local_main_process,
            )
            classifier.save_pretrained(classifier_dir)
        accelerator.wait_for_everyone()
    extractor = load_feature_extractor(
        args.fid_backend, classifier_path=classifier_dir, fid_weights=args.fid_weights, dinov2_model=args.dinov2_model
    ).to(device)
    return TaskFID(
        extractor,
        data.test_inputs,
        data.test.labels,
        data.tasks,
        num_samples=args.fid_num_samples,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        autocast_dtype=default_autocast_dtype(device),
        cache_dir=args.fid_reference_dir or output_dir / "fid_reference",
    )


def task_loader(args, accelerator, data: TaskData, classes: list[int], task_index: int):
    """(training loader, number of training images, Fisher loader) of one task."""
    if args.streaming:

        def streamed(shuffle: bool, seed: int = 0):
            return stream_task(
                data.source,
                "train",
                classes,
                resolution=data.resolution,
                num_channels=data.num_channels,
                image_column=args.image_column,
                label_column=args.label_column,
                resize=args.resize,
                shuffle=shuffle,
                seed=seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
            )

        num_examples = count_task_examples(data.source, "train", classes, args.label_column)
        num_batches = num_examples // (args.train_batch_size * accelerator.num_processes)
        if num_batches == 0:
            raise SystemExit(
                f"error: task {task_index} has {num_examples} training images, fewer than one batch "
                f"of {args.train_batch_size} per process; lower --train_batch_size"
            )
        loader = StreamedTaskLoader(
            streamed(True, args.seed + task_index), args.train_batch_size, num_batches, accelerator.device
        )
        fisher = StreamedTaskLoader(
            streamed(False),
            args.fisher_batch_size,
            None,
            accelerator.device,
            accelerator.process_index,
            accelerator.num_processes,
        )
        return loader, num_examples, fisher
    mask = torch.isin(data.train.labels, torch.tensor(classes))
    images, labels = data.train_inputs[mask], data.train.labels[mask]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(labels) > args.train_batch_size,
        generator=torch.Generator().manual_seed(args.seed + task_index),
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    fisher = fisher_loader(
        images,
        labels,
        args.fisher_num_samples,
        args.fisher_batch_size,
        args.seed + task_index,
        accelerator.process_index,
        accelerator.num_processes,
    )
    return loader, len(labels), fisher


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
    num_tasks: int,
    ema,
    seen_classes: list[int],
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
        desc=f"task {task_index}/{num_tasks}",
        show=accelerator.is_local_main_process,
    )
    ratio = ratio_curve[-1] if ratio_curve else None
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
                generator = step_generator(args.seed, task_index, epoch, step_in_epoch, accelerator.process_index)
                try:
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
                    )
                except NonFiniteLossError as err:
                    raise SystemExit(
                        f"error: {err} at task {task_index}, epoch {epoch}, step {run.global_step}; "
                        f"nothing after the last checkpoint was saved. {resume_advice(output_dir)}"
                    ) from None
                if lr_scheduler is not None:  # Accelerate's wrapper steps it only when the optimizer stepped
                    lr_scheduler.step()
                step_in_epoch += 1
                losses.append(out.loss)
                denoise.append(out.denoise)
                if not out.optimizer_stepped:
                    continue
                run.global_step += 1
                run.steps_this_process += 1
                progress.update(1)
                logs = {"loss": out.loss, "denoise": out.denoise, "distill": out.distill, "ewc": out.ewc}
                if lr_scheduler is not None:
                    logs["lr"] = lr_scheduler.get_last_lr()[0]
                if out.penalty_gradient_ratio is not None:
                    ratio = out.penalty_gradient_ratio
                    ratio_curve.append(ratio)
                if ratio is not None:  # ||grad EWC|| / ||grad rest of the loss||, at each epoch's first optimizer step
                    logs["ewc_grad_ratio"] = ratio
                progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
                accelerator.log({**logs, "task": task_index}, step=run.global_step)
                end_of_epoch = step_in_epoch == len(loader)
                if end_of_epoch and args.validation_epochs and (epoch + 1) % args.validation_epochs == 0:
                    log_validation_grid(args, accelerator, learner, model, ema, seen_classes, run.global_step)
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
                if run.global_step % args.checkpointing_steps == 0 or stop:
                    save_checkpoint(accelerator, model, output_dir, position, args.checkpoints_total_limit)
                if stop:
                    progress.close()
                    return loss_curve, denoise_curve, ratio_curve, stop
            if losses:
                loss_curve.append(sum(losses) / len(losses))
                denoise_curve.append(sum(denoise) / len(denoise))
    progress.close()
    return loss_curve, denoise_curve, ratio_curve, None


def log_validation_grid(
    args, accelerator, learner, model, ema: EMAModel | None, classes: list[int], step: int
) -> None:
    """--validation_epochs: 8 samples of each of (at most GRID_MAX_CLASSES of) ``classes`` from the current weights
    (the EMA's with --use_ema) to the trackers, as diffusers' examples log their validation images. Every process
    samples (a sharded model's forward needs all of them); the main process logs."""
    scheduler = sampling_scheduler(args.replay_scheduler, learner.noise_scheduler.config)
    grid = sample_grid(
        accelerator.unwrap_model(model), scheduler, evenly_chosen(classes), args.num_inference_steps, args.seed, ema
    )
    log_images(accelerator, {"validation": grid}, step)


def evaluate_task(accelerator, evaluator: TaskFID | None, model, sampler, eval_tasks: list, task_index: int):
    """FID_i(m_k) (and sample accuracy) for every task i in ``eval_tasks``, the sampling shared by all processes."""
    scores = {}
    if evaluator is None:
        return scores
    for i in range(1, len(eval_tasks) + 1):
        scores[i] = evaluator(
            model,
            sampler,
            i,
            accelerator.process_index,
            accelerator.num_processes,
            gather_object if accelerator.num_processes > 1 else None,
            show_progress=accelerator.is_local_main_process,
        )
        accuracy = f", accuracy {100 * scores[i].accuracy:.1f} %" if scores[i].accuracy is not None else ""
        logger.info(
            "FID_%d(m_%d) = %.3f (%s, N=%d)%s",
            i,
            task_index,
            scores[i].fid,
            evaluator.extractor.name,
            scores[i].num_samples,
            accuracy,
        )
    return scores


def start_replay(args, accelerator, learner: ContinualLearner, denoiser, sampler, old_classes, task_index: int):
    """The task's teacher (whole weights, gathered once under FSDP) and its replay pool of the old classes, written
    in shares by every process into OUTPUT_DIR/replay/task_XX (or online replay)."""
    learner.start_task(
        full_model_copy(denoiser),
        sampler,
        old_classes,
        per_class=args.replay_per_class,
        directory=Path(args.output_dir) / "replay" / task_folder_name(task_index),
        num_inference_steps=args.num_inference_steps,
        seed=args.seed * 100 + task_index,
        online_steps=args.online_replay_steps if args.replay_mode == "online" else None,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        show_progress=accelerator.is_local_main_process,
    )


def theta_star(accelerator, model, ema: EMAModel | None, sampler) -> tuple:
    """The end of a task's training: (the fp32 model to continue from (the EMA weights with --use_ema), its whole
    weights (gathered once under FSDP, else itself), the pipeline to save, a frozen copy to sample from)."""
    denoiser = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # no autocast wrapper: fp32 from here
    accelerator.free_memory()
    if ema is not None:
        ema.copy_to(denoiser.parameters())
    denoiser.eval()
    trained = full_model_copy(denoiser)
    return denoiser, trained, ClassConditionalPipeline.for_model(trained, sampler), frozen_teacher(trained)


def record_scores(run: RunState, scores: dict, task_index: int) -> None:
    """Row k of the FID and accuracy matrices, and the class-distribution KL of m_k."""
    run.matrix[task_index] = {i: s.fid for i, s in scores.items()}
    run.accuracy[task_index] = {i: s.accuracy for i, s in scores.items() if s.accuracy is not None}
    if (kl := class_distribution_kl(scores.values())) is not None:
        run.class_kl[task_index] = kl


def consolidate_task(args, accelerator, learner: ContinualLearner, trained, fisher_batches, task_index: int):
    """The finished task's Fisher at theta*_k -> a new penalty term (None without EWC); the statistics go back to
    the CPU between tasks."""
    streamed_share = -(-args.fisher_num_samples // accelerator.num_processes) if args.fisher_num_samples else None
    try:
        stats = learner.consolidate(
            trained,
            fisher_batches,
            seed=args.seed + task_index,
            reduce_sum=lambda t: accelerator.reduce(t, "sum"),
            num_samples=streamed_share if args.streaming else None,
            show_progress=accelerator.is_local_main_process,
        )
    except ValueError as err:
        raise SystemExit(f"error: task {task_index}: {err}. {resume_advice(Path(args.output_dir))}") from None
    if learner.penalty is not None:
        learner.penalty.to("cpu")
        mu = f"c* = {stats.c_star:.4g}, ||mu|| = {stats.mu_norm():.4g}" if stats.mu else "diagonal"
        logger.info("Fisher after task %d: %s, N = %d", task_index, mu, stats.num_samples)
    return stats


def evenly_chosen(classes: list[int]) -> list[int]:
    """At most GRID_MAX_CLASSES of ``classes``, spread evenly (first and last included): sample grids stay readable
    for 1000 classes."""
    n = min(len(classes), GRID_MAX_CLASSES)
    return [classes[round(i * (len(classes) - 1) / max(1, n - 1))] for i in range(n)]


def write_task_folder(
    args,
    accelerator,
    data: TaskData,
    run: RunState,
    pipeline,
    eval_model,
    stats,
    penalty,
    scores,
    curves,
    task_index: int,
    training_tasks: list,
    evaluator,
    ema,
    phase_seconds: dict[str, float],
) -> Path:
    """OUTPUT_DIR/task_XX (atomically) and results.json; main process only. ``eval_model`` (the pipeline's model
    as sampled for FID) draws ``samples.png``."""
    output_dir = Path(args.output_dir)
    classes, seen = training_tasks[task_index - 1], sorted({c for t in training_tasks[:task_index] for c in t})
    summary = summarize(run.matrix) if not args.joint else {}
    sampling = {
        "sampler": args.replay_scheduler,
        "num_inference_steps": args.num_inference_steps,
        "precision": evaluator.precision if evaluator else "fp32",
    }
    metrics = {
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
        "seconds_by_phase": dict(phase_seconds),  # this task's wall time in this process (writing not included)
        "c_star": stats.c_star if stats else None,
        "mu_norm": stats.mu_norm() if stats and stats.mu else None,
        **summary,
    }
    grid = sample(
        eval_model,
        pipeline.scheduler,
        torch.tensor(evenly_chosen(seen)).repeat_interleave(8),
        args.num_inference_steps,
        torch.Generator().manual_seed(args.seed),
        evaluator.autocast_dtype if evaluator else None,
    )

    state = {
        "task_index": task_index,
        "tasks": training_tasks,
        "seen_classes": seen,
        "run_config": run_config(args),
        "global_step": run.global_step,
        "method": method_description(args),
        "num_processes": accelerator.num_processes,
        "ema_optimization_step": ema.optimization_step if ema else None,
        "hf_r1ewc_version": __version__,
    }
    card = dict(
        task_index=task_index,
        num_tasks=len(training_tasks),
        seen_classes=seen,
        dataset_name=data.source,
        method_description=method_description(args),
        hyperparameters={
            k: getattr(args, k)
            for k in (
                "preset",
                "ewc_type",
                "ewc_lambda",
                "ewc_mode",
                "distill_weight",
                "replay",
                "replay_mode",
                "replay_per_class",
                "replay_scheduler",
                "num_epochs_per_task",
                "train_batch_size",
                "learning_rate",
                "num_inference_steps",
                "seed",
            )
        }
        | {"mixed_precision": accelerator.mixed_precision},
        command=f"accelerate launch --num_processes {accelerator.num_processes} --mixed_precision "
        f"{accelerator.mixed_precision} " + " ".join(shlex.quote(a) for a in sys.argv),
        matrix=run.matrix,
        summary=summary,
        fid_backend=args.fid_backend,
        fid_comparable=evaluator is not None and evaluator.extractor.comparable_to_inception,
        fid_num_samples=metrics["fid_num_samples"],
        accuracy=metrics["accuracy"],
        sampling=f"{args.replay_scheduler}, {args.num_inference_steps} steps, {sampling['precision']}",
        hub_model_id=args.hub_model_id,
        transfer=accuracy_summary(run.accuracy),
        class_kl=run.class_kl.get(task_index),
    )

    folder = write_task_artifacts(
        output_dir / task_folder_name(task_index),
        TaskArtifacts(
            pipeline,
            metrics,
            grid,
            card,
            state,
            stats,
            {"task_index": task_index, "classes": classes},
            penalty.state_dict() if penalty is not None else None,
        ),
    )
    results = {
        "method": method_description(args),
        "fid_backend": args.fid_backend,
        "fid_comparable_to_inception": bool(evaluator and evaluator.extractor.comparable_to_inception),
        "tasks": data.tasks,
        "joint": args.joint,
        "seed": args.seed,
        "sampling": sampling,
        "fid": run.matrix,
        "accuracy": run.accuracy,
        "class_kl": run.class_kl,
    }
    if args.joint and scores:
        results["afid_final"] = sum(s.fid for s in scores.values()) / len(scores)
    else:
        results.update(summarize(run.matrix))
        results.update(accuracy_summary(run.accuracy))
    if metrics["accuracy_per_class"] and task_index == len(training_tasks):
        results["final_accuracy_per_class"] = metrics["accuracy_per_class"]
    write_json(output_dir / "results.json", results)
    logger.info("wrote %s", folder)
    if accelerator.trackers:
        scalars = task_scalars(run.matrix, run.accuracy, run.class_kl, task_index)
        accelerator.log({**scalars, "task": task_index}, step=run.global_step)
        images = {"samples": grid_image(grid), **matrix_images(run.matrix, run.accuracy)}
        log_images(accelerator, images, run.global_step)
    return folder


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
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
            logger.info(
                "task %d/%d: classes %s, %d training images, method: %s",
                task_index,
                num_tasks,
                classes,
                num_examples,
                method_description(args),
            )
            if args.replay == "on" and not args.joint:
                with phases("replay pool"):
                    start_replay(args, accelerator, learner, denoiser, sampler, old_classes, task_index)
            model, optimizer, lr_scheduler, loader = prepare_task(args, accelerator, denoiser, loader)
            with phases("training"):
                *curves, stopped = train_task(
                    args,
                    accelerator,
                    learner,
                    model,
                    optimizer,
                    lr_scheduler,
                    loader,
                    run,
                    task_index,
                    num_tasks,
                    ema,
                    sorted({*old_classes, *classes}),
                )
            if stopped:
                logger.info(
                    "stopped by %s after step %d (checkpoint-%d saved); re-run the same command to continue",
                    stopped,
                    run.global_step,
                    run.global_step,
                )
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
                    folder = write_task_folder(
                        args,
                        accelerator,
                        data,
                        run,
                        pipeline,
                        eval_model,
                        stats,
                        penalty,
                        scores,
                        curves,
                        task_index,
                        training_tasks,
                        evaluator,
                        ema,
                        phases.seconds,
                    )
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
