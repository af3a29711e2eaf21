"""Comparing runs: results.json checked before it is read, runs of different protocols refused, pairs one run per
method and seed, unpaired runs listed; and ``evaluate`` over such folders (results.json only, no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_r1ewc import evaluate  # noqa: E402
from hf_r1ewc.comparison import (  # noqa: E402
    MAX_TASKS,
    aggregate,
    check_results,
    load_run_results,
    paired_differences,
    paired_markdown,
)


def results(method="GD", seed=0, tasks=2, shift=0.0, **extra) -> dict:
    """A finished run's results.json as the training script writes it (FID_i(m_k) = 10 k + i + shift)."""
    fid = {str(k): {str(i): 10.0 * k + i + shift for i in range(1, k + 1)} for k in range(1, tasks + 1)}
    afid = {str(k): sum(fid[str(k)].values()) / k for k in range(1, tasks + 1)}
    return {
        "method": method,
        "seed": seed,
        "fid_backend": "classifier",
        "tasks": [[2 * t, 2 * t + 1] for t in range(tasks)],
        "tasks_done": tasks,
        "dataset": "digits",
        "resolution": 8,
        "fid": fid,
        "afid": afid,
        "forgetting": 1.0 + shift,
        "plasticity": 2.0,
        **extra,
    }


def write_run(folder: Path, r: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(r))
    return folder


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda r: r["fid"]["2"].update({"1": None}), "fid\\[2\\]\\[1\\] is None, not a finite number \\(NaN"),
        (lambda r: r["fid"]["2"].update({"1": "12.0"}), "fid\\[2\\]\\[1\\] is '12.0'"),
        (lambda r: r.update(fid=[[1.0]]), "'fid' is not a mapping"),
        (lambda r: r["fid"].update({"7": {}}), "'fid' is not a mapping from task numbers 1..2"),
        (lambda r: r.pop("method"), "names no method"),
        (lambda r: r.update(tasks="0,1;2,3"), "'tasks' is not a list of lists"),
        (lambda r: r.update(forgetting=[1.0]), "forgetting is \\[1.0\\]"),
        (lambda r: r.update(seed="0"), "'seed' is '0'"),
        (lambda r: r.update(tasks=[[c] for c in range(MAX_TASKS + 1)]), f"{MAX_TASKS + 1} tasks; .* at most"),
    ],
)
def test_results_not_as_the_script_writes_them_are_refused_by_name(change, named):
    r = results()
    change(r)
    with pytest.raises(ValueError, match=named):
        check_results(r, "run/results.json")
    check_results(results(), "run/results.json")  # the script's own shape passes


def test_runs_of_different_protocols_are_not_averaged():
    runs = {
        "a": results(),
        "b": results(seed=1),
        "c": results(seed=2, tasks=5),
        "d": results(seed=3, fid_backend="none"),
    }
    with pytest.raises(ValueError, match="cannot be compared.*2 tasks, FID backend classifier.*: a, b;.*5 tasks.*: c"):
        aggregate(runs)
    with pytest.raises(ValueError, match="dataset fashion-mnist"):
        aggregate({"a": results(), "b": results(dataset="fashion-mnist")})
    table = aggregate({"a": results(), "b": results(seed=1, shift=2.0)})
    assert table["GD"]["runs"] == 2 and table["GD"]["afid"][0] == pytest.approx(
        (21.5 + 23.5) / 2
    )  # AFID@2 = (FID_1 + FID_2) / 2 of m_2


def test_pairing_refuses_two_runs_of_one_method_and_seed_and_lists_the_unpaired():
    with pytest.raises(ValueError, match="a and b are both 'GD' with seed 0"):
        paired_differences({"a": results(), "b": results(), "c": results("EWC")}, "GD")
    runs = {
        "gd0": results(),
        "gd1": results(seed=1),
        "ewc0": results("EWC", shift=1.0),
        "ewc1": results("EWC", seed=1, shift=3.0),
        "ewc7": results("EWC", seed=7),
        "si9": results("SI", seed=9),
    }
    table = paired_differences(runs, "GD")
    assert table["EWC"]["seeds"] == [0, 1] and table["EWC"]["unpaired_seeds"] == [7]
    assert table["EWC"]["afid"]["differences"] == [1.0, 3.0]
    assert table["SI"] == {"seeds": [], "unpaired_seeds": [9]}
    text = paired_markdown(table, "GD")
    assert (
        "Unpaired (no GD run of the same seed, left out of the differences): EWC (seeds [7]); SI (seeds [9])" in text
    )


def test_evaluate_takes_a_finished_run_without_fid_and_keeps_one_plot_per_folder(tmp_path):
    gd = write_run(tmp_path / "gd" / "run", results())
    other = write_run(tmp_path / "other" / "run", results(seed=1, shift=1.0))
    out = tmp_path / "summary"
    evaluate.main(["--run_dir", str(gd), str(other), "--output_dir", str(out)])
    assert {p.name for p in out.glob("fid_curves_*.png")} == {"fid_curves_gd_run.png", "fid_curves_other_run.png"}
    no_fid = results(fid_backend="none", fid={}, afid={}, forgetting=None, plasticity=None)
    a, b = write_run(tmp_path / "none_a", no_fid), write_run(tmp_path / "none_b", {**no_fid, "seed": 1})
    evaluate.main(["--run_dir", str(a), str(b), "--output_dir", str(tmp_path / "s2")])  # finished: not refused
    assert json.loads((tmp_path / "s2" / "summary.json").read_text())["GD"]["runs"] == 2
    with pytest.raises(SystemExit, match="cannot be compared"):
        evaluate.main(["--run_dir", str(gd), str(a), "--output_dir", str(tmp_path / "s3")])
    with pytest.raises(SystemExit, match="fid\\[1\\]\\[1\\] is None"):
        bad = results()
        bad["fid"]["1"]["1"] = None
        evaluate.main(["--run_dir", str(write_run(tmp_path / "bad", bad)), "--output_dir", str(tmp_path / "s4")])


def test_old_results_take_their_dataset_and_resolution_from_the_manifest(tmp_path):
    old = {k: v for k, v in results().items() if k not in ("dataset", "resolution", "tasks_done")}
    run = write_run(tmp_path / "run", old)
    (run / "run_manifest.json").write_text(
        json.dumps({"settings": {"dataset_name": None, "train_data_dir": "/d", "resolution": 16}})
    )
    loaded = load_run_results(run)
    assert (loaded["dataset"], loaded["resolution"]) == ("/d", 16)
