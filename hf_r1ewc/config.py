"""The training script's settings: its flags (grouped as in ``--help``), the presets filling the ones left unset, the
checks made before anything is loaded, and what a run's manifest records of them (``hf_r1ewc.run`` compares it)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    DynamoBackend,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
)
from diffusers import SchedulerMixin

from .integrity import sha256_tensors
from .methods import (
    AGEM,
    EWC,
    L2,
    MAS,
    ContinualMethod,
    DarkExperienceReplay,
    Ensemble,
    ExperienceReplay,
    GenerativeDistillation,
    KnowledgeDistillation,
    LoRA,
    SynapticIntelligence,
)
from .methods.lora import DEFAULT_TARGETS
from .models import PRESETS
from .pipeline import SAMPLERS


if TYPE_CHECKING:
    from .data import TaskData


@dataclass(frozen=True)
class MethodFlag:
    """A flag of one ``--method`` component: ``--name``, its type, default and help, and the values it takes (checked
    before anything is loaded): finite, and at least ``minimum`` (above it when ``above``)."""

    name: str
    type: type
    default: int | float | None
    help: str
    minimum: float = 0
    above: bool = False

    def problem(self, value: int | float | None) -> str | None:
        """Why ``value`` is refused, or None (a default of None means "derived": leaving it out is fine; a bool
        flag is a switch)."""
        if (value is None and self.default is None) or self.type in (bool, str):
            return None
        bound = f"> {self.minimum:g}" if self.above else f">= {self.minimum:g}"
        kind = "an integer" if self.type is int else "a finite number"
        if not math.isfinite(value) or (value <= self.minimum if self.above else value < self.minimum):
            return f"--{self.name} must be {kind} {bound}, got {value}"
        return None


@dataclass
class MethodSpec:
    """A component of ``--method``: its word, a line for ``--help``, how the settings build it (``build(args,
    noise_scheduler)`` -> a ``ContinualMethod``; None: nothing to compose, e.g. naive), its own flags (added to
    the parser's method group; refused when the component is not in ``--method``), whether it must stand alone, and
    its group (one weight regulariser at a time)."""

    name: str
    help: str
    build: Callable[[argparse.Namespace, SchedulerMixin], ContinualMethod] | None = None
    flags: tuple[MethodFlag, ...] = ()
    alone: bool = False
    group: str | None = None  # at most one component of a group in a --method
    why_alone: str = ""  # what a component that must stand alone says when composed


def streamed_source(args: argparse.Namespace) -> str | None:
    """The dataset a streamed run reads (what its exemplar images record as their source); None in memory."""
    return (args.dataset_name or args.train_data_dir) if args.streaming else None


def _ewc(kind: str) -> Callable:
    return lambda args, noise: EWC(noise, kind, args.ewc_lambda, args.ewc_mode)


def _gd(args: argparse.Namespace, noise_scheduler: SchedulerMixin) -> ContinualMethod:
    return GenerativeDistillation(
        args.replay_per_class,
        args.distill_weight,
        args.num_inference_steps,
        args.replay_pool,
        args.online_replay_steps if args.replay_mode == "online" else None,
        args.replay_batch_size,
        not args.no_replay_in_denoise,
    )


# the components of --method, in the order they compose (penalties, then replay): each is one file of hf_r1ewc.methods
METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Add a component to ``--method`` (after those registered before it, in composition order): its flags join
    ``--help`` and the run manifest (a manifest recorded without them reads as their defaults)."""
    if spec.name in METHODS or "+" in spec.name:
        raise ValueError(f"a method named {spec.name!r} is registered already (or has a '+')")
    METHODS[spec.name] = spec


REGULARISER = "a weight regulariser"
for _spec in (
    MethodSpec("naive", "fine-tuning, nothing protects old tasks", alone=True),
    MethodSpec("joint", "the non-continual upper bound, all classes at once", alone=True),
    MethodSpec("rank1", "rank-1 EWC, the paper's eq. 6 (--ewc_lambda, --ewc_mode)", _ewc("rank1"), group=REGULARISER),
    MethodSpec("rank1_unscaled", "rank-1 EWC without c*", _ewc("rank1_unscaled"), group=REGULARISER),
    MethodSpec("diag", "diagonal EWC", _ewc("diag"), group=REGULARISER),
    MethodSpec(
        "l2",
        "L2 to the previous task's weights (--l2_weight)",
        lambda args, noise: L2(args.l2_weight),
        (MethodFlag("l2_weight", float, 500.0, "l2: weight/2 * ||theta - theta*_{k-1}||^2 (CLoG: 500)"),),
        group=REGULARISER,
    ),
    MethodSpec(
        "si",
        "Synaptic Intelligence (--si_weight, --si_xi)",
        lambda args, noise: SynapticIntelligence(args.si_weight, args.si_xi),
        (
            MethodFlag("si_weight", float, 5.0, "si: the penalty's weight c (CLoG: 5)"),
            MethodFlag("si_xi", float, 0.01, "si: the damping xi of Omega's denominator (CLoG: 0.01)", above=True),
        ),
        group=REGULARISER,
    ),
    MethodSpec(
        "mas",
        "Memory Aware Synapses (--mas_weight)",
        lambda args, noise: MAS(noise, args.mas_weight),
        (MethodFlag("mas_weight", float, 5.0, "mas: weight * sum_i Omega_i (theta_i - theta*_i)^2 (CLoG: 5)"),),
        group=REGULARISER,
    ),
    MethodSpec("gd", "generative replay from a frozen teacher + distillation (--distill_weight, --replay_*)", _gd),
    MethodSpec(
        "er",
        "experience replay: real exemplars of the seen classes join the denoising loss (--er_per_class, --er_weight)",
        lambda args, noise: ExperienceReplay(
            args.er_per_class, args.er_weight, args.er_batch_size, args.er_reservoir, streamed_source(args)
        ),
        (
            MethodFlag("er_per_class", int, 20, "er: real exemplars kept per seen class", minimum=1),
            MethodFlag(
                "er_weight",
                float,
                1.0,
                "er: each exemplar row's weight in the denoising loss (1: a real row)",
                above=True,
            ),
            MethodFlag("er_batch_size", int, None, "er: exemplars per step (default: the real batch)", minimum=1),
            MethodFlag(
                "er_reservoir",
                int,
                None,
                "er: keep this many exemplars in all by reservoir sampling (a uniform sample of every training image "
                "seen; classes share it as their images did) instead of --er_per_class per class",
                minimum=1,
            ),
        ),
    ),
    MethodSpec(
        "der",
        "dark experience replay: exemplars with the model's eps-predictions at fixed (t, eps) when they were stored, "
        "matched later (--der_weight; der+er is DER++)",
        lambda args, noise: DarkExperienceReplay(
            noise, args.der_per_class, args.der_weight, args.der_draws, args.der_batch_size, streamed_source(args)
        ),
        (
            MethodFlag("der_per_class", int, 20, "der: real exemplars kept per seen class", minimum=1),
            MethodFlag("der_weight", float, 1.0, "der: the weight of the kept-prediction matching term"),
            MethodFlag(
                "der_draws", int, 4, "der: (t, eps) draws kept per exemplar, each with its prediction", minimum=1
            ),
            MethodFlag(
                "der_batch_size",
                int,
                None,
                "der: (exemplar, draw) pairs per step (default: the real batch)",
                minimum=1,
            ),
        ),
    ),
    MethodSpec(
        "agem",
        "A-GEM: the gradient projected when it would raise the loss on real exemplars (--agem_per_class)",
        lambda args, noise: AGEM(noise, args.agem_per_class, args.agem_batch_size, streamed_source(args)),
        (
            MethodFlag("agem_per_class", int, 20, "agem: real exemplars per seen class in the memory", minimum=1),
            MethodFlag("agem_batch_size", int, 64, "agem: memory images per reference gradient", minimum=1),
        ),
    ),
    MethodSpec(
        "kd",
        "knowledge distillation / LwF: the previous model on the real noisy batch (--kd_weight)",
        lambda args, noise: KnowledgeDistillation(args.kd_weight),
        (MethodFlag("kd_weight", float, 1.0, "kd: the distillation term's weight (CLoG: 1)"),),
    ),
    MethodSpec(
        "ensemble",
        "an ensemble: each task trains its own copy of the model, which serves that task's classes (routed by label)",
        lambda args, noise: Ensemble(args.ensemble_from_scratch),
        (
            MethodFlag(
                "ensemble_from_scratch",
                bool,
                False,
                "ensemble: each task's model starts from a fresh initialisation (off: from the previous task's)",
            ),
        ),
        alone=True,
        why_alone="each task trains its own model, so no other method has an old task to protect in it",
    ),
    MethodSpec(
        "lora",
        "a LoRA adapter per task after the first (peft), over shared weights frozen after task 1; routed by label",
        lambda args, noise: LoRA(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules),
        (
            MethodFlag("lora_rank", int, 8, "lora: the rank r of each task's adapter", minimum=1),
            MethodFlag(
                "lora_alpha", float, None, "lora: the adapter's scale is alpha / r (None: alpha = r)", above=True
            ),
            MethodFlag("lora_dropout", float, 0.0, "lora: dropout on the adapter's input"),
            MethodFlag(
                "lora_target_modules",
                str,
                DEFAULT_TARGETS,
                "lora: the layers that get an adapter, by the end of their names, comma-separated (these: the UNet's "
                "resnet convolutions, time projections and attention, the DiT's attention, feed-forward and adaLN)",
            ),
        ),
        alone=True,
        why_alone="the shared weights are frozen after task 1 and old classes are served by their own adapters, so "
        "a penalty or replay has nothing of old tasks to protect",
    ),
):
    register_method(_spec)
EWC_KINDS = ("rank1", "rank1_unscaled", "diag")
PARAMETER_ISOLATION = ("ensemble", "lora")  # a model or adapter per task, routed by class label
EWC_LAMBDA_DEFAULT = 15000.0  # the paper's


def canonical_method(spec: str) -> str:
    """``--method``'s components checked and put in composition order (``METHODS``), joined by '+'; raises
    ``ValueError`` naming the problem."""
    parts = [p.strip() for p in spec.split("+")]
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not parts:
        raise ValueError(f"--method {spec!r}: unknown component(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--method {spec!r} names a component twice")
    alone = [p for p in parts if METHODS[p].alone]
    if len(parts) > 1 and alone:
        why = "".join(f"; {METHODS[p].why_alone}" for p in alone if METHODS[p].why_alone)
        raise ValueError(f"--method {spec!r}: {' and '.join(alone)} cannot be combined with another component{why}")
    for group in {METHODS[p].group for p in parts} - {None}:
        members = [p for p in parts if METHODS[p].group == group]
        if len(members) > 1:
            raise ValueError(f"--method {spec!r}: {' and '.join(members)} are each {group}; choose one")
    return "+".join(sorted(parts, key=list(METHODS).index))


def method_from_legacy(ewc_type: str, replay: str, joint: bool) -> str:
    """The ``--method`` that ``--ewc_type``, ``--replay`` and ``--joint`` spell (what a run recorded before
    ``--method`` existed)."""
    if joint:
        return "joint"
    parts = ([ewc_type] if ewc_type != "none" else []) + (["gd"] if replay == "on" else [])
    return "+".join(parts) or "naive"


def resolve_method(args: argparse.Namespace) -> None:
    """Make ``--method`` and the older ``--ewc_type``/``--replay``/``--joint`` say the same thing: one of them sets
    the other (the older flags take the values that spell the method, ignored ones their old defaults, so that every
    spelling of a method records the same settings); both given and disagreeing is refused."""
    if args.method is None:
        args.ewc_type, args.replay = args.ewc_type or "rank1", args.replay or "on"
        args.method = method_from_legacy(args.ewc_type, args.replay, args.joint)
        return
    method = canonical_method(args.method)
    parts = method.split("+")
    spelled = {
        "ewc_type": next((p for p in parts if p in EWC_KINDS), "rank1" if method == "joint" else "none"),
        "replay": "on" if "gd" in parts or method == "joint" else "off",
    }
    for flag, value in spelled.items():
        if getattr(args, flag) not in (None, value):
            raise ValueError(f"--method {method} and --{flag} {getattr(args, flag)} disagree: drop --{flag}")
    if args.joint and method != "joint":
        raise ValueError(f"--method {method} and --joint disagree: drop --joint (or use --method joint)")
    args.method, args.ewc_type, args.replay, args.joint = (
        method,
        spelled["ewc_type"],
        spelled["replay"],
        method == "joint",
    )


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
    "replay_pool": "regenerate",
}


def recorded_defaults(settings: dict) -> dict:
    """The values of the settings that a recorded manifest lacks (added after it was written) which reproduce its
    run: ``ADDED_SETTINGS``, and ``method`` as its ``--ewc_type``, ``--replay`` and ``--joint`` spell it."""
    defaults = dict(ADDED_SETTINGS)
    defaults |= {flag.name: flag.default for spec in METHODS.values() for flag in spec.flags}
    if {"ewc_type", "replay", "joint"} <= set(settings):
        defaults["method"] = method_from_legacy(settings["ewc_type"], settings["replay"], settings["joint"])
    return defaults


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
    g.add_argument(
        "--tasks",
        default=None,
        help="explicit class-incremental tasks by class id or name, e.g. '0,1;2,3;4,5' or 'Sneaker,Bag;3,4'. A "
        "finished run continues with the tasks appended to its own; --resume_from_task also takes the new tasks alone",
    )
    g.add_argument(
        "--class_names",
        default=None,
        help="a name per class id, comma-separated in id order (default: the dataset's ClassLabel names, an "
        "imagefolder's subfolders, Fashion-MNIST's ten, else the ids); task folders record them as id2label",
    )
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
        help="model resolution; default: a continued model's (--resume_from_task, or OUTPUT_DIR's task folders), "
        "else 28x28 zero-padded to 32 (paper), otherwise the native size",
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
        "--method",
        default=None,
        help="the continual method, a '+'-joined list of components (docs/method.md): "
        + "; ".join(f"{name}: {spec.help}" for name, spec in METHODS.items())
        + ". E.g. rank1+gd (the paper), gd, diag. Default: from --ewc_type, --replay and --joint (rank1+gd)",
    )
    g.add_argument(
        "--ewc_type",
        choices=["none", "diag", "rank1", "rank1_unscaled"],
        default=None,
        help="the EWC component of --method (older spelling; default rank1): rank1 = paper eq. 6 (with c*), "
        "rank1_unscaled = without c*, diag = diagonal, none",
    )
    g.add_argument("--ewc_lambda", type=float, default=EWC_LAMBDA_DEFAULT, help="EWC weight lambda (paper: 15000)")
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
        default=None,
        help="the gd component of --method (older spelling; default on): 'off' disables the replay batch entirely "
        "(no GD): the 'w/o GD' baselines",
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
        "--replay_pool",
        choices=["regenerate", "accumulate"],
        default="regenerate",
        help="regenerate: after every task the teacher samples every class seen so far (the paper); accumulate: it "
        "samples only the classes it has just learned, and older classes keep the images sampled right after their "
        "own task (ImageNet-32's 20 tasks: 1.2M pool images instead of 12.4M). Pools live in OUTPUT_DIR/replay "
        "until the run ends",
    )
    g.add_argument(
        "--replay_batch_size",
        type=int,
        default=None,
        help="replay images per step (preset: demo 32; default: the real batch)",
    )
    g.add_argument("--online_replay_steps", type=int, default=2, help="sampler steps of online replay")
    g.add_argument(
        "--joint", action="store_true", help="non-continual upper bound: all classes at once (--method joint)"
    )
    for spec in METHODS.values():
        for flag in spec.flags:
            if flag.type is bool:
                g.add_argument(f"--{flag.name}", action="store_true", help=flag.help)
            else:
                g.add_argument(f"--{flag.name}", type=flag.type, default=flag.default, help=flag.help)


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
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the student (through Accelerate: the backend `accelerate launch --dynamo_backend` "
        "names, else inductor), the teacher and the replay sampler, with static shapes. Each task compiles "
        "again: on 2 CPU cores ~3 min for the CPU table-1 UNet's step, then 1.15-1.25x (benchmarks/results/"
        "throughput_quick.md); on a GPU see benchmarks/results/throughput_gpu.md",
    )
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
        help="start after a finished task: a task folder or REPO_ID@REVISION (e.g. user/model@task-03); --tasks "
        "lists its tasks first and appends new ones, or gives the new tasks alone",
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
        "--logging_steps",
        type=int,
        default=10,
        help="log the loss terms (their mean over the window) every N optimizer steps, and at each epoch's end: "
        "the losses stay on the device in between, one host sync per log instead of per step; a NaN or inf "
        "term stops the run at the next log, before any checkpoint holds the weights it touched",
    )
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
    g.add_argument(
        "--push_exemplars",
        action="store_true",
        help="with --push_to_hub, also upload the exemplar images a streamed --method er/der/agem run keeps in its task "
        "folders (left out by default: a dataset's licence may not allow republishing its images)",
    )


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Flags (preset values fill the ones left unset), validated before anything is loaded; ``description`` heads
    ``--help``."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for add in (add_data_arguments, add_method_arguments, add_optimisation_arguments, add_output_arguments):
        add(p)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        resolve_method(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    validate_args(args)
    return args


def check_method_flags(args: argparse.Namespace) -> None:
    """The components' own flags: each in its range, and none set for a component that ``--method`` leaves out
    (it would be ignored without a word); ``--ewc_lambda`` likewise needs an EWC component."""
    components = set(args.method.split("+"))
    for name, spec in METHODS.items():
        for flag in spec.flags:
            value = getattr(args, flag.name)
            if name not in components and value != flag.default:
                raise SystemExit(
                    f"error: --{flag.name}{'' if flag.type is bool else f' {value}'} is a setting of the {name} "
                    f"component, which --method "
                    f"{args.method} does not include: add {name} to --method or drop --{flag.name}"
                )
            if name in components and (problem := flag.problem(value)):
                raise SystemExit(f"error: {problem}")
    if "lora" in components:
        if args.use_ema:
            raise SystemExit(
                "error: --use_ema averages the trained parameters, and with --method lora they change from task to "
                "task (a new adapter each): pass --no-use_ema (the demo preset turns the EMA on)"
            )
        if args.lora_dropout >= 1:
            raise SystemExit(f"error: --lora_dropout must be in [0, 1), got {args.lora_dropout}")
        try:
            import peft.functional  # noqa: F401
        except ImportError:
            raise SystemExit(
                "error: --method lora makes its adapters with peft, which is not installed: pip install "
                "'hf-r1ewc[lora]' (or pip install peft)"
            ) from None
    if getattr(args, "ensemble_from_scratch", False) and args.use_ema:
        raise SystemExit(
            "error: --ensemble_from_scratch restarts each task's model, and --use_ema would average it with the "
            "previous task's weights: drop one of them (--no-use_ema; the demo preset turns the EMA on)"
        )
    if not components & set(EWC_KINDS) and args.ewc_lambda != EWC_LAMBDA_DEFAULT:
        raise SystemExit(
            f"error: --ewc_lambda {args.ewc_lambda} weighs an EWC penalty, and --method {args.method} has none "
            f"({', '.join(EWC_KINDS)}): add one to --method or drop --ewc_lambda"
        )


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
        "logging_steps",
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
    if args.replay_pool == "accumulate" and args.replay_mode == "online":
        fail("--replay_pool accumulate keeps pool images; online replay has no pool: drop one of the two")
    if args.replay_pool == "accumulate" and args.resume_from_task:
        fail(
            "--replay_pool accumulate needs the earlier tasks' pools, which a task folder does not hold: continue "
            "with --replay_pool regenerate, or re-run into the run's own OUTPUT_DIR"
        )
    check_method_flags(args)
    if args.push_exemplars and not ({"er", "der", "agem"} & set(args.method.split("+")) and args.streaming):
        fail(
            "--push_exemplars uploads the exemplar images of a streamed --method er, der or agem run; this one keeps none"
        )
    if "si" in args.method.split("+") and resolve_mixed_precision(args.mixed_precision) == "fp16":
        fail(
            "--method si integrates the gradient the optimizer sees, which fp16's gradient scaler still holds scaled "
            "when the hook runs: train SI in bf16 or fp32 (--mixed_precision bf16 or no)"
        )
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
    if args.lr_warmup_steps and args.lr_scheduler == "constant":
        fail(
            f"--lr_warmup_steps {args.lr_warmup_steps} has no effect with --lr_scheduler constant (diffusers' constant "
            f"schedule ignores it): add --lr_scheduler constant_with_warmup (or cosine, linear, ...)"
        )
    if args.fid_num_samples is not None and args.fid_num_samples < 2 and args.fid_backend != "none":
        fail(
            f"--fid_num_samples {args.fid_num_samples}: FID compares two covariances and needs at least 2 samples "
            f"per task (the paper's protocol uses the task's test images: leave it out), or pass --fid_backend none"
        )
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


# compared with the run_config of the task folder a run continues from (a key the folder lacks is not compared)
# what a run continued from another run's task folder or checkpoint must share with it (the tasks are compared too)
RESUME_MUST_MATCH = (  # (the resolution: a task folder's model must have this run's size, checked as it loads)
    "preset",
    "model_config_name_or_path",
    "ewc_type",
    "ewc_mode",
    "joint",
)


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
    "push_exemplars",
    "fid_reference_dir",
    "fisher_batch_size",
    "logging_dir",
    "logging_steps",
    "compile",
    "validation_epochs",
    "gradient_checkpointing",
    "dataloader_num_workers",
)


# the flags that say which data the tasks come from: tasks appended to a run may come from other data
DATA_SETTINGS = (
    "dataset_name",
    "train_data_dir",
    "image_column",
    "label_column",
    "eval_split",
    "max_train_per_class",
    "resize",
    "class_names",
)


# the flags that spell the task list: the manifest compares the list they give (a longer one continues the run)
TASK_LIST_SETTINGS = ("tasks", "classes_per_task")


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
        "method",
        "ewc_type",
        "ewc_mode",
        "joint",
        "max_train_per_class",
    )
    return {k: getattr(args, k) for k in keys}


def run_manifest(args: argparse.Namespace, accelerator, data: TaskData) -> dict:
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
    return {
        "settings": settings,
        "dataset": dataset,
        "tasks": data.tasks,
        "task_sources": data.task_sources or [data.source] * len(data.tasks),
    }


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
    dynamo = TorchDynamoPlugin()  # what `accelerate launch --dynamo_backend` or the config file set
    if args.compile and dynamo.backend == DynamoBackend.NO:
        dynamo.backend = DynamoBackend.INDUCTOR
    if dynamo.dynamic is None:
        dynamo.dynamic = False  # static shapes: drop_last batches, [B] timesteps
    accelerator = Accelerator(
        dynamo_plugin=dynamo,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # pinned batches (task_loader, on CUDA) reach the device without blocking the host
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SystemExit(
            "error: the EWC penalty works on FSDP2's DTensor shards; set fsdp_version: 2 in the "
            "accelerate config (accelerate_configs/fsdp.yaml)"
        )
    isolating = [p for p in args.method.split("+") if p in PARAMETER_ISOLATION]
    if accelerator.distributed_type == DistributedType.FSDP and isolating:
        raise SystemExit(
            f"error: --method {isolating[0]} keeps every finished task's model (or adapter) whole on each process, "
            "which FSDP is meant to avoid; run it under DDP (accelerate_configs/multi_gpu_ddp.yaml) or on one device"
        )
    if accelerator.distributed_type == DistributedType.FSDP and args.use_ema:
        raise SystemExit(
            "error: --use_ema keeps a full copy of the weights per process, which FSDP is meant to "
            "avoid; train without --use_ema under FSDP or use DDP (accelerate_configs/multi_gpu_ddp.yaml)"
        )
    return accelerator
