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
    METHODS.pop("l2")


def test_the_docs_method_runs_through_the_script_and_resumes_from_its_task_folder(docs_example, tmp_path):
    from test_faults import max_difference

    main = docs_example["train_continual_ddpm"].main
    flags = [
        *("--dataset_name", "digits", "--preset", "demo", "--tasks", "0,1;2,3", "--num_epochs_per_task", "2"),
        *("--max_train_per_class", "16", "--train_batch_size", "16", "--replay_per_class", "4"),
        *("--num_inference_steps", "2", "--fid_backend", "none", "--seed", "3", "--method", "l2+gd"),
        *("--l2_weight", "50"),
    ]
    main([*flags, "--output_dir", str(tmp_path / "whole")])
    task1, task2 = tmp_path / "whole" / "task_01", tmp_path / "whole" / "task_02"
    for folder in (task1, task2):  # the anchor a task folder keeps is the weights after that task
        anchor = load_file(str(folder / "l2_anchor.safetensors"))
        weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        assert anchor.keys() == weights.keys() and all((anchor[k] == weights[k]).all() for k in weights)
    import json

    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["method"] == "generative replay + distillation (weight 1) + L2 to the previous weights (weight 50)"
    manifest = json.loads((tmp_path / "whole" / "run_manifest.json").read_text())["settings"]
    assert (manifest["method"], manifest["l2_weight"]) == ("gd+l2", 50.0)
    main([*flags, "--output_dir", str(tmp_path / "continued"), "--resume_from_task", str(task1)])
    assert max_difference(task2, tmp_path / "continued" / "task_02") == 0.0
    with pytest.raises(SystemExit, match="l2_weight"):  # the method's flag is a setting the folder records
        main([*flags[:-1], "60", "--output_dir", str(tmp_path / "whole")])


def test_the_docs_method_is_l2_to_the_last_weights(docs_example):
    """Its penalty, by hand: weight/2 * ||theta - theta*||^2 over all parameters, 0 before any task ends (None)."""
    import torch
    from conftest import make_tiny_unet

    from hf_r1ewc.methods import TaskEnd

    method, unet = docs_example["L2"](3.0), make_tiny_unet()
    assert method.penalty(unet) is None
    method.end_task(TaskEnd(1, unet, [], [0, 1]))
    moved = make_tiny_unet(seed=1)
    by_hand = sum(float((p.double() - q.double()).pow(2).sum()) for p, q in zip(moved.parameters(), unet.parameters()))
    assert float(method.penalty(moved)) == pytest.approx(1.5 * by_hand, rel=1e-5)
    assert torch.autograd.grad(method.penalty(moved), next(moved.parameters())) is not None
