"""Dark experience replay (DER; Buzzega et al. 2020) for a denoiser.

In classification DER keeps, beside each exemplar, the network's output when the exemplar was stored, and later
matches it. A denoiser's output depends on (t, eps), so here each exemplar keeps ``draws`` fixed draws: when task k
ends, ``per_class`` exemplars of each of its classes join DER's own buffer (``exemplars``, as ER's: indices into the
training split, or the images of a stream), and for each exemplar x0 (class y) and draw j, seeded by the run's seed,
the task and the exemplar's position in the buffer, t_j ~ U{0..T-1}, eps_j ~ N(0, I) and the eps-prediction of
theta*_k at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_j are kept (float32). Each step draws ``batch_size``
(exemplar, draw) pairs uniformly (the step's generator) into the one forward with their kept (t, eps), rows with no
weight in the denoising loss, and adds ``weight * mean over rows and pixels (eps_theta(x_t, t, y) - kept)^2``.
DER++ is ``der+er``: ER's denoising term on its own buffer batch beside it (Buzzega's beta is ``--er_weight``). The
kept noise and predictions are memory: 2 * draws images' worth per exemplar beside the exemplar (counted in
``methods_cost.md``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import SchedulerMixin

from ..distill import distillation_loss
from .base import (
    ContinualMethod,
    Expected,
    ExtraBatch,
    SafetensorsFile,
    StepForward,
    TaskEnd,
    TaskStart,
    Term,
    check_tensors,
    load_task_file,
    refused,
)
from .exemplars import exemplar_buffer


BUFFER_FILE = "der_buffer.json"  # (.safetensors for a streamed run's images)
DRAWS_FILE = "der_draws.safetensors"  # noise [N, K, C, H, W], timesteps [N, K], targets [N, K, C, H, W]


class DarkExperienceReplay(ContinualMethod):
    """DER with ``per_class`` exemplars per seen class, ``draws`` kept (t, eps, prediction) per exemplar, ``weight`` on
    the matching term and ``batch_size`` pairs per step (None: the real batch's size); ``noise_scheduler``: the
    training schedule; ``stream_source``: the streamed dataset's name (None: the training split is in memory)."""

    name = term = "der"
    needs_training_split = True

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        per_class: int = 20,
        weight: float = 1.0,
        draws: int = 4,
        batch_size: int | None = None,
        stream_source: str | None = None,
    ) -> None:
        if not 0 <= weight < float("inf") or draws < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"DER needs a finite weight >= 0, draws >= 1 and batch_size >= 1, got {weight}, {draws}, {batch_size}"
            )
        self.noise_scheduler, self.weight, self.draws, self.batch_size = (
            noise_scheduler,
            float(weight),
            draws,
            batch_size,
        )
        self.buffer = exemplar_buffer(per_class, None, stream_source)
        self.file = Path(BUFFER_FILE).with_suffix(self.buffer.suffix).name
        self.noise = torch.zeros(0)  # [N, K, C, H, W], on the CPU; the step's rows move to the model's device
        self.timesteps = torch.zeros(0, draws, dtype=torch.long)  # [N, K]
        self.targets = torch.zeros(0)  # [N, K, C, H, W]: theta*'s eps-prediction when the exemplar was stored
        self._step_targets: torch.Tensor | None = None  # the targets of the rows extra_batch gave this step

    def label(self) -> str:
        return (
            f"dark experience replay ({self.buffer.per_class} per class, {self.draws} draws, weight {self.weight:g})"
        )

    def settings(self) -> dict:
        return {
            "der_per_class": self.buffer.per_class,
            "der_weight": self.weight,
            "der_draws": self.draws,
            "der_batch_size": self.batch_size,
        }

    def start_task(self, task: TaskStart) -> None:
        self.buffer.gather(task)

    def extra_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> ExtraBatch | None:
        """``batch_size`` (exemplar, draw) pairs, uniform over the buffer's N * K, with their kept (t, eps)."""
        if self.buffer.images is None:
            return None
        n = self.batch_size or batch_size
        draw_on = generator.device if generator is not None else device
        pair = torch.randint(0, len(self.buffer) * self.draws, (n,), generator=generator, device=draw_on).cpu()
        i, j = pair // self.draws, pair % self.draws
        self._step_targets = self.targets[i, j].to(device)
        on = self.buffer.images.device
        images, labels = self.buffer.images[i.to(on)].to(device), self.buffer.labels[i.to(on)].to(device)
        return ExtraBatch(images, labels, 0.0, self.noise[i, j].to(device), self.timesteps[i, j].to(device))

    def loss_terms(self, step: StepForward) -> dict[str, Term]:
        if self._step_targets is None:
            return {}
        der = distillation_loss(step.prediction[step.slices[self.name]], self._step_targets)
        self._step_targets = None
        return {self.term: Term(self.weight * der, der.detach())}

    @torch.no_grad()
    def end_task(self, task: TaskEnd) -> dict:
        """The task's exemplars join the buffer, each with its ``draws`` kept (t, eps, theta*_k's prediction)."""
        held = len(self.buffer)
        self.buffer.add_task(task)
        images, labels = self.buffer.exemplars(held, task.train)
        generators = [
            torch.Generator().manual_seed((task.seed * 1_000_003 + task.task_index) * 1_000_033 + p)
            for p in range(held, held + len(labels))
        ]
        num_train = self.noise_scheduler.config.num_train_timesteps
        t = torch.stack([torch.randint(0, num_train, (self.draws,), generator=g) for g in generators])
        eps = torch.stack([torch.randn(self.draws, *images.shape[1:], generator=g) for g in generators])
        targets = predictions(task.model, self.noise_scheduler, images, labels, eps, t)
        self.noise = torch.cat([self.noise.reshape(-1, *eps.shape[1:]), eps])
        self.timesteps = torch.cat([self.timesteps, t])
        self.targets = torch.cat([self.targets.reshape(-1, *targets.shape[1:]), targets])
        return {"der_buffer_size": len(self.buffer)}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        draws = {"noise": self.noise, "timesteps": self.timesteps, "targets": self.targets}
        return {
            **self.buffer.files(self.file),
            DRAWS_FILE: SafetensorsFile({k: v.contiguous() for k, v in draws.items()}),
        }

    def join(self, expected: Expected) -> str:
        self.buffer.join(expected)
        return "its buffer starts empty: no exemplars of the classes learned so far"

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        self.buffer.load(folder, self.file, expected)
        draws = load_task_file(folder, DRAWS_FILE, "DER's kept draws and predictions")
        try:
            self._take_draws(draws, expected)
        except ValueError as err:
            raise refused(folder, DRAWS_FILE, err) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        buffer = {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}
        return {**buffer, "noise": self.noise, "timesteps": self.timesteps, "targets": self.targets}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        buffer = {k.removeprefix("buffer."): v for k, v in state.items() if k.startswith("buffer.")}
        self.buffer.load_state_dict(buffer, expected)
        self._take_draws({k: v for k, v in state.items() if not k.startswith("buffer.")}, expected)

    def _take_draws(self, draws: dict[str, torch.Tensor], expected: Expected) -> None:
        """noise and targets ``[N, K, C, H, W]`` (N: the buffer's exemplars, K: ``draws``, the model's image shape),
        finite; timesteps ``[N, K]`` integers in [0, T)."""
        n, image = len(self.buffer), expected.sample_shape or tuple(self.noise.shape[2:])
        timesteps = draws.get("timesteps")
        check_tensors(
            {k: v for k, v in draws.items() if k != "timesteps"},
            {k: (n, self.draws, *image) for k in ("noise", "targets")},
        )
        if timesteps is None or timesteps.is_floating_point() or tuple(timesteps.shape) != (n, self.draws):
            raise ValueError(f"timesteps must be integers of shape {[n, self.draws]}")
        num_train = self.noise_scheduler.config.num_train_timesteps
        if n and not (0 <= int(timesteps.min()) and int(timesteps.max()) < num_train):
            raise ValueError(f"timesteps must lie in [0, {num_train})")
        self.noise, self.timesteps, self.targets = draws["noise"].float(), timesteps.long(), draws["targets"].float()


@torch.no_grad()
def predictions(
    model: torch.nn.Module,
    noise_scheduler: SchedulerMixin,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor,
    timesteps: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """eps_theta(x_t, t, y) for every exemplar ``images`` ``[N, C, H, W]`` and draw (``eps`` ``[N, K, C, H, W]``,
    ``timesteps`` ``[N, K]``), float32 ``[N, K, C, H, W]`` on the CPU, in eval mode with autocast off."""
    n, k = timesteps.shape
    device = next(model.parameters()).device
    x0 = images.unsqueeze(1).expand(-1, k, *images.shape[1:]).reshape(n * k, *images.shape[1:])
    y = labels.repeat_interleave(k)
    flat_eps, flat_t = eps.reshape(n * k, *eps.shape[2:]), timesteps.reshape(-1)
    was_training = model.training
    model.eval()
    try:
        out = []
        with torch.autocast(device.type, enabled=False):
            for s in range(0, n * k, chunk):
                part = slice(s, s + chunk)
                t = flat_t[part].to(device)
                x_t = noise_scheduler.add_noise(x0[part].to(device), flat_eps[part].to(device), t)
                out.append(model(x_t, t, class_labels=y[part].to(device)).sample.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).reshape(n, k, *eps.shape[2:]) if out else torch.zeros(0, k, *eps.shape[2:])
