"""One page to look at runs: ``report.html``, self-contained (every figure embedded as a PNG data URI, no server, no
file beside it), written at the end of every run and by ``python -m hf_r1ewc.evaluate report RUN_DIR ...``."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from .comparison import PAIRED_METRICS, aggregate, format_mean_se, load_run_results, paired_differences
from .metrics import matrix_from_json, run_summary_table
from .plots import plot_afid_curves, plot_loss_curves, plot_task_matrix


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222 }
h1 { font-size: 1.5em } h2 { border-bottom: 1px solid #ccc; margin-top: 2em } h3 { font-size: 1.05em }
table { border-collapse: collapse; margin: .5em 0 } td, th { border: 1px solid #ddd; padding: 3px 8px }
th { background: #f4f4f4 } td.n { text-align: right; font-variant-numeric: tabular-nums }
img { max-width: 100%; image-rendering: pixelated }
figure { display: inline-block; margin: .3em 1em .3em 0; vertical-align: top }
figcaption { font-size: .85em; color: #555 } pre { background: #f7f7f7; padding: .6em; white-space: pre-wrap }
.note { color: #555; font-size: .9em }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _png(draw: Callable[[io.BytesIO], None]) -> str:
    """A figure drawn by ``draw(buffer)`` as a PNG data URI."""
    buffer = io.BytesIO()
    draw(buffer)
    return _data_uri(buffer.getvalue())


def _file_png(path: Path) -> str:
    return _data_uri(path.read_bytes())


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f'<td class="n">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _task_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.json of every task folder of a run, by task number."""
    out = {}
    for folder in sorted(run_dir.glob("task_[0-9][0-9]")):
        if (folder / "metrics.json").exists():
            out[int(folder.name[5:])] = json.loads((folder / "metrics.json").read_text())
    return out


def run_section(run_dir: Path) -> str:
    """One run: its settings, the samples after each task, the FID and accuracy matrices, AFID@k, the summary
    table, loss and penalty-gradient curves per task, and the Fisher per task."""
    results = json.loads((run_dir / "results.json").read_text())
    tasks = _task_metrics(run_dir)
    matrix = matrix_from_json(results.get("fid", {}))
    accuracy = matrix_from_json(results.get("accuracy", {}))
    title = f"{run_dir.name}: {results['method']}, seed {results.get('seed')}"
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if matrix:
        class_kl = {int(k): v for k, v in results.get("class_kl", {}).items()}
        names = {int(k): v for k, v in results.get("class_names", {}).items()}
        summary = run_summary_table(matrix, accuracy, results["tasks"], class_kl, names)
        parts.append(f"<pre>{html.escape(summary)}</pre>")
    if (run_dir / "samples_by_task.png").exists():
        parts.append(_figure(_file_png(run_dir / "samples_by_task.png"), "classes (rows) x the model after each task"))
    samples = [
        _figure(_file_png(run_dir / f"task_{k:02d}" / "samples.png"), f"after task {k}")
        for k in tasks
        if (run_dir / f"task_{k:02d}" / "samples.png").exists()
    ]
    if samples:
        parts += ["<h3>Samples of the classes seen so far, after each task</h3>", *samples]
    figures = []
    if any(matrix.values()):
        figures.append(_figure(_png(lambda b: plot_task_matrix(matrix, b, "FID_i(m_k)")), "FID matrix"))
        afid = {int(k): (v, float("nan")) for k, v in results.get("afid", {}).items()}
        if afid:
            backend = results.get("fid_backend", "classifier")
            figures.append(_figure(_png(lambda b: plot_afid_curves({run_dir.name: afid}, b, backend)), "AFID@k"))
    if any(accuracy.values()):
        draw = lambda b: plot_task_matrix(accuracy, b, "sample accuracy ACC_i(m_k), %", percent=True)  # noqa: E731
        figures.append(_figure(_png(draw), "accuracy matrix"))
    losses = {k: m["loss_per_epoch"] for k, m in tasks.items() if m.get("loss_per_epoch")}
    if losses:
        draw = lambda b: plot_loss_curves({run_dir.name: losses}, b, "training loss (epoch mean)")  # noqa: E731
        figures.append(_figure(_png(draw), "loss per epoch, by task"))
    ratios = {k: m.get("ewc_grad_ratio_per_epoch") or [] for k, m in tasks.items()}
    ratios = {k: r for k, r in ratios.items() if any(v > 0 for v in r)}  # log scale: 0 at θ*_{k-1} exactly
    if ratios:
        draw = lambda b: plot_loss_curves({run_dir.name: ratios}, b, "||grad λ·EWC|| / ||grad rest||")  # noqa: E731
        figures.append(_figure(_png(draw), "penalty-gradient ratio at each epoch's first step"))
    if figures:
        parts += ["<h3>Figures</h3>", *figures]
    fisher = [(k, m.get("c_star"), m.get("mu_norm")) for k, m in tasks.items() if m.get("c_star") is not None]
    if fisher:
        parts += [
            "<h3>Fisher at the end of each task</h3>",
            '<p class="note">rank-1 Fisher F ≈ c*·μμᵀ: μ the mean per-sample gradient at θ*_k, c* its scale.</p>',
            _table(["task", "c*", "‖μ‖"], fisher),
        ]
    manifest = run_dir / "run_manifest.json"
    if manifest.exists():
        settings = json.loads(manifest.read_text()).get("settings", {})
        rows = [(k, json.dumps(v)) for k, v in sorted(settings.items())]
        parts += ["<details><summary>Settings (run_manifest.json)</summary>", _table(["setting", "value"], rows)]
        parts.append("</details>")
    return "\n".join(parts)


def comparison_section(runs: dict[str, dict], paired_against: str | None) -> str:
    """Several runs: mean ± SE per method (evaluate's aggregation), AFID@k per method, and with ``paired_against``
    the per-seed differences against that method."""
    table = aggregate(runs)
    header = ["method", "runs", "AFID@T", "F", "P", "ACC", "BWT", "class KL"]
    rows = [
        (
            m,
            r["runs"],
            *(format_mean_se(r[k]) for k in ("afid", "forgetting", "plasticity", "accuracy", "bwt", "class_kl")),
        )
        for m, r in table.items()
    ]
    parts = ["<h2>Comparison (mean ± standard error over runs)</h2>", _table(header, rows)]
    curves = {m: r["afid_at_k"] for m, r in table.items() if r["afid_at_k"]}
    if curves:
        parts.append(_figure(_png(lambda b: plot_afid_curves(curves, b)), "AFID@k per method"))
    if paired_against:
        paired = paired_differences(runs, paired_against)
        header = ["method", "seeds", *(f"Δ{name} (p_t)" for name in PAIRED_METRICS.values())]
        rows = [
            (
                m,
                len(r["seeds"]),
                *(
                    format_mean_se(e["mean_se"]) + (f" ({e['t_p']:.3f})" if "t_p" in e else "")
                    if (e := r.get(k))
                    else "—"
                    for k in PAIRED_METRICS
                ),
            )
            for m, r in paired.items()
        ]
        parts += [
            f"<h3>Paired against {html.escape(paired_against)} (method − it, per seed)</h3>",
            _table(header, rows),
        ]
    return "\n".join(parts)


def write_report(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, paired_against: str | None = None):
    """``output`` (an HTML file) for the runs in ``run_dirs`` (each with ``results.json``); written atomically.
    Returns its path. Raises ``ValueError`` for a folder without results, results not as the training script writes
    them, and runs that cannot be compared."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = {}
    for run_dir in run_dirs:
        runs[str(run_dir)] = load_run_results(run_dir)
    sections = [comparison_section(runs, paired_against)] if len(runs) > 1 else []
    sections += [run_section(d) for d in run_dirs]
    title = "Continual DDPM: " + ", ".join(d.name for d in run_dirs)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output
