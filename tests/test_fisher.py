"""Fisher statistics against brute force: explicit per-sample gradient loops in float64 and the dense Fisher."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.fisher import (
    FisherSums,
    accumulate_first_pass,
    accumulate_second_pass,
    estimate_fisher,
    finalize,
    fisher_statistics,
    forward_ad_safe,
    load_fisher,
    sample_noise,
    save_fisher,
    trainable_parameters,
)


def _inputs(n=10, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return scheduler.add_noise(x0, noise, t), t, y, noise


def _brute_force_gradients(unet, x_t, t, y, noise):
    """[N, P] float64 per-sample gradients by an explicit loop over samples on a float64 copy of the model."""
    model = copy.deepcopy(unet).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x_t.shape[0]):
        pred = model(x_t[i : i + 1].double(), t[i : i + 1], class_labels=y[i : i + 1]).sample
        loss = (pred - noise[i : i + 1].double()).pow(2).mean()
        grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return names, torch.stack(rows)


def _flat(stats_dict, names):
    return torch.cat([stats_dict[n].double().flatten() for n in names])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_statistics_match_brute_force_and_dense_fisher(tiny_denoiser):
    x_t, t, y, noise = _inputs(n=10)
    stats = fisher_statistics(tiny_denoiser, x_t, t, y, noise, kinds=("rank1", "diag"))
    names, G = _brute_force_gradients(tiny_denoiser, x_t, t, y, noise)
    assert G.shape[1] == sum(p.numel() for p in tiny_denoiser.parameters()) < 6000
    mu = G.mean(0)
    dense = G.T @ G / G.shape[0]  # the empirical Fisher, P x P
    c_star = float(mu @ dense @ mu / mu.norm() ** 4)
    assert stats.num_samples == 10
    assert _rel(_flat(stats.mu, names), mu) <= 1e-5
    assert abs(stats.c_star - c_star) / c_star <= 1e-5
    assert _rel(_flat(stats.diag, names), torch.diagonal(dense)) <= 1e-5
    # the textbook bug, squaring the batch-mean gradient, is far from the true diagonal
    assert _rel(mu.pow(2), torch.diagonal(dense)) > 0.3


def test_rank1_only_uses_jvp_and_agrees(tiny_denoiser):
    x_t, t, y, noise = _inputs(n=7, seed=1)
    both = fisher_statistics(tiny_denoiser, x_t, t, y, noise, kinds=("rank1", "diag"))
    rank1 = fisher_statistics(tiny_denoiser, x_t, t, y, noise, kinds=("rank1",), chunk_size=3)
    assert rank1.diag is None and rank1.kinds == ("rank1",)
    assert abs(rank1.c_star - both.c_star) / both.c_star <= 1e-5
    diag = fisher_statistics(tiny_denoiser, x_t, t, y, noise, kinds=("diag",), chunk_size=2)
    assert diag.mu is None and diag.c_star is None
    names = list(both.diag)
    assert _rel(_flat(diag.diag, names), _flat(both.diag, names)) <= 1e-5


def test_model_is_restored_after_estimation(tiny_unet):
    from diffusers.models.attention_processor import Attention

    before = [type(m.processor) for m in tiny_unet.modules() if isinstance(m, Attention)]
    x_t, t, y, noise = _inputs(n=3)
    fisher_statistics(tiny_unet, x_t, t, y, noise)
    assert [type(m.processor) for m in tiny_unet.modules() if isinstance(m, Attention)] == before
    assert not any(m._forward_pre_hooks for m in tiny_unet.modules())


def test_partial_sums_merge_like_one_process(tiny_unet):
    """Two 'processes' with half the samples each, merged by adding sums, equal one pass over all samples."""
    x_t, t, y, noise = _inputs(n=8, seed=2)
    whole = fisher_statistics(tiny_unet, x_t, t, y, noise)
    params = trainable_parameters(tiny_unet)
    halves = [slice(0, 5), slice(5, 8)]

    def add(a: FisherSums, b: FisherSums) -> FisherSums:
        plus = lambda d, e: None if d is None else {k: d[k] + e[k] for k in d}  # noqa: E731
        return FisherSums(
            a.count + b.count,
            plus(a.grad_sum, b.grad_sum),
            a.proj_sq_sum + b.proj_sq_sum,
            plus(a.grad_sq_sum, b.grad_sq_sum),
        )

    with forward_ad_safe(tiny_unet):
        parts = [FisherSums(), FisherSums()]
        for part, s in zip(parts, halves):
            accumulate_first_pass(tiny_unet, part, x_t[s], t[s], y[s], noise[s])
        merged = add(*parts)
        mu = {k: (v / merged.count).float() for k, v in merged.grad_sum.items()}
        seconds = [FisherSums(), FisherSums()]
        for part, s in zip(seconds, halves):
            accumulate_second_pass(tiny_unet, params, mu, part, x_t[s], t[s], y[s], noise[s], ("rank1", "diag"))
    second = add(*seconds)
    stats = finalize(
        FisherSums(merged.count, merged.grad_sum, second.proj_sq_sum, second.grad_sq_sum), ("rank1", "diag")
    )
    assert abs(stats.c_star - whole.c_star) / whole.c_star <= 1e-6
    names = list(whole.mu)
    assert _rel(_flat(stats.mu, names), _flat(whole.mu, names)) <= 1e-6
    assert _rel(_flat(stats.diag, names), _flat(whole.diag, names)) <= 1e-5


def test_estimate_fisher_draws_and_matches_explicit_inputs(tiny_unet):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 4, (12,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x0, y), batch_size=5)
    stats = estimate_fisher(
        tiny_unet,
        scheduler,
        loader,
        num_samples=9,
        timestep_range=(300, 700),
        generator=torch.Generator().manual_seed(11),
        show_progress=False,
    )
    assert stats.num_samples == 9 and stats.timestep_range == (300, 700)
    # a shard with explicit global indices reproduces the same draws (what each process of a multi-GPU run does)
    shard = [(x0[i : i + 3], y[i : i + 3], torch.arange(i, i + 3)) for i in (6, 3, 0)]
    reordered = estimate_fisher(
        tiny_unet,
        scheduler,
        shard,
        timestep_range=(300, 700),
        generator=torch.Generator().manual_seed(11),
        show_progress=False,
    )
    assert abs(reordered.c_star - stats.c_star) / stats.c_star <= 1e-6
    # rebuild the same draws: one generator per sample, seeded from (seed, sample index)
    draws = [sample_noise(i, 11, (1, 8, 8), (300, 700)) for i in range(9)]
    ts = [torch.cat([d[0] for d in draws])]
    ns = [torch.stack([d[1] for d in draws])]
    xs, ys = [scheduler.add_noise(x0[:9], ns[0], ts[0])], [y[:9]]
    assert all(300 <= int(t) < 700 for t in torch.cat(ts))
    explicit = fisher_statistics(tiny_unet, torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(ns))
    assert abs(stats.c_star - explicit.c_star) / explicit.c_star <= 1e-6
    names = list(explicit.diag)
    assert _rel(_flat(stats.diag, names), _flat(explicit.diag, names)) <= 1e-5
    assert _rel(_flat(stats.mu, names), _flat(explicit.mu, names)) <= 1e-6


def test_estimate_fisher_rejects_shuffling_loader(tiny_unet):
    data = torch.utils.data.TensorDataset(torch.zeros(16, 1, 8, 8), torch.arange(16) % 4)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="without shuffling"):
        estimate_fisher(tiny_unet, DDPMScheduler(), loader, kinds=("rank1",), show_progress=False)
    with pytest.raises(ValueError, match="unknown Fisher kinds"):
        estimate_fisher(tiny_unet, DDPMScheduler(), loader, kinds=("full",))


def test_save_load_bit_exact_with_metadata(tiny_unet, tmp_path):
    stats = fisher_statistics(tiny_unet, *_inputs(n=4))
    path = tmp_path / "fisher.safetensors"
    save_fisher(str(path), stats, task_index=2, classes=[4, 5])
    loaded = load_fisher(str(path), model=tiny_unet)
    assert loaded.c_star == stats.c_star and loaded.num_samples == 4 and loaded.kinds == ("rank1", "diag")
    assert loaded.metadata["task_index"] == "2" and loaded.metadata["classes"] == "[4, 5]"
    for n in stats.mu:
        assert torch.equal(loaded.mu[n], stats.mu[n]) and torch.equal(loaded.diag[n], stats.diag[n])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for key in (
        "kinds",
        "c_star",
        "num_samples",
        "timestep_range",
        "loss_normalization",
        "task_index",
        "classes",
        "hf_r1ewc_version",
    ):
        assert key in meta


def test_load_rejects_other_model_and_corrupt_file(tiny_unet, tmp_path):
    stats = fisher_statistics(tiny_unet, *_inputs(n=3))
    path = tmp_path / "fisher.safetensors"
    save_fisher(str(path), stats)
    other = make_tiny_unet(num_classes=7)  # class embedding of another shape
    with pytest.raises(ValueError, match=r"does not match this model.*wrong shape: \['class_embedding.weight'\]"):
        load_fisher(str(path), model=other)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fisher(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fisher(str(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("make", ["unet", "dit"])
def test_fisher_of_a_gradient_checkpointed_model_equals_the_plain_one(make):
    """--gradient_checkpointing leaves the model checkpointed when the task ends; torch.func refuses checkpointing's
    saved-tensor hooks, so the Fisher runs without it, and gives the same statistics. It is switched back on."""
    from conftest import make_tiny_dit

    from hf_r1ewc.continual import fisher_loader
    from hf_r1ewc.fisher import without_gradient_checkpointing

    model = (make_tiny_unet() if make == "unet" else make_tiny_dit()).eval()
    x_t, _, y, _ = _inputs(n=12)
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def fisher():
        loader = fisher_loader(x_t, y, 12, 6, 0)
        generator = torch.Generator().manual_seed(0)
        return estimate_fisher(model, scheduler, loader, generator=generator, show_progress=False)

    plain = fisher()
    model.enable_gradient_checkpointing()
    checkpointed = fisher()
    assert model.is_gradient_checkpointing
    assert checkpointed.c_star == plain.c_star
    for name in plain.mu:
        assert torch.equal(checkpointed.mu[name], plain.mu[name])
        assert torch.equal(checkpointed.diag[name], plain.diag[name])
    with without_gradient_checkpointing(model):
        assert not model.is_gradient_checkpointing
    assert model.is_gradient_checkpointing
