"""Which method should I use? The field's continual methods on paired seeds, at the CPU table-1 scale (issue 39).

    python benchmarks/compare_methods.py [--jobs 2] [--phase all|sweep|table|long|report]

The protocol of table1_fmnist_cpu.md (real Fashion-MNIST at 16x16, 5 tasks of 2 classes, the (16, 32, 32) UNet,
40 epochs per task, 100 training images per class, the classifier FID of the long-horizon study), every method of
``--method`` as one run per seed:

1. sweep: each method with a weight runs at 3-4 weights that include the peers' default, on seed 100, which is
   never a comparison seed; the weight with the lowest AFID@5 is chosen, and where it lies at the edge of the range
   the range grows by a decade that way (twice at most);
2. table: every method at its weight on seeds 0-2, paired against GD seed by seed; every method within reach of GD
   after 3 seeds (its mean ΔAFID@5 less than two standard errors above 0) and GD itself run seeds 3 and 4 too;
3. long: the best methods at 5 tasks (ER 20/class, and ER 20/class + rank-1 whose gain over ER the hypothesis asks
   about), each where it beats GD at 5 tasks (paired t, p < 0.05), on the long horizon of long_horizon.md (10 one-class tasks at 1x, seeds 0-4), paired against that study's
   GD records of the same seeds (same flags but the method's, same FID classifier);
4. report: ``benchmarks/results/methods.{md,json}`` and the AFID@k plot, rewritten after every finished run.

Every finished run leaves a record in ``benchmarks/results/methods_runs/`` (committed: its results.json, seconds per
phase and task, the EWC gradient ratio, for GD and the ER runs the drift geometry of ``_runs.drift_geometry``), so
that seeds run in different sessions pool; the run folders (``runs/methods/``) stay on the machine. Rerunning the
command skips recorded runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    RESULTS,
    ROOT,
    SCALES,
    TINY_UNET_CONFIG,
    UNET_CONFIG,
    drift_geometry,
    finished,
    launch,
    provenance,
    tiny_banner,
    train_fid_classifier,
)


sys.path.insert(0, str(ROOT))
from hf_r1ewc.comparison import format_mean_se  # noqa: E402


SWEEP_SEED = 100
SEEDS = (0, 1, 2)
MORE_SEEDS = (3, 4)
RECORDS = RESULTS / "methods_runs"
# the long-horizon study's FID classifier (same data, size and training): one classifier scores every study's runs
CLASSIFIER = RESULTS / "long_horizon_runs" / "fid_classifier"
BASELINE = "GD"
SCALE = SCALES["cpu"]
REPORT = RESULTS / "methods.md"
PER_CLASS = SCALE["per_class"]


@dataclass(frozen=True)
class Entry:
    """One row of the table: a ``--method`` spec, its fixed flags, and the flag swept with its values."""

    spec: str
    flags: tuple[str, ...] = ()
    weight: str | None = None
    values: tuple[float, ...] = ()


ENTRIES = {
    "naive": Entry("naive"),
    "GD": Entry("gd"),
    # lambda as chosen by the table-1 sweep (table1_fmnist_cpu.md, seed 100)
    "rank-1 + GD": Entry("rank1+gd", ("--ewc_lambda", "100")),
    "ER 20/class": Entry("er", ("--er_per_class", "20")),
    # every training image of a class at this scale: the buffer holds the whole data of the seen classes
    f"ER {PER_CLASS}/class": Entry("er", ("--er_per_class", str(PER_CLASS))),
    "ER 20/class + rank-1": Entry("er+rank1", ("--er_per_class", "20"), "ewc_lambda", (10.0, 100.0, 1000.0)),
    "ER 20/class + GD": Entry("er+gd", ("--er_per_class", "20")),
    "A-GEM 20/class": Entry("agem", ("--agem_per_class", "20")),
    "KD": Entry("kd", (), "kd_weight", (0.1, 1.0, 10.0)),
    "L2": Entry("l2", (), "l2_weight", (0.5, 5.0, 50.0, 500.0)),
    "SI": Entry("si", (), "si_weight", (0.05, 0.5, 5.0, 50.0)),
    "MAS": Entry("mas", (), "mas_weight", (0.05, 0.5, 5.0, 50.0)),
    "L2 + GD": Entry("l2+gd", (), "l2_weight", (0.5, 5.0, 50.0, 500.0)),
    "SI + GD": Entry("si+gd", (), "si_weight", (0.05, 0.5, 5.0, 50.0)),
    "MAS + GD": Entry("mas+gd", (), "mas_weight", (0.05, 0.5, 5.0, 50.0)),
    "joint": Entry("joint"),
}
GEOMETRY = ("GD", "ER 20/class", "ER 20/class + rank-1")  # the runs whose drift along old tasks' mu is measured
HYPOTHESIS = ("ER 20/class + rank-1", "ER 20/class")  # does rank-1 EWC complement real replay?
TASKS = [[2 * k, 2 * k + 1] for k in range(5)]
# the long horizon of long_horizon.md: 10 one-class tasks, 47 epochs of 3 batches each (reproduce_table1.long_extra)
LONG_METHODS = ("ER 20/class", "ER 20/class + rank-1")
LONG_RECORDS = RESULTS / "long_horizon_runs"
LONG_TASKS, LONG_EPOCHS = 10, 47
TITLE = "Which method should I use? The field's methods on paired seeds (issue 39)"
SECOND_BASELINE: str | None = None  # the buffer study pairs every row against ER 20/class too

# The buffer study (issue 48, ``--study buffer``): how small may ER's buffer be, and can DER++ or parameter isolation
# beat it, at two data sizes of equal compute (training images per class -> epochs per task: the same optimizer steps)
BUFFER_SIZES = (1, 2, 5, 20)
LORA_RANKS = (2, 8)
DATA_SIZES = {100: 40, 1000: 4}


def folder(label: str, value: float | None, seed: int) -> str:
    slug = label.replace(" + ", "+").replace("/", "per").replace(" ", "_")
    entry = ENTRIES[label]
    return f"{slug}{'' if value is None else f'_{entry.weight}{value:g}'}_seed{seed}"


def record(label: str, value: float | None, seed: int, long: bool = False) -> dict | None:
    path = record_path(label, value, seed, long)
    return json.loads(path.read_text()) if path.exists() else None


def record_path(label: str, value: float | None, seed: int, long: bool = False) -> Path:
    """RECORDS/FOLDER.json; a long-horizon run's beside the long-horizon study's records, as long_FOLDER.json."""
    return (
        LONG_RECORDS / f"long_{folder(label, value, seed)}.json"
        if long
        else RECORDS / f"{folder(label, value, seed)}.json"
    )


def run_folder(label: str, value: float | None, seed: int, long: bool = False) -> str:
    return f"{'long_' if long else ''}{folder(label, value, seed)}"


def flags(label: str, value: float | None) -> list[str]:
    entry = ENTRIES[label]
    return [*entry.flags, *([] if value is None else [f"--{entry.weight}", f"{value:g}"])]


def write_record(work: Path, data_dir: str, label: str, value: float | None, seed: int, long: bool = False) -> None:
    """Keep what the report needs of a finished run (``record_path``), written atomically."""
    from _common import machine

    from hf_r1ewc.integrity import sha256_file

    out = work / "runs" / run_folder(label, value, seed, long)
    num_tasks = LONG_TASKS if long else len(TASKS)
    if not finished(out, num_tasks):
        return
    tasks = range(1, 2 if ENTRIES[label].spec == "joint" else num_tasks + 1)
    metrics = {k: json.loads((out / f"task_{k:02d}" / "metrics.json").read_text()) for k in tasks}
    rec = {
        "label": label,
        "flags": ["--method", ENTRIES[label].spec, *flags(label, value)],
        "results": json.loads((out / "results.json").read_text()),
        "seconds_by_phase": {str(k): m["seconds_by_phase"] for k, m in metrics.items()},
        "ewc_grad_ratio_per_epoch": {str(k): m.get("ewc_grad_ratio_per_epoch", []) for k, m in metrics.items()},
        "geometry": (
            drift_geometry(out, data_dir, SCALE, seed, TASKS)
            if label in GEOMETRY and seed != SWEEP_SEED and not long
            else None
        ),
        "fid_classifier_sha256": sha256_file(work / "fid_classifier" / "model.safetensors"),
        "machine": machine(),
    }
    path = record_path(label, value, seed, long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=str))
    tmp.replace(path)


EXTENSIONS = 2  # decades a sweep may grow past its edge


def sweep(label: str) -> tuple[list[float], float | None]:
    """(the weights to run on SWEEP_SEED, the chosen one or None while runs are missing): the entry's values, grown by
    a decade past the edge where the lowest AFID@5 lies, at most EXTENSIONS times (a best value at the edge of the
    range is not a tuned one)."""
    values = sorted(ENTRIES[label].values)
    for extension in range(EXTENSIONS + 1):
        scores = {v: r["results"]["afid"]["5"] for v in values if (r := record(label, v, SWEEP_SEED))}
        if len(scores) < len(values):
            return values, None
        best = min(scores, key=scores.get)
        if extension == EXTENSIONS or values[0] < best < values[-1]:
            return values, best
        values = [float(f"{best / 10:g}"), *values] if best == values[0] else [*values, float(f"{best * 10:g}")]
    raise AssertionError("unreachable")


def chosen_weights() -> dict[str, float]:
    """Each swept method's chosen weight (``sweep``), once its sweep is recorded."""
    return {label: best for label, e in ENTRIES.items() if e.weight and (best := sweep(label)[1]) is not None}


def comparison_runs(best: dict[str, float]) -> dict[str, dict]:
    """results.json of every recorded comparison run (seeds 0-4), labelled by its table row."""
    runs = {}
    for label, entry in ENTRIES.items():
        if entry.weight and label not in best:
            continue
        value = best.get(label)
        for seed in (*SEEDS, *MORE_SEEDS):
            if rec := record(label, value, seed):
                runs[folder(label, value, seed)] = {**rec["results"], "label": label}
    return runs


def within_reach(paired: dict) -> list[str]:
    """Methods whose mean ΔAFID@5 against GD is less than two standard errors above zero after 3 seeds."""
    return [
        label
        for label, row in paired.items()
        if "afid" in row and len(row["seeds"]) >= 3 and row["afid"]["mean_se"][0] - 2 * row["afid"]["mean_se"][1] < 0
    ]


def train_seconds(label: str, value: float | None, seeds: list[int]) -> float | None:
    """Mean wall seconds per task of a method's runs, without FID and writing (training, the pool, Fisher)."""
    totals = []
    for seed in seeds:
        if rec := record(label, value, seed):
            per_task = rec["seconds_by_phase"].values()
            totals.append(
                sum(s for phases in per_task for p, s in phases.items() if p not in ("FID", "writing the task folder"))
                / len(per_task)
            )
    return sum(totals) / len(totals) if totals else None


def memory(label: str) -> str:
    """Memory beyond the model from methods_cost.json (MB): the spec's own row, or the sum of its components' rows
    (ER's buffer scaled to its size)."""
    path = RESULTS / "methods_cost.json"
    if not path.exists():
        return "—"
    rows = json.loads(path.read_text())["methods"]
    entry = ENTRIES[label]
    if entry.spec in ("naive", "joint"):
        return "0" if entry.spec == "naive" else "the whole data"
    scale = int(entry.flags[entry.flags.index("--er_per_class") + 1]) / 20 if "--er_per_class" in entry.flags else 1
    if entry.spec in rows and scale == 1:
        return f"{rows[entry.spec]['extra_memory_mb']:.2f}"
    parts = entry.spec.split("+")
    if any(p not in rows for p in parts):
        return "—"
    mb = sum(rows[p]["extra_memory_mb"] * (scale if p == "er" else 1) for p in parts)
    return f"{mb:.2f} (sum of parts)"


def write_report(output: Path) -> None:
    """methods.md/.json and the AFID@k plot from the recorded runs (the hand-written reading is kept)."""
    from hf_r1ewc.comparison import aggregate, paired_differences, paired_markdown
    from hf_r1ewc.plots import plot_afid_curves

    best = chosen_weights()
    runs = comparison_runs(best)
    table = aggregate(runs) if runs else {}
    paired = paired_differences(runs, BASELINE) if BASELINE in table else {}
    fmt = lambda pair: format_mean_se(pair, ".1f")  # noqa: E731
    gd_seconds = train_seconds(BASELINE, None, [*SEEDS, *MORE_SEEDS])
    seconds_note = ""  # the buffer study's queues: at 100 per class its GD records are the methods table's
    if SECOND_BASELINE and RECORDS == RESULTS / "methods_runs":
        seconds_note = (
            " Seconds here: the new rows ran two at a time beside other work, GD's records in another session's "
            "queue, so the ratio is indicative only (methods_cost.md times steps in one process)."
        )
    elif SECOND_BASELINE:
        seconds_note = (
            " Seconds here: every row ran two at a time in one queue (methods_cost.md times steps in one process)."
        )
    buffer_note = (  # the buffer study's two columns
        " Data kept: exemplars per class over training images per class. Memory after 5 tasks: exemplars as float32 "
        "model inputs (DER's with their 4 kept draws), GD's teacher and float16 pool, the kept models and adapters "
        "(methods_cost.md), arithmetic from those sizes."
        if SECOND_BASELINE
        else ""
    )
    lines = [
        f"# {TITLE}\n",
        *tiny_banner(SCALE),
        "Real Fashion-MNIST at 16x16, 5 tasks of 2 classes, the model and budget of table1_fmnist_cpu.md "
        f"({json.dumps(SCALE)}); every method paired against GD on the same seeds (task 1 trains "
        "identically for every method of a seed). FID features: the long-horizon study's CNN classifier (NOT "
        "comparable to Inception FID). Weights chosen on seed 100 (sweep below), never on a comparison seed.\n",
        provenance() + "\n",
        "\n## The table\n",
        "ACC: mean sample accuracy over all classes after task 5 (the FID classifier's). Seconds: wall seconds per "
        "task without FID (training, replay pool, Fisher/importances) relative to GD's in the same queue. Memory: "
        "beyond the model at task 2, from methods_cost.md." + buffer_note + seconds_note + "\n",
        "| method | weight | seeds | AFID@5 ↓ | F ↓ | P ↓ | ACC ↑ | BWT ↑ | class KL ↓ | seconds ÷ GD | memory (MB) |"
        + (" data kept | memory after 5 tasks (MB) |" if SECOND_BASELINE else ""),
        "| --- " * (13 if SECOND_BASELINE else 11) + "|",
    ]
    for label, row in table.items():
        entry, value = ENTRIES[label], best.get(label)
        weight = "—" if value is None else f"{entry.weight} {value:g}"
        seconds = train_seconds(label, value, [*SEEDS, *MORE_SEEDS])
        ratio = "—" if seconds is None or not gd_seconds else f"{seconds / gd_seconds:.2f}"
        acc = row.get("accuracy")
        lines.append(
            f"| {label} | {weight} | {row['runs']} | {fmt(row['afid'])} | {fmt(row['forgetting'])} | "
            f"{fmt(row['plasticity'])} | {'—' if acc is None else fmt(tuple(100 * a for a in acc))} | "
            f"{fmt(row['bwt'])} | {format_mean_se(row['class_kl'], '.3f')} | {ratio} | {memory(label)} |"
            + (f" {data_kept(label)} | {memory_after_tasks(label)} |" if SECOND_BASELINE else "")
        )
    if paired:
        lines.append(paired_markdown(paired, BASELINE))
        reach = within_reach(paired)
        lines.append(f"Within reach of GD after 3 seeds (run on 5): {', '.join(reach) or 'none'}.\n")
    lines += ["\n## Weight sweeps (seed 100): AFID@5 / F / P\n", "| method | weight | values |", "| --- | --- | --- |"]
    for label, entry in ENTRIES.items():
        if entry.weight:
            cells = [
                f"{v:g}: {r['results']['afid']['5']:.1f} / {r['results']['forgetting']:.1f} / "
                f"{r['results']['plasticity']:.1f}" + (" (chosen)" if best.get(label) == v else "")
                for v in sweep(label)[0]
                if (r := record(label, v, SWEEP_SEED))
            ]
            lines.append(f"| {label} | {entry.weight} | {'; '.join(cells)} |")
    hypothesis = (
        paired_differences({k: r for k, r in runs.items() if r["label"] in HYPOTHESIS}, HYPOTHESIS[1])
        if all(h in table for h in HYPOTHESIS)
        else {}
    )
    if hypothesis:
        lines.append(paired_markdown(hypothesis, HYPOTHESIS[1]).replace("## Paired", "## The hypothesis: paired"))
    against_er = paired_differences(runs, SECOND_BASELINE) if SECOND_BASELINE in table else {}
    if against_er:
        lines.append(paired_markdown(against_er, SECOND_BASELINE))
        lines += buffer_curve(table, output)
    lines += geometry_lines(best)
    lines += ratio_lines(best)
    long_table, long_paired, long_lines = long_horizon(best, output)
    lines += long_lines
    output.parent.mkdir(parents=True, exist_ok=True)
    curves = {label: row["afid_at_k"] for label, row in table.items() if len(row["afid_at_k"]) > 1}
    if curves:
        plot_afid_curves(curves, output.with_name(output.stem + "_afid_at_k.png"))
        lines.append(f"\n![AFID@k of every method]({output.stem}_afid_at_k.png)")
    reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""
    output.write_text("\n".join(lines) + "\n" + (f"\n## Reading{reading}" if reading else ""))
    output.with_suffix(".json").write_text(
        json.dumps(
            {
                "summary": table,
                "paired": paired,
                "hypothesis": hypothesis,
                "chosen_weights": best,
                **({f"paired_against_{SECOND_BASELINE}": against_er} if SECOND_BASELINE else {}),
                "long_horizon": {"summary": long_table, "paired": long_paired},
            },
            indent=1,
            default=str,
        )
    )


def memory_after_tasks(label: str, classes: int = 10) -> str:
    """What a row keeps beyond the model after the last task, in MB: exemplars (float32 images as the model sees
    them, at most a class's training images; DER's with 2 * 4 kept draws' images each), GD's teacher and pool
    (float16 images of the old classes), and the parameter-isolation methods' kept models and adapters
    (methods_cost.json's measurement after 5 tasks; another LoRA rank scaled linearly from rank 8's); "—" for a
    method that keeps anything else (a penalty's statistics, a teacher without a pool, the whole data)."""
    path = RESULTS / "methods_cost.json"
    cost = json.loads(path.read_text()) if path.exists() else {}
    entry = ENTRIES[label]
    image = 4 * SCALE["resolution"] ** 2  # bytes of a float32 16x16 image
    flags = dict(zip(entry.flags[::2], entry.flags[1::2]))
    mb = 0.0
    parts = entry.spec.split("+")
    if not set(parts) <= {"er", "der", "gd", "lora", "ensemble"}:
        return "—"
    if "er" in parts:
        mb += kept_per_class(flags.get("--er_per_class", "20")) * classes * image / 2**20
    if "der" in parts:
        mb += kept_per_class(flags.get("--der_per_class", "20")) * classes * image * (1 + 2 * 4) / 2**20
    if "gd" in parts:
        model_mb = 4 * cost.get("scale", {}).get("params", 0) / 2**20
        mb += model_mb + SCALE["replay"] * (classes - 2) * image / 2 / 2**20
    isolation = cost.get("parameter_isolation", {}).get(entry.spec)
    if entry.spec in ("lora", "ensemble"):
        if not isolation:
            return "—"
        scale = int(flags.get("--lora_rank", 8)) / 8 if entry.spec == "lora" else 1
        mb += isolation["memory_beyond_one_model_mb"] * scale
    return f"{mb:.2f}"


def data_kept(label: str) -> str:
    """The share of each class's training images that a row keeps as exemplars (ER's and DER's buffers)."""
    entry = ENTRIES[label]
    if entry.spec == "joint":
        return "100 %"
    sizes = [int(entry.flags[i + 1]) for i, f in enumerate(entry.flags) if f in ("--er_per_class", "--der_per_class")]
    if not sizes and entry.spec in ("er", "agem"):
        sizes = [20]
    return f"{100 * kept_per_class(max(sizes, default=0)) / SCALE['per_class']:g} %"


def kept_per_class(exemplars_per_class: int | str) -> int:
    """Exemplars a buffer of that size keeps of each class: all of a class with fewer training images."""
    return min(int(exemplars_per_class), SCALE["per_class"])


def buffer_curve(table: dict, output: Path) -> list[str]:
    """AFID@5 (mean ± SE) against exemplars per class for ER, ER + GD and DER++, GD and the rows without exemplars as
    horizontal lines: OUTPUT_buffer.png, and the line that names it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[tuple[int, float, float]]] = {}
    flat = {}
    for label, row in table.items():
        if size := re.search(r" (\d+)/class", label):
            families.setdefault(label.replace(size.group(0), ""), []).append((int(size.group(1)), *row["afid"]))
        else:
            flat[label] = row["afid"]
    with plt.rc_context({"text.parse_math": False}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for family, points in families.items():
            points.sort()
            xs, ys, ses = zip(*points)
            ax.errorbar(xs, ys, yerr=ses, marker="o", capsize=3, label=family)
        for i, (label, (mean, se)) in enumerate(flat.items()):
            ax.axhline(mean, color=f"C{len(families) + i}", linestyle="--", label=f"{label} ({mean:.1f} ± {se:.1f})")
        ax.margins(y=0.08)  # the highest horizontal line clear of the frame
        ax.set_xscale("log")
        ax.set_xticks(BUFFER_SIZES, [str(n) for n in BUFFER_SIZES])
        ax.set_xlabel("exemplars per class")
        ax.set_ylabel("AFID@5 (lower is better)")
        ax.set_title(f"{SCALE['per_class']} training images per class, {SCALE['epochs']} epochs per task")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output.with_name(output.stem + "_buffer.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return [f"\n![AFID@5 against exemplars per class]({path.name})"]


def ratio_lines(best: dict[str, float]) -> list[str]:
    """How strongly the penalty of HYPOTHESIS[0] pulls: ||grad of the penalty|| / ||grad of the rest of the loss|| at the
    first step of each task's first and last epoch (mean over the seeds recorded)."""
    from hf_r1ewc.metrics import mean_and_standard_error

    label = HYPOTHESIS[0]
    if label not in ENTRIES:
        return []
    per_task: dict[str, list[tuple[float, float]]] = {}
    for seed in (*SEEDS, *MORE_SEEDS):
        if rec := record(label, best.get(label), seed):
            for task, ratios in rec["ewc_grad_ratio_per_epoch"].items():
                if ratios:
                    per_task.setdefault(task, []).append((ratios[0], ratios[-1]))
    if not per_task:
        return []
    ms = lambda xs: format_mean_se(mean_and_standard_error(xs), ".2f")  # noqa: E731
    lines = [
        f"\n## How strongly the penalty pulls: {label}\n",
        "‖∇ λ·EWC‖ / ‖∇ rest of the loss‖ at the first optimizer step of a task's first and last epoch (mean ± SE "
        "over seeds; task 2 starts at θ*_1 itself, so its penalty's gradient is 0 there; later tasks start away from the "
        "earlier anchors).\n",
        "| task | seeds | first epoch | last epoch |",
        "| --- | --- | --- | --- |",
    ]
    for task, pairs in sorted(per_task.items(), key=lambda item: int(item[0])):
        lines.append(f"| {task} | {len(pairs)} | {ms([a for a, _ in pairs])} | {ms([b for _, b in pairs])} |")
    return lines


def geometry_lines(best: dict[str, float]) -> list[str]:
    """Per method of GEOMETRY (mean over seeds): the share of each task's parameter change that lies along the
    earlier tasks' mu, and the first-order loss change of old tasks mu_j^T (theta_5 - theta_j) beside the measured."""
    lines = [
        "\n## Where the drift goes (task folders of seeds 0-4)\n",
        "share: the part of task k's parameter change θ_k − θ_{k−1} inside span(μ_1..μ_{k−1}) (a random direction: "
        "(k−1)/P); μ_jᵀΔ / measured: old task j's first-order loss change μ_jᵀ(θ_5 − θ_j), which rank-1 EWC "
        "penalises, beside the measured ΔL_j (mean over seeds, tasks 1-4).\n",
        "| method | seeds | share along old μ, k = 2..5 | μ_jᵀΔ, j = 1..4 | measured ΔL_j, j = 1..4 |",
        "| --- | --- | --- | --- | --- |",
    ]
    if not any(label in ENTRIES for label in GEOMETRY):
        return []
    for label in (label for label in GEOMETRY if label in ENTRIES):
        geos = [
            rec["geometry"]
            for seed in (*SEEDS, *MORE_SEEDS)
            if (rec := record(label, best.get(label), seed)) and rec.get("geometry")
        ]
        if not geos:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        share = [mean([g["change_along_old_mu"][i]["share"] for g in geos]) for i in range(4)]
        linear = [mean([g["first_order_vs_measured"][j]["linear"] for g in geos]) for j in range(4)]
        measured = [mean([g["first_order_vs_measured"][j]["measured"] for g in geos]) for j in range(4)]
        lines.append(
            f"| {label} | {len(geos)} | {' / '.join(f'{s:.4f}' for s in share)} | "
            f"{' / '.join(f'{v:+.4f}' for v in linear)} | {' / '.join(f'{v:+.4f}' for v in measured)} |"
        )
    return lines


def long_horizon(best: dict[str, float], output: Path) -> tuple[dict, dict, list[str]]:
    """The long-horizon runs of LONG_METHODS beside the long-horizon study's GD records of the same seeds: (aggregate,
    paired differences against GD and against ER, the report's lines); the AFID@k plot beside ``output``."""
    from hf_r1ewc.comparison import aggregate, paired_differences, paired_markdown
    from hf_r1ewc.plots import plot_afid_curves

    runs, shas = {}, set()
    for seed in (*SEEDS, *MORE_SEEDS):
        for label, value, name in [
            (BASELINE, None, f"long_{BASELINE}_seed{seed}"),
            *((m, best.get(m), run_folder(m, best.get(m), seed, long=True)) for m in LONG_METHODS if m in ENTRIES),
        ]:
            path = LONG_RECORDS / f"{name}.json"
            if path.exists():
                rec = json.loads(path.read_text())
                runs[name] = {**rec["results"], "label": label}
                shas.add(rec["fid_classifier_sha256"])
    methods = {r["label"] for r in runs.values()} - {BASELINE}
    if not methods:
        return {}, {}, []
    # the GD records predate results.json's dataset and resolution; they ran the same data and flags
    known = next(r for r in runs.values() if r["label"] != BASELINE)
    for r in runs.values():
        r.setdefault("dataset", known["dataset"])
        r.setdefault("resolution", known["resolution"])
    if len(shas) > 1:
        return {}, {}, ["\n## The long horizon\n", "Records scored by different FID classifiers: not compared.\n"]
    table = aggregate(runs)
    paired = paired_differences(runs, BASELINE)
    hypothesis = (
        paired_differences({k: r for k, r in runs.items() if r["label"] in HYPOTHESIS}, HYPOTHESIS[1])
        if all(h in methods for h in HYPOTHESIS)
        else {}
    )
    fmt = lambda pair: format_mean_se(pair, ".1f")  # noqa: E731
    lines = [
        f"\n## The long horizon: {LONG_TASKS} one-class tasks at 1x\n",
        f"The protocol of long_horizon.md ({LONG_EPOCHS} epochs of 3 batches per one-class task, the same FID "
        "classifier); GD's runs are that study's records of the same seeds, the others differ from them only in "
        "--method and its flags.\n",
        f"| method | seeds | AFID@{LONG_TASKS} ↓ | F ↓ | P ↓ | ACC ↑ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in table.items():
        acc = row.get("accuracy")
        lines.append(
            f"| {label} | {row['runs']} | {fmt(row['afid'])} | {fmt(row['forgetting'])} | {fmt(row['plasticity'])} "
            f"| {'—' if acc is None else fmt(tuple(100 * a for a in acc))} |"
        )
    lines.append(paired_markdown(paired, BASELINE).replace("## Paired", "### Long horizon: paired"))
    if hypothesis:
        lines.append(paired_markdown(hypothesis, HYPOTHESIS[1]).replace("## Paired", "### Long horizon: paired"))
    curves = {label: row["afid_at_k"] for label, row in table.items()}
    plot_afid_curves(curves, output.with_name(output.stem + "_long_afid_at_k.png"))
    lines.append(f"\n![AFID@k on the long horizon]({output.stem}_long_afid_at_k.png)")
    return table, {"against_gd": paired, "against_er": hypothesis}, lines


def beats_baseline(label: str, best: dict[str, float]) -> bool:
    """Whether a method's AFID@5 is below GD's, paired over seeds 0-4, at p < 0.05 (Student's t)."""
    from hf_r1ewc.comparison import paired_differences

    row = paired_differences(comparison_runs(best), BASELINE).get(label, {}).get("afid", {})
    return row.get("mean_se", (0.0, 0.0))[0] < 0 and row.get("t_p", 1.0) < 0.05


def buffer_entries() -> dict[str, Entry]:
    """The buffer study's rows: GD; ER at each of BUFFER_SIZES exemplars per class; ER + GD at the two smallest;
    DER++ (``er+der``, both buffers of one size) at 20 per class with its weight swept."""
    entries = {BASELINE: Entry("gd")}
    for n in BUFFER_SIZES:
        entries[f"ER {n}/class"] = Entry("er", ("--er_per_class", str(n)))
    for n in BUFFER_SIZES[:2]:
        entries[f"ER {n}/class + GD"] = Entry("er+gd", ("--er_per_class", str(n)))
    der = ("--er_per_class", "20", "--der_per_class", "20")
    entries["DER++ 20/class"] = Entry("er+der", der, "der_weight", (0.1, 1.0, 10.0))
    for rank in LORA_RANKS:  # parameter isolation: no exemplars, memory instead
        entries[f"LoRA r{rank}"] = Entry("lora", ("--lora_rank", str(rank)))
    entries["ensemble"] = Entry("ensemble")
    return entries


def der_entries_where_er_wins() -> dict[str, Entry]:
    """DER++ at every buffer below 20 per class where ER beats GD (paired t over 3 seeds or more, p < 0.05), at DER++
    20/class's chosen weight, the smallest of them included (none while ER's rows or the weight are not in)."""
    from hf_r1ewc.comparison import paired_differences

    best = chosen_weights()
    runs = comparison_runs(best)
    if "DER++ 20/class" not in best or BASELINE not in {r["label"] for r in runs.values()}:
        return {}
    paired = paired_differences(runs, BASELINE)
    beating = [
        str(n)
        for n in BUFFER_SIZES[:-1]
        if len((row := paired.get(f"ER {n}/class", {})).get("seeds", ())) >= 3
        and row["afid"]["mean_se"][0] < 0
        and row["afid"]["t_p"] < 0.05
    ]
    weight = f"{best['DER++ 20/class']:g}"
    return {
        f"DER++ {n}/class": Entry("er+der", ("--er_per_class", n, "--der_per_class", n, "--der_weight", weight))
        for n in beating
    }


def use_buffer_study(per_class: int) -> None:
    """``--study buffer --per_class N``: the buffer study's rows at N training images per class (DATA_SIZES[N] epochs),
    records in methods_runs/ at 100 per class (the table's own protocol: its GD and ER 20/class records pool) and in
    methods_runs_Npc/ otherwise; report buffer_study_Npc.md."""
    global SCALE, REPORT, RECORDS, ENTRIES, GEOMETRY, LONG_METHODS, TITLE, SECOND_BASELINE
    SCALE = {**SCALES["cpu"], "per_class": per_class, "epochs": DATA_SIZES[per_class]}
    if per_class != SCALES["cpu"]["per_class"]:
        RECORDS = RESULTS / f"methods_runs_{per_class}pc"
    REPORT = RESULTS / f"buffer_study_{per_class}pc.md"
    GEOMETRY, LONG_METHODS, SECOND_BASELINE = (), (), "ER 20/class"
    TITLE = f"How little replay is enough? ER's buffer, DER++ and GD at {per_class} images per class (issue 48)"
    ENTRIES = buffer_entries()
    ENTRIES.update(der_entries_where_er_wins())


def use_tiny_study(work: Path) -> None:
    """``--tiny``: GD and ER 20/class (the buffer study: and ER 1/class) on seed 0 at the tiny scale (8x8 digits,
    seconds per run), records and report under WORK/results: one pass through queue, records and report that leaves
    the study's own files untouched."""
    global SCALE, REPORT, RECORDS, LONG_RECORDS, SEEDS, MORE_SEEDS, ENTRIES
    SCALE, SEEDS, MORE_SEEDS = SCALES["tiny"], (0,), ()
    ENTRIES = {label: e for label, e in ENTRIES.items() if label in (BASELINE, "ER 1/class", "ER 20/class")}
    REPORT = work / "results" / REPORT.name
    RECORDS, LONG_RECORDS = work / "results" / "methods_runs", work / "results" / "long_horizon_runs"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    p.add_argument("--data_dir", default=None, help="default: Debian's Fashion-MNIST; with --tiny: digits")
    p.add_argument("--work_dir", default=None, help="default: runs/methods (with --tiny: runs/methods_tiny)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="GD and ER on seed 0 with 8x8 digits and a tiny UNet, into WORK_DIR/results: a check that the queue, "
        "the records and the report run (for the tests), not a result",
    )
    p.add_argument(
        "--phase",
        choices=["all", "sweep", "table", "long", "report"],
        default="all",
        help="sweep: the weights on seed 100; table: seeds 0-2, then 3-4 for the methods within reach of GD; "
        "long: ER 20/class and ER + rank-1 on 10 one-class tasks, seeds 0-4 (if they beat GD at 5 tasks); "
        "report: rewrite methods.md from the records only",
    )
    p.add_argument(
        "--study",
        choices=["methods", "buffer"],
        default="methods",
        help="methods: the field's table (methods.md); buffer: ER's buffer sizes, ER + GD and DER++ against GD and ER "
        "20/class (issue 48; buffer_study_Npc.md)",
    )
    p.add_argument(
        "--per_class",
        type=int,
        choices=sorted(DATA_SIZES),
        default=SCALES["cpu"]["per_class"],
        help="--study buffer: training images per class; epochs per task follow (100: 40, 1000: 4, the same steps)",
    )
    args = p.parse_args(argv)
    if args.per_class != SCALES["cpu"]["per_class"] and args.study != "buffer":
        p.error("--per_class is the buffer study's (--study buffer); the methods table runs 100 images per class")
    if args.study == "buffer":
        use_buffer_study(args.per_class)
    work = Path(
        args.work_dir
        or ROOT
        / "runs"
        / ("methods_tiny" if args.tiny else "methods" if args.per_class == 100 else f"methods_{args.per_class}pc")
    )
    data_dir = args.data_dir or ("digits" if args.tiny else "/usr/share/datasets/fashion-mnist")
    if args.tiny:
        use_tiny_study(work)
    if args.phase == "report":
        write_report(REPORT)
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / "unet_config.json").write_text(json.dumps(TINY_UNET_CONFIG if args.tiny else UNET_CONFIG))
    if args.tiny:
        train_fid_classifier(work, data_dir, ["--resolution", str(SCALE["resolution"]), "--resize"])
    elif not (work / "fid_classifier").exists():
        shutil.copytree(CLASSIFIER, work / "fid_classifier")
    lock = threading.Lock()

    def run(job: tuple[str, float | None, int], long: bool = False) -> None:
        label, value, seed = job
        if record(*job, long=long):
            return
        extra = flags(label, value)
        if long:
            extra += ["--classes_per_task", "1", "--num_epochs_per_task", str(LONG_EPOCHS)]
        launch(
            ENTRIES[label].spec,
            None,
            seed,
            work,
            data_dir,
            SCALE,
            work / "runs.log",
            folder=run_folder(*job, long=long),
            extra=extra,
            num_tasks=LONG_TASKS if long else len(TASKS),
        )
        with lock:
            write_record(work, data_dir, *job, long=long)
            write_report(REPORT)

    with ThreadPoolExecutor(args.jobs) as pool:
        while args.phase in ("all", "sweep") and (  # rounds: a sweep grows past its edge once its values are in
            missing := [(label, v, SWEEP_SEED) for label, e in ENTRIES.items() if e.weight for v in sweep(label)[0]]
        ):
            missing = [job for job in missing if not record(*job)]
            if not missing:
                break
            list(pool.map(run, missing))
        if args.phase in ("all", "table"):
            best = chosen_weights()
            jobs = [
                (label, best.get(label), s)
                for s in SEEDS
                for label, e in ENTRIES.items()
                if not e.weight or label in best
            ]
            list(pool.map(run, jobs))
            from hf_r1ewc.comparison import paired_differences

            if args.study == "buffer" and (late := der_entries_where_er_wins().items() - ENTRIES.items()):
                ENTRIES.update(late)  # DER++ where ER beats GD below 20 per class, now that ER's rows are in
                list(pool.map(run, [(label, None, s) for s in SEEDS for label, _ in late]))
            runs = comparison_runs(chosen_weights())
            reach = within_reach(paired_differences(runs, BASELINE))
            if SECOND_BASELINE in {r["label"] for r in runs.values()}:
                reach += [r for r in within_reach(paired_differences(runs, SECOND_BASELINE)) if r not in reach]
            baselines = (BASELINE, *(() if SECOND_BASELINE is None else (SECOND_BASELINE,)))
            more = [(label, best.get(label), s) for s in MORE_SEEDS for label in dict.fromkeys((*baselines, *reach))]
            list(pool.map(run, more))
        if args.phase in ("all", "long"):
            best = chosen_weights()
            labels = [label for label in LONG_METHODS if label in ENTRIES and beats_baseline(label, best)]
            print(f"the long horizon for {labels or 'no method'} (beats GD at 5 tasks, p < 0.05)", flush=True)
            jobs = [(label, best.get(label), s) for s in (*SEEDS, *MORE_SEEDS) for label in labels]
            list(pool.map(lambda job: run(job, long=True), jobs))


if __name__ == "__main__":
    main()
