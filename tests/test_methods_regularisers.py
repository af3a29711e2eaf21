"""hf_r1ewc.methods.l2, .synaptic_intelligence, .mas, .knowledge_distillation against hand computations on tiny
models: L2's value and gradient, SI's omega after two hand-made steps and its Omega, MAS's importance by explicit
per-sample loops, KD's term on the real rows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner, fisher_loader
from hf_r1ewc.distill import distillation_loss
from hf_r1ewc.fisher import sample_noise
from hf_r1ewc.methods import L2, MAS, Expected, KnowledgeDistillation, SynapticIntelligence, TaskEnd, TaskStart
from hf_r1ewc.methods.mas import output_norm_sensitivity


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def test_l2_value_and_gradient():
    method, anchor, moved = L2(3.0), make_tiny_unet(), make_tiny_unet(seed=1)
    assert method.penalty(moved) is None
    method.end_task(TaskEnd(1, anchor, [], [0, 1]))
    value = method.penalty(moved)
    diff = _flat(moved) - _flat(anchor)
    assert float(value) == pytest.approx(1.5 * float(diff.pow(2).sum()), rel=1e-6)
    grads = torch.autograd.grad(value, list(moved.parameters()))
    assert torch.allclose(torch.cat([g.double().flatten() for g in grads]), 3.0 * diff, rtol=1e-5, atol=1e-7)


class Pair(torch.nn.Module):
    """Two scalar-ish parameters: SI by hand."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([-1.0]))


def test_si_omega_after_two_hand_made_steps_and_its_importance():
    """omega = -sum_steps g * dtheta with the optimizer's own step; Omega = omega / ((theta_k - theta_{k-1})^2 + xi);
    in the next task g excludes SI's own penalty gradient 2 c Omega (theta - theta*)."""
    model, si = Pair(), SynapticIntelligence(weight=2.0, xi=0.5)
    si.start_task(TaskStart(1, model, [], [0]))
    steps = [
        ({"a": [0.5, -1.0], "b": [2.0]}, {"a": [-0.1, 0.2], "b": [-0.3]}),
        ({"a": [1.0, 0.0], "b": [-1.0]}, {"a": [0.05, 0.0], "b": [0.1]}),
    ]
    omega = {"a": torch.zeros(2), "b": torch.zeros(1)}
    for grads, delta in steps:
        for name, p in model.named_parameters():
            p.grad = torch.tensor(grads[name])
        si.after_backward(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.tensor(delta[name]))  # the optimizer's step, whatever its rule
        si.after_optimizer_step(model, 0.1)
        for name in omega:
            omega[name] -= torch.tensor(grads[name]) * torch.tensor(delta[name])
    assert all(torch.allclose(si.omega[n], omega[n]) for n in omega)
    moved = {"a": torch.tensor([-0.05, 0.2]), "b": torch.tensor([-0.2])}
    si.end_task(TaskEnd(1, model, [], [0]))
    expected = {n: omega[n] / (moved[n] ** 2 + 0.5) for n in omega}
    assert all(torch.allclose(si.importance[n], expected[n]) for n in omega)
    assert si.penalty(model) is not None and float(si.penalty(model)) == 0.0  # at theta*_1
    # task 2: the gradient SI integrates is backward's minus its own penalty's
    si.start_task(TaskStart(2, model, [0], [1]))
    with torch.no_grad():
        model.a.add_(0.3)
    model.zero_grad()
    penalty = si.penalty(model)
    penalty.backward()
    si.after_backward(model)  # the gradient backward left is exactly SI's own: g = 0
    with torch.no_grad():
        model.a.add_(1.0)
    si.after_optimizer_step(model, 0.1)
    assert all(float(v.abs().max()) < 1e-7 for v in si.omega.values())
    assert float(penalty) == pytest.approx(2.0 * float((expected["a"] * 0.09).sum()), rel=1e-5)


def test_si_state_round_trips_with_its_path_integral():
    model, si = Pair(), SynapticIntelligence()
    si.start_task(TaskStart(1, model, [], [0]))
    si.omega["a"] += 3.0
    restored = SynapticIntelligence()
    restored.load_state_dict(si.state_dict(), Expected.of(model, [[0]], 0, within_task=True))
    assert torch.equal(restored.omega["a"], si.omega["a"]) and torch.equal(restored.start["b"], si.start["b"])


def test_mas_importance_by_explicit_per_sample_loops():
    """Omega = mean_i |grad mean_pixels(eps_theta(x_t,i)^2)| with each sample's seeded (t, eps), by a loop of
    ordinary backward passes, one sample at a time."""
    unet = make_tiny_unet().eval()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1, 1])
    loader = fisher_loader(images, labels, None, 2, seed=0)
    omega = output_norm_sensitivity(unet, SCHEDULER, loader, seed=7)
    by_hand = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in unet.named_parameters()}
    for i in range(5):
        t, eps = sample_noise(i, 7, (1, 8, 8), (0, 1000))
        x_t = SCHEDULER.add_noise(images[i : i + 1], eps[None], t)
        out = unet(x_t, t, class_labels=labels[i : i + 1]).sample.pow(2).mean()
        grads = torch.autograd.grad(out, list(unet.parameters()))
        for (n, _), gr in zip(unet.named_parameters(), grads):
            by_hand[n] += gr.double().abs() / 5
    for n, value in omega.items():
        torch.testing.assert_close(value.double(), by_hand[n], rtol=1e-4, atol=1e-9)
    method = MAS(SCHEDULER, weight=2.0)
    method.end_task(TaskEnd(1, unet, fisher_loader(images, labels, None, 2, seed=0), [0, 1], seed=6))
    method.end_task(TaskEnd(1, unet, fisher_loader(images, labels, None, 2, seed=0), [0, 1], seed=6))
    assert all(torch.allclose(method.importance[n], 2 * omega[n]) for n in omega)  # summed over tasks
    moved = make_tiny_unet(seed=1)
    expected = sum(
        float((2 * omega[n].double() * (p.detach().double() - q.detach().double()) ** 2).sum())
        for (n, p), q in zip(moved.named_parameters(), unet.parameters())
    )
    assert float(method.penalty(moved)) == pytest.approx(2.0 * expected, rel=1e-5)


def test_kd_is_the_teacher_on_the_real_rows():
    student, old = make_tiny_unet().eval(), make_tiny_unet(seed=3).eval()
    kd = KnowledgeDistillation(weight=0.5)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    kd.start_task(TaskStart(1, old, [], [0, 1]))
    assert kd.teacher is None
    kd.start_task(TaskStart(2, old, [0, 1], [2, 3]))
    terms = ContinualLearner(SCHEDULER, [kd]).loss(student, x, y, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    noisy = SCHEDULER.add_noise(x, noise, t)
    with torch.no_grad():
        by_hand = distillation_loss(student(noisy, t, class_labels=y).sample, old(noisy, t, class_labels=y).sample)
    assert float(terms["kd"]) == pytest.approx(float(by_hand), rel=1e-6) and float(by_hand) > 0
    assert float(terms["loss"]) == pytest.approx(float(terms["denoise"]) + 0.5 * float(by_hand), rel=1e-6)


def _finished_one_task(name: str, unet):
    """L2, SI or MAS after one task on ``unet`` (classes 0, 1), as its task folder would restore it."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1])
    method = {"l2": lambda: L2(), "si": lambda: SynapticIntelligence(), "mas": lambda: MAS(SCHEDULER)}[name]()
    method.start_task(TaskStart(1, unet, [], [0, 1]))
    method.end_task(TaskEnd(1, unet, fisher_loader(images, labels, None, 2, seed=0), [0, 1]))
    return method


FIRST = "conv_in.weight"


@pytest.mark.parametrize(
    "name, tamper, message",
    [
        (
            "si",
            lambda t, k: t.__setitem__(k, t[k][:1]),
            r"importance.conv_in.weight has shape \[1, 1, 3, 3\], the model's needs \[4, 1, 3, 3\]",
        ),
        ("si", lambda t, k: t.pop(k), "missing"),
        ("si", lambda t, k: t[k].view(-1).__setitem__(0, float("nan")), "non-finite"),
        ("si", lambda t, k: t[k].view(-1).__setitem__(0, float("inf")), "non-finite"),
        ("si", lambda t, k: t.__setitem__(k, t[k].long()), "not a floating-point tensor"),
        ("si", lambda t, k: t.__setitem__("importance.extra", torch.zeros(1)), r"unexpected \['importance.extra'\]"),
        ("mas", lambda t, k: t[k].view(-1).__setitem__(0, -1.0), "negative values"),
        ("l2", lambda t, k: t.__setitem__(k, torch.zeros(3)), "has shape"),
    ],
    ids=["si_shape", "si_missing", "si_nan", "si_inf", "si_int", "si_extra", "mas_negative", "l2_shape"],
)
def test_a_tampered_method_file_is_refused_naming_the_file_and_taking_nothing(tmp_path, name, tamper, message):
    """Digests rewritten to match: a wrong shape or a missing key used to be a traceback (size mismatch, KeyError),
    NaN/inf trained on until task 2 stopped with advice to lower the learning rate."""
    from safetensors.torch import save_file

    unet = make_tiny_unet()
    ((filename, payload),) = _finished_one_task(name, unet).task_files(1, [0, 1]).items()
    tensors = {k: v.clone() for k, v in payload.tensors.items()}
    key = next(k for k in tensors if k in (FIRST, f"importance.{FIRST}"))  # (L2 keeps the anchor alone)
    tamper(tensors, key)
    save_file(tensors, str(tmp_path / filename))
    fresh = {"l2": lambda: L2(), "si": lambda: SynapticIntelligence(), "mas": lambda: MAS(SCHEDULER)}[name]()
    with pytest.raises(ValueError, match=message) as raised:
        fresh.load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))
    assert filename in str(raised.value)
    assert fresh.penalty(unet) is None  # nothing taken


@pytest.mark.parametrize("name", ["l2", "si", "mas"])
def test_an_intact_method_file_restores_the_penalty(tmp_path, name):
    from safetensors.torch import save_file

    unet = make_tiny_unet()
    method = _finished_one_task(name, unet)
    for filename, payload in method.task_files(1, [0, 1]).items():
        save_file(payload.tensors, str(tmp_path / filename))
    fresh = {"l2": lambda: L2(), "si": lambda: SynapticIntelligence(), "mas": lambda: MAS(SCHEDULER)}[name]()
    fresh.load_task_folder(tmp_path, Expected.of(unet, [[0, 1]], 1))
    moved = make_tiny_unet(seed=1)
    assert float(fresh.penalty(moved)) == pytest.approx(float(method.penalty(moved)), rel=1e-6)


def test_l2_anchor_grows_with_the_model_new_rows_from_the_model_it_starts_from(tmp_path):
    """An L2 anchor written at 4 classes, read by a model grown to 6: the old rows are theta*_{k-1}'s, the new rows
    the grown model's own (its start), so the penalty is 0 where the task starts and the new rows are free of it."""
    from safetensors.torch import save_file

    from hf_r1ewc.methods.l2 import ANCHOR_FILE
    from hf_r1ewc.models import grow_class_embedding

    trained = make_tiny_unet(seed=2)
    save_file({n: p.detach().contiguous() for n, p in trained.named_parameters()}, str(tmp_path / ANCHOR_FILE))
    grown = make_tiny_unet(seed=2)
    growth = grow_class_embedding(grown, 6, learned=[0, 1])
    method = L2(3.0)
    method.load_task_folder(tmp_path, Expected.of(grown, [[0, 1]], 1, growth=growth))
    method.start_task(TaskStart(2, grown, [0, 1], [4, 5]))
    assert torch.equal(method.anchor["class_embedding.weight"], grown.class_embedding.weight.detach())
    assert float(method.penalty(grown)) == 0.0
