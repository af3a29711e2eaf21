"""The continual-learning method around any Accelerate training loop: replay, the training step, consolidation.

``ContinualLearner`` holds what carries from task to task — the EWC penalty and the replay source (a frozen teacher
and its pool) — and the three phases a training loop calls::

    learner.start_task(model, sampler, old_classes, ..., accelerator=accelerator)  # teacher + replay pool
    learner.training_step(accelerator, model, optimizer, x, y, generator)           # per micro-batch
    learner.consolidate(model, fisher_loader, ..., accelerator=accelerator)        # Fisher -> penalty term

Each phase takes the distributed context the same way, from the ``accelerator`` (None: one process): the pool is
generated in shares and gathered, the Fisher's partial sums are all-reduced. ``training_step(..., check_finite=False)``
reads nothing back to the host; a ``LossLog`` then reads the terms of many steps at once (and checks them).

One step's loss (docs/method.md): ``denoise(real ∪ replay) + distill_weight * distill(replay) + λ·EWC(θ)`` with
``ewc_mode="loss"``; with ``ewc_mode="decoupled"`` the penalty instead acts as an exact proximal step after each
optimizer step that really happened (not on accumulation micro-steps, not when fp16's gradient scaler skipped it).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DynamoBackend, extract_model_from_parallel
from diffusers import ModelMixin, SchedulerMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from .distill import ReplayPool, continual_loss, frozen_teacher, online_replay_batch
from .fisher import FisherStatistics, estimate_fisher, subset_indices
from .hub import task_folder_name
from .penalty import EWCPenalty
from .pipeline import ClassConditionalPipeline
from .run import resume_advice
from .sharding import full_model_copy, local_tensor


logger = get_logger(__name__, log_level="INFO")
EWC_MODES = ("loss", "decoupled")


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for one micro-batch, seeded from (seed, *keys) through a hash: no two different key
    tuples share a stream (e.g. keys = task, epoch, micro-step in the epoch, process index). On the model's device
    the step's noise, timesteps and replay indices are drawn there, with no copy from the host; a stream differs
    between device types (CPU and CUDA draw differently from the same seed), never between runs on one."""
    digest = hashlib.blake2b(repr((int(seed), *map(int, keys))).encode(), digest_size=7).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little"))


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; ``term`` names it (denoise, distill or ewc)."""

    def __init__(self, term: str, value: float, step: int | None = None) -> None:
        super().__init__(f"the {term} term of the loss is {value}")
        self.term, self.value, self.step = term, value, step


def compile_options(accelerator: Accelerator) -> dict | None:
    """``torch.compile``'s keyword arguments from the accelerator's dynamo plugin, or None when it compiles
    nothing: the models it does not prepare (the teacher) are compiled the way it compiles the student."""
    plugin = accelerator.state.dynamo_plugin
    return None if plugin.backend == DynamoBackend.NO else plugin.to_kwargs()


def bare_model(accelerator: Accelerator, model: nn.Module, keep_fp32_wrapper: bool = True) -> nn.Module:
    """The model itself, without DDP and without ``torch.compile``'s wrapper (whose parameter names carry an
    ``_orig_mod.`` prefix: the penalty binds by name, torch.func and ``save_pretrained`` need the module)."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=keep_fp32_wrapper, keep_torch_compile=False)


TERMS = ("denoise", "distill", "ewc")  # the loss's terms, in the order a non-finite one is named


def check_terms(values: Sequence[float], step: int | None = None) -> None:
    """Raise ``NonFiniteLossError`` naming the first non-finite of (denoise, distill, ewc) = ``values[-3:]``."""
    for term, value in zip(TERMS, values[-3:]):
        if not math.isfinite(value):
            raise NonFiniteLossError(term, value, step)


class LossLog:
    """Each micro-batch's loss terms, kept on the device until read: one host sync per ``read``, not per step.

    A loop appends every ``StepOutput`` and reads when it logs (every few optimizer steps), at an epoch's end and
    before it checkpoints, so a non-finite term stops the run before any weights it touched are written.
    """

    def __init__(self) -> None:
        self._terms: list[torch.Tensor] = []
        self._steps: list[int] = []

    def append(self, out: StepOutput, step: int) -> None:
        """``step``: the optimizer step the micro-batch belongs to (named if one of its terms is not finite)."""
        self._terms.append(out.terms)
        self._steps.append(step)

    def read(self) -> list[list[float]]:
        """(loss, denoise, distill, ewc) of each micro-batch appended since the last read, oldest first; raises
        ``NonFiniteLossError`` (with its ``step``) for the first micro-batch with a non-finite term."""
        if not self._terms:
            return []
        values = torch.stack(self._terms).tolist()
        steps, self._terms, self._steps = self._steps, [], []
        for row, step in zip(values, steps):
            check_terms(row, step)
        return values


@dataclass
class Replay:
    """Where a step's replay batch comes from: the teacher's ``pool``, or (``pool`` None) fresh online samples."""

    teacher: nn.Module
    classes: list[int]
    pool: ReplayPool | None = None
    sampler: SchedulerMixin | None = None  # the sampling scheduler of online replay
    online_steps: int = 2

    def batch(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 ``[B, C, H, W]`` in [-1, 1], labels ``[B]``) on ``device``."""
        if self.pool is not None:
            return self.pool.sample(batch_size, generator, device)
        images, labels = online_replay_batch(
            self.teacher, self.sampler, self.classes, batch_size, self.online_steps, generator
        )
        return images.to(device), labels.to(device)


@dataclass
class StepOutput:
    """One micro-batch: ``terms``, float32 ``[4]`` on the model's device = (loss, denoise, distill, ewc), detached and
    not read back (no host sync: ``LossLog`` reads many at once), and whether an optimizer step happened."""

    terms: torch.Tensor
    optimizer_stepped: bool
    penalty_gradient_ratio: float | None = None  # ||grad lambda*EWC|| / ||grad of the rest of the loss||, if measured


class ContinualLearner:
    """Rank-1 (or diagonal) EWC + generative distillation for a class-conditional diffusers model.

    ``penalty`` None trains without EWC; ``distill_weight`` 0 keeps replay without distillation; no replay at all
    when ``start_task`` is never given old classes. ``replay_batch_size`` None = the real batch size.
    """

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        penalty: EWCPenalty | None = None,
        ewc_mode: str = "loss",
        distill_weight: float = 1.0,
        replay_in_denoise: bool = True,
        replay_batch_size: int | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if ewc_mode not in EWC_MODES:
            raise ValueError(f"ewc_mode must be one of {EWC_MODES}, got {ewc_mode!r}")
        self.noise_scheduler, self.penalty, self.ewc_mode = noise_scheduler, penalty, ewc_mode
        self.distill_weight, self.replay_in_denoise = distill_weight, replay_in_denoise
        self.replay_batch_size, self.max_grad_norm = replay_batch_size, max_grad_norm
        self.replay: Replay | None = None

    # ------------------------------------------------------------------------------------------ start of a task

    def start_task(
        self,
        model: nn.Module,
        sampler: SchedulerMixin,
        old_classes: Sequence[int],
        *,
        per_class: int | None,
        directory: str | os.PathLike | None,
        num_inference_steps: int = 50,
        seed: int = 0,
        online_steps: int | None = None,
        accelerator: Accelerator | None = None,
        show_progress: bool = True,
        kept: ReplayPool | None = None,
    ) -> None:
        """Freeze a copy of ``model`` (whole weights: gather FSDP shards first) as the teacher of ``old_classes``
        and generate its replay pool into ``directory`` with ``sampler``; ``online_steps`` instead samples fresh
        replay every step with that many sampler steps. No old classes: no replay. ``kept``: pool images of some old
        classes sampled earlier (by the teachers that had just learned them): only the other old classes are
        generated, and replay draws from both (``--replay_pool accumulate``). When the ``accelerator`` compiles
        models (``--compile``, ``accelerate launch --dynamo_backend``) the teacher is compiled the same way: its
        distillation forward and the pool's sampler run compiled."""
        self.replay = None
        if not old_classes:
            return
        teacher = frozen_teacher(model)
        if accelerator is not None and (options := compile_options(accelerator)) is not None:
            teacher = torch.compile(teacher, **options)  # as Accelerate compiled the student
        if online_steps is not None:
            self.replay = Replay(teacher, list(old_classes), None, sampler, online_steps)
            return
        new_classes = [c for c in old_classes if kept is None or c not in kept.classes]
        pools = [kept] if kept is not None else []
        if new_classes:
            pools.append(
                ReplayPool.generate(
                    teacher,
                    sampler,
                    new_classes,
                    per_class,
                    directory,
                    num_inference_steps,
                    seed=seed,
                    rank=accelerator.process_index if accelerator else 0,
                    world_size=accelerator.num_processes if accelerator else 1,
                    barrier=accelerator.wait_for_everyone if accelerator else None,
                    show_progress=show_progress,
                )
            )
        pool = ReplayPool.concat(pools) if len(pools) > 1 else pools[0]
        self.replay = Replay(teacher, list(old_classes), pool.to(next(teacher.parameters()).device))

    # ------------------------------------------------------------------------------------------------- a step

    def loss(
        self,
        model: nn.Module,
        images: torch.Tensor,
        class_labels: torch.Tensor,
        generator: torch.Generator,
        check_finite: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch and its terms, 0-dim tensors on the model's device: ``loss`` = ``denoise`` on
        real ∪ replay + distill_weight · ``distill`` on replay + ``ewc`` (λ·EWC(θ) with ``ewc_mode="loss"``, else 0).

        Args:
            model: the denoiser as trained (an Accelerate-prepared wrapper is fine).
            images: ``[B, C, H, W]`` in [-1, 1]; class_labels: ``[B]``.
            generator: this micro-batch's generator (noise, timesteps, replay indices), e.g. ``step_generator``.
            check_finite: raise ``NonFiniteLossError``, naming the term, before anything is updated (one host sync
                per call); False leaves the check to whoever reads the terms (``LossLog``).

        No backward, no optimizer: a custom loop calls ``backward``, its optimizer and LR scheduler, then
        ``after_optimizer_step``.
        """
        replay, teacher = None, None
        if self.replay is not None:
            replay = self.replay.batch(self.replay_batch_size or images.shape[0], generator, images.device)
            teacher = self.replay.teacher
        parts = continual_loss(
            model,
            self.noise_scheduler,
            images,
            class_labels,
            replay,
            teacher,
            self.distill_weight,
            self.replay_in_denoise,
            generator,
        )
        loss, ewc = parts["loss"], torch.zeros((), device=images.device)
        if self.penalty is not None and self.ewc_mode == "loss" and self.penalty.num_tasks:
            ewc = self.penalty(extract_model_from_parallel(model, keep_torch_compile=False))
            loss = loss + ewc
        terms = {"loss": loss, "denoise": parts["denoise"], "distill": parts["distill"], "ewc": ewc}
        if check_finite:
            check_terms(torch.stack([terms[k].detach().float() for k in TERMS]).tolist())
        return terms

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        """Call after every optimizer step that happened (not on accumulation micro-steps, not when fp16's scaler
        skipped it), with the step's learning rate. With ``ewc_mode="decoupled"`` this is the exact proximal step
        θ ← argmin_θ ½‖θ − θ̃‖² + lr·λ·EWC(θ) (θ̃ the weights the optimizer left); nothing otherwise."""
        if self.penalty is not None and self.ewc_mode == "decoupled":
            self.penalty.proximal_step(extract_model_from_parallel(model, keep_torch_compile=False), lr)

    def training_step(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        class_labels: torch.Tensor,
        generator: torch.Generator,
        ema: EMAModel | None = None,
        measure_penalty: bool = False,
        check_finite: bool = True,
    ) -> StepOutput:
        """The convenience step the training script uses: ``loss`` under ``accelerator.accumulate``, backward, (clip,
        optimizer step, ``after_optimizer_step``, EMA update when the accumulation window closes).
        ``measure_penalty``: on a step that closes the window, also report ||grad lambda*EWC|| relative to the
        gradient of the rest of the loss (one extra small backward through the penalty): the number that says
        lambda is too large when it is >> 1 (under FSDP, of this process's shards; not measured under fp16's
        gradient scaler). ``check_finite``: as in ``loss``; the training script passes False and reads the terms
        through a ``LossLog`` every few steps, so that a step never waits for the device."""
        with accelerator.accumulate(model):
            terms = self.loss(model, images, class_labels, generator, check_finite)
            accelerator.backward(terms["loss"])
            # not under fp16's gradient scaler: the gradients are still scaled here, the penalty's would not be
            measure = measure_penalty and accelerator.sync_gradients and accelerator.scaler is None
            ratio = self._penalty_gradient_ratio(bare_model(accelerator, model)) if measure else None
            if accelerator.sync_gradients and self.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
        if stepped:
            self.after_optimizer_step(bare_model(accelerator, model), optimizer.param_groups[0]["lr"])
        if stepped and ema is not None:
            ema.step(model.parameters())
        values = torch.stack([terms[k].detach().float() for k in ("loss", *TERMS)])
        return StepOutput(values, accelerator.sync_gradients, ratio)

    def _penalty_gradient_ratio(self, model: nn.Module) -> float | None:
        """||grad of lambda*EWC|| / ||grad of the other terms||, from the gradients that backward just left."""
        if self.penalty is None or not self.penalty.num_tasks:
            return None
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        penalty_grads = torch.autograd.grad(self.penalty(model), params, allow_unused=True)
        pen_sq, rest_sq = 0.0, 0.0
        for p, g in zip(params, penalty_grads):
            g = torch.zeros_like(local_tensor(p.grad)) if g is None else local_tensor(g)
            total = local_tensor(p.grad).float()
            rest = total - g if self.ewc_mode == "loss" else total  # in the loss, backward already added it
            pen_sq += float(g.double().pow(2).sum())
            rest_sq += float(rest.double().pow(2).sum())
        return (pen_sq / rest_sq) ** 0.5 if rest_sq > 0 else float("inf")

    def state_dict(self) -> dict:
        """What carries across tasks and is not in the model: ``ewc_mode`` and the penalty's tensors under
        ``penalty.``, so that ``accelerator.register_for_checkpointing(learner)`` keeps it in a checkpoint (the
        replay pool lives on disk and the teacher is rebuilt by ``start_task``)."""
        state: dict = {"ewc_mode": self.ewc_mode}
        if self.penalty is not None:
            state |= {f"penalty.{k}": v for k, v in self.penalty.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; refuses a state written with another ``ewc_mode`` or penalty presence."""
        penalty = {k.removeprefix("penalty."): v for k, v in state.items() if k.startswith("penalty.")}
        if state.get("ewc_mode") != self.ewc_mode or bool(penalty) != (self.penalty is not None):
            raise ValueError(
                f"the learner state was written with ewc_mode {state.get('ewc_mode')!r} and "
                f"{'a' if penalty else 'no'} penalty; this learner has ewc_mode {self.ewc_mode!r} and "
                f"{'a' if self.penalty is not None else 'no'} penalty"
            )
        if self.penalty is not None:
            self.penalty.load_state_dict(penalty)

    # ------------------------------------------------------------------------------------------- end of a task

    def consolidate(
        self,
        model: nn.Module,
        fisher_loader: Iterable,
        *,
        seed: int,
        accelerator: Accelerator | None = None,
        num_samples: int | None = None,
        show_progress: bool = True,
    ) -> FisherStatistics | None:
        """Estimate the finished task's Fisher at theta*_k = ``model`` (whole, unwrapped weights; float32 whatever
        the training precision) and add its term to the penalty. None when training without EWC. Raises
        ``ValueError`` on a non-finite estimate, before the penalty takes it."""
        if self.penalty is None:
            return None
        kinds = ("diag",) if self.penalty.kind == "diag" else ("rank1",)
        stats = estimate_fisher(
            model,
            self.noise_scheduler,
            fisher_loader,
            kinds=kinds,
            num_samples=num_samples,
            generator=torch.Generator().manual_seed(seed),
            reduce_sum=(lambda t: accelerator.reduce(t, "sum"))
            if accelerator and accelerator.num_processes > 1
            else None,
            show_progress=show_progress,
        ).check_finite("the finished task's Fisher estimate")
        self.penalty.add_task(stats, model)
        return stats


def fisher_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int | None,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """The Fisher's in-memory loader: a seeded random subset of ``num_samples`` (``subset_indices``), this process's
    share of it (every ``world_size``-th), with global indices so that the estimate does not depend on the process
    count. Yields ``(images [B, C, H, W], labels [B], global_index [B])`` in a fixed order."""
    chosen = subset_indices(images.shape[0], num_samples, seed)[rank::world_size]
    dataset = torch.utils.data.TensorDataset(images[chosen], labels[chosen], chosen)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


# -------------------------------------------------------------- from the training script's settings (hf_r1ewc.config)


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


def make_optimizer(args, model: torch.nn.Module, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Adam (the paper), or AdamW when --adam_weight_decay > 0 (diffusers' examples), for parameters trained on
    ``device``: one fused kernel per step on CUDA, the multi-tensor implementation elsewhere (on the CPU it gives the
    per-parameter loop's weights bit for bit, in fewer operator calls)."""
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    kwargs.update({"fused": True} if torch.device(device).type == "cuda" else {"foreach": True})
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


def start_replay(args, accelerator, learner: ContinualLearner, denoiser, sampler, old_classes, task_index: int):
    """The task's teacher (whole weights, gathered once under FSDP) and its replay pool of the old classes, written
    in shares by every process into OUTPUT_DIR/replay/task_XX (or online replay). With ``--replay_pool accumulate``
    the teacher samples only task k-1's classes, into OUTPUT_DIR/replay/accumulated/task_{k-1}, and the classes of
    tasks 1..k-2 keep their folders there (same seed as regenerate's: at task 2 both pools are the same images)."""
    directory, kept = Path(args.output_dir) / "replay" / task_folder_name(task_index), None
    if args.replay_pool == "accumulate":  # (validate_args refuses it with online replay)
        directory = Path(args.output_dir) / "replay" / "accumulated" / task_folder_name(task_index - 1)
        earlier = [directory.parent / task_folder_name(j) for j in range(1, task_index - 1)]
        try:
            kept = ReplayPool.concat([ReplayPool.load(d) for d in earlier]) if earlier else None
        except (OSError, ValueError) as err:
            raise SystemExit(
                f"error: --replay_pool accumulate: an earlier task's pool cannot be read ({err}); re-run with "
                f"--replay_pool regenerate to sample every old class again"
            ) from None
    learner.start_task(
        full_model_copy(denoiser),
        sampler,
        old_classes,
        per_class=args.replay_per_class,
        directory=directory,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed * 100 + task_index,
        online_steps=args.online_replay_steps if args.replay_mode == "online" else None,
        accelerator=accelerator,
        show_progress=accelerator.is_local_main_process,
        kept=kept,
    )


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


def consolidate_task(args, accelerator, learner: ContinualLearner, trained, fisher_batches, task_index: int):
    """The finished task's Fisher at theta*_k -> a new penalty term (None without EWC); the statistics go back to
    the CPU between tasks."""
    streamed_share = -(-args.fisher_num_samples // accelerator.num_processes) if args.fisher_num_samples else None
    try:
        stats = learner.consolidate(
            trained,
            fisher_batches,
            seed=args.seed + task_index,
            accelerator=accelerator,
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
