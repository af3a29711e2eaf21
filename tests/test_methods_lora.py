"""hf_r1ewc.methods.lora: a 3-task run forgets nothing (earlier classes sample bit-identically from every later task
folder, the FID of an old task never moves, old classes' embedding rows and the shared weights stay as task 1 left
them), its adapters load with peft alone, plain diffusers samples classes of task 1 and task 3 row by row as each
route alone, a step trains only the adapter and the new classes' rows, and adapters that do not fit are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    ISOLATION_TASKS,
    assert_nothing_forgotten,
    assert_plain_diffusers_samples_each_route_alone,
    isolation_run,
    make_tiny_unet,
    quiet_pipeline,
)
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from hf_r1ewc.methods import Expected, LoRA, TaskEnd, TaskStart


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return isolation_run(
        tmp_path_factory.mktemp("lora") / "out", "--method", "lora", "--lora_rank", "2", "--no-use_ema"
    )


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_every_earlier_class_samples_bit_identically_and_old_rows_never_move(lora_run):
    assert_nothing_forgotten(lora_run)
    first, second, third = (_unet(lora_run / f"task_0{k}") for k in (1, 2, 3))
    table = "class_embedding.weight"
    assert torch.equal(first[table][[0, 1]], third[table][[0, 1]]) and torch.equal(
        second[table][2:4], third[table][2:4]
    )
    assert not torch.equal(first[table][2:4], second[table][2:4])  # task 2 trained its classes' rows
    assert all(torch.equal(first[k], third[k]) for k in first if k != table)  # the shared weights are frozen
    assert json.loads((lora_run / "task_03" / "metrics.json").read_text())["lora_parameters"] > 0
    card = (lora_run / "task_03" / "README.md").read_text()
    assert "the pipeline's own model serves classes 0, 1; `routes/task_02/` serves classes 2, 3" in card


def test_the_adapters_load_with_peft_alone(lora_run):
    """``PeftModel.from_pretrained(shared model, routes/task_02)``: peft's own loader reads our files; its forward on
    a class of task 2 matches the pipeline's route for that class."""
    from peft import PeftModel

    folder = lora_run / "task_03"
    model = PeftModel.from_pretrained(UNet2DModel.from_pretrained(folder / "unet"), folder / "routes" / "task_02")
    routed = quiet_pipeline(folder).denoiser
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([2, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, class_labels=y).sample, routed(x, t, class_labels=y).sample)
        plain = UNet2DModel.from_pretrained(folder / "unet")(x, t, class_labels=y).sample
        assert not torch.allclose(plain, routed(x, t, class_labels=y).sample)  # the adapter does something


def test_plain_diffusers_samples_classes_of_task_1_and_3_row_by_row_as_each_route_alone(lora_run):
    """Task 3's folder through diffusers alone: task 1's classes (the shared weights) and task 3's (its adapter)."""
    assert_plain_diffusers_samples_each_route_alone(lora_run / "task_03", {"denoiser": [0, 2], "task_03": [1, 3]})


def test_a_step_trains_only_the_adapter_and_the_new_classes_rows():
    """With AdamW's weight decay every row would move; the old rows are put back after the step, and the shared
    weights have no gradient at all."""
    model, lora = make_tiny_unet(), LoRA(rank=2)
    lora.start_task(TaskStart(1, model, [], [0, 1]))
    lora.end_task(TaskEnd(1, model, [], [0, 1]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.start_task(TaskStart(2, model, [0, 1], [2, 3]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"class_embedding.weight"} | {n for n in trainable if ".lora_" in n} and len(trainable) > 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    out = model(torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), class_labels=torch.tensor([2, 3, 2, 3])).sample
    out.pow(2).mean().backward()
    optimizer.step()
    lora.after_optimizer_step(model, 0.1)
    rows = model.class_embedding.weight.detach()
    old = before["class_embedding.weight"]
    assert torch.equal(rows[[0, 1]], old[[0, 1]]) and not torch.equal(rows[[2, 3]], old[[2, 3]])
    lora.end_task(TaskEnd(2, model, [], [2, 3]))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()  # the adapter's layers are out of the model again
    assert all(torch.equal(after[n], before[n]) for n in before if n != "class_embedding.weight")


def _set_weight(folder: Path, change) -> None:
    path = folder / "routes" / "task_02" / "adapter_model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _first_a(state: dict) -> str:
    return next(k for k in state if "lora_A" in k)


def _set_config(folder: Path, **changes) -> None:
    path = folder / "routes" / "task_02" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda f: _set_weight(f, lambda s: s[_first_a(s)].fill_(float("nan"))), "not a finite"),
        (lambda f: _set_weight(f, lambda s: s.update({_first_a(s): torch.zeros(3, 1)})), "rank 2 on this layer"),
        (
            lambda f: _set_weight(f, lambda s: s.update({"base_model.model.nope.lora_A.weight": torch.zeros(2, 2)})),
            "not a LoRA weight",
        ),
        (lambda f: _set_config(f, r=4), "rank 4 on this layer"),
        (lambda f: shutil.rmtree(f / "routes" / "task_02"), "routes/task_02 cannot be used"),
        (lambda f: _set_config(f, peft_type="IA3"), "not LoRA"),
    ],
)
def test_an_adapter_that_does_not_fit_is_refused_before_anything_is_taken(lora_run, tmp_path, tamper, message):
    folder = shutil.copytree(lora_run / "task_02", tmp_path / "task_02")
    expected = Expected.of(UNet2DModel.from_pretrained(folder / "unet"), ISOLATION_TASKS, 2)
    LoRA(rank=2).load_task_folder(folder, expected)  # the folder as written loads
    tamper(folder)
    method = LoRA(rank=2)
    with pytest.raises(ValueError, match=message):
        method.load_task_folder(folder, expected)
    assert not method.adapters and not method.class_routes


def test_a_dit_gets_adapters_on_its_blocks_and_keeps_its_old_label_rows():
    """The DiT's attention, feed-forward and adaLN get adapters; its label table (one per block, with the null
    class of classifier-free guidance last) trains only the new classes' rows; the routed model serves a mixed batch."""
    from conftest import make_tiny_dit

    model, lora = make_tiny_dit(), LoRA(rank=2)
    lora.start_task(TaskStart(1, model, [], [0, 1]))
    lora.end_task(TaskEnd(1, model, [], [0, 1]))
    table = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    old = dict(model.named_parameters())[table].detach().clone()
    lora.start_task(TaskStart(2, model, [0, 1], [2, 3]))
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert {
        "transformer_blocks.0.attn1.to_q",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.norm1.linear",
    } <= adapted
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), class_labels=torch.tensor([2, 3])).sample
    out.pow(2).mean().backward()
    optimizer.step()
    lora.after_optimizer_step(model, 0.1)
    rows = dict(model.named_parameters())[table].detach()
    assert torch.equal(rows[[0, 1, 4]], old[[0, 1, 4]]) and not torch.equal(rows[[2, 3]], old[[2, 3]])
    routed = lora.serve(model.eval())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([7, 7, 7])
    with torch.no_grad():
        mixed = routed(x, t, class_labels=torch.tensor([0, 2, 1])).sample
        alone = routed(x[[1]], t[[1]], class_labels=torch.tensor([2])).sample
    assert torch.equal(mixed[[1]], alone)


def test_a_step_under_bf16_autocast_trains_the_adapter_in_fp32_and_keeps_old_rows():
    """A model prepared by Accelerate with bf16 (autocast on the CPU): the adapter's weights and the class table stay
    float32 and move; the old classes' rows do not."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from hf_r1ewc.continual import ContinualLearner, make_optimizer

    model, lora = make_tiny_unet(), LoRA(rank=2)
    learner = ContinualLearner(DDIMScheduler(num_train_timesteps=1000), [lora])
    learner.start_task(TaskStart(1, model, [], [0, 1]))
    learner.end_task(TaskEnd(1, model, [], [0, 1]))
    learner.start_task(TaskStart(2, model, [0, 1], [2, 3]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        prepared, optimizer = accelerator.prepare(model, make_optimizer(model, 1e-2))
        x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([2, 3, 2, 3])
        learner.training_step(accelerator, prepared, optimizer, x, y, torch.Generator().manual_seed(0))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".lora_" in n or n == "class_embedding.weight" for n in moved)
    assert all(after[n].dtype == torch.float32 for n in moved)
    assert torch.equal(after["class_embedding.weight"][[0, 1]], before["class_embedding.weight"][[0, 1]])
