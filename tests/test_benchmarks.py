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


@pytest.mark.parametrize(
    "script, argv, written",
    [
        ("bench_fisher", ["--tiny", "--device", "cpu"], "bench_fisher_tiny.json"),
        ("bench_train", ["--tiny", "--device", "cpu", "--skip_compile"], "bench_train_tiny.json"),
        ("bench_methods", ["--tiny", "--device", "cpu"], "methods_cost_tiny.json"),
        ("bench_throughput", ["--tiny", "--device", "cpu"], "throughput_tiny.json"),
        ("bench_scale", ["--tiny", "--device", "cpu"], "bench_scale_tiny.json"),
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
