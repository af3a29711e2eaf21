from __future__ import annotations

import json
import math

import pytest
import torch

from hf_r1ewc.features import (
    ClassifierFeatures,
    FeatureStatistics,
    classifier_accuracy,
    frechet_distance,
    load_feature_extractor,
    train_classifier,
)
from hf_r1ewc.metrics import afid_at, forgetting, labels_in_test_proportions, plasticity, summarize


def test_distance_of_a_feature_set_to_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    s = FeatureStatistics.from_features(feats, "x")
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8


def test_two_gaussians_match_the_closed_form():
    g = torch.Generator().manual_seed(1)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(d, dtype=torch.float64)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # closed form via scipy's general matrix square root
    import numpy as np
    from scipy import linalg

    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # commuting (diagonal) case: sum of (sqrt(a) - sqrt(b))^2
    da, db = torch.rand(d, dtype=torch.float64) + 0.5, torch.rand(d, dtype=torch.float64) + 0.5
    closed = float(((m1 - m2) ** 2).sum() + ((da.sqrt() - db.sqrt()) ** 2).sum())
    assert frechet_distance(m1, torch.diag(da), m2, torch.diag(db)) == pytest.approx(closed, rel=1e-10)


def test_agrees_with_torchmetrics_fid_on_the_same_features():
    """torchmetrics' FrechetInceptionDistance with a custom feature module gives the same number."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x.flatten(1).double()

    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(300, 8, 1, 1, generator=g), torch.randn(300, 8, 1, 1, generator=g) * 1.3 + 0.2
    fid = FrechetInceptionDistance(feature=Identity(), normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    r = FeatureStatistics.from_features(real.flatten(1), "id")
    f = FeatureStatistics.from_features(fake.flatten(1), "id")
    assert frechet_distance(r.mu, r.sigma, f.mu, f.sigma) == pytest.approx(float(fid.compute()), rel=1e-5)


def test_small_n_warns_and_statistics_round_trip(tmp_path):
    with pytest.warns(UserWarning, match="singular"):
        FeatureStatistics.from_features(torch.randn(10, 16), "classifier")
    s = FeatureStatistics.from_features(torch.randn(40, 4), "classifier")
    s.save(tmp_path / "s.safetensors")
    t = FeatureStatistics.load(tmp_path / "s.safetensors")
    assert torch.equal(s.mu, t.mu) and torch.equal(s.sigma, t.sigma) and t.num_samples == 40


def test_afid_forgetting_plasticity_on_a_hand_made_matrix():
    m = {1: {1: 10.0}, 2: {1: 14.0, 2: 20.0}, 3: {1: 16.0, 2: 21.0, 3: 30.0}}
    assert afid_at(m, 1) == 10.0 and afid_at(m, 2) == 17.0 and afid_at(m, 3) == pytest.approx(67 / 3)
    assert forgetting(m, 3) == pytest.approx(((16 - 10) + (21 - 20) + 0) / 3)
    assert plasticity(m, 3) == pytest.approx(20.0)
    s = summarize(m)
    assert s["afid"] == {1: 10.0, 2: 17.0, 3: pytest.approx(67 / 3)} and s["forgetting"] == pytest.approx(7 / 3)


def test_acc_and_bwt_on_a_hand_made_accuracy_matrix():
    """ACC_i(m_k): task 1 learned to 0.9, then 0.6 and 0.5; task 2 to 0.8, then 0.7; task 3 to 1.0.
    ACC = (0.5 + 0.7 + 1.0) / 3 = 0.7333; BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = -0.25."""
    from hf_r1ewc.metrics import accuracy_summary

    accuracy = {1: {1: 0.9}, 2: {1: 0.6, 2: 0.8}, 3: {1: 0.5, 2: 0.7, 3: 1.0}}
    out = accuracy_summary(accuracy)
    assert out["acc"] == pytest.approx(2.2 / 3) and out["bwt"] == pytest.approx(-0.25)
    assert accuracy_summary({1: {1: 0.9}}) == {"acc": 0.9}  # no earlier task: no BWT
    assert accuracy_summary({}) == {} and accuracy_summary({2: {1: 0.5, 2: 0.5}}) == {}  # rows missing


def test_labels_in_test_proportions():
    test = torch.tensor([0] * 30 + [1] * 10)
    labels = labels_in_test_proportions(test, 9)
    assert labels.tolist().count(0) == 7 and labels.tolist().count(1) == 2  # 6.75 -> 7, 2.25 -> 2


def test_classifier_reaches_85_percent_on_real_fashion_mnist(fashion_mnist_dir, tmp_path):
    from hf_r1ewc.data import load_labeled_images

    train = load_labeled_images(str(fashion_mnist_dir), "train")
    test = load_labeled_images(str(fashion_mnist_dir), "test")
    # at the CPU studies' 16x16 (resized), as their FID classifier is trained
    x_train, x_test = (d.to_model_input(16, resize=True).tensors[0] for d in (train, test))
    model = train_classifier(x_train, train.labels, 10, epochs=2, batch_size=256, lr=3e-3, show_progress=False)
    accuracy = classifier_accuracy(model, x_test, test.labels)
    assert accuracy >= 0.85, accuracy
    model.save_pretrained(tmp_path / "clf")
    loaded = load_feature_extractor("classifier", classifier_path=str(tmp_path / "clf"))
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["feature_dim"] == 64
    assert torch.equal(loaded.features(x_test[:8]), model.features(x_test[:8]))


def test_missing_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --fid_classifier"):
        load_feature_extractor("classifier")
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        ClassifierFeatures.from_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ImportError, FileNotFoundError)) as info:
        load_feature_extractor("inception", fid_weights=str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(info.value) or "torch-fidelity" in str(info.value)
    with pytest.raises(ValueError, match="unknown FID backend"):
        load_feature_extractor("clip")


def test_plots_are_written(tmp_path):
    from hf_r1ewc.plots import plot_afid_curves, plot_against, plot_loss_curves, plot_task_fid_curves

    plot_afid_curves(
        {"rank-1 + GD": {1: (10.0, 1.0), 2: (12.0, 0.5)}, "GD": {1: (11.0, math.nan), 2: (15.0, 1.0)}},
        tmp_path / "afid.png",
    )
    plot_task_fid_curves({1: {1: 10.0}, 2: {1: 12.0, 2: 20.0}}, tmp_path / "curves.png")
    plot_loss_curves(
        {"GD seed 0": {1: [0.2, 0.1, 0.08], 2: [0.1, 0.09]}, "rank-1": {1: [0.3, 0.2]}}, tmp_path / "loss.png"
    )
    plot_against(
        {"AFID@5": {"GD": {280: (10.0, 1.0), 840: (9.0, math.nan)}}, "P": {"GD": {280: (3.0, 0.5)}}},
        tmp_path / "against.png",
        "optimizer steps per task",
        log_x=True,
    )
    for name in ("afid.png", "curves.png", "loss.png", "against.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_reference_cache_is_keyed_by_images_classes_and_weights(tmp_path):
    from hf_r1ewc.features import real_statistics, reference_cache_path

    extractor = ClassifierFeatures(feature_dim=8).eval()
    images = torch.rand(20, 1, 32, 32) * 2 - 1
    path = reference_cache_path(tmp_path, extractor, [0, 1], images)
    assert path == reference_cache_path(tmp_path, extractor, [0, 1], images.clone())
    assert path != reference_cache_path(tmp_path, extractor, [2, 3], images)
    assert path != reference_cache_path(tmp_path, extractor, [0, 1], images[:19])
    other = ClassifierFeatures(feature_dim=8).eval()
    assert path != reference_cache_path(tmp_path, other, [0, 1], images)
    first = real_statistics(extractor, images, path)
    assert path.exists()
    again = real_statistics(extractor, images, path)
    assert torch.equal(first.mu, again.mu) and torch.equal(first.sigma, again.sigma)


def test_dinov2_backend_from_a_local_folder(tmp_path):
    """The dinov2 backend loads transformers' Dinov2Model from a local folder (a tiny random one: the real weights
    cannot be downloaded here) and maps [-1, 1] images of any channel count to its hidden size."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    extractor = load_feature_extractor("dinov2", dinov2_model=str(tmp_path / "dino"))
    features = extractor.features(torch.rand(3, 1, 32, 32) * 2 - 1)
    assert extractor.dim == 32 and features.shape == (3, 32) and torch.isfinite(features).all()
    with pytest.raises(RuntimeError, match="cannot load DINOv2"):
        load_feature_extractor("dinov2", dinov2_model=str(tmp_path / "missing"))


def test_task_fid_shared_by_processes_equals_one_process():
    """TaskFID: chunks of FID samples split over processes (rank r takes chunks r, r + W, ...) and merged by
    `gather` give the one-process FID exactly; accuracy is the share of samples classified as their label."""
    from conftest import make_tiny_unet
    from diffusers import DDPMScheduler

    from hf_r1ewc.features import ClassifierFeatures
    from hf_r1ewc.metrics import FID_CHUNK, TaskFID
    from hf_r1ewc.pipeline import sampling_scheduler

    torch.manual_seed(0)
    extractor = ClassifierFeatures(1, 4, 8, feature_dim=8).eval()
    g = torch.Generator().manual_seed(1)
    test_images, test_labels = torch.rand(60, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2] * 20)
    evaluator = TaskFID(
        extractor, test_images, test_labels, [[0, 1], [2]], num_samples=FID_CHUNK + 30, num_inference_steps=2, seed=3
    )
    model, sampler = make_tiny_unet().eval(), sampling_scheduler("ddim", DDPMScheduler().config)
    whole = evaluator(model, sampler, 1)
    # two "processes" as threads; gather_object exchanges their chunks (a barrier stands in for the collective)
    import threading

    parts, barrier, scores = {}, threading.Barrier(2), {}

    def process(rank):
        def gather(mine):
            parts[rank] = mine
            barrier.wait()
            return parts[0] + parts[1]

        scores[rank] = evaluator(model, sampler, 1, rank=rank, world_size=2, gather=gather)

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(parts[0]), len(parts[1])] == [1, 1]
    assert scores[0].fid == scores[1].fid == whole.fid and scores[0].accuracy == whole.accuracy
    assert whole.num_samples == FID_CHUNK + 30 and set(whole.accuracy_per_class) == {0, 1}
    labels = evaluator.labels(1)
    predicted = torch.cat(
        [
            extractor.predict_from_features(
                extractor.features(
                    __import__("hf_r1ewc.pipeline", fromlist=["sample"]).sample(
                        model,
                        sampler,
                        labels[i : i + FID_CHUNK],
                        2,
                        torch.Generator().manual_seed((3 * 1_000_003 + 1) * 100_003 + i // FID_CHUNK),
                    )
                )
            )
            for i in range(0, len(labels), FID_CHUNK)
        ]
    )
    assert whole.accuracy == pytest.approx(float((predicted == labels).float().mean()))


def test_a_task_without_its_test_images_is_scored_from_its_carried_statistics(tmp_path):
    """Task 1's statistics and test labels written by one TaskFID and read back (a later task folder's
    fid_reference/) score it in a TaskFID whose data holds only task 2: the same FID and accuracy. Without them,
    with another extractor's, or with a value altered, it is refused by name."""
    from conftest import make_tiny_unet
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file, save_file

    from hf_r1ewc.features import ClassifierFeatures
    from hf_r1ewc.metrics import CarriedReference, TaskFID
    from hf_r1ewc.pipeline import sampling_scheduler

    torch.manual_seed(0)
    extractor = ClassifierFeatures(1, 4, 8, feature_dim=8).eval()
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(60, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 1, 2] * 15)
    kwargs = dict(num_samples=24, num_inference_steps=2, seed=3)
    whole = TaskFID(extractor, images, labels, [[0, 1], [2]], **kwargs)
    path = tmp_path / "task_01.safetensors"
    save_file(whole.reference(1).payload().tensors, str(path), whole.reference(1).payload().metadata)
    carried = CarriedReference.load(path)
    assert carried.test_sha256 == whole.reference(1).test_sha256 and carried.classes == [0, 1]
    later = labels == 2  # the data of a run continued elsewhere: task 1's images are gone
    alone = TaskFID(extractor, images[later], labels[later], [[0, 1], [2]], carried={1: carried}, **kwargs)
    model, sampler = make_tiny_unet().eval(), sampling_scheduler("ddim", DDPMScheduler().config)
    assert torch.equal(alone.labels(1), whole.labels(1))
    a, b = whole(model, sampler, 1), alone(model, sampler, 1)
    assert a.fid == b.fid and a.accuracy == b.accuracy and a.accuracy_per_class == b.accuracy_per_class
    with pytest.raises(
        ValueError, match=r"task 1 \(classes \[0, 1\]\) has no test images in this data and no carried"
    ):
        TaskFID(extractor, images[later], labels[later], [[0, 1], [2]], **kwargs)
    other = ClassifierFeatures(1, 4, 8, feature_dim=8).eval()
    with pytest.raises(ValueError, match="computed with the feature extractor classifier:.* and this run's is"):
        TaskFID(other, images[later], labels[later], [[0, 1], [2]], carried={1: carried}, **kwargs)
    tensors = load_file(str(path))
    tensors["sigma"][0, 0] = float("nan")
    save_file(tensors, str(path), whole.reference(1).payload().metadata)
    with pytest.raises(ValueError, match="holds non-finite statistics: it was altered"):
        CarriedReference.load(path)


def test_run_summary_table_by_hand():
    from hf_r1ewc.metrics import run_summary_table

    matrix = {1: {1: 10.0}, 2: {1: 14.0, 2: 20.0}}
    accuracy = {1: {1: 0.9}, 2: {1: 0.75, 2: 0.5}}
    table = run_summary_table(matrix, accuracy, [[0, 1], [2, 3]])
    rows = table.splitlines()
    assert rows[2].split() == ["1", "0,1", "10.00", "14.00", "75.0%"]
    assert rows[3].split() == ["2", "2,3", "20.00", "20.00", "50.0%"]
    # AFID@2 = (14 + 20) / 2; F = ((14 - 10) + 0) / 2; P = (10 + 20) / 2; mean accuracy (75 + 50) / 2;
    # BWT = 75 - 90 (task 1 only); each defined in the line below
    assert rows[-2] == (
        "AFID@2 = 17.00, F = 2.00, P = 15.00, mean accuracy after task 2 (ACC) = 62.5 %, BWT = -15.0 points"
    )
    assert rows[-1].startswith("ACC: mean over tasks") and "BWT: mean over earlier tasks" in rows[-1]


def test_labeled_grid_has_one_image_per_cell(tmp_path):
    from hf_r1ewc.plots import save_labeled_grid

    images = torch.rand(6, 1, 8, 8) * 2 - 1
    save_labeled_grid(images, tmp_path / "grid.png", ["class 0", "class 1"], ["task 1", "task 2", "task 3"])
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="6 images do not fill 3 rows x 3 columns"):
        save_labeled_grid(images, tmp_path / "bad.png", ["a", "b", "c"], ["x", "y", "z"])


def test_paired_differences_by_hand():
    """Three seeds; the method is better than GD by 1, 2 and 3 AFID points: mean -2, SE 1/sqrt(3),
    t = -2 / (1/sqrt(3)) = -3.464 on 2 degrees of freedom; exact Wilcoxon with all signs alike: p = 2 / 2^3."""
    from hf_r1ewc.comparison import paired_differences, paired_markdown

    def results(method, seed, afid, f, p):
        return {
            "method": method,
            "seed": seed,
            "tasks": [[0, 1], [2, 3]],
            "afid": {"2": afid},
            "forgetting": f,
            "plasticity": p,
        }

    runs = {}
    for seed, (gd, ours) in enumerate([(10.0, 9.0), (12.0, 10.0), (11.0, 8.0)]):
        runs[f"gd{seed}"] = results("GD", seed, gd, 1.0, 5.0)
        runs[f"ours{seed}"] = results("ours", seed, ours, 1.0 + seed, 5.0)
    runs["ours-unpaired"] = results("ours", 7, 0.0, 0.0, 0.0)  # no GD run with seed 7: left out
    table = paired_differences(runs, "GD")
    afid = table["ours"]["afid"]
    assert table["ours"]["seeds"] == [0, 1, 2] and afid["differences"] == [-1.0, -2.0, -3.0]
    assert afid["mean_se"][0] == pytest.approx(-2.0) and afid["mean_se"][1] == pytest.approx(1 / math.sqrt(3))
    assert afid["t"] == pytest.approx(-2 * math.sqrt(3)) and afid["wilcoxon_p"] == pytest.approx(0.25)
    assert "t" not in table["ours"]["plasticity"]  # all differences zero: no test
    assert "| ours | 3 | -2.00 ± 0.58 (" in paired_markdown(table, "GD")
    with pytest.raises(ValueError, match="names no method of these runs"):
        paired_differences(runs, "rank-1")


def test_class_distribution_kl_by_hand():
    """Two tasks pooled: asked for 0:2, 1:2, 2:4 (p = 1/4, 1/4, 1/2); the classifier assigned 0:4, 2:3 and one
    image to class 7, which was never asked for (q = 1/2, 0 -> floored at 1/(2*8), 3/8)."""
    from hf_r1ewc.metrics import TaskScore, class_distribution_kl, run_summary_table

    first = TaskScore(1.0, 4, 0.5, None, intended_counts={0: 2, 1: 2}, predicted_counts={0: 4})
    second = TaskScore(1.0, 4, 0.5, None, intended_counts={2: 4}, predicted_counts={2: 3, 7: 1})
    expected = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / (1 / 16)) + 0.5 * math.log(0.5 / 0.375)
    assert class_distribution_kl([first, second]) == pytest.approx(expected, rel=1e-12)
    balanced = TaskScore(1.0, 4, 1.0, None, intended_counts={0: 2, 1: 2}, predicted_counts={0: 2, 1: 2})
    assert class_distribution_kl([balanced]) == 0.0
    assert class_distribution_kl([TaskScore(1.0, 4, None, None)]) is None  # no classifier predictions
    table = run_summary_table({1: {1: 10.0}}, {1: {1: 0.5}}, [[0, 1]], {1: expected})
    assert f"class KL = {expected:.3f} nats" in table.splitlines()[-2]


def test_class_kl_is_aggregated_and_paired_over_seeds(tmp_path):
    """The final model's class KL (results.json ``class_kl`` at T) goes into the summary (mean ± SE) and the paired
    table like AFID: GD 0.1, 0.2, 0.3 against ours 0.0, 0.1, 0.1 -> differences -0.1, -0.1, -0.2."""
    from hf_r1ewc.comparison import aggregate, paired_differences
    from hf_r1ewc.evaluate import write_summary

    def results(method, seed, kl):
        return {"method": method, "seed": seed, "tasks": [[0, 1], [2, 3]], "afid": {"2": 1.0}, "fid_backend": "classifier",
                "class_kl": {"1": 9.9, "2": kl}}  # fmt: skip

    runs = {}
    for seed, (gd, ours) in enumerate([(0.1, 0.0), (0.2, 0.1), (0.3, 0.1)]):
        runs[f"gd{seed}"], runs[f"ours{seed}"] = results("GD", seed, gd), results("ours", seed, ours)
    table = aggregate(runs)
    assert table["GD"]["class_kl"][0] == pytest.approx(0.2) and table["GD"]["class_kl"][1] == pytest.approx(
        0.1 / 3**0.5
    )
    assert paired_differences(runs, "GD")["ours"]["class_kl"]["differences"] == pytest.approx([-0.1, -0.1, -0.2])
    write_summary(table, tmp_path)
    assert "| GD | 3 | 1.00 ± 0.00 | — | — | — | — | 0.20 ± 0.06 |" in (tmp_path / "summary.md").read_text()
