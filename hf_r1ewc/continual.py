"""The continual-learning method around any Accelerate training loop: a list of methods composed into one step.

``ContinualLearner`` composes continual methods (``hf_r1ewc.methods``: EWC, generative distillation, ...) and calls
their hooks in the three phases a training loop has::

    learner.start_task(TaskStart(k, model, old_classes, classes, sampler, scratch_dir, seed, accelerator))
    learner.training_step(accelerator, model, optimizer, x, y, generator)     # per micro-batch
    learner.end_task(TaskEnd(k, model, fisher_batches, classes, seed, accelerator=accelerator))

One step's loss (docs/method.md): ``denoise(real ∪ the methods' extra batches) + Σ the methods' loss terms + Σ their
penalties in the loss`` (e.g. ``denoise(real ∪ replay) + w·distill(replay) + λ·EWC(θ)``). The learner draws the
methods' extra batches, noises everything once at uniform t and runs ONE student forward that every method's term
reads; ``after_backward`` (gradient surgery) runs once the window's gradients are all-reduced, and
``after_optimizer_step`` (a proximal step) after each optimizer step that really happened (not on accumulation
micro-steps, not when fp16's gradient scaler skipped it). ``training_step(..., check_finite=False)`` reads nothing
back to the host; a ``LossLog`` then reads the terms of many steps at once (and checks them).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from diffusers import SchedulerMixin
from diffusers.training_utils import EMAModel
from torch import nn

from .fisher import subset_indices
from .methods.base import ContinualMethod, Expected, StepForward, TaskEnd, TaskStart
from .sharding import local_tensor


STANDARD_TERMS = ("denoise", "distill", "ewc")  # always logged (0 when no method adds them), so runs compare


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for one micro-batch, seeded from (seed, *keys) through a hash: no two different key
    tuples share a stream (e.g. keys = task, epoch, micro-step in the epoch, process index). On the model's device
    the step's noise, timesteps and replay indices are drawn there, with no copy from the host; a stream differs
    between device types (CPU and CUDA draw differently from the same seed), never between runs on one."""
    digest = hashlib.blake2b(repr((int(seed), *map(int, keys))).encode(), digest_size=7).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little"))


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; ``term`` names it (denoise, distill, ewc, ...)."""

    def __init__(self, term: str, value: float, step: int | None = None) -> None:
        super().__init__(f"the {term} term of the loss is {value}")
        self.term, self.value, self.step = term, value, step


def bare_model(accelerator: Accelerator, model: nn.Module, keep_fp32_wrapper: bool = True) -> nn.Module:
    """The model itself, without DDP and without ``torch.compile``'s wrapper (whose parameter names carry an
    ``_orig_mod.`` prefix: the penalty binds by name, torch.func and ``save_pretrained`` need the module)."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=keep_fp32_wrapper, keep_torch_compile=False)


def check_terms(values: Sequence[float], names: Sequence[str], step: int | None = None) -> None:
    """Raise ``NonFiniteLossError`` naming the first non-finite term of ``values`` (named by ``names``, "loss"
    skipped: a term names the cause)."""
    for term, value in zip(names, values):
        if term != "loss" and not math.isfinite(value):
            raise NonFiniteLossError(term, value, step)


class LossLog:
    """Each micro-batch's loss terms, kept on the device until read: one host sync per ``read``, not per step.

    A loop appends every ``StepOutput`` and reads when it logs (every few optimizer steps), at an epoch's end and
    before it checkpoints, so a non-finite term stops the run before any weights it touched are written.
    """

    def __init__(self, names: Sequence[str] = ("loss", *STANDARD_TERMS)) -> None:
        self.names = tuple(names)  # the learner's ``term_names``
        self._terms: list[torch.Tensor] = []
        self._steps: list[int] = []

    def append(self, out: StepOutput, step: int) -> None:
        """``step``: the optimizer step the micro-batch belongs to (named if one of its terms is not finite)."""
        self._terms.append(out.terms)
        self._steps.append(step)

    def read(self) -> list[list[float]]:
        """The terms (``names``) of each micro-batch appended since the last read, oldest first; raises
        ``NonFiniteLossError`` (with its ``step``) for the first micro-batch with a non-finite term."""
        if not self._terms:
            return []
        values = torch.stack(self._terms).tolist()
        steps, self._terms, self._steps = self._steps, [], []
        for row, step in zip(values, steps):
            check_terms(row, self.names, step)
        return values


@dataclass
class StepOutput:
    """One micro-batch: ``terms``, float32 ``[T]`` on the model's device = the learner's ``term_names`` (loss, denoise,
    distill, ewc, ...), detached and not read back (no host sync: ``LossLog`` reads many at once), and whether an optimizer step happened."""

    terms: torch.Tensor
    optimizer_stepped: bool
    penalty_gradient_ratio: float | None = None  # ||grad lambda*EWC|| / ||grad of the rest of the loss||, if measured


class ContinualLearner:
    """A list of continual methods composed into one training step; no methods: plain fine-tuning.

    ``noise_scheduler``: the training schedule (uniform t, DDPM noising); ``max_grad_norm``: clip the gradient
    (after ``after_backward``) before each optimizer step. Methods are called in list order.
    """

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        methods: Sequence[ContinualMethod] = (),
        max_grad_norm: float | None = None,
    ) -> None:
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"each method may appear once, got {names}")
        self.noise_scheduler, self.methods, self.max_grad_norm = noise_scheduler, list(methods), max_grad_norm
        extra = [m.term for m in methods if m.term and m.term not in STANDARD_TERMS]
        self.term_names: tuple[str, ...] = ("loss", "denoise", *STANDARD_TERMS[1:], *extra)

    def method(self, name: str) -> ContinualMethod | None:
        """The composed method called ``name``, or None."""
        return next((m for m in self.methods if m.name == name), None)

    def label(self) -> str:
        """What the learner runs, with its weights (in composition order): e.g. ``rank1 EWC (lambda=100,
        decoupled) + generative replay + distillation (weight 1)``."""
        return " + ".join(m.label() for m in self.methods) or "plain fine-tuning"

    # ------------------------------------------------------------------------------------------ start of a task

    def start_task(self, task: TaskStart) -> None:
        """Every method's ``start_task`` (a teacher and its replay, buffers, adapters), in order."""
        for method in self.methods:
            method.start_task(task)

    def serve(self, model: nn.Module) -> nn.Module:
        """The model that samples every class learned so far, around ``model`` (the current task's, bare): itself,
        or, with a parameter-isolation method, a ``pipeline.RoutedDenoiser`` that routes each label."""
        for method in self.methods:
            model = method.serve(model)
        return model

    def routes(self, task_index: int) -> dict[int, str] | None:
        """The routing table of task folder ``task_index`` (class -> route), or None when one model serves all."""
        return next((r for m in self.methods if (r := m.routes(task_index)) is not None), None)

    # ------------------------------------------------------------------------------------------------- a step

    def loss(
        self,
        model: nn.Module,
        images: torch.Tensor,
        class_labels: torch.Tensor,
        generator: torch.Generator,
        check_finite: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch and its terms (``term_names``), 0-dim tensors on the model's device.

        Args:
            model: the denoiser as trained (an Accelerate-prepared wrapper is fine).
            images: ``[B, C, H, W]`` in [-1, 1]; class_labels: ``[B]``.
            generator: this micro-batch's generator (extra batches, noise, timesteps), e.g. ``step_generator``.
            check_finite: raise ``NonFiniteLossError``, naming the term, before anything is updated (one host sync
                per call); False leaves the check to whoever reads the terms (``LossLog``).

        No backward, no optimizer: a custom loop calls ``backward``, ``after_backward``, its optimizer and LR
        scheduler, then ``after_optimizer_step``.
        """
        step, denoise = self._forward(model, images, class_labels, generator)
        zero = torch.zeros((), device=images.device)
        terms = {"loss": denoise, "denoise": denoise.detach(), **{name: zero for name in self.term_names[2:]}}
        loss = denoise
        for method in self.methods:
            for name, term in method.loss_terms(step).items():
                loss, terms[name] = loss + term.added, term.logged
        bare = extract_model_from_parallel(model, keep_torch_compile=False)
        for method in self.methods:
            if method.penalty_in_loss and (value := method.penalty(bare)) is not None:
                loss = loss + value
                terms[method.term] = value
        terms["loss"] = loss
        if check_finite:
            check_terms(torch.stack([terms[k].detach().float() for k in self.term_names]).tolist(), self.term_names)
        return terms

    def _forward(
        self, model: nn.Module, images: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[StepForward, torch.Tensor]:
        """The step's one student forward over real ∪ the methods' extra batches, noised once at uniform t, and the
        denoising loss: the mean over the real rows and the extra rows that join it of mean_pixels (eps -
        eps_theta(x_t, t, y))^2, an extra row counted with its batch's ``denoise_weight`` (1: as a real one)."""
        device, num_real = images.device, images.shape[0]
        extras = [(m.name, b) for m in self.methods if (b := m.extra_batch(num_real, generator, device)) is not None]
        x0, labels, slices, start = images, class_labels, {"real": slice(0, num_real)}, num_real
        if extras:
            x0 = torch.cat([images, *(b.images.to(device, images.dtype) for _, b in extras)])
            labels = torch.cat([class_labels, *(b.labels.to(device) for _, b in extras)])
            for name, b in extras:
                slices[name], start = slice(start, start + b.images.shape[0]), start + b.images.shape[0]
        draw_on = generator.device if generator is not None else device
        noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(device)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=draw_on
        ).to(device)
        for name, b in extras:  # rows with fixed draws (drawn above all the same: the other rows' draws never change)
            if b.noise is not None:
                noise[slices[name]] = b.noise.to(device, noise.dtype)
                t[slices[name]] = b.timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = model(noisy, t, class_labels=labels).sample
        per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
        weights = [b.denoise_weight for _, b in extras]
        if all(w == 1 for w in weights):
            denoise = per_sample.mean()
        elif not any(weights):
            denoise = per_sample[:num_real].mean()
        else:  # the rows that join, each extra row weighted by its batch's denoise_weight, over their count
            w = torch.cat([torch.ones(num_real)] + [torch.full((len(b.labels),), b.denoise_weight) for _, b in extras])
            w = w.to(device)
            denoise = (per_sample * w).sum() / (w > 0).sum()
        return StepForward(noisy, t, labels, noise, pred, slices), denoise

    def after_backward(self, model: nn.Module) -> None:
        """Every method's gradient hook: after the window's backward (and DDP's all-reduce), before clipping and the
        optimizer step. ``model``: the bare model (its ``.grad``s)."""
        for method in self.methods:
            method.after_backward(model)

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        """Call after every optimizer step that happened (not on accumulation micro-steps, not when fp16's scaler
        skipped it), with the step's learning rate: e.g. the decoupled EWC's exact proximal step
        θ ← argmin_θ ½‖θ − θ̃‖² + lr·λ·EWC(θ) (θ̃ the weights the optimizer left)."""
        bare = extract_model_from_parallel(model, keep_torch_compile=False)
        for method in self.methods:
            method.after_optimizer_step(bare, lr)

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
        """The convenience step the training script uses: ``loss`` under ``accelerator.accumulate``, backward, (the
        methods' gradient hooks, clip, optimizer step, ``after_optimizer_step``, EMA update when the accumulation
        window closes). ``measure_penalty``: on a step that closes the window, also report ||grad of the penalties||
        relative to the gradient of the rest of the loss (one extra small backward through the penalties): the
        number that says lambda is too large when it is >> 1 (under FSDP, of this process's shards; not measured
        under fp16's gradient scaler). ``check_finite``: as in ``loss``; the training script passes False and reads
        the terms through a ``LossLog`` every few steps, so that a step never waits for the device."""
        with accelerator.accumulate(model):
            terms = self.loss(model, images, class_labels, generator, check_finite)
            accelerator.backward(terms["loss"])
            # not under fp16's gradient scaler: the gradients are still scaled here, the penalty's would not be
            measure = measure_penalty and accelerator.sync_gradients and accelerator.scaler is None
            ratio = self._penalty_gradient_ratio(bare_model(accelerator, model)) if measure else None
            if accelerator.sync_gradients:
                self.after_backward(bare_model(accelerator, model))
            if accelerator.sync_gradients and self.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
        if stepped:
            self.after_optimizer_step(bare_model(accelerator, model), optimizer.param_groups[0]["lr"])
        if stepped and ema is not None:
            ema.step(model.parameters())
        values = torch.stack([terms[k].detach().float() for k in self.term_names])
        return StepOutput(values, accelerator.sync_gradients, ratio)

    def _penalty_gradient_ratio(self, model: nn.Module) -> float | None:
        """||grad of the penalties|| / ||grad of the other terms||, from the gradients that backward just left (which
        hold the penalties in the loss already)."""
        penalties = [(m.penalty_in_loss, v) for m in self.methods if (v := m.penalty(model)) is not None]
        if not penalties:
            return None
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        grads = [
            torch.autograd.grad(v, params, allow_unused=True) if v.requires_grad else [None] * len(params)
            for _, v in penalties
        ]
        pen_sq, rest_sq = 0.0, 0.0
        for i, p in enumerate(params):
            rest, penalty_grad = local_tensor(p.grad).float(), None
            for (in_loss, _), per_param in zip(penalties, grads):
                g = torch.zeros_like(local_tensor(p.grad)) if per_param[i] is None else local_tensor(per_param[i])
                penalty_grad = g if penalty_grad is None else penalty_grad + g
                rest = rest - g if in_loss else rest
            pen_sq += float(penalty_grad.double().pow(2).sum())
            rest_sq += float(rest.double().pow(2).sum())
        return (pen_sq / rest_sq) ** 0.5 if rest_sq > 0 else float("inf")

    # ------------------------------------------------------------------------------------------- end of a task

    def end_task(self, task: TaskEnd) -> dict:
        """Every method's consolidation at theta*_k = ``task.model`` (whole, unwrapped fp32 weights); returns the
        numbers they report for the task's ``metrics.json``. A method raises ``ValueError`` on a non-finite
        estimate, before it takes it."""
        metrics: dict = {}
        for method in self.methods:
            metrics |= method.end_task(task)
        return metrics

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        """The files the methods add to task folder ``task_index``: name -> safetensors payload or JSON dict."""
        files: dict = {}
        for method in self.methods:
            files |= method.task_files(task_index, classes)
        return files

    def load_task_folder(self, folder, expected: Expected, joining: Sequence[str] = ()) -> dict[str, str]:
        """Every method restores what it wrote into task folder ``expected.finished``, checked against ``expected``
        (``ValueError`` naming the file and the problem); a method named in ``joining`` (the folder's run did not
        use it) starts empty instead (``join``). Returns what each joining method starts with."""
        joined = {}
        for method in self.methods:
            if method.name in joining:
                joined[method.name] = method.join(expected)
            else:
                method.load_task_folder(folder, expected)
        return joined

    def state_dict(self, changing_only: bool = False) -> dict[str, torch.Tensor]:
        """Every method's state under ``<name>.`` (safetensors-ready: ``hf_r1ewc.run.register_methods`` keeps it in
        checkpoints); ``changing_only``: only the methods whose state changes during a task (what a mid-task
        checkpoint must add to the last task folder)."""
        return {
            f"{m.name}.{k}": v
            for m in self.methods
            if m.changes_during_task or not changing_only
            for k, v in m.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected, changing_only: bool = False) -> None:
        """Restore ``state_dict(changing_only)``, every method's part checked against ``expected``: refuses the state
        of a method it does not compose, and a state without the part of a method that ``state_dict`` writes."""
        names = {m.name for m in self.methods}
        unknown = sorted({k.split(".", 1)[0] for k in state} - names)
        if unknown:
            raise ValueError(f"the state holds methods {unknown} that this learner ({sorted(names)}) does not compose")
        for method in self.methods:
            if changing_only and not method.changes_during_task:
                continue
            prefix = method.name + "."
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            try:
                method.load_state_dict(part, expected)
            except ValueError as err:
                raise ValueError(f"{method.name}: {err}") from None


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


def make_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """Adam (the paper), or AdamW when ``weight_decay`` > 0 (diffusers' examples), for parameters trained on
    ``device``: one fused kernel per step on CUDA, the multi-tensor implementation elsewhere (on the CPU it gives the
    per-parameter loop's weights bit for bit, in fewer operator calls)."""
    kwargs = {"lr": lr, "betas": betas, "eps": eps}
    kwargs.update({"fused": True} if torch.device(device).type == "cuda" else {"foreach": True})
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), weight_decay=weight_decay, **kwargs)
    return torch.optim.Adam(model.parameters(), **kwargs)
