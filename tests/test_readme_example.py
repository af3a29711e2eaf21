"""The README's "Use the library in your own loop" example, run exactly as written, on a tiny UNet and 2 tasks."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import make_tiny_unet


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs_and_consolidates(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 34  # short: imports, a loop with an LR scheduler and the hooks
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    monkeypatch.chdir(tmp_path)  # the example writes its replay pools under ./replay
    g = torch.Generator().manual_seed(0)
    tasks = [
        (torch.rand(48, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1] * 24)),
        (torch.rand(48, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([2, 3] * 24)),
    ]
    before = [p.detach().clone() for p in make_tiny_unet().parameters()]
    unet, learner = namespace["train_continually"](make_tiny_unet(), tasks, replay_per_class=8)
    ewc, gd = learner.methods
    assert ewc.penalty_module.num_tasks == 2  # both tasks consolidated
    assert gd.replay is not None and gd.replay.classes == [0, 1] and len(gd.replay.pool) == 16
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))  # it trained
    assert float(ewc.penalty(unet)) >= 0
