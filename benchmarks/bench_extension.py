"""What continuing a finished run costs before it learns: the seconds from the training script's start to the new
task's first optimizer step, against a fresh run's first task, measured in the same process on the same machine.

    python benchmarks/bench_extension.py [--tiny] [--repeats 3]

Three starts, each ``--repeats`` times, interleaved (so that drift hits all):

* ``fresh``: a new run of the 2-task digits demo (``--tasks 0,1;2,3``) into an empty folder, up to task 1's first step
  (loading the data, building the model, training the FID classifier, the real statistics of task 1);
* ``appended``: the finished 2-task run re-run into its folder with ``--tasks 0,1;2,3;4,5``, up to task 3's first
  step (reading and verifying task_02, restoring the model and the methods, the start of task 3);
* ``new data``: ``--resume_from_task RUN/task_02`` into a new folder with two named classes of another dataset (a
  parquet stand-in), up to task 3's first step (the label table grows; tasks 1 and 2 are scored later from the
  statistics task_02 carries, so no digit is read).

Each is timed in this process (``train_continual_ddpm.main``, after one untimed fresh start: the interpreter's
start, imports and first calls are shared and left out). The method is ``rank1`` (EWC alone: its start of task does nothing) so that what is measured is
the continuation itself, not a replay pool. Also reports the carried statistics' size per task folder. Writes
benchmarks/results/bench_extension[_tiny].json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from _common import machine, print_table, write_results  # noqa: E402


class FirstStep(Exception):
    """Raised at the first optimizer step: the start has been timed."""


def flags(tiny: bool, tasks: str, output_dir: Path) -> list[str]:
    epochs = "1" if tiny else "40"
    return [
        *("--dataset_name", "digits", "--preset", "demo", "--method", "rank1", "--tasks", tasks),
        *("--num_epochs_per_task", epochs, "--fid_num_samples", "16" if tiny else "200"),
        *(("--max_train_per_class", "48", "--num_inference_steps", "4") if tiny else ()),
        *("--output_dir", str(output_dir)),
    ]


def seconds_to_first_step(argv: list[str]) -> float:
    """Seconds from ``main(argv)`` to the first call of ``ContinualLearner.training_step``."""
    from accelerate.state import AcceleratorState, GradientState

    import train_continual_ddpm
    from hf_r1ewc.continual import ContinualLearner

    original, start = ContinualLearner.training_step, time.perf_counter()

    def first(*args, **kwargs):
        raise FirstStep(time.perf_counter() - start)

    ContinualLearner.training_step = first
    try:
        train_continual_ddpm.main(argv)
    except FirstStep as step:
        return float(step.args[0])
    finally:
        ContinualLearner.training_step = original
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    raise RuntimeError(f"the run never reached a training step: {argv}")


def finished_run(tiny: bool, folder: Path) -> Path:
    """The 2-task digits run that the continuations start from (trained once, copied for each repeat)."""
    from conftest import run

    run(flags(tiny, "0,1;2,3", folder))
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tiny", action="store_true", help="1 epoch per task on 48 images per class (a check, not a result)"
    )
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from conftest import named_shapes_parquet

    work = Path(tempfile.mkdtemp(prefix="bench_extension_"))
    try:
        shapes = named_shapes_parquet(work / "shapes")
        base = finished_run(args.tiny, work / "base")
        seconds_to_first_step(flags(args.tiny, "0,1;2,3", work / "warm-up"))  # first-call costs (imports, kernels)
        times: dict[str, list[float]] = {"fresh": [], "appended": [], "new data": []}
        for r in range(args.repeats):
            times["fresh"].append(seconds_to_first_step(flags(args.tiny, "0,1;2,3", work / f"fresh{r}")))
            run_dir = shutil.copytree(base, work / f"appended{r}", ignore=shutil.ignore_patterns(".lock"))
            times["appended"].append(seconds_to_first_step(flags(args.tiny, "0,1;2,3;4,5", run_dir)))
            new = flags(args.tiny, "circle,square", work / f"new{r}")
            new[new.index("--dataset_name") + 1] = str(shapes)
            new += ["--resume_from_task", str(base / "task_02"), "--fid_classifier", str(base / "fid_classifier")]
            times["new data"].append(seconds_to_first_step(new))
        carried = sum(p.stat().st_size for p in (base / "task_02" / "fid_reference").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        (name, f"{medians[name]:.2f} s", f"{medians[name] / medians['fresh']:.2f}x a fresh run's first task")
        for name in times
    ]
    rows.append(("carried statistics", f"{carried / 1024:.1f} KB", "in task_02 (2 tasks, classifier features)"))
    print(f"time to the new task's first optimizer step, median of {args.repeats} ({machine()['cpu']})")
    print_table(rows)
    results = {
        "tiny": args.tiny,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": medians,
        "ratio_to_fresh": {k: v / medians["fresh"] for k, v in medians.items()},
        "carried_statistics_bytes_task_02": carried,
    }
    print(f"wrote {write_results('bench_extension_tiny' if args.tiny else 'bench_extension', results)}")


if __name__ == "__main__":
    main()
