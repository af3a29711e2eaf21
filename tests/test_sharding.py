"""FSDP2 sharding: the penalty, its proximal step and the Fisher on sharded parameters, in 2 real processes.

Accelerate selects no distributed backend for FSDP without an accelerator (``PartialState._prepare_backend`` maps a
CPU run to MULTI_CPU/DDP), so the script's FSDP path cannot run on a CPU machine. This test therefore calls
Accelerate's own ``fsdp2_prepare_model`` with the plugin of accelerate_configs/fsdp.yaml (a namespace stands in for
the ``Accelerator`` it reads) in two gloo processes started by ``torch.distributed.run`` (tests/fsdp_worker.py), and
compares everything with an unsharded reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from hf_r1ewc.sharding import all_reduce_keeping_local_grad, local_slice, local_tensor, model_is_sharded


TESTS = Path(__file__).resolve().parent


def test_unsharded_helpers_are_identities():
    layer = torch.nn.Linear(3, 2)
    assert not model_is_sharded(layer)
    assert local_tensor(layer.weight) is layer.weight
    full = torch.randn(4, 2, 3)
    assert torch.equal(local_slice(full, layer.weight, leading_dims=1), full)
    partial = torch.tensor(2.0, requires_grad=True)
    assert all_reduce_keeping_local_grad(partial, ()) is partial


def test_penalty_gradient_step_and_fisher_on_fsdp2_shards_match_unsharded(tmp_path):
    out = tmp_path / "errors.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TESTS / "fsdp_worker.py"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    assert len(errors) == 15, errors
    # the config's wrap policy shards the root and every down, mid and up block of the UNet
    assert errors.pop("fsdp_units") >= 6
    # the tiny UNet's 1-channel output conv has one row: one process holds empty shards, which must still work
    assert errors.pop("empty_local_shards") >= 1
    assert errors.pop("fisher/num_samples") == 0
    worst = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not worst, worst
