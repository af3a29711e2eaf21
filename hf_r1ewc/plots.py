"""Images and figures written as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """float ``[N, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[rows*(H+p)+p, nrow*(W+p)+p, 3]`` grid on a white border."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = images[i].permute(1, 2, 0).numpy()
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 4) -> None:
    """Write ``image_grid(images, nrow)`` as a PNG, upscaled ``scale`` times (nearest) so small images stay visible."""
    from PIL import Image

    grid = Image.fromarray(image_grid(images, nrow))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def _plain_text(plot: Callable) -> Callable:
    """``plot`` with every text drawn as written: text from users (folder names, labels, method names) is never
    parsed as mathtext or TeX (a '$' in a folder name used to end the report in a ParseFatalException)."""

    @functools.wraps(plot)
    def drawn_as_written(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return plot(*args, **kwargs)

    return drawn_as_written


@_plain_text
def save_labeled_grid(
    images: torch.Tensor, path: str | os.PathLike, row_labels: list[str], column_labels: list[str], title: str = ""
) -> None:
    """Row-major ``[rows * columns, C, H, W]`` images in [-1, 1] as one PNG grid with a label per row and column."""
    plt = _pyplot()
    rows, columns = len(row_labels), len(column_labels)
    if images.shape[0] != rows * columns:
        raise ValueError(f"{images.shape[0]} images do not fill {rows} rows x {columns} columns")
    padding, h, w = 1, images.shape[-2], images.shape[-1]
    grid = image_grid(images, nrow=columns, padding=padding)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * columns, 0.4 + 0.55 * rows))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([padding + c * (w + padding) + w / 2 - 0.5 for c in range(columns)], column_labels, fontsize=7)
    ax.set_yticks([padding + r * (h + padding) + h / 2 - 0.5 for r in range(rows)], row_labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8, pad=16)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@_plain_text
def plot_afid_curves(
    curves: dict[str, dict[int, tuple[float, float]]], path: str | os.PathLike, backend: str = "classifier"
) -> None:
    """AFID@k over tasks, one line per method with a standard-error band (paper fig. 4).
    ``curves[method][k] = (mean, standard_error)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, points in sorted(curves.items()):
        ks = sorted(points)
        mean = np.array([points[k][0] for k in ks])
        se = np.nan_to_num(np.array([points[k][1] for k in ks]))
        ax.plot(ks, mean, marker="o", label=method)
        ax.fill_between(ks, mean - se, mean + se, alpha=0.2)
    ax.set_xlabel("task k")
    ax.set_ylabel(f"AFID@k ({backend} features)")
    ax.set_xticks(sorted({k for points in curves.values() for k in points}))
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_plain_text
def plot_task_fid_curves(matrix: dict[int, dict[int, float]], path: str | os.PathLike, title: str = "") -> None:
    """FID_i(m_k) against k for every task i (paper figs. 7-14)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    tasks = sorted({i for row in matrix.values() for i in row})
    for i in tasks:
        ks = sorted(k for k in matrix if i in matrix[k])
        ax.plot(ks, [matrix[k][i] for k in ks], marker="o", label=f"task {i}")
    ax.set_xlabel("model after task k")
    ax.set_xticks(sorted(matrix))  # whole task numbers, not 1.0, 1.5, ...
    ax.set_ylabel("FID on task i")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_plain_text
def plot_loss_curves(
    curves: dict[str, dict[int, list[float]]],
    path: str | os.PathLike | io.BytesIO,
    y_label: str = "denoising loss (epoch mean)",
) -> None:
    """A per-epoch quantity of every task (log scale), one panel per run: ``curves[run][task] = [value at epoch 1,
    ...]``; by default the training loss."""
    plt = _pyplot()
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, (run, by_task) in zip(axes.flat, sorted(curves.items())):
        for task, losses in sorted(by_task.items()):
            ax.plot(range(1, len(losses) + 1), losses, label=f"task {task}")
        ax.set_title(run, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("epoch", fontsize=7)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(y_label)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@_plain_text
def plot_against(
    panels: dict[str, dict[str, dict[float, tuple[float, float]]]],
    path: str | os.PathLike,
    x_label: str,
    log_x: bool = False,
) -> None:
    """One panel per quantity, one line per method with standard-error bars:
    ``panels[quantity][method][x] = (mean, standard_error)`` (e.g. AFID@T, F and P against steps per task)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (quantity, lines) in zip(axes[0], panels.items()):
        for method, points in sorted(lines.items()):
            xs = sorted(points)
            ax.errorbar(
                xs,
                [points[x][0] for x in xs],
                yerr=np.nan_to_num([points[x][1] for x in xs]),
                marker="o",
                capsize=3,
                label=method,
            )
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
            xs = sorted({x for points in lines.values() for x in points})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_title(quantity, fontsize=9)
    axes[0][0].legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_plain_text
def plot_task_matrix(
    matrix: Mapping[int, Mapping[int, float]], path: str | os.PathLike | io.BytesIO, title: str, percent: bool = False
) -> None:
    """A heatmap of ``matrix[k][i]`` (row k: the model after task k; column i: task i), each value written in its
    cell (as a percentage with ``percent``); missing entries stay blank."""
    plt = _pyplot()
    rows = sorted(matrix)
    columns = sorted({i for row in matrix.values() for i in row})
    values = np.array([[matrix[k].get(i, np.nan) for i in columns] for k in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(columns), 1.0 + 0.4 * len(rows)))
    shown = ax.imshow(values, cmap="viridis" if percent else "viridis_r", aspect="auto")
    for r, c in np.argwhere(~np.isnan(values)):
        text = f"{100 * values[r, c]:.0f}" if percent else f"{values[r, c]:.1f}"
        light = np.mean(shown.cmap(shown.norm(values[r, c]))[:3]) > 0.5
        ax.text(c, r, text, ha="center", va="center", fontsize=6, color="black" if light else "white")
    ax.set_xticks(range(len(columns)), [str(i) for i in columns], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(k) for k in rows], fontsize=7)
    ax.set_xlabel("task i", fontsize=8)
    ax.set_ylabel("model after task k", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def png_rgb(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 ``[H, W, 3]`` (the form trackers take images in)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


GRID_MAX_CLASSES = 10  # samples.png shows 8 samples of at most this many seen classes, chosen evenly


def evenly_chosen(classes: list[int]) -> list[int]:
    """At most GRID_MAX_CLASSES of ``classes``, spread evenly (first and last included): sample grids stay readable
    for 1000 classes."""
    n = min(len(classes), GRID_MAX_CLASSES)
    return [classes[round(i * (len(classes) - 1) / max(1, n - 1))] for i in range(n)]
