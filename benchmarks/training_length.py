"""Training length at the CPU table-1 scale: does in-loss lambda = 15000 become usable as tasks converge, and does
decoupling keep its edge there? (issue 18)

    python benchmarks/training_length.py [--jobs 2] [--lengths 1,3,9] [--seeds 0,1,2] [--methods ...] [--report_only]

Every run is one ``train_continual_ddpm.py`` process in runs/table1 (sharing the classifier FID features and
reference statistics of ``reproduce_table1.py``). Three parts:

1. task 1 alone (``--tasks 0,1``) at 1x, 3x, 9x and 27x the CPU scale's 280 optimizer steps per task: the Fisher's
   ||mu|| and c*, the rank-1 penalty's curvature along its direction (lambda c* ||mu||^2: the penalty is
   lambda/2 c* (mu . (theta - theta*))^2) and FID_1(m_1), per seed. Cheap (no replay), so it reaches 27x;
2. the 5-task runs of GD, rank-1 + GD (lambda 15000 in the loss), decoupled rank-1 + GD (lambda 15000) and diag + GD
   (lambda 15000 in the loss) at each of ``--lengths``: AFID@5, F, P and, per task, ||mu||, c* and the penalty's
   gradient relative to the rest of the loss at the first step of the next task's second epoch
   (``ewc_grad_ratio_per_epoch[1]`` in metrics.json; at the very first step the weights are theta*_k itself).

3. a lambda rule (item 3) that needs no sweep: rank-1 + GD in the loss at lambda = D / (2 L), L being GD's task-1
   denoising loss over its last quarter of epochs and D the pixels per image, on the paired study's seeds 0-4 at 1x,
   paired against GD beside the paired study's lambda = 100 (the sweep's best), lambda = 15000 and decoupled.

Part 1 runs first; part 2 is queued seed by seed (every method of a seed, then the next seed), so a study cut short
still pairs. Re-running the command resumes (finished runs are skipped, interrupted ones continue from their
checkpoints); ``--report_only`` writes benchmarks/results/training_length.{md,json} and the plots from what has
finished, saying which cells are missing. 1x runs of the paired study made before the penalty-gradient ratio was
recorded are rerun into ``*_r`` folders (the same flags, so the same numbers, plus the ratio).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    PAPER_LAMBDA,
    RESULTS,
    ROOT,
    SCALES,
    TINY_UNET_CONFIG,
    UNET_CONFIG,
    finished,
    launch,
    provenance,
    run_dir_name,
    tiny_banner,
    train_fid_classifier,
)


sys.path.insert(0, str(ROOT))
from hf_r1ewc.comparison import format_mean_se  # noqa: E402


METHODS = [
    ("GD", None),
    ("rank-1 + GD", PAPER_LAMBDA),
    ("decoupled rank-1 + GD", PAPER_LAMBDA),
    ("diag + GD", PAPER_LAMBDA),
]
TASK1_LENGTHS = (1, 3, 9, 27)
BASE = SCALES["cpu"]
STEPS_PER_TASK = BASE["epochs"] * -(-2 * BASE["per_class"] // BASE["batch"])  # 40 epochs x 7 batches = 280
PIXELS = BASE["resolution"] ** 2  # D: Fashion-MNIST is one channel
RULE_SEEDS = (0, 1, 2, 3, 4)  # the paired study's seeds
SWEEP_BEST_LAMBDA = 100.0  # in-loss rank-1 + GD, table1_fmnist_cpu.md's sweep (seed 100)


def final_loss(metrics: dict) -> float:
    """The denoising loss over the last quarter of a task's epochs (one epoch's loss is noisy: 32-image batches)."""
    losses = metrics["denoise_loss_per_epoch"]
    quarter = max(1, len(losses) // 4)  # (a run of fewer than 4 epochs: its last epoch)
    return sum(losses[-quarter:]) / quarter


def rule_lambda(loss: float) -> float:
    """Item 3's candidate: lambda = D / (2 L), to 2 significant digits. For the per-pixel-mean MSE with residuals of
    variance L, the per-sample gradient is (2/D) J^T r, so the empirical Fisher is ~ (2L/D) G with G = (2/D) E[J^T J]
    the loss's Gauss-Newton curvature. At this lambda the penalty's curvature along mu is task 1's own loss curvature
    there: the old task weighs as much as the new one (kappa = 1 in lambda = kappa D / (2L)). No sweep needed."""
    return float(f"{PIXELS / (2 * loss):.2g}")


def rule_lambda_of_study(work: Path) -> float | None:
    """rule_lambda of GD's mean task-1 loss over RULE_SEEDS at 1x; None until those runs have finished."""
    paths = [work / "runs" / run_dir_name("GD", None, s) / "task_01" / "metrics.json" for s in RULE_SEEDS]
    if not all(p.exists() for p in paths):
        return None
    return rule_lambda(sum(final_loss(json.loads(p.read_text())) for p in paths) / len(paths))


def scale_at(length: int) -> dict:
    """The CPU table-1 scale with ``length`` x the epochs (optimizer steps) per task."""
    return {**BASE, "epochs": BASE["epochs"] * length}


def has_ratio_record(out: Path) -> bool:
    path = out / "task_02" / "metrics.json"
    return path.exists() and "ewc_grad_ratio_per_epoch" in json.loads(path.read_text())


def run_folder(work: Path, name: str, lam: float | None, seed: int, length: int, rerun: bool = False) -> str:
    """Longer runs carry ``_x{length}``. 1x is the paired study's folder; ``rerun``: its ``*_r`` rerun when that
    folder predates the ratio record (GD has no penalty, so nothing to rerun). Reports prefer a finished rerun."""
    base = run_dir_name(name, lam, seed)
    if length != 1:
        return f"{base}_x{length}"
    paired = work / "runs" / base
    if lam is None or not finished(paired) or has_ratio_record(paired):
        return base
    return f"{base}_r" if rerun or finished(work / "runs" / f"{base}_r") else base


def task1_folder(seed: int, length: int) -> str:
    return f"task1_only_seed{seed}_x{length}"


def run_all(work: Path, data_dir: str, jobs: int, lengths: list[int], seeds: list[int], methods: list[str]) -> None:
    log = work / "runs.log"
    task1_jobs = [
        dict(
            name="rank-1 + GD",
            lam=PAPER_LAMBDA,
            seed=s,
            length=k,
            sc=scale_at(k),
            folder=task1_folder(s, k),
            extra=["--tasks", "0,1"],
            num_tasks=1,
        )
        for k in TASK1_LENGTHS
        for s in seeds
    ]
    study_jobs = [
        dict(name=m, lam=lam, seed=s, length=k, sc=scale_at(k), folder=run_folder(work, m, lam, s, k, rerun=True))
        for k in sorted(lengths)
        for s in seeds
        for m, lam in METHODS
        if m in methods
    ]
    lam = rule_lambda_of_study(work)
    if lam is None:
        print("lambda rule: GD's 1x runs on seeds 0-4 (reproduce_table1.py --phase paired) are not finished; skipped")
    rule_jobs = [
        dict(name="rank-1 + GD", lam=lam, seed=s, length=1, sc=BASE, folder=run_dir_name("rank-1 + GD", lam, s))
        for s in (RULE_SEEDS if lam is not None else ())
    ]

    def priority(job: dict) -> int:
        """Task 1 alone up to 9x; the 5-task runs up to 3x (1x where the paired study has none); the 1x reruns that
        only add the ratio record; task 1 alone at 27x; the longer 5-task runs. Seed by seed within each."""
        if job.get("num_tasks") == 1:
            return 0 if job["length"] <= 9 else 3
        return 4 if job["length"] > 3 else 2 if job["folder"].endswith("_r") else 1

    queue = sorted(task1_jobs + study_jobs + rule_jobs, key=lambda j: (priority(j), j["seed"], j["length"]))
    with ThreadPoolExecutor(jobs) as pool:
        list(
            pool.map(
                lambda j: launch(
                    j["name"],
                    j["lam"],
                    j["seed"],
                    work,
                    data_dir,
                    j["sc"],
                    log,
                    folder=j["folder"],
                    extra=j.get("extra", ()),
                    num_tasks=j.get("num_tasks", 5),
                ),
                queue,
            )
        )


def fisher_signal(work: Path, folder: str, per_class: int | None = None) -> dict:
    """Is the task-1 Fisher's mu signal or estimation noise? A re-estimate (mu and the diagonal, one (t, eps) per
    image) on the run's task-1 training images: ||mu||^2 against its sampling-noise floor (tr F - ||mu||^2) / N
    (the expected ||mu_hat||^2 when the true mean gradient is 0), and tr F. Cached in work/fisher_signal.json."""
    import torch

    from hf_r1ewc.data import images_to_model_input, load_labeled_images
    from hf_r1ewc.fisher import estimate_fisher
    from hf_r1ewc.models import training_noise_scheduler
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    cache_path = work / "fisher_signal.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if folder not in cache:
        state = json.loads((work / "runs" / folder / "task_01" / "training_state.json").read_text())
        config, per_class = state["run_config"], per_class or BASE["per_class"]
        train = load_labeled_images(config["train_data_dir"] or config["dataset_name"], "train").subset([0, 1])
        idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:per_class] for c in (0, 1)])
        x0, y = images_to_model_input(train.images[idx], BASE["resolution"], True), train.labels[idx]
        model = ClassConditionalPipeline.from_pretrained(work / "runs" / folder / "task_01").denoiser.eval()
        stats = estimate_fisher(
            model,
            training_noise_scheduler(),
            [(x0[i : i + 50], y[i : i + 50]) for i in range(0, len(y), 50)],
            kinds=("rank1", "diag"),
            generator=torch.Generator().manual_seed(1),
            show_progress=False,
        )
        mu2 = sum(float(v.double().pow(2).sum()) for v in stats.mu.values())
        trace = sum(float(v.double().sum()) for v in stats.diag.values())
        cache[folder] = {"trace_F": trace, "mu_sq_over_noise_floor": mu2 / ((trace - mu2) / len(y))}
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[folder]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def report(work: Path, lengths: list[int], seeds: list[int]) -> None:
    from hf_r1ewc.comparison import paired_differences, paired_markdown
    from hf_r1ewc.metrics import mean_and_standard_error as mse
    from hf_r1ewc.plots import plot_against

    runs = work / "runs"
    # ---- part 1: task 1 alone
    task1 = {}
    for k in TASK1_LENGTHS:
        rows = [m for s in seeds if (m := read_json(runs / task1_folder(s, k) / "task_01" / "metrics.json"))]
        if rows:
            signal = [
                fisher_signal(work, task1_folder(s, k))
                for s in seeds
                if (runs / task1_folder(s, k) / "task_01" / "metrics.json").exists()
            ]
            task1[k] = {
                "seeds": len(rows),
                "mu_norm": mse([r["mu_norm"] for r in rows]),
                "trace_F": mse([x["trace_F"] for x in signal]),
                "mu_sq_over_noise_floor": mse([x["mu_sq_over_noise_floor"] for x in signal]),
                "c_star": mse([r["c_star"] for r in rows]),
                "stiffness": mse([PAPER_LAMBDA * r["c_star"] * r["mu_norm"] ** 2 for r in rows]),
                "fid_1": mse([r["fid"]["1"] for r in rows]),
                "final_denoise_loss": mse([final_loss(r) for r in rows]),
                "rule_lambda": mse([rule_lambda(final_loss(r)) for r in rows]),
            }
    # ---- part 2: the 5-task runs
    study, per_task, results_by_run = {}, {}, {}
    for k in lengths:
        for name, lam in METHODS:
            outs = [runs / run_folder(work, name, lam, s, k) for s in seeds]
            done = [o for o in outs if finished(o)]
            if not done:
                continue
            res = [json.loads((o / "results.json").read_text()) for o in done]
            for o, r in zip(done, res):
                results_by_run[str(o)] = {**r, "label": f"{name} @ {k}x"}
            study.setdefault(name, {})[k] = {
                "seeds": [r["seed"] for r in res],
                "afid": mse([r["afid"]["5"] for r in res]),
                "forgetting": mse([r["forgetting"] for r in res]),
                "plasticity": mse([r["plasticity"] for r in res]),
            }
            tasks = {}
            for t in range(1, 6):
                ms = [m for o in done if (m := read_json(o / f"task_{t:02d}" / "metrics.json"))]
                nxt = [m for o in done if (m := read_json(o / f"task_{t + 1:02d}" / "metrics.json"))]
                ratios = [
                    m["ewc_grad_ratio_per_epoch"][1] for m in nxt if len(m.get("ewc_grad_ratio_per_epoch") or []) > 1
                ]
                tasks[t] = {
                    "mu_norm": mse([m["mu_norm"] for m in ms]) if ms and ms[0].get("mu_norm") else None,
                    "c_star": mse([m["c_star"] for m in ms]) if ms and ms[0].get("c_star") else None,
                    "grad_ratio_next_task": mse(ratios) if ratios else None,
                    "fid_when_learned": mse([m["fid"][str(t)] for m in ms]) if ms else None,
                }
            per_task.setdefault(name, {})[k] = tasks
    paired = {}
    for k in lengths:
        at_k = {run: r for run, r in results_by_run.items() if r["label"].endswith(f"@ {k}x")}
        if f"GD @ {k}x" in {r["label"] for r in at_k.values()} and len({r["label"] for r in at_k.values()}) > 1:
            paired[k] = paired_differences(at_k, f"GD @ {k}x")
    # ---- part 3: the lambda rule against the paired study's fixed lambdas, 1x, seeds 0-4
    lam_rule, rule = rule_lambda_of_study(work), {}
    if lam_rule is not None:
        best = "rank-1 + GD, λ = 100 (sweep's best)"
        arms = [
            ("GD", None, "GD"),
            ("rank-1 + GD", SWEEP_BEST_LAMBDA, best),
            ("rank-1 + GD", lam_rule, f"rank-1 + GD, λ = {lam_rule:g} = D / (2L) (rule)"),
            ("rank-1 + GD", PAPER_LAMBDA, "rank-1 + GD, λ = 15000"),
            ("decoupled rank-1 + GD", PAPER_LAMBDA, "decoupled rank-1 + GD, λ = 15000"),
        ]
        rule_runs = {}
        for name, lam, label in arms:
            for s in RULE_SEEDS:
                o = runs / run_folder(work, name, lam, s, 1)
                if finished(o):
                    rule_runs[str(o)] = {**json.loads((o / "results.json").read_text()), "label": label}
        labels = {r["label"] for r in rule_runs.values()}
        if len(labels) > 1:
            of = {label: [r for r in rule_runs.values() if r["label"] == label] for label in labels}
            rule = {
                "lambda": lam_rule,
                "paired_vs_gd": paired_differences(rule_runs, "GD"),
                "paired_vs_sweep_best": paired_differences(rule_runs, best) if best in labels else {},
                "per_method": {
                    label: {
                        "seeds": sorted(r["seed"] for r in rs),
                        "afid": mse([r["afid"]["5"] for r in rs]),
                        "plasticity": mse([r["plasticity"] for r in rs]),
                    }
                    for label, rs in of.items()
                },
            }
    table = {
        "steps_per_task_at_1x": STEPS_PER_TASK,
        "scale": BASE,
        "task1_alone": task1,
        "study": study,
        "per_task": per_task,
        "paired_vs_gd": paired,
        "lambda_rule": rule,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_length.json").write_text(json.dumps(table, indent=1, default=str))

    fmt = lambda p, d=1: format_mean_se(p, f".{d}f")  # noqa: E731
    lines = [
        "# Training length at the CPU table-1 scale (issue 18)\n",
        *tiny_banner(BASE),
        "The CPU scale of table1_fmnist_cpu.md (280 optimizer steps per task at 1x) at longer training: the "
        "epochs per task times 1, 3, 9 (27 for task 1 alone). FID features: a CNN classifier (NOT comparable "
        "to Inception FID). Mean ± standard error over the seeds listed.\n",
        provenance() + "\n",
        "\n## Task 1 alone: how the Fisher changes as the task converges\n",
        "‖μ‖ and c* from the run's Fisher (N = 200, one (t, ε) per image); tr F and ‖μ‖² / noise floor from a "
        "re-estimate on the same images, the floor being (tr F − ‖μ‖²)/N, what ‖μ̂‖² would be if the true mean "
        "gradient were 0. λ c* ‖μ‖² = λ μᵀFμ/‖μ‖² is the curvature the rank-1 penalty adds along μ: it does not "
        "depend on ‖μ‖ itself.\n",
        "The denoising loss L is the mean over the last quarter of the epochs; D / (2L) is item 3's λ rule "
        "(below) at that loss.\n",
        "| steps | seeds | denoising loss L | D / (2L) | FID_1(m_1) | ‖μ‖ | c* | λ c* ‖μ‖² (λ = 15000) | tr F | "
        "‖μ‖² / noise floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, r in task1.items():
        lines.append(
            f"| {k * STEPS_PER_TASK} ({k}x) | {r['seeds']} | {fmt(r['final_denoise_loss'], 4)} | "
            f"{fmt(r['rule_lambda'], 0)} | {fmt(r['fid_1'])} | {fmt(r['mu_norm'], 4)} | "
            f"{fmt(r['c_star'], 2)} | {fmt(r['stiffness'], 0)} | "
            f"{fmt(r['trace_F'], 3)} | {fmt(r['mu_sq_over_noise_floor'], 1)} |"
        )
    lines += [
        "\n## Five tasks: AFID@5, forgetting F and plasticity P by training length\n",
        "| method | steps per task | seeds | AFID@5 ↓ | F ↓ | P ↓ | ‖μ‖ of task 1 | c* of task 1 | "
        "penalty / loss gradient, task 2 epoch 2 | same, task 5 epoch 2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_k in study.items():
        for k, e in sorted(by_k.items()):
            t = per_task[name][k]
            lines.append(
                f"| {name} | {k * STEPS_PER_TASK} ({k}x) | {len(e['seeds'])} | {fmt(e['afid'])} | "
                f"{fmt(e['forgetting'])} | {fmt(e['plasticity'])} | {fmt(t[1]['mu_norm'], 4)} | "
                f"{fmt(t[1]['c_star'], 2)} | {fmt(t[1]['grad_ratio_next_task'], 2)} | "
                f"{fmt(t[4]['grad_ratio_next_task'], 2)} |"
            )
    missing = [
        f"{name} {k}x seed {s}"
        for k in lengths
        for name, lam in METHODS
        for s in seeds
        if not finished(runs / run_folder(work, name, lam, s, k))
    ]
    if missing:
        lines += [f"\nNot yet run ({len(missing)}): " + ", ".join(missing) + "."]
    for k, table_k in paired.items():
        lines.append(
            paired_markdown(table_k, f"GD @ {k}x").replace(
                "## Paired", f"## {k}x ({k * STEPS_PER_TASK} steps per task): paired"
            )
        )
    if rule:
        lines += [
            f"\n## Item 3: a λ without a sweep, λ = D / (2L) = {rule['lambda']:g} (1x, seeds 0-4)\n",
            f"D = {PIXELS} pixels; L = GD's task-1 denoising loss over its last quarter of epochs, mean over the "
            f"seeds. The per-pixel-mean MSE makes the empirical Fisher ≈ (2L/D) × the loss's Gauss-Newton "
            f"curvature, so at λ = D/(2L) the penalty's curvature along μ equals task 1's own loss curvature "
            f"(the old task weighs as much as the new). The other rows are the paired study's runs.\n",
            "| method | seeds | AFID@5 ↓ | P ↓ |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {label} | {len(e['seeds'])} | {fmt(e['afid'])} | {fmt(e['plasticity'])} |"
            for label, e in sorted(rule["per_method"].items())
        ]
        lines.append(paired_markdown(rule["paired_vs_gd"], "GD").replace("## Paired", "### Paired"))
        if rule["paired_vs_sweep_best"]:
            lines.append(paired_markdown(rule["paired_vs_sweep_best"], best).replace("## Paired", "### Paired"))
    md = RESULTS / "training_length.md"
    reading = md.read_text().partition("\n## Reading")[2] if md.exists() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n## Reading{reading}" if reading else ""))
    if study:
        plot_against(
            {
                q: {name: {k * STEPS_PER_TASK: e[key] for k, e in by_k.items()} for name, by_k in study.items()}
                for q, key in (
                    ("AFID@5 ↓", "afid"),
                    ("forgetting F ↓", "forgetting"),
                    ("plasticity P ↓", "plasticity"),
                )
            },
            RESULTS / "training_length_afid_f_p.png",
            "optimizer steps per task",
            log_x=True,
        )
    if task1:
        # (task 1 of a 5-task run trains exactly as task 1 alone, same seed and length: one line serves both)
        plot_against(
            {
                "‖μ‖ (task 1)": {"task 1 alone": {k * STEPS_PER_TASK: r["mu_norm"] for k, r in task1.items()}},
                "λ c* ‖μ‖² (task 1 alone)": {
                    "task 1 alone": {k * STEPS_PER_TASK: r["stiffness"] for k, r in task1.items()}
                },
                "FID_1(m_1) (task 1 alone)": {
                    "task 1 alone": {k * STEPS_PER_TASK: r["fid_1"] for k, r in task1.items()}
                },
            },
            RESULTS / "training_length_mu.png",
            "optimizer steps per task",
            log_x=True,
        )
    print("\n".join(lines))


def use_tiny_study(work: Path) -> None:
    """``--tiny``: task 1 alone at 1x and GD and rank-1 + GD at 1x on seed 0, at the tiny scale (8x8 digits), the
    report under WORK/results: one pass through queue and report that leaves the study's own files untouched."""
    global BASE, STEPS_PER_TASK, PIXELS, TASK1_LENGTHS, RULE_SEEDS, RESULTS
    BASE, TASK1_LENGTHS, RULE_SEEDS, RESULTS = SCALES["tiny"], (1,), (0,), work / "results"
    STEPS_PER_TASK = BASE["epochs"] * -(-2 * BASE["per_class"] // BASE["batch"])
    PIXELS = BASE["resolution"] ** 2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--lengths", default="1,3,9", help="multiples of the CPU scale's 280 steps per task")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--methods",
        default=",".join(m for m, _ in METHODS),
        help="the five-task methods to queue, comma-separated (default: all four)",
    )
    p.add_argument("--data_dir", default=None, help="default: Debian's Fashion-MNIST (digits with --tiny)")
    p.add_argument("--work_dir", default=None, help="default: runs/table1 (runs/training_length_tiny with --tiny)")
    p.add_argument("--report_only", action="store_true", help="write the results from the finished runs")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="task 1 alone, GD and rank-1 + GD at 1x on seed 0 with 8x8 digits and a tiny UNet, the report under "
        "WORK_DIR/results: a check that the study runs (for the tests), not a result",
    )
    args = p.parse_args(argv)
    work = Path(args.work_dir or ROOT / "runs" / ("training_length_tiny" if args.tiny else "table1"))
    data_dir = args.data_dir or ("digits" if args.tiny else "/usr/share/datasets/fashion-mnist")
    if args.tiny:
        use_tiny_study(work)
        args.lengths, args.seeds, args.methods = "1", "0", "GD,rank-1 + GD"
    lengths, seeds = [int(k) for k in args.lengths.split(",")], [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if unknown := set(methods) - {m for m, _ in METHODS}:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {[m for m, _ in METHODS]}")
    if not args.report_only:
        work.mkdir(parents=True, exist_ok=True)
        (work / "unet_config.json").write_text(json.dumps(TINY_UNET_CONFIG if args.tiny else UNET_CONFIG))
        train_fid_classifier(work, data_dir, ["--resolution", str(BASE["resolution"]), "--resize"])
        run_all(work, data_dir, args.jobs, lengths, seeds, methods)
    report(work, lengths, seeds)


if __name__ == "__main__":
    main()
