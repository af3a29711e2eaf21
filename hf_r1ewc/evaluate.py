"""Evaluate and aggregate continual-learning runs.

    python -m hf_r1ewc.evaluate --run_dir runs/a runs/b ... [--complete] [--output_dir DIR]
    python -m hf_r1ewc.evaluate --hub_repo USER/NAME [--revisions task-01,...,task-05]
    python -m hf_r1ewc.evaluate train-classifier --dataset_name DATA --output_dir DIR
    python -m hf_r1ewc.evaluate report RUN_DIR [RUN_DIR ...] [--output report.html] [--paired_against METHOD]

The first form reads each run's ``results.json`` (completing missing FID_i(m_k) entries from the task folders with
``--complete``, e.g. every i instead of i <= k with ``--all_tasks``, into ``results_completed.json`` beside it: the
run's own ``results.json`` is never written, and a run folder that a training process holds is refused), groups
finished runs by method (unfinished ones are refused, or with ``--include_unfinished`` marked as such), and writes
AFID@T, forgetting F, plasticity P, ACC and BWT as mean +- standard error over runs (seeds) to ``summary.md``,
``summary.csv`` and ``summary.json``, plus the AFID@k plot, per-run FID curves and a class x task sample grid. ``--paired_against
METHOD`` adds seed-by-seed differences of every method against METHOD with paired tests (``paired.json``).
``report`` writes one self-contained HTML page of the runs (``hf_r1ewc.report``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from .comparison import aggregate, format_mean_se, load_run_results, paired_differences, paired_markdown
from .data import default_resolution, images_to_model_input, load_labeled_images
from .distill import frozen_teacher
from .features import classifier_accuracy, load_feature_extractor, train_classifier
from .hub import is_complete_task_folder, read_training_state, resolve_task_source, task_folder_name, write_json
from .integrity import OutputLock, sha256_tensors
from .metrics import TaskFID, accuracy_summary, matrix_from_json, summarize
from .pipeline import ClassConditionalPipeline, num_classes_of
from .plots import plot_afid_curves, plot_task_fid_curves, save_labeled_grid
from .run import finished_tasks


def train_classifier_main(argv: list[str]) -> None:
    """``python -m hf_r1ewc.evaluate train-classifier``: the offline FID feature classifier."""
    p = argparse.ArgumentParser(
        prog="python -m hf_r1ewc.evaluate train-classifier",
        description="Train the offline FID feature classifier on a dataset's training split.",
    )
    p.add_argument("--dataset_name", required=True, help="'digits', a Hub id or a local folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: 28x28 padded to 32, else native")
    p.add_argument("--resize", action="store_true", help="resize to --resolution instead of padding")
    p.add_argument("--feature_dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train = load_labeled_images(args.dataset_name, "train")
    test = load_labeled_images(args.dataset_name, "test")
    resolution = args.resolution or default_resolution(train.image_size)
    model = train_classifier(
        images_to_model_input(train.images, resolution, args.resize),
        train.labels,
        max(train.classes) + 1,
        feature_dim=args.feature_dim,
        epochs=args.epochs,
        seed=args.seed,
    )
    accuracy = classifier_accuracy(model, images_to_model_input(test.images, resolution, args.resize), test.labels)
    model.save_pretrained(args.output_dir)
    (Path(args.output_dir) / "accuracy.json").write_text(json.dumps({"test_accuracy": accuracy}))
    print(f"test accuracy {accuracy:.4f}; saved to {args.output_dir}")


COMPLETED = "results_completed.json"


def complete_run(run_dir: Path, all_tasks: bool = False, num_samples: int | None = None) -> dict:
    """Fill the missing FID_i(m_k) (and sample accuracy) of a run from its task folders, through the same
    ``TaskFID`` as the training script (same seeds, sampler and precision), into ``RUN_DIR/results_completed.json``
    (entries computed by an earlier call are kept); returns those results. The run's ``results.json`` belongs to the
    training run and is never written. Holds the run folder's lock while it works: raises ``ValueError`` naming the
    process if a training run holds it."""
    lock = OutputLock(run_dir)
    if not lock.acquire():
        raise ValueError(
            f"{run_dir} is being written by process {lock.holder()} (a training run); wait for it to "
            f"finish, or evaluate a copy of the folder"
        )
    try:
        return _complete_run(run_dir, all_tasks, num_samples)
    finally:
        lock.release()


def _complete_run(run_dir: Path, all_tasks: bool, num_samples: int | None) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    if (run_dir / COMPLETED).exists():  # keep what an earlier completion computed, under the run's own entries
        earlier = json.loads((run_dir / COMPLETED).read_text())
        for key in ("fid", "accuracy"):
            for k, row in earlier.get(key, {}).items():
                results.setdefault(key, {}).setdefault(k, {})
                results[key][k] = {**row, **results[key][k]}
    manifest = run_dir / "run_manifest.json"  # (args.json: runs written before the manifest)
    recorded = json.loads(manifest.read_text()) if manifest.exists() else {}
    args = recorded["settings"] if recorded else json.loads((run_dir / "args.json").read_text())
    source = args["dataset_name"] or args["train_data_dir"]
    sources = sorted(set(recorded.get("task_sources") or results.get("task_sources") or [source]))
    if len(sources) > 1:
        raise ValueError(
            f"{run_dir}'s tasks come from several datasets ({', '.join(sources)}), mapped by name onto one label "
            f"space: --complete reads one dataset and cannot score them yet. Its FIDs are in results.json"
        )
    resize_to = args.get("resolution") if args.get("resize") else None
    test = load_labeled_images(
        source, args.get("eval_split", "test"), args.get("image_column"), args.get("label_column"), resize_to
    )
    expected = recorded.get("dataset", {}).get("test_sha256")
    if expected and sha256_tensors(test.images, test.labels) != expected:
        raise ValueError(
            f"{source}'s {args.get('eval_split', 'test')} split is not the data {run_dir} was evaluated on (its SHA-256 "
            f"differs from the one in {manifest}): FID completed on it would not be comparable. Point the run at the "
            f"same data, or evaluate a new run"
        )
    resolution = args.get("resolution") or default_resolution(test.image_size)
    extractor = load_feature_extractor(
        results["fid_backend"],
        classifier_path=args.get("fid_classifier") or str(run_dir / "fid_classifier"),
        fid_weights=args.get("fid_weights"),
        dinov2_model=args.get("dinov2_model", "facebook/dinov2-base"),
    )
    precision = results.get("sampling", {}).get("precision", "fp32")
    tasks = results["tasks"]
    evaluator = TaskFID(
        extractor,
        images_to_model_input(test.images, resolution, args.get("resize", False)),
        test.labels,
        tasks,
        num_samples=num_samples or args.get("fid_num_samples"),
        num_inference_steps=args.get("num_inference_steps", 50),
        seed=args.get("seed", 0),
        autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
        cache_dir=args.get("fid_reference_dir") or run_dir / "fid_reference",
    )
    matrix = matrix_from_json(results["fid"])
    accuracy = matrix_from_json(results.get("accuracy", {}))
    for k in range(1, len(tasks) + 1):
        folder = run_dir / task_folder_name(k)
        if not is_complete_task_folder(folder):
            continue
        wanted = range(1, len(tasks) + 1) if all_tasks else range(1, k + 1)
        missing = [i for i in wanted if i not in matrix.get(k, {})]
        if not missing:
            continue
        read_training_state(folder)  # checks every file against its recorded SHA-256
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        model = frozen_teacher(pipe.denoiser)
        for i in missing:
            score = evaluator(model, pipe.scheduler, i)
            matrix.setdefault(k, {})[i] = score.fid
            if score.accuracy is not None:
                accuracy.setdefault(k, {})[i] = score.accuracy
            print(f"{run_dir.name}: FID_{i}(m_{k}) = {score.fid:.3f}")
    results["fid"], results["accuracy"] = matrix, accuracy
    results.update(summarize({k: {i: v for i, v in row.items() if i <= k} for k, row in matrix.items()}))
    results.update(accuracy_summary(accuracy))
    write_json(run_dir / COMPLETED, results)
    return json.loads((run_dir / COMPLETED).read_text())


def results_from_revisions(repo_id: str, revisions: list[str]) -> dict:
    """A run's results rebuilt from the ``metrics.json`` of each task revision of a Hub repo (or local folders)."""
    matrix, method, backend, tasks = {}, None, None, None
    for revision in revisions:
        folder = resolve_task_source(f"{repo_id}@{revision}" if not Path(revision).exists() else revision)
        metrics = json.loads((folder / "metrics.json").read_text())
        state = read_training_state(folder)
        matrix[int(metrics["task"])] = {int(i): float(v) for i, v in metrics["fid"].items()}
        backend, tasks = metrics["fid_backend"], state["tasks"]
        method = state.get("method") or repo_id
    s = summarize(matrix)
    return {
        "method": method,
        "fid_backend": backend,
        "tasks": tasks,
        "joint": False,
        "fid": {str(k): {str(i): v for i, v in row.items()} for k, row in matrix.items()},
        "afid": {str(k): v for k, v in s.get("afid", {}).items()},
        "forgetting": s.get("forgetting"),
        "plasticity": s.get("plasticity"),
    }


def write_summary(table: dict, output_dir: Path) -> None:
    """``summary.md``, ``summary.csv``, ``summary.json`` and the AFID@k plot from ``aggregate``'s table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "| method | runs | AFID@T ↓ | forgetting F ↓ | plasticity P ↓ | accuracy after T (ACC) ↑ | BWT ↑ | class KL ↓ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    percent = lambda pair: pair and (100 * pair[0], 100 * pair[1])  # noqa: E731
    for method, row in table.items():
        lines.append(
            f"| {method} | {row['runs']} | {format_mean_se(row['afid'])} | {format_mean_se(row['forgetting'])} | "
            f"{format_mean_se(row['plasticity'])} | {format_mean_se(percent(row.get('accuracy')))} | "
            f"{format_mean_se(percent(row.get('bwt')))} | {format_mean_se(row.get('class_kl'))} |"
        )
    backends = sorted({row["fid_backend"] for row in table.values()})
    note = (
        "\nFID backend: "
        + ", ".join(backends)
        + (
            " (a classifier trained on the dataset's training split: NOT comparable to Inception FID)"
            if "classifier" in backends
            else ""
        )
        + ". Mean ± standard error over runs. "
        "ACC: mean over tasks of the sample accuracy after the last task (%); BWT: mean over earlier tasks of "
        "accuracy after the last task minus accuracy when learned (points; negative = forgotten); class KL: "
        "KL(asked || generated) of the final model's class frequencies (nats; 0 = every class as often as asked).\n"
    )
    (output_dir / "summary.md").write_text("\n".join(lines) + "\n" + note)
    with open(output_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "method",
                "runs",
                "afid_mean",
                "afid_se",
                "forgetting_mean",
                "forgetting_se",
                "plasticity_mean",
                "plasticity_se",
                "accuracy_mean",
                "accuracy_se",
                "bwt_mean",
                "bwt_se",
                "class_kl_mean",
                "class_kl_se",
                "fid_backend",
            ]
        )
        for method, row in table.items():
            cells = []
            for key in ("afid", "forgetting", "plasticity", "accuracy", "bwt", "class_kl"):
                cells += list(row[key]) if row[key] else ["", ""]
            writer.writerow([method, row["runs"], *cells, row["fid_backend"]])
    write_json(
        output_dir / "summary.json",
        {m: {**row, "afid_at_k": {str(k): v for k, v in row["afid_at_k"].items()}} for m, row in table.items()},
    )
    plot_afid_curves(
        {m: row["afid_at_k"] for m, row in table.items() if row["afid_at_k"]},
        output_dir / "afid_at_k.png",
        backend=", ".join(backends),
    )


@torch.no_grad()
def sample_grid_across_tasks(
    run_dir: Path, classes: list[int], path: Path, steps: int = 50, seed: int = 0
) -> torch.Tensor:
    """Rows: classes; columns: the model after each finished task of ``run_dir`` (paper fig. 5), sampled with its
    saved scheduler, labelled. Same noise in every column; a class the model had not learned yet is washed out.
    Returns the grid, ``[classes * columns, C, H, W]`` in [-1, 1], row-major."""
    import warnings

    columns, names = [], []
    for folder in sorted(run_dir.glob("task_[0-9][0-9]")):  # the finished ones (a run resumed from another
        if not is_complete_task_folder(folder):  # folder's task holds only the later tasks)
            continue
        state = read_training_state(folder)
        learned = set(state["seen_classes"])
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        in_table = torch.tensor(classes) < num_classes_of(pipe.own_denoiser)  # later classes may grow the table
        with warnings.catch_warnings():  # sampling the classes to come is the point here: they are marked instead
            warnings.simplefilter("ignore")
            drawn = [c if ok else 0 for c, ok in zip(classes, in_table.tolist())]
            images = pipe(drawn, steps, generator=torch.Generator().manual_seed(seed), output_type="pt").images
        images = torch.where(in_table[:, None, None, None], images, torch.full_like(images, 0.5))
        not_yet = torch.tensor([c not in learned for c in classes])
        columns.append(torch.where(not_yet[:, None, None, None], 0.25 * images + 0.6, images))
        names.append(f"task {int(folder.name[5:])}")
    if not columns:
        raise ValueError(f"{run_dir} has no finished task folder")
    grid = torch.stack(columns, dim=1).flatten(0, 1) * 2 - 1  # class-major: row = class, column = task
    title = "the model after each task (washed out: a class not learned yet)"
    id2label = pipe.config.get("id2label") or {}  # the newest folder's names
    rows = [f"{c}: {id2label[str(c)]}" if id2label.get(str(c), str(c)) != str(c) else f"class {c}" for c in classes]
    save_labeled_grid(grid, path, rows, names, title=title)
    return grid


def report_main(argv: list[str]) -> None:
    """``python -m hf_r1ewc.evaluate report``: one self-contained report.html of one or several runs."""
    from .report import write_report

    p = argparse.ArgumentParser(prog="python -m hf_r1ewc.evaluate report", description=report_main.__doc__)
    p.add_argument("run_dirs", nargs="+", help="run output folders (each with results.json)")
    p.add_argument(
        "--output", default=None, help="default: RUN_DIR/report.html for one run, ./report.html for several"
    )
    p.add_argument("--paired_against", default=None, metavar="METHOD", help="add per-seed differences against METHOD")
    args = p.parse_args(argv)
    output = args.output or (Path(args.run_dirs[0]) / "report.html" if len(args.run_dirs) == 1 else "report.html")
    try:
        print(f"wrote {write_report(args.run_dirs, output, args.paired_against)}")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_r1ewc.evaluate``: aggregate runs (see the module docstring)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-classifier":
        return train_classifier_main(argv[1:])
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m hf_r1ewc.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run_dir", nargs="+", default=[], help="run output folders (each with results.json)")
    p.add_argument(
        "--hub_repo",
        action="append",
        default=[],
        help="a Hub model repo pushed with --push_to_hub (repeatable): read from its task revisions",
    )
    p.add_argument(
        "--revisions",
        default="task-01,task-02,task-03,task-04,task-05",
        help="with --hub_repo: the task revisions to read",
    )
    p.add_argument("--output_dir", default=None, help="where the summary goes (default: the first run's parent)")
    p.add_argument("--complete", action="store_true", help="compute missing FID_i(m_k) from the task folders")
    p.add_argument("--all_tasks", action="store_true", help="with --complete: FID of every task, also i > k")
    p.add_argument("--fid_num_samples", type=int, default=None)
    p.add_argument("--grid_classes", default=None, help="with one run: classes for the class x task sample grid")
    p.add_argument(
        "--include_unfinished",
        action="store_true",
        help="aggregate runs that have not finished their last task too, as methods of their own marked "
        "'[unfinished]' (default: refuse them)",
    )
    p.add_argument(
        "--paired_against",
        default=None,
        metavar="METHOD",
        help="also compare every method with METHOD (e.g. 'generative replay + distillation (weight 1)', "
        "as the summary names it) seed by seed: mean difference +- SE, paired t and Wilcoxon tests",
    )
    args = p.parse_args(argv)
    runs = {}
    for run in args.run_dir:
        run_dir = Path(run)
        try:
            results = load_run_results(run_dir)
            if args.complete:
                results = {**results, **complete_run(run_dir, args.all_tasks, args.fid_num_samples)}
        except ValueError as err:  # no or altered results, a run being trained, an altered task folder, other data
            raise SystemExit(f"error: {err}") from None
        results.setdefault("tasks_done", finished_tasks(run_dir, len(results["tasks"])))
        runs[str(run_dir)] = results
    for repo in args.hub_repo:
        runs[repo] = results_from_revisions(repo, args.revisions.split(","))
        runs[repo].setdefault("tasks_done", len(runs[repo].get("afid", {})))
    if not runs:
        raise SystemExit("error: pass --run_dir DIR [DIR ...] and/or --hub_repo REPO_ID")
    unfinished = {run: r for run, r in runs.items() if r["tasks_done"] < (1 if r.get("joint") else len(r["tasks"]))}
    if unfinished and not args.include_unfinished:
        listed = "; ".join(f"{run} ({r['tasks_done']} of {len(r['tasks'])} tasks)" for run, r in unfinished.items())
        raise SystemExit(
            f"error: runs that have not finished: {listed}. Let them finish (re-run their command), "
            f"leave them out, or pass --include_unfinished to show them apart, marked '[unfinished]'"
        )
    for r in unfinished.values():
        r["label"] = f"{r.get('label') or r['method']} [unfinished]"
    output_dir = Path(args.output_dir or (Path(args.run_dir[0]).parent if args.run_dir else "."))
    try:
        table = aggregate(runs)
    except ValueError as err:  # runs of different data, task counts, FID backends or resolutions
        raise SystemExit(f"error: {err}") from None
    write_summary(table, output_dir)
    if args.paired_against:
        try:
            paired = paired_differences(runs, args.paired_against)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        write_json(output_dir / "paired.json", paired)
        with open(output_dir / "summary.md", "a") as f:
            f.write(paired_markdown(paired, args.paired_against))
    names = [Path(run).name for run in runs]
    for run, results in runs.items():  # named by the folder, by its parent too where two folders share a name
        name = Path(run).name if names.count(Path(run).name) == 1 else "_".join(Path(run).parts[-2:])
        plot_task_fid_curves(
            matrix_from_json(results["fid"]),
            output_dir / f"fid_curves_{name.replace('/', '_')}.png",
            title=results["method"],
        )
    if args.grid_classes:
        try:
            sample_grid_across_tasks(
                Path(args.run_dir[0]),
                [int(c) for c in args.grid_classes.split(",")],
                output_dir / "samples_across_tasks.png",
            )
        except ValueError as err:  # an altered task folder, a class the model does not know
            raise SystemExit(f"error: --grid_classes: {err}") from None
    print((output_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
