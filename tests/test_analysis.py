"""Fisher geometry against the dense Fisher (eigh of a P x P matrix) on a tiny UNet."""

from __future__ import annotations

import copy

import torch
from conftest import make_tiny_unet

from hf_r1ewc.analysis import analyse_checkpoint, fisher_geometry, gram_and_diagonal, plot_analysis
from hf_r1ewc.models import training_noise_scheduler


def _inputs(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(n, 1, 8, 8, generator=g)
    tt = torch.full((n,), t, dtype=torch.long)
    return training_noise_scheduler().add_noise(x0, noise, tt), tt, torch.randint(0, 4, (n,), generator=g), noise


def _dense(unet, x_t, t, y, noise):
    model = copy.deepcopy(unet).double()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x_t.shape[0]):
        loss = (
            (
                model(x_t[i : i + 1].double(), t[i : i + 1], class_labels=y[i : i + 1]).sample
                - noise[i : i + 1].double()
            )
            .pow(2)
            .mean()
        )
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows)
    return G, G.T @ G / G.shape[0]


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_every_quantity_matches_the_dense_fisher():
    unet = make_tiny_unet().eval()
    x_t, t, y, noise = _inputs(12, 700)
    ours = fisher_geometry(unet, x_t, t, y, noise, top_k=5, chunk_size=5)
    G, F = _dense(unet, x_t, t, y, noise)
    assert F.shape[0] < 5000
    eig = torch.linalg.eigvalsh(F).flip(0)
    for a, b in zip(ours["top_eigenvalues"], eig[:5]):
        assert _rel(a, float(b)) <= 1e-5
    assert _rel(ours["eigengap_ratio"], float(eig[1] / eig[0])) <= 1e-5
    mu = G.mean(0)
    c_star = float(mu @ F @ mu / mu.norm() ** 4)
    rank1 = float((F - c_star * torch.outer(mu, mu)).norm() / F.norm())
    diag = float((F - torch.diag(torch.diagonal(F))).norm() / F.norm())
    assert _rel(ours["c_star"], c_star) <= 1e-5
    assert _rel(ours["rel_frobenius_error_rank1"], rank1) <= 1e-5
    assert _rel(ours["rel_frobenius_error_diag"], diag) <= 1e-5
    cos = (G @ mu / (G.norm(dim=1) * mu.norm())).abs()
    assert max(_rel(a, float(b)) for a, b in zip(ours["abs_cos_to_mean"], cos)) <= 1e-5
    scale = (1 - training_noise_scheduler().alphas_cumprod[700]).sqrt()
    with torch.no_grad():
        mse = float((x_t - scale * unet(x_t, t, class_labels=y).sample).pow(2).mean())
    assert _rel(ours["mse_scaled_identity"], mse) <= 1e-6


def test_parameter_groups_stream_the_same_gram():
    unet = make_tiny_unet().eval()
    x_t, t, y, noise = _inputs(6, 300, seed=1)
    whole, d_whole, _ = gram_and_diagonal(unet, x_t, t, y, noise)
    grouped, d_grouped, _ = gram_and_diagonal(unet, x_t, t, y, noise, chunk_size=4, memory_bytes=6 * 4 * 600)
    torch.testing.assert_close(grouped, whole, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(d_grouped, d_whole, rtol=1e-6, atol=1e-14)


def test_checkpoint_analysis_and_figures(tmp_path):
    unet = make_tiny_unet().eval()
    g = torch.Generator().manual_seed(0)
    result = analyse_checkpoint(unet, torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.arange(8) % 4, [100, 900])
    cos = result["mean_gradient_cosine"]
    assert abs(cos[0][0] - 1) < 1e-9 and abs(cos[0][1] - cos[1][0]) < 1e-12 and -1 <= cos[0][1] <= 1
    plot_analysis(result, tmp_path)
    for name in ("fig1_scaled_identity_mse.png", "fig2_abs_cos_to_mean.png", "fig3_fisher_geometry.png"):
        assert (tmp_path / name).stat().st_size > 3000


def test_cli_analyses_a_folder_trained_on_resized_images(tmp_path, capsys):
    """A run trained with --resize (28x28 Fashion-MNIST rescaled to 8x8) is analysed on images rescaled the same
    way, as its training_state.json records (before: 'padding cannot shrink images')."""
    import json

    import pytest

    from hf_r1ewc.analysis import main
    from hf_r1ewc.hub import write_training_state
    from hf_r1ewc.models import training_noise_scheduler as scheduler
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    fmnist = "/usr/share/datasets/fashion-mnist"
    if not __import__("os").path.isdir(fmnist):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    folder = tmp_path / "task_01"
    ClassConditionalPipeline(make_tiny_unet(num_classes=10).eval(), scheduler()).save_pretrained(folder)
    write_training_state(folder, {"task_index": 1, "run_config": {"resize": True, "resolution": 8}})
    main(
        [
            "--checkpoint",
            str(folder),
            "--train_data_dir",
            fmnist,
            "--task",
            "1",
            "--timesteps",
            "100,900",
            "--num_samples",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert sorted(int(t) for t in result["per_timestep"]) == [100, 900] and result["num_samples"] == 8
    assert "lambda2/lambda1" in capsys.readouterr().out
