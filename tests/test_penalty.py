"""The EWC penalty and its proximal step against explicit dense quadratic forms on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_r1ewc.fisher import FisherStatistics, fisher_statistics, load_fisher, save_fisher
from hf_r1ewc.penalty import EWCPenalty


KINDS = ("rank1", "rank1_unscaled", "diag")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _unflat(vector, model):
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = vector[start : start + p.numel()].view_as(p).float()
        start += p.numel()
    return out


def _random_task(model, seed):
    g = torch.Generator().manual_seed(seed)
    P = sum(p.numel() for p in model.parameters())
    mu = torch.randn(P, generator=g, dtype=torch.float64) * 0.1
    diag = torch.rand(P, generator=g, dtype=torch.float64) * 0.5
    theta_star = torch.randn(P, generator=g, dtype=torch.float64)
    c_star = float(torch.rand((), generator=g)) * 3 + 0.5
    stats = FisherStatistics(mu=_unflat(mu, model), diag=_unflat(diag, model), c_star=c_star, num_samples=10)
    return stats, _unflat(theta_star, model), (mu, diag, theta_star, c_star)


def _penalty_with_tasks(model, kind, ewc_lambda, seeds):
    """A penalty over random tasks (one per seed), and those tasks."""
    tasks = [_random_task(model, seed) for seed in seeds]
    penalty = EWCPenalty(kind, ewc_lambda=ewc_lambda)
    for stats, theta_star, _ in tasks:
        penalty.add_task(stats, theta_star)
    return penalty, tasks


def _dense_terms(kind, tasks):
    """[(F_k dense, theta*_k)] with F_k as stored in float32 (the penalty keeps float32 tensors)."""
    out = []
    for _, _, (mu, diag, theta_star, c_star) in tasks:
        mu32, diag32, theta32 = mu.float().double(), diag.float().double(), theta_star.float().double()
        if kind == "diag":
            dense = torch.diag(diag32)
        else:
            dense = (c_star if kind == "rank1" else 1.0) * torch.outer(mu32, mu32)
        out.append((dense, theta32))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_value_and_gradient_equal_explicit_quadratic(kind):
    model = _model()
    penalty, tasks = _penalty_with_tasks(model, kind, 37.0, (1, 2, 3))
    theta = _flat(model).requires_grad_(True)
    explicit = sum(0.5 * (theta - ts) @ F @ (theta - ts) for F, ts in _dense_terms(kind, tasks)) * 37.0
    (explicit_grad,) = torch.autograd.grad(explicit, theta)
    value = penalty(model)
    value.backward()
    ours_grad = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(explicit), rel=1e-5)
    assert float((ours_grad - explicit_grad).norm() / explicit_grad.norm()) <= 1e-5


def test_merged_diagonal_equals_per_task_sum_and_constant_memory():
    model = _model()
    tasks = [_random_task(model, seed) for seed in range(5)]
    merged = EWCPenalty("diag", ewc_lambda=2.0)
    singles = []
    for stats, theta_star, _ in tasks:
        merged.add_task(stats, theta_star)
        single = EWCPenalty("diag", ewc_lambda=2.0)
        single.add_task(stats, theta_star)
        singles.append(single)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    assert float(merged(model)) == pytest.approx(sum(float(s(model)) for s in singles), rel=1e-5)
    sizes = {k: v.numel() for k, v in merged.state_dict().items()}
    assert sum(sizes.values()) == 2 * sum(p.numel() for p in model.parameters()) + 3  # A, m, constant, K, lambda


def test_penalty_is_zero_at_the_anchor_and_with_no_task():
    model = _model()
    stats, _, _ = _random_task(model, 0)
    for kind in KINDS:
        penalty = EWCPenalty(kind, 10.0)
        assert float(penalty(model)) == 0.0
        penalty.add_task(stats, model)
        assert abs(float(penalty(model))) < 1e-6


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model()
    for kind in KINDS:
        penalty = EWCPenalty(kind, 5.0)
        for seed in (1, 2):
            stats, theta_star, _ = _random_task(model, seed)
            penalty.add_task(stats, theta_star)
        save_file(penalty.state_dict(), str(tmp_path / f"{kind}.safetensors"))
        restored = EWCPenalty(kind, 0.0)
        restored.load_state_dict(load_file(str(tmp_path / f"{kind}.safetensors")))
        assert restored.num_tasks == 2 and restored.ewc_lambda == 5.0
        assert float(restored(model)) == float(penalty(model))


@pytest.mark.parametrize("mode", ["value", "proximal"])
def test_restored_penalty_rounds_as_the_saved_one_wherever_it_is_bound(mode):
    """A run resumed mid-task binds its restored penalty at other weights than the uninterrupted run did: both take
    the float32 projections relative to theta*_K (kept in the state) and agree bit for bit (value, gradient, proximal
    step), not only to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    stats, _, _ = _random_task(model, 3)
    penalty = EWCPenalty("rank1", 15000.0)
    penalty.add_task(stats, model)  # theta*_1: the model's weights now

    def move(m, seed):  # a training step's worth of change
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)

    move(model, 1)
    penalty(model)  # the uninterrupted run binds here, at its first step
    move(model, 2)  # ... and goes on to where the checkpoint was written
    resumed_model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    resumed_model.load_state_dict(model.state_dict())
    restored = EWCPenalty("rank1", 0.0)
    restored.load_state_dict(penalty.state_dict())
    for m, p in ((model, penalty), (resumed_model, restored)):
        if mode == "value":
            m.zero_grad()
            p(m).backward()
        else:
            p.proximal_step(m, 1e-3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
        if mode == "value":
            assert torch.equal(a.grad, b.grad)
    assert float(penalty(model)) == float(restored(resumed_model))


def test_consolidating_after_a_restore_matches_bit_for_bit(tmp_path):
    """The next task's terms (b, c, Gram) do not depend on whether the penalty was kept in memory or read back from a
    file, whose tensors come in another order than the model's parameters."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(12)])
    kept = EWCPenalty("rank1", 1.0)
    kept.add_task(_random_task(model, 1)[0], model)
    save_file(kept.state_dict(), str(tmp_path / "p.safetensors"))
    restored = EWCPenalty("rank1", 1.0)
    restored.load_state_dict(load_file(str(tmp_path / "p.safetensors")))
    for seed in (2, 3):
        stats = _random_task(model, seed)[0]
        kept.add_task(stats, model)
        restored.add_task(stats, model)
    a, b = kept.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_penalty_from_real_fisher_file(tmp_path):
    from conftest import make_tiny_unet

    unet = make_tiny_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    stats = fisher_statistics(
        unet, x, torch.tensor([10, 500, 900, 300]), torch.tensor([0, 1, 2, 3]), torch.randn_like(x)
    )
    save_fisher(str(tmp_path / "f.safetensors"), stats)
    penalty = EWCPenalty("rank1", 15000.0)
    penalty.add_task(load_fisher(str(tmp_path / "f.safetensors"), unet), unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    theta_star = torch.cat([p.detach().double().flatten() for p in make_tiny_unet().parameters()])
    theta = torch.cat([p.detach().double().flatten() for p in unet.parameters()])
    mu = torch.cat([stats.mu[n].double().flatten() for n, _ in unet.named_parameters()])
    expected = 0.5 * 15000.0 * stats.c_star * float(mu @ (theta - theta_star)) ** 2
    assert float(penalty(unet)) == pytest.approx(expected, rel=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="unknown EWC penalty kind"):
        EWCPenalty("full", 1.0)
    with pytest.raises(ValueError, match="ewc_lambda must be >= 0"):
        EWCPenalty("rank1", -1.0)
    model = _model()
    stats, theta_star, _ = _random_task(model, 0)
    with pytest.raises(ValueError, match="needs diagonal statistics"):
        EWCPenalty("diag", 1.0).add_task(FisherStatistics(stats.mu, None, 1.0, 3), theta_star)
    wrong = dict(stats.mu)
    wrong.pop("0.weight")
    with pytest.raises(ValueError, match=r"missing \['0.weight'\]"):
        EWCPenalty("rank1", 1.0).add_task(FisherStatistics(wrong, None, 1.0, 3), theta_star)


# -------------------------------------------------------------------------------------------- proximal step


def _dense_minimiser(theta_tilde, step, lam, terms):
    """argmin 1/2 ||theta - theta~||^2 + step * lam/2 sum_k (theta - theta*_k)^T F_k (theta - theta*_k), dense."""
    P = theta_tilde.numel()
    system = torch.eye(P, dtype=torch.float64) + step * lam * sum(F for F, _ in terms)
    rhs = theta_tilde + step * lam * sum(F @ ts for F, ts in terms)
    return torch.linalg.solve(system, rhs)


@pytest.mark.parametrize("kind", KINDS)
def test_proximal_step_equals_dense_minimiser(kind):
    model = _model()
    penalty, tasks = _penalty_with_tasks(model, kind, 50.0, (4, 5, 6))
    theta_tilde = _flat(model)
    expected = _dense_minimiser(theta_tilde, 0.01, 50.0, _dense_terms(kind, tasks))
    before = float(penalty(model))
    penalty.proximal_step(model, step_size=0.01)
    after = _flat(model)
    assert float((after - expected).norm() / expected.norm()) <= 1e-6
    assert float(penalty(model)) <= before  # the step never increases the penalty


@pytest.mark.parametrize("kind", KINDS)
def test_proximal_step_limits(kind):
    model = _model()
    penalty, tasks = _penalty_with_tasks(model, kind, 0.0, (7, 8, 9))
    theta_tilde = _flat(model)
    penalty.proximal_step(model, step_size=0.1)
    assert torch.equal(_flat(model), theta_tilde)  # lambda = 0 leaves theta unchanged
    penalty.ewc_lambda = 1e12
    penalty.proximal_step(model, step_size=1e-3)
    after = _flat(model)
    assert torch.isfinite(after).all()
    if kind == "diag":  # pulled onto the precision-weighted anchor
        anchor = torch.cat([penalty.terms.anchor[n].double().flatten() for n, _ in model.named_parameters()])
        assert float((after - anchor).abs().max()) <= 1e-5
    else:  # on the constraint set mu_k^T theta = b_k for every task
        residual = penalty.terms.projections(penalty.bind(model)) - penalty.terms.b
        scale = torch.stack([ts.float().double().abs().sum() * mu.abs().max() for _, _, (mu, _, ts, _) in tasks])
        assert bool((residual.abs() <= 1e-5 * scale).all()), residual


@pytest.mark.parametrize("kind", ["rank1", "rank1_unscaled"])
def test_bf16_mu_storage_is_consistent(kind):
    """With mu stored in bf16, b_k and the Gram matrix come from the stored mu: the penalty is 0 at theta*_k and the
    proximal step is the exact minimiser for the stored (rounded) quadratic."""
    model = _model()
    stats, theta_star, (mu, _, _, c_star) = _random_task(model, 3)
    penalty = EWCPenalty(kind, 1e4, mu_dtype=torch.bfloat16)
    penalty.add_task(stats, theta_star)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta_star[n])
    assert float(penalty(model)) == 0.0 or abs(float(penalty(model))) <= 1e-9
    stored = torch.cat([penalty.terms.mu[n][0].double().flatten() for n, _ in model.named_parameters()])
    scale = c_star if kind == "rank1" else 1.0
    theta_tilde = _flat(model) + 0.05
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.05)
    expected = _dense_minimiser(
        theta_tilde,
        0.01,
        1e4,
        [
            (
                scale * torch.outer(stored, stored),
                torch.cat([theta_star[n].double().flatten() for n, _ in model.named_parameters()]),
            )
        ],
    )
    penalty.proximal_step(model, step_size=0.01)
    assert float((_flat(model) - expected).norm() / expected.norm()) <= 1e-6
