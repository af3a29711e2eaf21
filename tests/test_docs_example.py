"""docs/method.md's "Adding a method": the example method file, run as written through the training script, then a
run continued from its first task folder (the method's task-folder files restore it) ends with the same weights."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def docs_example():
    """The example's module namespace, executed as an import (it registers its method, the script does not run)."""
    from hf_r1ewc.config import METHODS

    sys.path.insert(0, str(ROOT))
    code = re.search(r"<!-- method-example -->\s*```python\n(.*?)```", (ROOT / "docs" / "method.md").read_text(), re.S)
    namespace: dict = {"__name__": "my_train"}
    exec(compile(code.group(1), "docs/method.md example", "exec"), namespace)
    yield namespace
    METHODS.pop("decay")


def test_the_docs_method_runs_through_the_script_and_resumes_from_its_task_folder(docs_example, tmp_path):
    from test_faults import max_difference

    main = docs_example["train_continual_ddpm"].main
    flags = [
        *("--dataset_name", "digits", "--preset", "demo", "--tasks", "0,1;2,3", "--num_epochs_per_task", "1"),
        *("--max_train_per_class", "16", "--train_batch_size", "16", "--replay_per_class", "4"),
        *("--num_inference_steps", "2", "--fid_backend", "none", "--seed", "3", "--method", "decay+gd"),
        *("--decay_rate", "50"),
    ]
    main([*flags, "--output_dir", str(tmp_path / "whole")])
    task1, task2 = tmp_path / "whole" / "task_01", tmp_path / "whole" / "task_02"
    for folder in (task1, task2):  # the anchor a task folder keeps is the weights after that task
        anchor = {k.removeprefix("anchor."): v for k, v in load_file(str(folder / "decay_anchor.safetensors")).items()}
        weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        assert anchor.keys() == weights.keys() and all((anchor[k] == weights[k]).all() for k in weights)
    import json

    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert (
        results["method"]
        == "generative replay + distillation (weight 1) + decay towards the previous weights (rate 50)"
    )
    manifest = json.loads((tmp_path / "whole" / "run_manifest.json").read_text())["settings"]
    assert (manifest["method"], manifest["decay_rate"]) == ("gd+decay", 50.0)
    main([*flags, "--output_dir", str(tmp_path / "continued"), "--resume_from_task", str(task1)])
    assert max_difference(task2, tmp_path / "continued" / "task_02") == 0.0
    with pytest.raises(SystemExit, match="decay_rate"):  # the method's flag is a setting the folder records
        main([*flags[:-1], "60", "--output_dir", str(tmp_path / "whole")])


def test_the_docs_method_decays_towards_the_last_weights(docs_example):
    """Its step, by hand: theta - lr * rate * (theta - theta*), nothing before the first task ends."""
    import torch
    from conftest import make_tiny_unet

    from hf_r1ewc.methods import TaskEnd

    method, anchor, moved = docs_example["DecayToPrevious"](3.0), make_tiny_unet(), make_tiny_unet(seed=1)
    before = [p.detach().clone() for p in moved.parameters()]
    method.after_optimizer_step(moved, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, moved.parameters()))
    method.end_task(TaskEnd(1, anchor, [], [0, 1]))
    method.after_optimizer_step(moved, 0.1)
    for b, p, a in zip(before, moved.parameters(), anchor.parameters()):
        torch.testing.assert_close(p, b - 0.3 * (b - a), rtol=1e-6, atol=1e-7)
