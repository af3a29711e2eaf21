"""The interface of a continual method: a few hooks with typed inputs and outputs, composed by ``ContinualLearner``.

A training loop with a list of methods runs, per task::

    start_task(TaskStart)                  teacher, buffers, adapters (a method may re-initialise task.model)
    per micro-batch:
        extra_batch(...)                   examples that join the step's one forward (replay, exemplars)
        loss_terms(StepForward)            terms computed from that forward (distillation)
        penalty(model)                     a penalty on the weights, in the loss when ``penalty_in_loss``
        after_backward(model)              the gradient, all-reduced, before the optimizer step (gradient surgery)
        after_optimizer_step(model, lr)    after each optimizer step that happened (a proximal step, a path integral)
    end_task(TaskEnd)                      Fisher, importances, buffer update
    task_files() / load_task_folder(dir, expected)
                                           what the task folder keeps of the method (safetensors + JSON only)
    join(expected)                         instead of load_task_folder, for a method the folder's run did not use
    state_dict() / load_state_dict(s, expected)
                                           all of its state (``changes_during_task``: checkpoints keep it too)
    serve(model) / routes(task_index)      parameter isolation: the model that serves every class (routed by
                                           label) around the current task's, and the task folder's routing table

State read from outside (a task folder, perhaps pulled from the Hub with its own digests; a checkpoint) is checked
against ``Expected`` (the model's parameter shapes, the tasks finished, their classes, the training split) and
refused with a ``ValueError`` that names the problem before the method takes any of it: a digest says a file is the
one written, never that its values are valid.

Every hook has a default that does nothing, so a method implements only what it needs. The step's loss is
``denoise(real ∪ joined extra batches) + Σ loss_terms + Σ penalties in the loss`` (docs/method.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

import torch
from accelerate.utils import DynamoBackend
from torch import nn


if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import SchedulerMixin


def compile_like_student(model: nn.Module, accelerator: Accelerator | None) -> nn.Module:
    """``model`` compiled as the ``accelerator`` compiles the model it prepares (``--compile``, ``accelerate launch
    --dynamo_backend``), e.g. a teacher; itself when it compiles nothing."""
    if accelerator is None or accelerator.state.dynamo_plugin.backend == DynamoBackend.NO:
        return model
    return torch.compile(model, **accelerator.state.dynamo_plugin.to_kwargs())


def task_folder_name(task_index: int) -> str:
    """``task_XX`` (two digits, 1-based): task folders and the methods' per-task scratch folders."""
    return f"task_{task_index:02d}"


@dataclass
class TrainingSplit:
    """The whole training split in memory as the model sees it: ``images`` ``[N, C, H, W]`` in [-1, 1], ``labels``
    ``[N]``, and the SHA-256 of the dataset's images and labels (what a method that keeps indices into it checks
    they still point to)."""

    images: torch.Tensor
    labels: torch.Tensor
    sha256: str


@dataclass
class TaskStart:
    """What a method may use as task ``task_index`` (1-based) starts.

    ``model``: the whole fp32 weights theta*_{k-1} the task starts from (gathered under FSDP; copy it to keep it);
    ``old_classes``: the classes of tasks 1..k-1; ``classes``: this task's; ``sampler``: the sampling scheduler of
    replay and samples; ``scratch_dir``: a folder of the run the method may write to (None: keep things in memory);
    ``seed``: the run's seed; ``accelerator``: the distributed context (None: one process)."""

    task_index: int
    model: nn.Module
    old_classes: list[int]
    classes: list[int]
    sampler: SchedulerMixin | None = None
    scratch_dir: Path | None = None
    seed: int = 0
    accelerator: Accelerator | None = None
    show_progress: bool = True
    train: TrainingSplit | None = None  # given to methods with ``needs_training_split`` (None: streamed data)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1


@dataclass
class TaskEnd:
    """What a method may use as task ``task_index`` ends: ``model`` = theta*_k (whole fp32 weights, unwrapped);
    ``batches``: the task's data for statistics, ``(images [B, C, H, W], labels [B], global index [B])`` in a fixed
    order, this process's share; ``num_samples``: how many of them to use (None: all the loader yields); ``seed``:
    the run's seed."""

    task_index: int
    model: nn.Module
    batches: Iterable
    classes: list[int]
    seed: int = 0
    num_samples: int | None = None
    accelerator: Accelerator | None = None
    show_progress: bool = True
    train: TrainingSplit | None = None  # given to methods with ``needs_training_split`` (None: streamed data)

    def reduce_sum(self):
        """The all-reduce of partial sums across processes, or None on one process."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return None
        return lambda t: self.accelerator.reduce(t, "sum")


@dataclass(frozen=True)
class Growth:
    """A label table that grew as the model learned new classes: parameter ``name``'s first axis went from ``old``
    to ``new`` rows, the new rows inserted at row ``at`` (before a null row that stays last, as a DiT's)."""

    name: str
    old: int
    new: int
    at: int

    def grow(self, tensor: torch.Tensor, param_dims: int) -> torch.Tensor:
        """``tensor`` of the parameter's old shape (its last ``param_dims`` axes; leading axes, e.g. a rank-1
        penalty's one per task, kept) with ``new - old`` rows of zeros inserted at ``at``: no Fisher mass,
        importance or drift for rows that no task has trained."""
        axis = tensor.dim() - param_dims
        if tensor.shape[axis] != self.old:
            return tensor
        zeros = tensor.new_zeros((*tensor.shape[:axis], self.new - self.old, *tensor.shape[axis + 1 :]))
        head, tail = tensor.narrow(axis, 0, self.at), tensor.narrow(axis, self.at, self.old - self.at)
        return torch.cat([head, zeros, tail], dim=axis)


@dataclass(frozen=True)
class Expected:
    """What state read from outside must fit before a method takes it: ``shapes`` of the model's trainable
    parameters (name -> shape), how many tasks are ``finished`` (consolidated: k for task folder k, k - 1 for a
    checkpoint within task k), the classes they taught (``seen_classes``, sorted) and the training split in memory
    (None: streamed data)."""

    shapes: dict[str, tuple[int, ...]]
    finished: int
    seen_classes: list[int]
    train: TrainingSplit | None = None
    within_task: bool = False  # a checkpoint's: what changes during a task must be there too
    sample_shape: tuple[int, int, int] | None = None  # (C, R, R) of the model's images, where its config says
    growth: tuple[Growth, ...] = ()  # label tables grown since the state was written (new classes)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        tasks: list[list[int]],
        finished: int,
        train: TrainingSplit | None = None,
        within_task: bool = False,
        growth: tuple[Growth, ...] = (),
    ) -> Expected:
        """For ``model`` (whole, unwrapped) after the first ``finished`` of ``tasks`` (``within_task``: a checkpoint
        of task ``finished + 1``; ``growth``: the label tables grown since the state was written)."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        seen = sorted({c for t in tasks[:finished] for c in t})
        return cls(shapes, finished, seen, train, within_task, sample_shape(model), tuple(growth))

    def before_growth(self) -> dict[str, tuple[int, ...]]:
        """``shapes`` as they were before the label tables grew (a finished task's own model keeps them)."""
        return {**self.shapes, **{g.name: (g.old, *self.shapes[g.name][1:]) for g in self.growth}}

    def grown(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (keys ``<part>.<parameter name>``) written before the label tables grew, with the new rows
        (zeros: ``Growth.grow``) where a tensor holds a grown parameter at its old size."""
        if not self.growth:
            return state
        out = dict(state)
        for g in self.growth:
            dims = len(self.shapes[g.name])
            for key, value in state.items():
                if key == g.name or key.endswith("." + g.name):
                    out[key] = g.grow(value, dims)
        return out

    def prefixed(self, *parts: str) -> dict[str, tuple[int, ...]]:
        """``{part.name: shape}`` for each parameter and part (e.g. ``anchor.<name>``)."""
        return {f"{part}.{n}": shape for part in parts for n, shape in self.shapes.items()}


def sample_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, R, R) of the images ``model`` denoises, from its diffusers config (``in_channels``, ``sample_size``);
    None for a model without one."""
    config = getattr(model, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    if channels is None or size is None:
        return None
    size = size if isinstance(size, int) else size[0]
    return int(channels), int(size), int(size)


def check_tensors(
    state: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    nonnegative: Iterable[str] = (),
) -> None:
    """Refuses (``ValueError``) ``state`` unless it holds exactly the keys of ``shapes``, each a floating-point tensor
    of that shape with finite values (and no negative one for the keys in ``nonnegative``)."""
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"it holds other tensors than this model's parameters need (missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
            f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}): it was written for another model or is damaged"
        )
    nonnegative = set(nonnegative)
    for key, shape in shapes.items():
        value = state[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{key} has shape {list(value.shape)}, the model's needs {list(shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{key} is {value.dtype}, not a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} holds non-finite values (NaN or inf)")
        if key in nonnegative and bool((value < 0).any()):
            raise ValueError(f"{key} holds negative values, which it never has when estimated")


def parameter_parts(
    state: dict[str, torch.Tensor], expected: Expected, parts: Iterable[str], nonnegative: Iterable[str] = ()
) -> dict[str, dict[str, torch.Tensor]]:
    """``state`` (keys ``<part>.<parameter name>``) as ``{part: {name: float32 tensor}}``, after ``check_tensors``:
    exactly those keys, the model's shapes, finite (and >= 0 for the ``nonnegative`` parts)."""
    parts = tuple(parts)
    check_tensors(state, expected.prefixed(*parts), nonnegative=expected.prefixed(*nonnegative))
    return {part: {n: state[f"{part}.{n}"].float().clone() for n in expected.shapes} for part in parts}


def check_count(state: dict[str, torch.Tensor], key: str, low: int = 0, high: int | None = None) -> int:
    """The integer scalar ``state[key]``, refused (``ValueError``) unless it is one, in [low, high]."""
    value = state.get(key)
    if value is None or value.is_floating_point() or value.is_complex() or value.numel() != 1 or value.dim() > 1:
        raise ValueError(
            f"{key} must be an integer scalar, got {None if value is None else (value.dtype, list(value.shape))}"
        )
    count = int(value)
    if count < low or (high is not None and count > high):
        raise ValueError(f"{key} is {count}, outside [{low}, {high if high is not None else 'inf'}]")
    return count


class ExtraBatch(NamedTuple):
    """Examples a method adds to the step's forward: ``images`` float32 ``[R, C, H, W]`` in [-1, 1] and ``labels``
    ``[R]`` on the step's device; ``denoise_weight``: each row's weight in the denoising loss (1: as a real row; 0:
    only forward, for the method's own terms); ``noise`` ``[R, C, H, W]`` and ``timesteps`` ``[R]``: fixed draws for
    these rows (None: the step's own uniform draws)."""

    images: torch.Tensor
    labels: torch.Tensor
    denoise_weight: float = 1.0
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


@dataclass
class StepForward:
    """The step's one student forward over real ∪ extra batches, all ``[B']`` along dim 0: ``noisy`` x_t, the
    ``timesteps``, ``labels``, the ``noise`` eps and the student's ``prediction``; ``slices`` says which rows are
    whose (``"real"``, and each method's name)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor
    prediction: torch.Tensor
    slices: dict[str, slice] = field(default_factory=dict)


class Term(NamedTuple):
    """A loss term: ``added`` to the loss as it is (the method's weight applied) and ``logged`` (its value)."""

    added: torch.Tensor
    logged: torch.Tensor


class SafetensorsFile(NamedTuple):
    """A task-folder file: tensors and string metadata (safetensors: nothing pickled)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None


class ContinualMethod:
    """Base of the continual methods: every hook does nothing. Subclasses set ``name`` (the ``--method`` word) and
    override the hooks they need; ``term`` is the name of the loss term they log (if any)."""

    name: str = "method"
    term: str | None = None
    penalty_in_loss: bool = True  # penalty() joins the loss; False: it acts elsewhere (a proximal step)
    changes_during_task: bool = False  # state_dict() changes between optimizer steps: checkpoints must keep it
    needs_training_split: bool = False  # TaskStart/TaskEnd carry the training split in memory (exemplars)
    isolates_parameters: bool = False  # a model or adapter per task, routed by label: composes with no other method

    def label(self) -> str:
        """What ran, with its weights, for results, cards and ``evaluate``'s grouping."""
        return self.name

    def settings(self) -> dict[str, Any]:
        """The method's settings (JSON values) for the manifest and the model card."""
        return {}

    def start_task(self, task: TaskStart) -> None:
        pass

    def extra_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> ExtraBatch | None:
        return None

    def loss_terms(self, step: StepForward) -> dict[str, Term]:
        return {}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """The weighted penalty on the weights of ``model`` (bare, unwrapped), 0-dim; None when there is none."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        pass

    def end_task(self, task: TaskEnd) -> dict[str, Any]:
        """Consolidate the finished task; returns numbers (JSON) for the task's ``metrics.json``."""
        return {}

    def task_files(self, task_index: int, classes: list[int]) -> dict[str, SafetensorsFile | dict]:
        """Files for the task folder after ``end_task``: name -> safetensors payload or JSON dict."""
        return {}

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        """Restore what ``task_files`` wrote into task folder ``expected.finished`` (to continue after it), checked
        against ``expected`` first; raise ``ValueError`` naming the file and the problem, taking nothing."""

    def join(self, expected: Expected) -> str:
        """Start after ``expected.finished`` tasks that this method did not see (a run continued from a task folder
        adds it): returns what it starts with, for the log; raises ``ValueError`` where it cannot. Default: it
        keeps something of every finished task (a penalty term, an anchor), which the folder's run did not make."""
        raise ValueError(
            f"--method {self.name} keeps something of every finished task, which that run did not make, so it cannot "
            f"join after {expected.finished} tasks: continue with the folder's method (or add only gd, kd, er, agem "
            f"or der)"
        )

    def serve(self, model: nn.Module) -> nn.Module:
        """The model that samples every class learned so far, given ``model``, the current task's (in training, or
        theta*_k before ``end_task``): e.g. a ``pipeline.RoutedDenoiser``. Default: ``model`` serves every class."""
        return model

    def routes(self, task_index: int) -> dict[int, str] | None:
        """After ``end_task``: the task folder's routing table, class -> route (``pipeline.OWN_ROUTE``: the folder's
        own model; another name: ``routes/<name>/``, written by ``task_files``); None: one model serves all."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """Restore ``state_dict()``, checked against ``expected`` first (``ValueError`` naming the problem, nothing
        taken)."""
        if state:
            raise ValueError(f"the {self.name} method keeps no state, got {sorted(state)[:3]}")


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of ``model``'s trainable parameters, keyed as in ``named_parameters()`` (theta* of a task)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_task_file(
    folder: str | os.PathLike, name: str, what: str, expected: Expected | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a method's safetensors file in a task folder (grown with ``expected.grown`` where given: a
    state keyed by parameter); ``ValueError`` naming it (and ``what`` it holds) when it is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / name
    if not path.exists():
        raise ValueError(f"{folder} has no {name} ({what}); copy the whole folder again (or pull it from the Hub)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} cannot be used ({err}); copy the folder again") from None
    return expected.grown(state) if expected is not None else state


def refused(folder: str | os.PathLike, name: str, err: ValueError) -> ValueError:
    """The ``ValueError`` for a task-folder file whose values do not fit the run: names the file and the problem."""
    return ValueError(
        f"{Path(folder) / name} cannot be used: {err}. It does not fit this run (another model, data or "
        f"settings), or it was altered: continue from a task folder this run wrote"
    )


def quadratic_penalty(
    model: nn.Module, anchor: dict[str, torch.Tensor], importance: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """sum_i Omega_i (theta_i - theta*_i)^2 over the parameters of ``anchor`` (Omega = 1 without ``importance``), in
    float32 with autocast off, differentiable in ``model``'s parameters (bare module: names as ``named_parameters``)."""
    named = dict(model.named_parameters())
    device = named[next(iter(anchor))].device
    with torch.autocast(device.type, enabled=False):
        terms = []
        for name, theta_star in anchor.items():
            square = (named[name].float() - theta_star.to(device)).pow(2)
            terms.append((square if importance is None else importance[name].to(device) * square).sum())
        return torch.stack(terms).sum()
