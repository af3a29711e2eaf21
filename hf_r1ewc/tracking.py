"""What a run shows its trackers (``--report_to``: TensorBoard, W&B, ...): per-task scalars and images, through
Accelerate's trackers, so that one call serves every tracker Accelerate knows."""

from __future__ import annotations

import io
from typing import Callable, Mapping

import numpy as np
import torch

from .metrics import accuracy_summary, summarize
from .pipeline import sample
from .plots import image_grid, plot_task_matrix, png_rgb


def task_scalars(
    matrix: Mapping[int, Mapping[int, float]],
    accuracy: Mapping[int, Mapping[int, float]],
    class_kl: Mapping[int, float],
    task_index: int,
) -> dict[str, float]:
    """The scalars after task k = ``task_index``: ``fid/task_i`` = FID_i(m_k) for each evaluated i, ``afid@k``
    (AFID over tasks 1..k), ``forgetting`` and ``plasticity`` (F and P over tasks 1..k), ``acc`` and ``bwt`` (sample
    accuracy: mean over tasks 1..k, and backward transfer) and ``class_kl`` (of m_k), where recorded. Matrices are
    keyed ``[k][i]``, as ``results.json``."""
    out = {f"fid/task_{i}": fid for i, fid in sorted(matrix.get(task_index, {}).items())}
    summary = summarize({k: row for k, row in matrix.items() if k <= task_index})
    if task_index in summary["afid"]:
        out["afid@k"] = summary["afid"][task_index]
    if "forgetting" in summary:
        out["forgetting"], out["plasticity"] = summary["forgetting"], summary["plasticity"]
    out.update(accuracy_summary({k: row for k, row in accuracy.items() if k <= task_index}))
    if class_kl.get(task_index) is not None:
        out["class_kl"] = class_kl[task_index]
    return out


def matrix_images(
    matrix: Mapping[int, Mapping[int, float]], accuracy: Mapping[int, Mapping[int, float]]
) -> dict[str, np.ndarray]:
    """The FID matrix and (when recorded) the sample-accuracy matrix as heatmaps, uint8 ``[H, W, 3]``."""
    images = {}
    for name, values, title, percent in (
        ("fid_matrix", matrix, "FID_i(m_k)", False),
        ("accuracy_matrix", accuracy, "sample accuracy ACC_i(m_k), %", True),
    ):
        if any(values.values()):
            png = io.BytesIO()
            plot_task_matrix(values, png, title, percent)
            images[name] = png_rgb(png.getvalue())
    return images


def log_images(accelerator, images: Mapping[str, np.ndarray], step: int) -> None:
    """Log uint8 ``[H, W, 3]`` images to every tracker of ``accelerator`` that takes images, each in the form its
    ``log_images`` expects (TensorBoard: a batch of one; W&B, SwanLab: a list; Aim, ClearML: the image)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step, dataformats="NHWC")
        elif tracker.name in ("wandb", "swanlab"):
            tracker.log_images({k: [v] for k, v in images.items()}, step)
        elif tracker.name in ("aim", "clearml"):
            tracker.log_images(dict(images), step)


def sample_grid(
    model: torch.nn.Module,
    scheduler,
    classes: list[int],
    num_inference_steps: int,
    seed: int,
    ema=None,
    serve: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> np.ndarray:
    """8 samples of each of ``classes`` (a row per class) from ``model`` in eval mode, the same noise for the same
    seed, as a uint8 ``[H, W, 3]`` grid; with a diffusers ``EMAModel`` from its averaged weights (of ``model``);
    ``serve``: what samples, around ``model`` (``ContinualLearner.serve``: routed by label). The model's mode and
    weights are restored after."""
    params = list(model.parameters())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    was_training = model.training
    model.eval()
    try:
        labels = torch.tensor(classes).repeat_interleave(8)
        sampled = serve(model) if serve is not None else model
        images = sample(sampled, scheduler, labels, num_inference_steps, torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
        if ema is not None:
            ema.restore(params)
    return grid_image(images)


def grid_image(images: torch.Tensor, min_width: int = 256) -> np.ndarray:
    """Samples ``[N, C, H, W]`` in [-1, 1], 8 per class and class-major, as a uint8 ``[H, W, 3]`` grid with a row per
    class, enlarged (nearest) to at least ``min_width`` pixels so that 8x8 or 28x28 samples stay visible."""
    grid = image_grid(images, nrow=8)
    scale = max(1, -(-min_width // grid.shape[1]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def log_task(accelerator, run, task_index: int, samples: torch.Tensor) -> None:
    """After task k = ``task_index``: ``task_scalars`` of ``run`` (an ``hf_r1ewc.run.RunState``), the grid of
    ``samples`` (``[8 * classes, C, H, W]`` in [-1, 1]) and the FID/accuracy heatmaps, at the run's global step;
    nothing without trackers."""
    if not accelerator.trackers:
        return
    scalars = task_scalars(run.matrix, run.accuracy, run.class_kl, task_index)
    accelerator.log({**scalars, "task": task_index}, step=run.global_step)
    images = {"samples": grid_image(samples), **matrix_images(run.matrix, run.accuracy)}
    log_images(accelerator, images, run.global_step)
