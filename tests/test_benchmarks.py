"""The benchmark scripts' tiny modes run to their end (a benchmark cannot rot unseen); their numbers are not checked
here: speed is measured by the scripts themselves, never in tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_sampling_tiny_reaches_its_table_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    """Without native bf16 (AVX2 CPUs) no bf16 variant is measured; the summary table used to look them up anyway
    and crash after all the timing."""
    import _common
    import bench_sampling

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_sampling, "default_autocast_dtype", lambda device: None)
    bench_sampling.main(["--tiny", "--device", "cpu"])
    results = json.loads((tmp_path / "bench_sampling_tiny.json").read_text())
    assert "speedup_ours_bf16" not in results and results["sampling_speedup_vs_reference"] > 0


@pytest.mark.parametrize("native", [False, True], ids=["without_native_bf16", "with_native_bf16"])
def test_gpu_check_sampling_summary_names_only_the_variants_it_measured(tmp_path, request, native):
    """gpu_check's summary looked up the bf16 rows a CPU without native bf16 never measures: KeyError after all the
    timing, on AMD EPYC (AVX2) only. Both branches run on every CPU (native bf16 forced on is emulated there)."""
    import argparse

    import gpu_check
    import torch

    if native:
        request.getfixturevalue("native_bf16")
    results = {
        "machine": {"torch": "x"},
        "sampling": gpu_check.check_sampling(argparse.Namespace(tiny=True), torch.device("cpu")),
    }
    gpu_check.write_markdown(results, tmp_path / "gpu_check.md")
    line = next(x for x in (tmp_path / "gpu_check.md").read_text().splitlines() if "DDIM-50 sampling" in x)
    assert ("bf16" in line) == native and "fp32 channels_last" in line and "plain fp32 DDIMScheduler loop" in line


@pytest.mark.parametrize(
    "script, argv, written",
    [
        ("bench_fisher", ["--tiny", "--device", "cpu"], "bench_fisher_tiny.json"),
        ("bench_train", ["--tiny", "--device", "cpu", "--skip_compile"], "bench_train_tiny.json"),
        ("bench_methods", ["--tiny", "--device", "cpu"], "methods_cost_tiny.json"),
        ("bench_throughput", ["--tiny", "--device", "cpu"], "throughput_tiny.json"),
        ("bench_scale", ["--tiny", "--device", "cpu"], "bench_scale_tiny.json"),
        ("bench_extension", ["--tiny", "--repeats", "1"], "bench_extension_tiny.json"),
    ],
)
def test_each_benchmark_runs_its_tiny_mode_to_the_end(tmp_path, monkeypatch, script, argv, written):
    import importlib

    import _common

    module = importlib.import_module(script)
    for owner in (_common, module):  # (some scripts import RESULTS by name)
        if hasattr(owner, "RESULTS"):
            monkeypatch.setattr(owner, "RESULTS", tmp_path)
    module.main(argv)
    assert json.loads((tmp_path / written).read_text())["machine"]["cpu"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """The FID classifier every study's tiny mode trains first (``_runs.train_fid_classifier`` on 8x8 digits), trained
    once here; each test copies it into its work folder, where the study finds it and skips the training."""
    from _runs import train_fid_classifier

    return train_fid_classifier(tmp_path_factory.mktemp("classifier"), "digits", ["--resolution", "8", "--resize"])


def study_folder(tmp_path: Path, classifier: Path) -> Path:
    import shutil

    shutil.copytree(classifier, tmp_path / "fid_classifier")
    return tmp_path


def run_script(*argv: str) -> None:
    """A study script in its own process (its --tiny mode rebinds module globals; they must not leak into others)."""
    import subprocess

    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_compare_methods_tiny_runs_the_queue_records_and_report(tmp_path, tiny_classifier):
    """The field's table (issue 39) at the tiny scale: GD and ER through train_continual_ddpm.py, their records, the
    paired table (without the buffer study's columns); the study's own records are untouched."""
    gd_record = ROOT / "benchmarks" / "results" / "methods_runs" / "GD_seed0.json"
    before = gd_record.read_bytes()
    run_script("benchmarks/compare_methods.py", "--tiny", "--work_dir", str(study_folder(tmp_path, tiny_classifier)))
    report = json.loads((tmp_path / "results" / "methods.json").read_text())
    assert set(report["summary"]) == {"GD", "ER 20/class"}
    assert report["paired"]["ER 20/class"]["seeds"] == [0]
    assert (tmp_path / "results" / "methods_runs" / "GD_seed0.json").exists()
    methods_md = (tmp_path / "results" / "methods.md").read_text()
    assert "not a result" in methods_md
    assert "data kept" not in methods_md  # the buffer study's columns, whose arithmetic counts buffers only
    assert not any(key.startswith("paired_against") for key in report)  # no second baseline here
    assert gd_record.read_bytes() == before


def test_compare_methods_buffer_study_tiny_pairs_against_er20_and_embeds_its_plot(tmp_path, tiny_classifier):
    """The buffer study (issue 48) at the tiny scale: GD, ER 1/class and ER 20/class, each paired against GD and
    against ER 20/class, the buffer plot shown in the report, and the data kept capped at a class's training images
    (the tiny scale has 4 per class, so ER 20/class keeps them all: 100 %, not 500 %)."""
    run_script(
        "benchmarks/compare_methods.py",
        "--tiny",
        "--study",
        "buffer",
        "--work_dir",
        str(study_folder(tmp_path, tiny_classifier)),
    )
    results = tmp_path / "results"
    report = json.loads((results / "buffer_study_100pc.json").read_text())
    assert set(report["summary"]) == {"GD", "ER 1/class", "ER 20/class"}
    assert set(report["paired_against_ER 20/class"]) == {"GD", "ER 1/class"}
    markdown = (results / "buffer_study_100pc.md").read_text()
    assert "![AFID@5 against exemplars per class](buffer_study_100pc_buffer.png)" in markdown
    assert (results / "buffer_study_100pc_buffer.png").exists()
    table = markdown.partition("## The table")[2].partition("\n## ")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")
    }
    assert rows["ER 20/class"][-2:] == ["100 %", "0.01 |"]
    assert rows["ER 1/class"][-2] == "25 %"


def test_reproduce_table1_tiny_scale_writes_its_table(tmp_path, tiny_classifier):
    work = study_folder(tmp_path, tiny_classifier)
    run_script("benchmarks/reproduce_table1.py", "--scale", "tiny", "--work_dir", str(work))
    table = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert set(table["paper_lambda"]) == {"GD", "rank-1 + GD"}
    assert table["paper_lambda"]["GD"]["seeds"] == 1


def test_training_length_tiny_writes_every_part(tmp_path, tiny_classifier):
    """Task 1 alone and the 5-task runs of one length: a run of fewer than 4 epochs used to divide by zero in the
    last-quarter loss."""
    run_script("benchmarks/training_length.py", "--tiny", "--work_dir", str(study_folder(tmp_path, tiny_classifier)))
    assert "not a result" in (tmp_path / "results" / "training_length.md").read_text()
    results = json.loads((tmp_path / "results" / "training_length.json").read_text())
    assert list(results["task1_alone"]) == ["1"]
    assert {m: list(by_length) for m, by_length in results["study"].items()} == {"GD": ["1"], "rank-1 + GD": ["1"]}
    assert (tmp_path / "results" / "training_length_mu.png").exists()


def test_bench_sampler_steps_tiny_scores_every_sampler_and_the_plateau(tmp_path, tiny_classifier):
    run_script(
        "benchmarks/bench_sampler_steps.py", "--tiny", "--work_dir", str(study_folder(tmp_path, tiny_classifier))
    )
    results = json.loads((tmp_path / "results" / "sampler_steps_2ep.json").read_text())
    assert {(r["sampler"], r["steps"]) for r in results["rows"]} == {
        (name, steps) for name in ("ddim", "dpmsolver++", "unipc") for steps in (2, 4)
    }
    assert len(results["plateau"]["half"]) == 2


def test_gpu_check_tiny_runs_every_section_on_cpu_even_over_an_earlier_checks_folder(tmp_path):
    """gpu_check.py is the one run a GPU session gets: its dry run must reach every section without an error. A run
    folder left by an earlier check (here a damaged one) used to be resumed or refused instead of trained afresh."""
    stale = tmp_path / "work" / "gpu_check_run" / "task_01"
    stale.mkdir(parents=True)
    (stale / "model_index.json").write_text("{")
    run_script(
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path / "out"),
        "--work_dir",
        str(tmp_path / "work"),
    )
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["errors"] == {}
    sections = {"train_step", "fisher", "sampling", "script_bf16", "fsdp", "geometry", "throughput"}
    assert sections <= set(results["section_seconds"])
    assert results["script_bf16"]["rc"] == 0 and results["script_bf16"]["fisher_matches_fp32"]
    assert set(results["geometry"]["models"]) == {"small", "large"}
