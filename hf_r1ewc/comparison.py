"""Comparing runs: group them by method (mean ± standard error of AFID@T, F, P, ACC, BWT, class KL and AFID@k) and
pair them seed by seed against a baseline method (differences, paired t and exact Wilcoxon tests). ``evaluate`` and
``report`` both present these tables."""

from __future__ import annotations

from collections import defaultdict

from .metrics import mean_and_standard_error


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
    BWT and the final model's class KL (classifier backend), and AFID@k for each k."""
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

    by_method: dict[str, dict[int, dict]] = defaultdict(dict)
    for run, results in results_by_run.items():
        if results.get("seed") is None:
            raise ValueError(
                f"{run}: results.json records no seed (written before seeds were recorded); pairing needs it"
            )
        by_method[results.get("label") or results["method"]][int(results["seed"])] = results
    if baseline not in by_method:
        raise ValueError(f"--paired_against {baseline!r} names no method of these runs; methods: {sorted(by_method)}")
    table = {}
    for method, runs in by_method.items():
        seeds = sorted(set(runs) & set(by_method[baseline]))
        if method == baseline or not seeds:
            continue
        row = {"seeds": seeds}
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
        table[method] = row
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
