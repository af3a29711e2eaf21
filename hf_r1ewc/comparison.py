"""Comparing runs: group them by method (mean ± standard error of AFID@T, F, P, ACC, BWT, class KL and AFID@k) and
pair them seed by seed against a baseline method (differences, paired t and exact Wilcoxon tests). ``evaluate`` and
``report`` both present these tables."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .metrics import mean_and_standard_error


MAX_TASKS = 100  # matrices, plots and tables grow with the square of the task count: beyond this, refuse


class ResultsError(ValueError):
    """A results.json that is not what the training script writes, with what is wrong and where."""


def check_results(results: object, where: str) -> dict:
    """``results`` if it has the shape the training script writes (method, tasks, FID and accuracy matrices of
    numbers, scalar summaries), else ``ResultsError`` naming the first problem; at most ``MAX_TASKS`` tasks."""

    def bad(what: str) -> ResultsError:
        return ResultsError(
            f"{where}: {what}. It was not written by train_continual_ddpm.py or was altered: re-run "
            "the training command on its folder (it rewrites results.json), or leave the run out"
        )

    def number(value, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            extra = " (NaN and infinities are written as null: the run diverged there)" if value is None else ""
            raise bad(f"{name} is {value!r}, not a finite number{extra}")

    if not isinstance(results, dict):
        raise bad("it is not a JSON object")
    if not isinstance(results.get("method"), str):
        raise bad("it names no method ('method' missing or not a string)")
    tasks = results.get("tasks")
    if (
        not isinstance(tasks, list)
        or not tasks
        or not all(
            isinstance(t, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in t) for t in tasks
        )
    ):
        raise bad("'tasks' is not a list of lists of class ids")
    if len(tasks) > MAX_TASKS:
        raise bad(f"it has {len(tasks)} tasks; reports and comparisons take at most {MAX_TASKS}")
    task_keys = {str(k) for k in range(1, len(tasks) + 1)}
    for key in ("fid", "accuracy"):
        matrix = results.get(key, {})
        if not isinstance(matrix, dict) or not set(matrix) <= task_keys:
            raise bad(f"'{key}' is not a mapping from task numbers 1..{len(tasks)} to rows")
        for k, row in matrix.items():
            if not isinstance(row, dict) or not set(row) <= task_keys:
                raise bad(f"'{key}' row {k} is not a mapping from task numbers to values")
            for i, value in row.items():
                number(value, f"{key}[{k}][{i}]")
    for key in ("afid", "class_kl"):
        curve = results.get(key) or {}
        if not isinstance(curve, dict) or not set(curve) <= task_keys:
            raise bad(f"'{key}' is not a mapping from task numbers to values")
        for k, value in curve.items():
            number(value, f"{key}[{k}]")
    for key in ("forgetting", "plasticity", "bwt", "afid_final"):  # null: not defined (one task, say)
        if results.get(key) is not None:
            number(results[key], key)
    if results.get("seed") is not None and (isinstance(results["seed"], bool) or not isinstance(results["seed"], int)):
        raise bad(f"'seed' is {results['seed']!r}, not an integer")
    return results


def load_run_results(run_dir: str | Path) -> dict:
    """RUN_DIR/results.json, checked (``check_results``), with the run's dataset and resolution taken from its
    ``run_manifest.json`` where results.json (written before they were recorded) lacks them. Raises ``ValueError``."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise ValueError(f"{run_dir} has no results.json (is it a train_continual_ddpm.py output_dir?)")
    try:
        results = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ResultsError(f"{path} cannot be read ({err}); re-run the training command on its folder") from None
    check_results(results, str(path))
    manifest = run_dir / "run_manifest.json"
    if ("dataset" not in results or "resolution" not in results) and manifest.exists():
        try:
            settings = json.loads(manifest.read_text())["settings"]
            results.setdefault("dataset", settings.get("dataset_name") or settings.get("train_data_dir"))
            results.setdefault("resolution", settings.get("resolution"))
        except (ValueError, OSError, KeyError, TypeError):
            pass  # the run's manifest is checked where it is resumed; here it only labels the protocol
    return results


def protocol(results: dict) -> tuple:
    """What must be equal for two runs to be compared: (dataset, number of tasks, FID backend, resolution)."""
    return (results.get("dataset"), len(results["tasks"]), results.get("fid_backend"), results.get("resolution"))


def check_comparable(results_by_run: dict[str, dict]) -> None:
    """``ValueError`` naming the runs of each protocol when the runs do not share one (``protocol``)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for run, results in results_by_run.items():
        groups[protocol(results)].append(run)
    if len(groups) > 1:
        listed = "; ".join(
            f"dataset {d}, {t} tasks, FID backend {b}, resolution {r}: {', '.join(runs)}"
            for (d, t, b, r), runs in groups.items()
        )
        raise ValueError(
            f"these runs cannot be compared, they differ in data, task count, FID backend or resolution ({listed}); "
            f"evaluate each group on its own"
        )


def final_afid(results: dict) -> float | None:
    """AFID@T of a run (the joint run's AFID over all tasks); None while the last task is missing."""
    return (
        results.get("afid_final") if results.get("joint") else results.get("afid", {}).get(str(len(results["tasks"])))
    )


def final_class_kl(results: dict) -> float | None:
    """The class-distribution KL of the final model (classifier backend); None where not recorded."""
    return results.get("class_kl", {}).get(str(len(results["tasks"])))


def aggregate(results_by_run: dict[str, dict]) -> dict:
    """Group runs by method: mean +- standard error of AFID@T, F, P, the mean sample accuracy after the last task,
    BWT and the final model's class KL (classifier backend), and AFID@k for each k. Runs of different protocols
    (``protocol``) are refused with ``ValueError``."""
    check_comparable(results_by_run)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run, results in results_by_run.items():
        groups[results.get("label") or results["method"]].append(results)
    table = {}
    for method, runs in groups.items():
        final = [a for r in runs if (a := final_afid(r)) is not None]
        row = {"runs": len(runs), "afid": mean_and_standard_error(final) if final else None}
        for key in ("forgetting", "plasticity"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = mean_and_standard_error(values) if values else None
        final_accuracy = [
            sum(a.values()) / len(a) for r in runs if (a := r.get("accuracy", {}).get(str(len(r["tasks"]))))
        ]
        row["accuracy"] = mean_and_standard_error(final_accuracy) if final_accuracy else None
        bwt = [r["bwt"] for r in runs if r.get("bwt") is not None]
        row["bwt"] = mean_and_standard_error(bwt) if bwt else None
        kl = [v for r in runs if (v := final_class_kl(r)) is not None]
        row["class_kl"] = mean_and_standard_error(kl) if kl else None
        curve = defaultdict(list)
        for r in runs:
            for k, v in r.get("afid", {}).items():
                curve[int(k)].append(v)
        row["afid_at_k"] = {k: mean_and_standard_error(v) for k, v in sorted(curve.items())}
        row["fid_backend"] = runs[0]["fid_backend"]
        table[method] = row
    return table


PAIRED_METRICS = {"afid": "AFID@T", "forgetting": "F", "plasticity": "P", "bwt": "BWT", "class_kl": "class KL"}
FINAL_VALUE = {"afid": final_afid, "class_kl": final_class_kl}  # the other metrics are results.json keys


def paired_differences(results_by_run: dict[str, dict], baseline: str) -> dict:
    """For each method against ``baseline`` (a method label): the per-seed differences (method - baseline) of AFID@T,
    F and P over the seeds both have, their mean +- standard error, and two paired tests (scipy): Student's t
    (assumes normal differences) and the exact Wilcoxon signed-rank test (no such assumption, but with n seeds its
    smallest two-sided p is 2 / 2^n: 0.0625 for 5, so it cannot reach 0.05 below 6 seeds). Runs need a ``seed``."""
    from scipy.stats import ttest_rel, wilcoxon

    check_comparable(results_by_run)
    by_method: dict[str, dict[int, dict]] = defaultdict(dict)
    run_of: dict[tuple[str, int], str] = {}
    for run, results in results_by_run.items():
        if results.get("seed") is None:
            raise ValueError(
                f"{run}: results.json records no seed (written before seeds were recorded); pairing needs it"
            )
        method, seed = results.get("label") or results["method"], int(results["seed"])
        if (method, seed) in run_of:
            raise ValueError(
                f"{run_of[method, seed]} and {run} are both {method!r} with seed {seed}: a pairing takes one run per "
                f"method and seed; leave one out"
            )
        run_of[method, seed] = run
        by_method[method][seed] = results
    if baseline not in by_method:
        raise ValueError(f"--paired_against {baseline!r} names no method of these runs; methods: {sorted(by_method)}")
    table = {}
    for method, runs in by_method.items():
        if method == baseline:
            continue
        seeds = sorted(set(runs) & set(by_method[baseline]))
        row = {"seeds": seeds, "unpaired_seeds": sorted(set(runs) - set(by_method[baseline]))}
        table[method] = row
        if not seeds:
            continue
        for key in PAIRED_METRICS:
            get = FINAL_VALUE.get(key, lambda r, key=key: r.get(key))
            pairs = [(get(runs[s]), get(by_method[baseline][s])) for s in seeds]
            if any(a is None or b is None for a, b in pairs):
                continue
            diffs = [a - b for a, b in pairs]
            entry = {"differences": diffs, "mean_se": mean_and_standard_error(diffs)}
            if len(seeds) >= 2 and any(diffs):
                entry["t"], entry["t_p"] = (float(v) for v in ttest_rel([a for a, _ in pairs], [b for _, b in pairs]))
                entry["wilcoxon_p"] = float(wilcoxon(diffs, method="exact").pvalue)
            row[key] = entry
    return table


def paired_markdown(table: dict, baseline: str) -> str:
    """The paired table: one row per method, per metric the mean difference +- SE, t's p and Wilcoxon's p."""
    lines = [
        f"\n## Paired against {baseline} (method − {baseline}, per seed; negative = better)\n",
        "| method | seeds | " + " | ".join(f"Δ{name} (p_t, p_W)" for name in PAIRED_METRICS.values()) + " |",
        "| --- | --- |" + " --- |" * len(PAIRED_METRICS),
    ]
    for method, row in table.items():
        cells = []
        for key in PAIRED_METRICS:
            e = row.get(key)
            if e is None:
                cells.append("—")
                continue
            tests = f" ({e['t_p']:.3f}, {e['wilcoxon_p']:.3f})" if "t_p" in e else ""
            cells.append(format_mean_se(e["mean_se"]) + tests)
        lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    unpaired = [f"{m} (seeds {r['unpaired_seeds']})" for m, r in table.items() if r.get("unpaired_seeds")]
    if unpaired:
        lines.append(
            f"\nUnpaired (no {baseline} run of the same seed, left out of the differences): {'; '.join(unpaired)}."
        )
    n = max((len(r["seeds"]) for r in table.values()), default=0)
    lines.append(
        f"\np_t: paired t-test (two-sided); p_W: exact Wilcoxon signed-rank test, whose smallest possible p "
        f"with {n} seeds is {2 / 2**n:.4f}"
        + (
            " — it cannot show significance at 0.05 with so few seeds; "
            "read p_t, which assumes roughly normal differences"
            if n and 2 / 2**n > 0.05
            else ""
        )
        + ".\n"
    )
    return "\n".join(lines)


def format_mean_se(pair: tuple[float, float] | None, spec: str = ".2f") -> str:
    """``(mean, standard error)`` as "mean ± SE" with the format ``spec`` ("mean" alone when the error is NaN: one
    run; "—" for None)."""
    if pair is None:
        return "—"
    mean, se = pair
    return f"{mean:{spec}} ± {se:{spec}}" if se == se else f"{mean:{spec}}"
