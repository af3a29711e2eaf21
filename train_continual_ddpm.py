#!/usr/bin/env python
"""Class-incremental training of a label-conditioned diffusers UNet2DModel with rank-1 (or diagonal) Fisher EWC and
generative distillation — "Avoid catastrophic forgetting with rank-1 Fisher from diffusion models".

    accelerate launch train_continual_ddpm.py --dataset_name digits --preset demo --output_dir runs/demo

Per task: train -> evaluate FID on every task so far -> estimate the Fisher -> save OUTPUT_DIR/task_XX (a loadable
pipeline with fisher.safetensors, ewc_penalty.safetensors, metrics.json, samples.png, README.md) -> the next task
starts with a frozen teacher and its replay pool. OUTPUT_DIR/results.json holds the FID matrix, AFID@k, F and P.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from hf_r1ewc import __version__
from hf_r1ewc.data import (
    StreamedTaskLoader,
    count_task_examples,
    default_resolution,
    images_to_model_input,
    load_labeled_images,
    parse_tasks,
    stream_task,
)
from hf_r1ewc.distill import (
    ReplayPool,
    continual_loss,
    ddim_sample,
    default_autocast_dtype,
    frozen_teacher,
    online_replay_batch,
)
from hf_r1ewc.fisher import estimate_fisher, save_fisher
from hf_r1ewc.hub import (
    TaskUploader,
    is_complete_task_folder,
    resolve_task_source,
    task_folder_name,
    write_folder_atomically,
    write_model_card,
)
from hf_r1ewc.metrics import (
    FeatureStatistics,
    fid_from_statistics,
    labels_in_test_proportions,
    load_feature_extractor,
    matrix_from_json,
    real_statistics,
    reference_cache_path,
    summarize,
    train_classifier,
    write_json,
)
from hf_r1ewc.models import PRESETS, training_noise_scheduler, unet_from_preset
from hf_r1ewc.penalty import EWCPenalty
from hf_r1ewc.pipeline import ClassConditionalDDIMPipeline
from hf_r1ewc.plots import save_image_grid
from hf_r1ewc.sharding import full_model_copy

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="'digits' (builtin), a Hub dataset id (zalando-datasets/fashion_mnist, ylecun/mnist, "
                        "uoft-cs/cifar10, ...) or a local folder")
    g.add_argument("--train_data_dir", default=None,
                   help="a local folder: raw IDX files, a save_to_disk folder, an imagefolder or parquet files")
    g.add_argument("--image_column", default=None, help="image column (detected when omitted)")
    g.add_argument("--label_column", default=None, help="label column (detected when omitted)")
    g.add_argument("--tasks", default=None, help="explicit class-incremental tasks, e.g. '0,1;2,3;4,5;6,7;8,9'")
    g.add_argument("--classes_per_task", type=int, default=2,
                   help="contiguous groups of labels in label order (the paper: 2; ImageNet: 50)")
    g.add_argument("--resolution", type=int, default=None,
                   help="model resolution; default: 28x28 zero-padded to 32 (paper), otherwise the native size")
    g.add_argument("--resize", action="store_true", help="resize images to --resolution instead of padding")
    g.add_argument("--max_train_per_class", type=int, default=None,
                   help="use only the first N training images of each class (small CPU runs)")
    g.add_argument("--streaming", action="store_true",
                   help="stream the training split with `datasets` instead of reading it into memory (ImageNet): each "
                        "task reads only its classes (label filter pushed down to parquet), a shuffle buffer "
                        "reseeded per epoch, one shard per process. The --eval_split is still read into memory.")
    g.add_argument("--eval_split", default="test",
                   help="the split that FID and the class list come from (ImageNet 32x32: validation)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="UNet shape and default hyperparameters: paper (~34M params, the paper's protocol), "
                        "cpu-small (~1.1M), demo (8x8 digits)")
    g.add_argument("--model_config_name_or_path", default=None,
                   help="a UNet2DModel config (json file or folder) instead of the preset's UNet")
    g = p.add_argument_group("continual learning (the paper's method and baselines)")
    g.add_argument("--ewc_type", choices=["none", "diag", "rank1", "rank1_unscaled"], default="rank1",
                   help="EWC penalty: rank1 = paper eq. 6 (with c*), rank1_unscaled = without c*, diag = diagonal")
    g.add_argument("--ewc_lambda", type=float, default=15000.0, help="EWC weight lambda (paper: 15000)")
    g.add_argument("--ewc_mode", choices=["loss", "decoupled"], default="loss",
                   help="loss: penalty added to the loss (paper); decoupled: exact proximal step after each "
                        "optimizer step with step size = learning rate")
    g.add_argument("--fisher_num_samples", type=int, default=None,
                   help="samples of the task used for the Fisher (default: the preset's; None = all)")
    g.add_argument("--fisher_batch_size", type=int, default=64)
    g.add_argument("--distill_weight", type=float, default=1.0,
                   help="generative distillation weight (paper: 1.0; 0 disables distillation)")
    g.add_argument("--replay", choices=["on", "off"], default="on",
                   help="'off' disables the replay batch entirely (no GD): the 'w/o GD' baselines")
    g.add_argument("--no_replay_in_denoise", action="store_true",
                   help="keep replay images out of the denoising loss (default: they join it, as in the authors' code)")
    g.add_argument("--replay_per_class", type=int, default=None, help="replay pool images per class (paper: 5000)")
    g.add_argument("--replay_mode", choices=["pool", "online"], default="pool",
                   help="pool: teacher-generated pool (paper); online: fresh few-step DDIM replay each step")
    g.add_argument("--replay_batch_size", type=int, default=None, help="default: the real batch size")
    g.add_argument("--online_replay_steps", type=int, default=2, help="DDIM steps of online replay")
    g.add_argument("--joint", action="store_true", help="non-continual upper bound: all classes at once")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs_per_task", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=None)
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=None, help="gradient clipping (default: none, as the paper)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: the accelerate config's fp16/bf16 if it sets one, else bf16 on a CUDA GPU that "
                        "supports it and no (fp32) on CPU (benchmarks/results/bench_train.json)")
    g.add_argument("--use_ema", action="store_true", help="EMA of the weights (diffusers EMAModel)")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for replay, samples and FID")
    g.add_argument("--fid_backend", choices=["classifier", "inception", "dinov2", "none"], default="classifier",
                   help="classifier: a CNN trained on the dataset's training split (offline default, NOT comparable "
                        "to Inception FID); inception: the paper's metric (needs --fid_weights offline); dinov2")
    g.add_argument("--fid_classifier", default=None,
                   help="a trained feature classifier folder; default: train one into OUTPUT_DIR/fid_classifier")
    g.add_argument("--fid_weights", default=None, help="Inception FID weights file for offline use")
    g.add_argument("--dinov2_model", default="facebook/dinov2-base")
    g.add_argument("--fid_reference_dir", default=None,
                   help="cache of real-image FID statistics (default OUTPUT_DIR/fid_reference); share one folder "
                        "across runs of other methods and seeds to compute each task's statistics once")
    g.add_argument("--fid_num_samples", type=int, default=None,
                   help="generated images per task for FID (default: the preset's; None = the task's test set size)")
    g = p.add_argument_group("checkpoints, resume and logging")
    g.add_argument("--output_dir", default="runs/continual-ddpm")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--resume_from_task", default=None,
                   help="start after a finished task: a task folder or REPO_ID@REVISION (e.g. user/model@task-03)")
    g.add_argument("--stop_after_steps", type=int, default=None,
                   help="stop (after checkpointing) once this many optimizer steps ran in this process: for tests and "
                        "for splitting long runs")
    g.add_argument("--report_to", default=None, help="tensorboard, wandb, ... (Accelerate trackers)")
    g.add_argument("--push_to_hub", action="store_true", help="push each task folder to branch task-XX of the repo")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private", action="store_true")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].defaults.items():
        if getattr(args, key) is None and key not in ("fisher_num_samples", "fid_num_samples"):
            setattr(args, key, value)
    if args.fisher_num_samples is None:
        args.fisher_num_samples = PRESETS[args.preset].defaults.get("fisher_num_samples")
    if args.fid_num_samples is None:
        args.fid_num_samples = PRESETS[args.preset].defaults.get("fid_num_samples")
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading data or models."""
    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    if (args.dataset_name is None) == (args.train_data_dir is None):
        fail("pass exactly one of --dataset_name and --train_data_dir")
    if not args.ewc_lambda >= 0 or math.isinf(args.ewc_lambda):
        fail(f"--ewc_lambda must be a finite number >= 0, got {args.ewc_lambda}")
    if args.distill_weight < 0:
        fail(f"--distill_weight must be >= 0, got {args.distill_weight}")
    for name in ("num_epochs_per_task", "train_batch_size", "gradient_accumulation_steps", "num_inference_steps",
                 "replay_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1")
    if args.learning_rate <= 0:
        fail("--learning_rate must be > 0")
    if args.push_to_hub and not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id USER/NAME")
    if args.joint and args.resume_from_task:
        fail("--joint trains all classes at once; it cannot continue from a task folder")
    if args.fid_backend == "inception" and args.fid_weights and not Path(args.fid_weights).exists():
        fail(f"--fid_weights {args.fid_weights} does not exist")
    if args.streaming and args.max_train_per_class:
        fail("--max_train_per_class reads the whole training split into memory; drop it with --streaming")
    if args.streaming and args.fid_backend == "classifier" and not args.fid_classifier:
        fail("--streaming never holds the training split in memory, so the FID classifier cannot be trained here: "
             "train it with `python -m hf_r1ewc.evaluate train-classifier` and pass --fid_classifier DIR, or use "
             "--fid_backend inception, dinov2 or none")
    if args.fid_classifier and not (Path(args.fid_classifier) / "model.safetensors").exists():
        fail(f"--fid_classifier {args.fid_classifier} holds no model.safetensors")


# -------------------------------------------------------------------------------------------------- helpers


def method_description(args) -> str:
    if args.joint:
        return "non-continual upper bound (all classes at once)"
    parts = []
    if args.ewc_type != "none":
        parts.append(f"{args.ewc_type} EWC (lambda={args.ewc_lambda:g}, {args.ewc_mode})")
    if args.replay == "on":
        parts.append("generative replay" + (f" + distillation (weight {args.distill_weight:g})"
                                            if args.distill_weight > 0 else ""))
    return " + ".join(parts) or "plain fine-tuning"


RESUME_MUST_MATCH = ("preset", "model_config_name_or_path", "ewc_type", "ewc_mode", "joint", "resize")


def run_config(args) -> dict:
    """The settings a resumed run must share with the run that wrote the folder."""
    keys = ("dataset_name", "train_data_dir", "tasks", "classes_per_task", "resolution", "resize", "preset",
            "model_config_name_or_path", "ewc_type", "ewc_mode", "joint", "max_train_per_class")
    return {k: getattr(args, k) for k in keys}


def build_unet(args, resolution: int, channels: int, num_classes: int) -> UNet2DModel:
    if args.model_config_name_or_path:
        config = UNet2DModel.load_config(args.model_config_name_or_path)
        unet = UNet2DModel.from_config(config)
    else:
        unet = unet_from_preset(args.preset, resolution, channels, num_classes)
    if unet.config.sample_size != resolution:
        raise SystemExit(f"error: the model's sample_size {unet.config.sample_size} differs from --resolution "
                         f"{resolution}")
    if unet.config.in_channels != channels:
        raise SystemExit(f"error: the model takes {unet.config.in_channels} channels but the images have {channels}")
    return unet


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


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted((d for d in root.iterdir() if d.name.startswith("checkpoint-") and (d / "position.json").exists()),
                  key=lambda d: int(d.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, global_step: int, position: dict, limit: int) -> None:
    """Accelerate state + our position (task, epoch, step in epoch), atomically; old checkpoints pruned."""
    root = output_dir / "checkpoints"
    target = root / f"checkpoint-{global_step}"
    tmp = root / f"checkpoint-{global_step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "position.json").write_text(json.dumps(position))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in checkpoint_dirs(output_dir)[:-limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)
    device = accelerator.device
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise SystemExit("error: the EWC penalty works on FSDP2's DTensor shards; set fsdp_version: 2 in the "
                         "accelerate config (accelerate_configs/fsdp.yaml)")
    if fsdp and args.use_ema:
        raise SystemExit("error: --use_ema keeps a full copy of the weights per process, which FSDP is meant to "
                         "avoid; train without --use_ema under FSDP or use DDP (accelerate_configs/multi_gpu_ddp.yaml)")

    # ---- data and tasks: validated before any model is built
    source = args.dataset_name or args.train_data_dir
    try:
        test = load_labeled_images(source, args.eval_split, args.image_column, args.label_column)
        train = None if args.streaming else load_labeled_images(source, "train", args.image_column,
                                                                  args.label_column)
        if args.max_train_per_class:
            train = train.head_per_class(args.max_train_per_class)
        known = test if args.streaming else train  # streamed: the eval split names the classes and the image shape
        resolution = args.resolution or default_resolution(known.image_size)
        num_classes = max(known.classes) + 1  # the class embedding covers every label of the dataset
        unet = build_unet(args, resolution, known.num_channels, num_classes)
        tasks = parse_tasks(args.tasks, None if args.tasks else args.classes_per_task, known.classes,
                            unet.config.num_class_embeds)
        all_classes = sorted(c for task in tasks for c in task)
        train_inputs = None if args.streaming else images_to_model_input(train.images, resolution, args.resize)
        test_inputs = images_to_model_input(test.images, resolution, args.resize)
    except ValueError as err:  # DataError and model-shape errors: stop before any training
        raise SystemExit(f"error: {err}") from None
    missing_test = [c for c in all_classes if c not in test.classes]
    if missing_test and args.fid_backend != "none":
        raise SystemExit(f"error: the test split has no images of classes {missing_test}: FID needs them "
                         f"(or pass --fid_backend none)")
    noise_scheduler = training_noise_scheduler()
    training_tasks = [all_classes] if args.joint else tasks
    num_tasks = len(training_tasks)
    penalty = EWCPenalty(args.ewc_type, args.ewc_lambda) if args.ewc_type != "none" and not args.joint else None
    use_replay = args.replay == "on" and not args.joint

    # ---- where to start: resume a checkpoint, continue from a task folder, or skip finished task folders
    start_task, resume_position, resume_dir = 1, None, None
    previous_folder = None
    if args.resume_from_checkpoint:
        found = checkpoint_dirs(output_dir) if args.resume_from_checkpoint == "latest" \
            else [Path(args.resume_from_checkpoint)]
        if found:
            resume_dir = found[-1]
            resume_position = json.loads((resume_dir / "position.json").read_text())
            start_task = resume_position["task"]
        elif args.resume_from_checkpoint != "latest":
            raise SystemExit(f"error: checkpoint {args.resume_from_checkpoint} does not exist")
    if args.resume_from_task:
        previous_folder = resolve_task_source(args.resume_from_task)
    for k in range(1, num_tasks + 1):  # finished task folders of this output_dir are kept, never redone
        folder = output_dir / task_folder_name(k)
        if is_complete_task_folder(folder) and (resume_position is None or k < resume_position["task"]):
            previous_folder, start_task = folder, max(start_task, k + 1)
    if previous_folder is not None:
        state = json.loads((previous_folder / "training_state.json").read_text())
        conflicts = {k: (state["run_config"].get(k), v) for k, v in run_config(args).items()
                     if k in RESUME_MUST_MATCH and state["run_config"].get(k) != v}
        if conflicts:
            raise SystemExit(f"error: {previous_folder} was trained with other settings "
                             f"(setting: (folder, this run)) {conflicts}; match them or use another --output_dir")
        if state["tasks"] != training_tasks:
            raise SystemExit(f"error: {previous_folder} was trained on tasks {state['tasks']}, not {training_tasks}")
        start_task = max(start_task, state["task_index"] + 1)
        loaded = UNet2DModel.from_pretrained(previous_folder / "unet")
        if loaded.config.sample_size != resolution:
            raise SystemExit(f"error: {previous_folder} holds a {loaded.config.sample_size}x"
                             f"{loaded.config.sample_size} model but --resolution is {resolution}")
        unet.load_state_dict(loaded.state_dict())
        if penalty is not None and (previous_folder / "ewc_penalty.safetensors").exists():
            from safetensors.torch import load_file

            penalty.load_state_dict(load_file(str(previous_folder / "ewc_penalty.safetensors")))
            penalty.ewc_lambda = args.ewc_lambda
    if start_task > num_tasks:
        logger.info("all %d tasks are finished in %s", num_tasks, output_dir)
        return

    # ---- evaluation set-up (main process trains the feature classifier once)
    extractor = None
    if args.fid_backend != "none":
        classifier_dir = args.fid_classifier or str(output_dir / "fid_classifier")
        if args.fid_backend == "classifier" and not (Path(classifier_dir) / "model.safetensors").exists():
            if accelerator.is_main_process:
                logger.info("training the FID feature classifier on the training split -> %s", classifier_dir)
                feature_dim = 64 if min(len(test.subset(t)) for t in tasks) > 64 else 32
                classifier = train_classifier(train_inputs, train.labels, num_classes, feature_dim=feature_dim,
                                              epochs=2 if len(train) > 20_000 else 20, seed=args.seed,
                                              show_progress=accelerator.is_local_main_process)
                classifier.save_pretrained(classifier_dir)
            accelerator.wait_for_everyone()
        extractor = load_feature_extractor(args.fid_backend, classifier_path=classifier_dir,
                                           fid_weights=args.fid_weights, dinov2_model=args.dinov2_model).to(device)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    results_path = output_dir / "results.json"
    matrix = matrix_from_json(json.loads(results_path.read_text())["fid"]) if results_path.exists() else {}
    matrix = {k: row for k, row in matrix.items() if k < start_task}

    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("continual-ddpm", config={k: v for k, v in vars(args).items()
                                                           if isinstance(v, (int, float, str, bool))})
    uploader = TaskUploader(args.hub_model_id, private=args.hub_private or None) \
        if args.push_to_hub and accelerator.is_main_process else None

    unet.to(device)
    penalty_device = "cpu" if fsdp else device  # under FSDP only each shard's slice of the statistics goes to the GPU
    if penalty is not None:
        penalty.to(penalty_device)
    global_step = resume_position["global_step"] if resume_position else 0
    steps_this_process = 0
    stopped_early = False

    for task_index in range(start_task, num_tasks + 1):
        classes = training_tasks[task_index - 1]
        seen = sorted({c for t in training_tasks[:task_index] for c in t})
        old_classes = sorted({c for t in training_tasks[: task_index - 1] for c in t})

        def streamed(shuffle: bool, seed: int = 0):
            return stream_task(source, "train", classes, resolution=resolution, num_channels=known.num_channels,
                               image_column=args.image_column, label_column=args.label_column, resize=args.resize,
                               shuffle=shuffle, seed=seed, rank=accelerator.process_index,
                               world_size=accelerator.num_processes)

        if args.streaming:
            task_data = None
            num_examples = count_task_examples(source, "train", classes, args.label_column)
        else:
            task_mask = torch.isin(train.labels, torch.tensor(classes))
            task_data = torch.utils.data.TensorDataset(train_inputs[task_mask], train.labels[task_mask])
            num_examples = len(task_data)
        logger.info("task %d/%d: classes %s, %d training images, method: %s", task_index, num_tasks, classes,
                    num_examples, method_description(args))

        # teacher and replay pool from the model after the previous task
        teacher, pool = None, None
        if use_replay and old_classes:
            teacher = frozen_teacher(full_model_copy(unet))  # under FSDP: whole weights, gathered once here
            if args.replay_mode == "pool":
                pool = ReplayPool.generate(
                    teacher, noise_scheduler, old_classes, args.replay_per_class,
                    output_dir / "replay" / task_folder_name(task_index), args.num_inference_steps,
                    seed=args.seed * 100 + task_index, rank=accelerator.process_index,
                    world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                    show_progress=accelerator.is_local_main_process)

        # a fresh optimizer per task (the penalty and the teacher carry what earlier tasks taught)
        optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate)
        if args.streaming:  # sharded by stream_task itself, so the loader does not go through prepare
            num_batches = num_examples // (args.train_batch_size * accelerator.num_processes)
            if num_batches == 0:
                raise SystemExit(f"error: task {task_index} has {num_examples} training images, fewer than one batch "
                                 f"of {args.train_batch_size} per process; lower --train_batch_size")
            loader = StreamedTaskLoader(streamed(True, args.seed + task_index), args.train_batch_size, num_batches,
                                        device)
            model, optimizer = accelerator.prepare(unet, optimizer)
        else:
            loader = torch.utils.data.DataLoader(task_data, batch_size=args.train_batch_size, shuffle=True,
                                                 drop_last=len(task_data) > args.train_batch_size,
                                                 generator=torch.Generator().manual_seed(args.seed + task_index))
            model, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
        first_epoch, skip_batches = 0, 0
        if resume_dir is not None and resume_position["task"] == task_index:
            accelerator.load_state(str(resume_dir))
            first_epoch, skip_batches = resume_position["epoch"], resume_position["step_in_epoch"]
            logger.info("resumed from %s (task %d, epoch %d, step %d)", resume_dir, task_index, first_epoch,
                        skip_batches)
            resume_dir = None

        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        progress = tqdm(total=args.num_epochs_per_task * steps_per_epoch,
                        initial=first_epoch * steps_per_epoch + skip_batches // args.gradient_accumulation_steps,
                        desc=f"task {task_index}/{num_tasks}", disable=not accelerator.is_local_main_process)
        loss_curve, denoise_curve = [], []
        for epoch in range(first_epoch, args.num_epochs_per_task):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = loader
            if skip_batches:
                batches = loader.skip_first(skip_batches) if args.streaming \
                    else accelerator.skip_first_batches(loader, skip_batches)
            step_in_epoch = skip_batches
            skip_batches = 0
            epoch_losses, epoch_denoise = [], []
            model.train()
            for images, labels in batches:
                step_seed = (args.seed * 1_000_003 + global_step) * 8 + accelerator.process_index
                generator = torch.Generator().manual_seed(step_seed)
                replay = None
                if teacher is not None:
                    replay_bs = args.replay_batch_size or images.shape[0]
                    if pool is not None:
                        replay = pool.sample(replay_bs, generator, device)
                    else:
                        replay = online_replay_batch(teacher, noise_scheduler, old_classes, replay_bs,
                                                     args.online_replay_steps, generator)
                with accelerator.accumulate(model):
                    parts = continual_loss(model, noise_scheduler, images, labels, replay, teacher,
                                           args.distill_weight, not args.no_replay_in_denoise, generator)
                    loss = parts["loss"]
                    ewc = torch.zeros((), device=device)
                    if penalty is not None and args.ewc_mode == "loss" and penalty.num_tasks:
                        ewc = penalty(accelerator.unwrap_model(model))
                        loss = loss + ewc
                    if not torch.isfinite(loss):
                        raise SystemExit(f"error: non-finite loss ({float(loss)}) at task {task_index}, epoch "
                                         f"{epoch}, step {global_step}. The last checkpoint in "
                                         f"{output_dir / 'checkpoints'} is intact; lower --learning_rate or "
                                         f"--ewc_lambda and resume with --resume_from_checkpoint latest.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_in_epoch += 1
                epoch_losses.append(float(loss.detach()))
                epoch_denoise.append(float(parts["denoise"]))
                if not accelerator.sync_gradients:
                    continue
                if penalty is not None and args.ewc_mode == "decoupled":
                    penalty.proximal_step(accelerator.unwrap_model(model), optimizer.param_groups[0]["lr"])
                if ema is not None:
                    ema.step(model.parameters())
                global_step += 1
                steps_this_process += 1
                progress.update(1)
                logs = {"loss": epoch_losses[-1], "denoise": epoch_denoise[-1],
                        "distill": float(parts["distill"]), "ewc": float(ewc.detach()), "task": task_index}
                progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "task"})
                accelerator.log(logs, step=global_step)
                position = {"task": task_index, "epoch": epoch, "step_in_epoch": step_in_epoch,
                            "global_step": global_step}
                if step_in_epoch == len(loader):
                    position.update(epoch=epoch + 1, step_in_epoch=0)
                stop_now = args.stop_after_steps is not None and steps_this_process >= args.stop_after_steps
                if global_step % args.checkpointing_steps == 0 or stop_now:
                    save_checkpoint(accelerator, output_dir, global_step, position, args.checkpoints_total_limit)
                if stop_now:
                    stopped_early = True
                    break
            if stopped_early:
                break
            if epoch_losses:  # (empty when a resumed epoch had already finished)
                loss_curve.append(sum(epoch_losses) / len(epoch_losses))
                denoise_curve.append(sum(epoch_denoise) / len(epoch_denoise))
        progress.close()
        if stopped_early:
            logger.info("stopped after %d steps as asked; continue with --resume_from_checkpoint latest",
                        steps_this_process)
            break

        # ---- end of task: weights, evaluation, Fisher, task folder
        unet = accelerator.unwrap_model(model)
        accelerator.free_memory()
        if ema is not None:
            ema.copy_to(unet.parameters())
        unet.eval()
        trained = full_model_copy(unet)  # whole weights, gathered once per task under FSDP (else unet itself)
        pipeline = ClassConditionalDDIMPipeline(trained, noise_scheduler)
        eval_model = frozen_teacher(trained)  # the same fast sampler as the replay pool (bf16 where fast)

        def sample_fn(labels: torch.Tensor, seed: int) -> torch.Tensor:
            return ddim_sample(eval_model, noise_scheduler, labels, args.num_inference_steps,
                               torch.Generator().manual_seed(seed), default_autocast_dtype(device))

        eval_tasks = tasks if args.joint else tasks[:task_index]
        row = {}
        fid_n = {}
        if extractor is not None and accelerator.is_main_process:
            for i, task_classes in enumerate(eval_tasks, start=1):
                test_mask = torch.isin(test.labels, torch.tensor(task_classes))
                cache = reference_cache_path(args.fid_reference_dir or output_dir / "fid_reference", extractor,
                                             task_classes, test_inputs[test_mask])
                real = real_statistics(extractor, test_inputs[test_mask], cache)
                n = args.fid_num_samples or int(test_mask.sum())
                labels = labels_in_test_proportions(test.labels[test_mask], n)
                fake = torch.cat([extractor.features(sample_fn(labels[j : j + 500], args.seed * 7919 + j + i))
                                  for j in range(0, n, 500)])
                row[i] = fid_from_statistics(real, FeatureStatistics.from_features(fake, extractor.name))
                fid_n[i] = n
                logger.info("FID_%d(m_%d) = %.3f (%s, N=%d)", i, task_index, row[i], args.fid_backend, n)
            matrix[task_index] = row
        accelerator.wait_for_everyone()

        stats = None
        if penalty is not None:
            kinds = ("diag",) if args.ewc_type == "diag" else ("rank1",)
            per_process_cap = None
            if args.streaming:  # one unshuffled pass per Fisher pass over this process's shard
                fisher_loader = StreamedTaskLoader(streamed(False), args.fisher_batch_size, None, device,
                                                   accelerator.process_index, accelerator.num_processes)
                if args.fisher_num_samples:
                    per_process_cap = -(-args.fisher_num_samples // accelerator.num_processes)
            else:
                shard = torch.arange(len(task_data))
                if args.fisher_num_samples:
                    shard = shard[: args.fisher_num_samples]
                shard = shard[accelerator.process_index :: accelerator.num_processes]
                fisher_loader = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(task_data.tensors[0][shard], task_data.tensors[1][shard], shard),
                    batch_size=args.fisher_batch_size)
            stats = estimate_fisher(trained, noise_scheduler, fisher_loader, kinds=kinds, num_samples=per_process_cap,
                                    generator=torch.Generator().manual_seed(args.seed + task_index),
                                    reduce_sum=lambda t: accelerator.reduce(t, "sum"),
                                    show_progress=accelerator.is_local_main_process)
            penalty.add_task(stats, trained)
            penalty.to(penalty_device)
            logger.info("Fisher after task %d: c* = %s, ||mu|| = %.4g, N = %d", task_index, stats.c_star,
                        stats.mu_norm(), stats.num_samples)

        if accelerator.is_main_process:
            summary = summarize(matrix) if not args.joint else {}
            metrics = {"task": task_index, "classes": classes, "fid": row, "fid_num_samples": fid_n,
                       "fid_backend": args.fid_backend, "loss_per_epoch": loss_curve,
                       "denoise_loss_per_epoch": denoise_curve,
                       "c_star": stats.c_star if stats else None,
                       "mu_norm": stats.mu_norm() if stats and stats.mu else None, **summary}
            grid_labels = torch.tensor(seen).repeat_interleave(8)
            grid = sample_fn(grid_labels, args.seed)
            folder = output_dir / task_folder_name(task_index)

            def fill(tmp: Path) -> None:
                pipeline.save_pretrained(tmp)
                if stats is not None:
                    save_fisher(str(tmp / "fisher.safetensors"), stats, task_index=task_index, classes=classes)
                if penalty is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.cpu() for k, v in penalty.state_dict().items()},
                              str(tmp / "ewc_penalty.safetensors"))
                write_json(tmp / "metrics.json", metrics)
                save_image_grid(grid, tmp / "samples.png", nrow=8)
                write_json(tmp / "training_state.json", {
                    "task_index": task_index, "tasks": training_tasks, "seen_classes": seen,
                    "run_config": run_config(args), "global_step": global_step, "method": method_description(args),
                    "num_processes": accelerator.num_processes,
                    "hf_r1ewc_version": __version__})
                write_model_card(
                    tmp, task_index=task_index, num_tasks=num_tasks, seen_classes=seen,
                    dataset_name=source, method_description=method_description(args),
                    hyperparameters={k: getattr(args, k) for k in (
                        "preset", "ewc_type", "ewc_lambda", "ewc_mode", "distill_weight", "replay", "replay_mode",
                        "replay_per_class", "num_epochs_per_task", "train_batch_size", "learning_rate",
                        "num_inference_steps", "seed", "mixed_precision")},
                    command="accelerate launch " + " ".join(shlex.quote(a) for a in sys.argv),
                    matrix=matrix, summary=summary, fid_backend=args.fid_backend,
                    fid_comparable=extractor is not None and extractor.comparable_to_inception,
                    fid_num_samples=max(fid_n.values()) if fid_n else "n/a", hub_model_id=args.hub_model_id)

            write_folder_atomically(folder, fill)
            results = {"method": method_description(args), "fid_backend": args.fid_backend,
                       "fid_comparable_to_inception": bool(extractor is not None and extractor.comparable_to_inception),
                       "tasks": tasks, "joint": args.joint,
                       "fid": {str(k): {str(i): v for i, v in r.items()} for k, r in matrix.items()}}
            if args.joint and row:
                results["afid_final"] = sum(row.values()) / len(row)
            else:
                s = summarize(matrix)
                results.update(afid={str(k): v for k, v in s.get("afid", {}).items()},
                               forgetting=s.get("forgetting"), plasticity=s.get("plasticity"))
            write_json(results_path, results)
            logger.info("wrote %s", folder)
            if uploader is not None:
                uploader.submit(folder, task_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # the pool served this task only; the task folder is safely written
            shutil.rmtree(output_dir / "replay" / task_folder_name(task_index), ignore_errors=True)

    if uploader is not None:
        failures = uploader.close()
        if failures:
            write_json(output_dir / "upload_failures.json", {"failures": failures})
            logger.warning("%d uploads failed; see %s (local results are complete)", len(failures),
                           output_dir / "upload_failures.json")
    accelerator.end_training()
    if accelerator.is_main_process and not stopped_early:
        print(f"\nDone. Task folders: {output_dir}/task_XX (pipeline, fisher.safetensors, samples.png, README.md)")
        print(f"Results (FID matrix, AFID@k, forgetting, plasticity): {results_path}")


if __name__ == "__main__":
    main()
