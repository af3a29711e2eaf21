"""hf_r1ewc.methods.ewc: the penalty in the loss or as a proximal step, the Fisher at a task's end, the task-folder
files and their restore at the run's lambda."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner, fisher_loader
from hf_r1ewc.fisher import estimate_fisher
from hf_r1ewc.methods import EWC, Expected, SafetensorsFile, TaskEnd
from hf_r1ewc.penalty import EWCPenalty


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def _task_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 2, (n,), generator=g)


def _consolidated(kind: str, mode: str, ewc_lambda: float = 100.0) -> tuple[EWC, torch.nn.Module, dict]:
    unet = make_tiny_unet().eval()
    method = EWC(SCHEDULER, kind, ewc_lambda, mode)
    images, labels = _task_data()
    metrics = method.end_task(TaskEnd(1, unet, fisher_loader(images, labels, None, 8, seed=0), [0, 1], seed=3))
    return method, unet, metrics


@pytest.mark.parametrize("kind", ["rank1", "rank1_unscaled", "diag"])
def test_end_task_adds_the_exact_fisher_seeded_by_the_task(kind):
    """The term end_task adds is estimate_fisher's at theta*_k with the generator seeded by seed + task index: the
    penalty equals an EWCPenalty built from that estimate by hand, at moved weights."""
    method, unet, metrics = _consolidated(kind, "loss")
    images, labels = _task_data()
    stats = estimate_fisher(
        unet,
        SCHEDULER,
        fisher_loader(images, labels, None, 8, seed=0),
        kinds=("diag",) if kind == "diag" else ("rank1",),
        generator=torch.Generator().manual_seed(3 + 1),
        show_progress=False,
    )
    by_hand = EWCPenalty(kind, 100.0)
    by_hand.add_task(stats, unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05)
    assert float(method.penalty(unet)) == float(by_hand(unet)) > 0
    assert (metrics["c_star"] is None) == (kind == "diag") and method.penalty_module.num_tasks == 1


def test_in_the_loss_or_as_a_proximal_step():
    """mode="loss": lambda*EWC is the learner's ewc term and joins the loss; "decoupled": the term is 0 and
    after_optimizer_step moves theta to the exact proximal point (EWCPenalty.proximal_step)."""
    images, labels = _task_data(4)
    for mode in ("loss", "decoupled"):
        method, unet, _ = _consolidated("rank1", mode)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05)
        terms = ContinualLearner(SCHEDULER, [method]).loss(unet, images, labels, torch.Generator().manual_seed(0))
        penalty = float(method.penalty(unet))
        assert float(terms["ewc"]) == (penalty if mode == "loss" else 0.0)
        assert float(terms["loss"]) == pytest.approx(float(terms["denoise"]) + float(terms["ewc"]), rel=1e-6)
        expected = make_tiny_unet()
        expected.load_state_dict(unet.state_dict())
        method.penalty_module.proximal_step(expected, 0.1)
        ContinualLearner(SCHEDULER, [method]).after_optimizer_step(unet, 0.1)
        moved = [torch.equal(a, b) for a, b in zip(unet.parameters(), expected.parameters())]
        if mode == "decoupled":
            assert all(moved) and float(method.penalty(unet)) < penalty
        else:
            assert float(method.penalty(unet)) == penalty  # the loss mode takes no step


def test_task_files_restore_the_penalty_at_the_runs_lambda(tmp_path):
    """task_files: fisher.safetensors (this task's statistics, with its index and classes) and
    ewc_penalty.safetensors; load_task_folder restores the penalty at the restoring method's lambda, and names a
    missing or damaged file."""
    from safetensors.torch import save_file

    from hf_r1ewc.fisher import load_fisher

    method, unet, _ = _consolidated("rank1", "loss", ewc_lambda=100.0)
    files = method.task_files(1, [0, 1])
    assert set(files) == {"fisher.safetensors", "ewc_penalty.safetensors"}
    for name, payload in files.items():
        assert isinstance(payload, SafetensorsFile)
        save_file(payload.tensors, str(tmp_path / name), payload.metadata)
    assert load_fisher(str(tmp_path / "fisher.safetensors")).metadata["classes"] == "[0, 1]"
    restored = EWC(SCHEDULER, "rank1", 10.0)
    restored.load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))
    assert restored.ewc_lambda == 10.0 and restored.penalty_module.num_tasks == 1
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05)
    assert float(restored.penalty(unet)) == pytest.approx(float(method.penalty(unet)) / 10, rel=1e-6)
    (tmp_path / "ewc_penalty.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="ewc_penalty.safetensors cannot be used"):
        EWC(SCHEDULER, "rank1", 10.0).load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))
    (tmp_path / "ewc_penalty.safetensors").unlink()
    with pytest.raises(ValueError, match="has no ewc_penalty.safetensors"):
        EWC(SCHEDULER, "rank1", 10.0).load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        EWC(SCHEDULER, "rank1", 1.0, "sideways")
    with pytest.raises(ValueError, match="unknown EWC kind"):
        EWC(SCHEDULER, "rank2", 1.0)
    assert EWC(SCHEDULER, "diag", 1000.0, "decoupled").label() == "diag EWC (lambda=1000, decoupled)"


@pytest.mark.parametrize(
    "kind, tamper, message",
    [
        ("rank1", lambda t: t.__setitem__("num_tasks", torch.tensor(2)), r"num_tasks is 2, outside \[1, 1\]"),
        ("rank1", lambda t: t.__setitem__("num_tasks", torch.tensor(1.0)), "num_tasks must be an integer scalar"),
        ("rank1", lambda t: t.__setitem__("c", -t["c"]), "c holds negative values"),
        (
            "rank1",
            lambda t: t.__setitem__("mu.conv_in.weight", t["mu.conv_in.weight"][:, :2]),
            "mu.conv_in.weight has",
        ),
        ("rank1", lambda t: t.pop("gram"), r"missing \['gram'\]"),
        ("rank1", lambda t: t.__setitem__("ewc_lambda", torch.tensor(float("inf"))), "non-finite"),
        ("diag", lambda t: t["precision.conv_in.weight"].view(-1).__setitem__(0, -1.0), "negative values"),
        ("diag", lambda t: t.pop("anchor.conv_in.bias"), r"missing \['anchor.conv_in.bias'\]"),
    ],
    ids=["k_too_many", "k_float", "c_negative", "mu_shape", "no_gram", "lambda_inf", "diag_negative", "diag_missing"],
)
def test_a_tampered_penalty_is_refused_naming_the_file_and_taking_nothing(tmp_path, kind, tamper, message):
    """ewc_penalty.safetensors with its digest rewritten: shapes, the task count, c* >= 0 and the diagonal Fisher
    >= 0 are checked against the model and the finished tasks before the penalty takes any of it."""
    from safetensors.torch import save_file

    method, unet, _ = _consolidated(kind, "loss")
    tensors = {k: v.clone() for k, v in method.penalty_module.state_dict().items()}
    tamper(tensors)
    save_file(tensors, str(tmp_path / "ewc_penalty.safetensors"))
    fresh = EWC(SCHEDULER, kind, 10.0)
    with pytest.raises(ValueError, match=message) as raised:
        fresh.load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))
    assert "ewc_penalty.safetensors cannot be used" in str(raised.value) and fresh.penalty_module.num_tasks == 0
