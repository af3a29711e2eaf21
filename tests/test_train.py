"""The training script (tiny preset, builtin digits data): launched for real with `accelerate launch` (or torchrun)
where the launcher is part of what is tested (the shared two-task run, several processes, dynamo, bad input's exit
status), its ``main()`` in this process otherwise (the same code without two interpreter start-ups per run)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    ROOT,
    SCRIPT,
    assert_same_task_folder,
    launch,
    named_shapes_parquet,
    quiet_pipeline,
    refusal,
    row_generators,
    run,
    tiny_unet_config,
    unet_weights,
)


def test_layout_fisher_pipeline_and_results(two_task_run):
    from hf_r1ewc.fisher import load_fisher
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    for k in (1, 2):
        folder = two_task_run / f"task_{k:02d}"
        for name in (
            "model_index.json",
            "unet/config.json",
            "scheduler/scheduler_config.json",
            "pipeline.py",
            "fisher.safetensors",
            "ewc_penalty.safetensors",
            "metrics.json",
            "samples.png",
            "README.md",
            "training_state.json",
        ):
            assert (folder / name).exists(), f"{folder}/{name} missing"
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        stats = load_fisher(str(folder / "fisher.safetensors"), model=pipe.unet)
        assert stats.kinds == ("rank1",) and stats.num_samples == 64 and stats.c_star > 0
        assert stats.metadata["task_index"] == str(k)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 1], num_inference_steps=3, output_type="np").images
        assert images.shape == (2, 8, 8, 1)
    results = json.loads((two_task_run / "results.json").read_text())
    assert set(results["fid"]) == {"1", "2"} and set(results["fid"]["2"]) == {"1", "2"}
    assert all(v > 0 for row in results["fid"].values() for v in row.values())
    assert results["afid"]["2"] == pytest.approx((results["fid"]["2"]["1"] + results["fid"]["2"]["2"]) / 2)
    assert results["forgetting"] == pytest.approx((results["fid"]["2"]["1"] - results["fid"]["1"]["1"]) / 2)
    assert results["fid_backend"] == "classifier" and results["fid_comparable_to_inception"] is False
    metrics = json.loads((two_task_run / "task_02" / "metrics.json").read_text())
    # the class balance of m_k's samples over every task so far, in results.json and the task's metrics.json
    assert set(results["class_kl"]) == {"1", "2"} and all(0 <= v < 10 for v in results["class_kl"].values())
    assert metrics["class_kl"] == results["class_kl"]["2"]
    # where the task's wall time went (task 2 samples its teacher's replay pool first)
    assert set(metrics["seconds_by_phase"]) == {"replay pool", "training", "FID", "Fisher"}
    assert all(v > 0 for v in metrics["seconds_by_phase"].values())
    assert metrics["fid_num_samples"] == {"1": 40, "2": 40} and len(metrics["loss_per_epoch"]) == 2
    assert len(metrics["denoise_loss_per_epoch"]) == 2 and all(v > 0 for v in metrics["denoise_loss_per_epoch"])
    # ||grad lambda*EWC|| / ||grad rest|| at each epoch's first step: 0 at theta*_1 itself, then the pull back
    ratios = metrics["ewc_grad_ratio_per_epoch"]
    assert len(ratios) == 2 and ratios[0] == pytest.approx(0.0, abs=1e-6) and ratios[1] > 0
    assert json.loads((two_task_run / "task_01" / "metrics.json").read_text())["ewc_grad_ratio_per_epoch"] == []
    penalty_state = json.loads((two_task_run / "task_02" / "training_state.json").read_text())
    assert penalty_state["seen_classes"] == [0, 1, 2, 3]
    card = (two_task_run / "task_02" / "README.md").read_text()
    assert "library_name: diffusers" in card and "AFID@2" in card and "sample accuracy task 1" in card
    assert f"ACC = {100 * results['acc']:.1f} %" in card and f"BWT = {100 * results['bwt']:+.1f} points" in card
    assert f"class KL = {results['class_kl']['2']:.3f} nats" in card
    assert set(results["final_accuracy_per_class"]) == {"0", "1", "2", "3"}
    assert (two_task_run / "samples_by_task.png").stat().st_size > 500  # classes x tasks


def test_one_fid_path_script_and_evaluate_agree(two_task_run, tmp_path):
    """FID_i(m_k) and sample accuracy recomputed by `python -m hf_r1ewc.evaluate --complete` from the saved task
    folders equal what the training script wrote (same TaskFID, seeds, sampler and precision)."""
    import shutil

    from hf_r1ewc.evaluate import complete_run

    run = tmp_path / "copy"
    shutil.copytree(two_task_run, run)
    written = json.loads((run / "results.json").read_text())
    stripped = {**written, "fid": {"1": written["fid"]["1"]}, "accuracy": {"1": written["accuracy"]["1"]}}
    (run / "results.json").write_text(json.dumps(stripped))
    completed = complete_run(run, num_samples=40)
    for i in ("1", "2"):
        assert completed["fid"]["2"][i] == pytest.approx(written["fid"]["2"][i], rel=1e-6)
        assert completed["accuracy"]["2"][i] == pytest.approx(written["accuracy"]["2"][i])
    metrics = json.loads((two_task_run / "task_02" / "metrics.json").read_text())
    # (native bf16 is reported absent throughout the suite: conftest)
    assert metrics["sampling"]["sampler"] == "ddim" and metrics["sampling"]["precision"] == "fp32"
    assert 0 <= metrics["accuracy"]["1"] <= 1 and set(metrics["accuracy_per_class"]) == {"0", "1", "2", "3"}


def test_bf16_training_saves_the_fp32_fisher(tmp_path):
    """--mixed_precision bf16 (the CUDA default): the saved Fisher equals an fp32 re-estimate at the saved weights
    (<= 1e-5 relative); the autocast wrapper of prepare() does not leak into the estimate."""
    from hf_r1ewc.continual import fisher_loader
    from hf_r1ewc.data import images_to_model_input, load_labeled_images
    from hf_r1ewc.fisher import estimate_fisher, load_fisher
    from hf_r1ewc.models import training_noise_scheduler
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    out = tmp_path / "bf16"
    run(
        [
            *FAST,
            "--tasks",
            "0,1",
            "--fid_backend",
            "none",
            "--ewc_type",
            "rank1",
            "--mixed_precision",
            "bf16",
            "--output_dir",
            str(out),
        ]
    )
    pipe = ClassConditionalPipeline.from_pretrained(out / "task_01")
    saved = load_fisher(str(out / "task_01" / "fisher.safetensors"), model=pipe.unet)
    data = load_labeled_images("digits", "train").head_per_class(48).subset([0, 1])
    loader = fisher_loader(images_to_model_input(data.images), data.labels, 64, 64, seed=0 + 1)
    fp32 = estimate_fisher(
        pipe.unet,
        training_noise_scheduler(),
        loader,
        kinds=("rank1",),
        generator=torch.Generator().manual_seed(0 + 1),
        show_progress=False,
    )
    assert saved.c_star == pytest.approx(fp32.c_star, rel=1e-5)
    num = sum(float((saved.mu[n] - fp32.mu[n]).double().pow(2).sum()) for n in fp32.mu) ** 0.5
    assert num <= 1e-5 * fp32.mu_norm()


def test_long_main_process_phases_get_a_long_process_group_timeout():
    from datetime import timedelta

    from hf_r1ewc.config import make_accelerator, parse_args

    args = parse_args(["--dataset_name", "digits", "--output_dir", "unused"])
    assert make_accelerator(args).init_handler.timeout >= timedelta(hours=1)


@pytest.mark.parametrize("ewc_mode", ["decoupled", "loss"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, ewc_mode, caplog):
    """Bit for bit: a run stopped mid-task and resumed from its checkpoint ends with exactly the weights and penalty
    of the uninterrupted run (the restored penalty's projections are anchored where the saved one's were)."""
    common = [
        *FAST,
        "--fid_backend",
        "none",
        "--ewc_type",
        "rank1",
        "--checkpointing_steps",
        "2",
        "--ewc_mode",
        ewc_mode,
        *(["--ewc_lambda", "100"] if ewc_mode == "loss" else []),
    ]
    run([*common, "--output_dir", str(tmp_path / "whole")])
    # stop in the middle of task 2 (task 1 has 3 steps per epoch x 2 epochs = 6 steps), then resume
    run([*common, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "8"])
    assert (tmp_path / "cut" / "task_01").exists() and not (tmp_path / "cut" / "task_02").exists()
    caplog.set_level(logging.INFO)
    run([*common, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    assert "checkpoint-8 (task 2, epoch 0, step 2)" in caplog.text  # continued mid-task, not from scratch
    a, b = unet_weights(tmp_path / "whole" / "task_02"), unet_weights(tmp_path / "cut" / "task_02")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    # the penalty state after task 2 matches too
    from safetensors.torch import load_file

    pa = load_file(str(tmp_path / "whole" / "task_02" / "ewc_penalty.safetensors"))
    pb = load_file(str(tmp_path / "cut" / "task_02" / "ewc_penalty.safetensors"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_sigterm_checkpoints_the_step_and_resumes_bit_for_bit(tmp_path):
    """A real SIGTERM to a training process (what Slurm, Kubernetes and spot preemption send): it finishes the step,
    writes a checkpoint, says how to resume and exits with 75; the resumed run equals the uninterrupted one. The script
    is started directly, as a scheduler's job step would: `accelerate launch`'s launcher does not forward signals."""
    import signal
    import time

    common = [
        *FAST,
        "--tasks",
        "0,1",
        "--num_epochs_per_task",
        "40",
        "--fid_backend",
        "none",
        "--ewc_type",
        "rank1",
        "--checkpointing_steps",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "cut.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *common, "--output_dir", str(tmp_path / "cut")],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        deadline = time.time() + 300
        first = tmp_path / "cut" / "checkpoints" / "checkpoint-10"
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # in training: step 10 of 120
        rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    assert "SIGTERM received: finishing the current optimizer step" in text
    step = int(text.split("stopped by SIGTERM after step ")[1].split(" ")[0])
    assert 10 <= step < 120 and (tmp_path / "cut" / "checkpoints" / f"checkpoint-{step}" / "digests.json").exists()
    assert not (tmp_path / "cut" / "task_01").exists()
    launch([*common, "--output_dir", str(tmp_path / "cut")])
    launch([*common, "--output_dir", str(tmp_path / "whole")])
    a, b = unet_weights(tmp_path / "whole" / "task_01"), unet_weights(tmp_path / "cut" / "task_01")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_task_folder_alone(two_task_run, tmp_path):
    """A new output_dir continues after task 1 from the task folder alone."""
    run(
        [
            *FAST,
            "--fid_backend",
            "none",
            "--ewc_type",
            "rank1",
            "--output_dir",
            str(tmp_path / "next"),
            "--resume_from_task",
            str(two_task_run / "task_01"),
        ]
    )
    assert not (tmp_path / "next" / "task_01").exists() and (tmp_path / "next" / "task_02").exists()
    state = json.loads((tmp_path / "next" / "task_02" / "training_state.json").read_text())
    assert state["task_index"] == 2


def test_incompatible_resume_folder_is_refused(two_task_run, tmp_path):
    message = refusal(
        [
            *FAST,
            "--fid_backend",
            "none",
            "--ewc_type",
            "diag",
            "--output_dir",
            str(tmp_path / "next"),
            "--resume_from_task",
            str(two_task_run / "task_01"),
        ]
    )
    assert "'ewc_type': ('rank1', 'diag')" in message
    message = refusal(
        [
            *FAST,
            "--fid_backend",
            "none",
            "--resolution",
            "16",
            "--output_dir",
            str(tmp_path / "next"),
            "--resume_from_task",
            str(two_task_run / "task_01"),
        ]
    )
    assert "--resolution is 16" in message


def test_two_processes(tmp_path):
    """accelerate launch --num_processes 2 on CPU (gloo): the Fisher is all-reduced and equals the one-process
    estimate on the same samples; only the main process writes."""
    from hf_r1ewc.continual import fisher_loader
    from hf_r1ewc.data import images_to_model_input, load_labeled_images
    from hf_r1ewc.fisher import estimate_fisher, load_fisher
    from hf_r1ewc.models import training_noise_scheduler
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    launch(
        [
            *FAST,
            "--tasks",
            "0,1",
            "--fid_backend",
            "none",
            "--ewc_type",
            "rank1",
            "--output_dir",
            str(tmp_path / "ddp"),
        ],
        num_processes=2,
    )
    folder = tmp_path / "ddp" / "task_01"
    assert json.loads((folder / "training_state.json").read_text())["num_processes"] == 2
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    two_proc = load_fisher(str(folder / "fisher.safetensors"), model=pipe.unet)
    data = load_labeled_images("digits", "train").head_per_class(48).subset([0, 1])
    loader = fisher_loader(images_to_model_input(data.images), data.labels, 64, 16, seed=0 + 1)
    one_proc = estimate_fisher(
        pipe.unet,
        training_noise_scheduler(),
        loader,
        kinds=("rank1",),
        generator=torch.Generator().manual_seed(0 + 1),
        show_progress=False,
    )
    assert two_proc.num_samples == one_proc.num_samples == 64
    assert two_proc.c_star == pytest.approx(one_proc.c_star, rel=1e-5)
    for name in one_proc.mu:
        torch.testing.assert_close(two_proc.mu[name], one_proc.mu[name], rtol=1e-4, atol=1e-7)


# every pair of (penalty, replay), (penalty, mode) and (replay, mode) once: 8 runs instead of the 14 of all three
@pytest.mark.parametrize(
    "ewc_type, replay, ewc_mode",
    [
        ("none", "on", "loss"),
        ("none", "off", "loss"),
        ("diag", "on", "decoupled"),
        ("diag", "off", "loss"),
        ("rank1", "on", "decoupled"),
        ("rank1", "off", "loss"),
        ("rank1_unscaled", "on", "loss"),
        ("rank1_unscaled", "off", "decoupled"),
    ],
)
def test_every_method_runs(tmp_path, ewc_type, replay, ewc_mode):
    """Each penalty (in the loss and decoupled) with distillation on and off: a short in-process run of main(), then
    the finished run extended by a third task (its penalty gains a term)."""
    out = tmp_path / "m"
    flags = [*FAST, "--num_epochs_per_task", "1", "--fid_backend", "none", "--ewc_type", ewc_type, "--replay"]
    flags += [replay, "--ewc_mode", ewc_mode, "--gradient_accumulation_steps", "2", "--output_dir", str(out)]
    run(flags)
    assert (out / "task_02" / "model_index.json").exists()
    assert (out / "task_02" / "fisher.safetensors").exists() == (ewc_type != "none")
    # the penalty's gradient ratio is measured on the epoch's first optimizer step, also under accumulation
    ratios = json.loads((out / "task_02" / "metrics.json").read_text())["ewc_grad_ratio_per_epoch"]
    assert len(ratios) == (ewc_type != "none") and all(math.isfinite(r) for r in ratios)
    run(with_tasks(flags, "0,1;2,3;4,5"))
    assert json.loads((out / "task_03" / "training_state.json").read_text())["seen_classes"] == [0, 1, 2, 3, 4, 5]
    if ewc_type != "none":
        from safetensors.torch import load_file

        assert int(load_file(str(out / "task_03" / "ewc_penalty.safetensors"))["num_tasks"]) == 3


def test_bad_input_fails_before_training(tmp_path):
    proc = launch(["--dataset_name", "digits", "--tasks", "0,1;1,2", "--output_dir", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0 and "class 1 appears in task 1 and task 2" in proc.stderr
    # offline, as on these machines: the launched process reads HF_HUB_OFFLINE before importing the Hub's libraries
    proc = launch(["--dataset_name", "nobody/nothing", "--output_dir", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0 and "could not load Hub dataset 'nobody/nothing'" in proc.stderr
    message = refusal(["--dataset_name", "digits", "--ewc_lambda", "-1", "--output_dir", str(tmp_path / "x")])
    assert "--ewc_lambda must be a finite number >= 0" in message
    config = {
        "_class_name": "UNet2DModel",
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "num_class_embeds": 4,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    (tmp_path / "unet.json").write_text(json.dumps(config))
    message = refusal(
        [
            "--dataset_name",
            "digits",
            "--tasks",
            "0,1;8,9",
            "--model_config_name_or_path",
            str(tmp_path / "unet.json"),
            "--output_dir",
            str(tmp_path / "x"),
        ]
    )
    assert "classes [8, 9] lie outside the model's class embedding" in message
    assert not (tmp_path / "x").exists()


def test_evaluate_cli_completes_and_aggregates(two_task_run, tmp_path):
    """python -m hf_r1ewc.evaluate: completes FID_i(m_k) for every i, aggregates, plots, draws the class x task grid."""
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(two_task_run, run)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_r1ewc.evaluate",
            "--run_dir",
            str(run),
            "--complete",
            "--all_tasks",
            "--fid_num_samples",
            "40",
            "--grid_classes",
            "0,2",
            "--output_dir",
            str(tmp_path / "summary"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "results.json").read_bytes() == (two_task_run / "results.json").read_bytes()  # the run's own
    results = json.loads((run / "results_completed.json").read_text())
    assert "2" in results["fid"]["1"]  # FID of task 2 under the model after task 1 (i > k) was added
    assert results["fid"]["2"] == json.loads((two_task_run / "results.json").read_text())["fid"]["2"]
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    ((method, row),) = summary.items()
    assert row["runs"] == 1 and row["afid"][0] == pytest.approx(results["afid"]["2"])
    assert "| " + method in (tmp_path / "summary" / "summary.md").read_text()
    assert (tmp_path / "summary" / "summary.csv").read_text().startswith("method,runs,afid_mean")
    for png in ("afid_at_k.png", "fid_curves_copy.png", "samples_across_tasks.png"):
        assert (tmp_path / "summary" / png).stat().st_size > 1000


def test_ema_run_and_resume(tmp_path):
    """EMA in checkpoints as unet_ema/ (diffusers layout, safetensors; no pickle), kill/resume equal to the whole
    run, and --resume_from_task carries the EMA's warm-up position instead of restarting it."""
    common = [*FAST, "--fid_backend", "none", "--use_ema", "--checkpointing_steps", "2", "--tasks", "0,1;2,3"]
    run([*common, "--output_dir", str(tmp_path / "whole")])
    run([*common, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "3"])
    checkpoint = next((tmp_path / "cut" / "checkpoints").iterdir())
    assert (checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the EMA is no longer pickled
    run([*common, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    for k in ("task_01", "task_02"):
        a, b = unet_weights(tmp_path / "whole" / k), unet_weights(tmp_path / "cut" / k)
        assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-5
    run([*common, "--output_dir", str(tmp_path / "next"), "--resume_from_task", str(tmp_path / "whole" / "task_01")])
    whole = json.loads((tmp_path / "whole" / "task_02" / "training_state.json").read_text())
    resumed = json.loads((tmp_path / "next" / "task_02" / "training_state.json").read_text())
    assert whole["ema_optimization_step"] == resumed["ema_optimization_step"] == 12
    a, b = unet_weights(tmp_path / "whole" / "task_02"), unet_weights(tmp_path / "next" / "task_02")
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-5


def test_non_finite_loss_stops_with_last_good_state(tmp_path):
    """A penalty that overflows float32 at task 2 stops the run with a clear message; task 1 stays intact."""
    sys.path.insert(0, str(ROOT))
    import train_continual_ddpm

    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="the ewc term of the loss is inf at task 2"):
        train_continual_ddpm.main(
            [
                *FAST,
                "--num_epochs_per_task",
                "1",
                "--fid_backend",
                "none",
                "--ewc_type",
                "rank1_unscaled",
                "--ewc_mode",
                "loss",
                "--ewc_lambda",
                "1e300",
                "--output_dir",
                str(out),
            ]
        )
    assert (out / "task_01" / "model_index.json").exists() and not (out / "task_02").exists()


def _imagenet32_like_parquet(root: Path, num_classes: int = 100, train_per_class: int = 4, size: int = 8) -> Path:
    """A local parquet dataset with the schema of benjamin-paine/imagenet-1k-32x32 (image: Image, label: ClassLabel;
    splits train and validation), tiny RGB images, the train split in 2 files."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"n{c:08d}" for c in range(num_classes)])}
    )

    def split(per_class):
        labels = [c for _ in range(per_class) for c in range(num_classes)]
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)) for _ in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    data = root / "data"
    data.mkdir(parents=True)
    train = split(train_per_class)
    for i in range(2):
        train.shard(2, i, contiguous=True).to_parquet(str(data / f"train-{i:05d}-of-00002.parquet"))
    split(2).to_parquet(str(data / "validation-00000-of-00001.parquet"))
    return root


def test_streamed_imagenet32_protocol_end_to_end(tmp_path):
    """--streaming on an ImageNet-32-schema parquet dataset (100 classes, 50 per task) with 2 processes (gloo):
    label-filtered streamed tasks, equal step counts on both processes, Fisher from the stream, ER's buffer merged
    from both processes' shards, task folders."""
    from hf_r1ewc.fisher import load_fisher

    source = _imagenet32_like_parquet(tmp_path / "imagenet32")
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"_class_name": "UNet2DModel", **tiny_unet_config(3, 100)}))
    out = tmp_path / "out"
    launch(
        [
            "--train_data_dir",
            str(source),
            "--streaming",
            "--eval_split",
            "validation",
            "--classes_per_task",
            "50",
            "--resolution",
            "8",
            "--model_config_name_or_path",
            str(config),
            "--num_epochs_per_task",
            "1",
            "--train_batch_size",
            "8",
            "--method",
            "rank1+gd+er",  # ER streamed too: each process's reservoirs merged into one buffer
            "--er_per_class",
            "2",
            "--replay_per_class",
            "1",
            "--num_inference_steps",
            "2",
            "--fisher_num_samples",
            "40",
            "--fid_backend",
            "none",
            "--output_dir",
            str(out),
        ],
        num_processes=2,
    )
    for k in (1, 2):
        state = json.loads((out / f"task_{k:02d}" / "training_state.json").read_text())
        assert state["tasks"] == [list(range(0, 50)), list(range(50, 100))] and state["num_processes"] == 2
        # 200 streamed images per task, batches of 8 on each of 2 processes: 12 steps per task
        assert state["global_step"] == 12 * k
        stats = load_fisher(str(out / f"task_{k:02d}" / "fisher.safetensors"))
        assert stats.num_samples == 40 and stats.c_star > 0
    assert json.loads((out / "task_02" / "metrics.json").read_text())["classes"] == list(range(50, 100))
    from safetensors.torch import load_file

    buffer = load_file(str(out / "task_02" / "er_buffer.safetensors"))  # 2 of each class's 4 images, both shards
    assert sorted(buffer["labels"].tolist()) == [c for c in range(100) for _ in range(2)]
    assert buffer["counts"].tolist() == [[c, 4] for c in range(100)]
    from PIL import Image

    grid = Image.open(out / "task_02" / "samples.png")  # 100 seen classes, at most 10 rows of 8
    assert grid.size == ((8 * 9 + 1) * 4, (10 * 9 + 1) * 4)


def test_streaming_refuses_settings_that_need_the_split_in_memory(tmp_path):
    message = refusal(
        ["--dataset_name", "digits", "--streaming", "--max_train_per_class", "4", "--output_dir", str(tmp_path / "x")]
    )
    assert "--max_train_per_class" in message and "--streaming" in message
    assert "--fid_classifier" in refusal(
        ["--dataset_name", "digits", "--streaming", "--output_dir", str(tmp_path / "y")]
    )


def test_table1_reproduction_scales_are_valid_invocations(tmp_path, fashion_mnist_dir):
    """Every scale of the table-1 studies (benchmarks/_runs.py; the GPU ones included, which this machine cannot run)
    builds flags that the script accepts, with the paper's model and protocol on the GPU scale."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _runs as table1

    from hf_r1ewc.config import parse_args

    (tmp_path / "fid_classifier").mkdir()
    (tmp_path / "fid_classifier" / "model.safetensors").write_bytes(b"")
    for name, sc in table1.SCALES.items():
        for method in table1.METHODS:
            lam = 15000.0 if method in table1.HAS_PENALTY else None
            flags = table1.run_flags(method, lam, 0, tmp_path, str(fashion_mnist_dir), sc)
            args = parse_args([*flags, "--output_dir", str(tmp_path / "out")])
            assert args.seed == 0 and (lam is None or args.ewc_lambda == lam)
            assert not args.use_ema and args.replay_batch_size is None  # the demo preset's choices stay out
            if method in table1.HAS_PENALTY:  # the in-loss methods say so: the demo preset's default is decoupled
                assert args.ewc_mode == ("decoupled" if "decoupled" in method else "loss")
            if name == "gpu":
                assert args.preset == "paper" and args.resolution == 32 and not args.resize
                assert args.num_epochs_per_task == 200 and args.replay_per_class == 5000
                assert args.max_train_per_class is None and args.fisher_num_samples is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be >= 0"),
        (["--fisher_batch_size", "0"], "--fisher_batch_size must be >= 1"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0"),
        (["--distill_weight", "nan"], "--distill_weight must be a finite number >= 0"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number > 0"),
        (["--validation_epochs", "1"], "--validation_epochs logs sample grids to the trackers: add --report_to"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    ],
)
def test_flags_rejected_before_any_work(flags, message, capsys):
    """Settings that used to fail after training started (ZeroDivisionError, deleted checkpoints, NaN) are refused
    by the argument check."""
    from hf_r1ewc.config import parse_args

    with pytest.raises(SystemExit, match=message):
        parse_args(["--dataset_name", "digits", "--output_dir", "unused", *flags])


def test_dit_backbone_run_resume_and_folder(tmp_path):
    """--preset dit-small: the same task folders as a UNet run (transformer/ instead of unet/, a Fisher, a card), and
    kill/resume ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from hf_r1ewc.fisher import load_fisher
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    common = [*FAST, "--preset", "dit-small", "--fid_num_samples", "40", "--checkpointing_steps", "2"]
    run([*common, "--output_dir", str(tmp_path / "whole")])
    run([*common, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "8"])
    run([*common, "--output_dir", str(tmp_path / "cut")])
    folder = tmp_path / "whole" / "task_02"
    for name in (
        "transformer/config.json",
        "fisher.safetensors",
        "ewc_penalty.safetensors",
        "README.md",
        "samples.png",
    ):
        assert (folder / name).exists(), name
    assert not (folder / "unet").exists()
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    assert type(pipe.denoiser).__name__ == "DiTTransformer2DModel"
    assert load_fisher(str(folder / "fisher.safetensors"), model=pipe.denoiser).c_star > 0
    a, b = (
        load_file(str(tmp_path / run / "task_02" / "transformer" / "diffusion_pytorch_model.safetensors"))
        for run in ("whole", "cut")
    )
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_trackers_get_grids_heatmaps_and_the_metric_scalars(two_task_run):
    """--report_to tensorboard --validation_epochs 1: TensorBoard's own reader finds the per-task grid and heatmaps,
    a validation grid after every epoch, the losses of each logging window and the per-task metrics at each task's
    last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(two_task_run / "logs" / "continual-ddpm"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"samples", "fid_matrix", "accuracy_matrix", "validation"} <= set(tags["images"])
    results = json.loads((two_task_run / "results.json").read_text())
    ends = [e.step for e in events.Images("samples")]
    assert len(ends) == 2 and len(events.Images("validation")) == 4  # 2 tasks x 2 epochs
    assert [e.step for e in events.Scalars("afid@k")] == ends
    assert [e.value for e in events.Scalars("afid@k")] == pytest.approx([results["afid"]["1"], results["afid"]["2"]])
    assert events.Scalars("fid/task_1")[-1].value == pytest.approx(results["fid"]["2"]["1"])
    assert events.Scalars("forgetting")[-1].value == pytest.approx(results["forgetting"])
    assert events.Scalars("acc")[-1].value == pytest.approx(results["acc"])
    assert events.Scalars("bwt")[-1].value == pytest.approx(results["bwt"])
    # the loss terms' mean over each window: every 10 optimizer steps (--logging_steps) and at each epoch's end
    # (3 steps per epoch); a window that is a whole epoch logs that epoch's mean loss
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(logged) == [3, 6, 9, 10, 12] and ends[-1] == 12
    first_epochs = [
        json.loads((two_task_run / t / "metrics.json").read_text())["loss_per_epoch"] for t in ("task_01", "task_02")
    ]
    assert logged[3] == pytest.approx(first_epochs[0][0]) and logged[6] == pytest.approx(first_epochs[0][1])
    assert logged[9] == pytest.approx(first_epochs[1][0])


def test_gradient_checkpointing_and_loader_workers_change_no_result(tmp_path):
    """Memory and loading flags are not in the manifest because they change nothing: the same weights after a
    task with activation checkpointing and two loader workers as without (the Fisher too, computed without it)."""
    from safetensors.torch import load_file

    one_task = [*FAST, "--tasks", "0,1", "--fid_backend", "none", "--ewc_type", "rank1"]
    run([*one_task, "--output_dir", str(tmp_path / "plain")])
    run(
        [
            *one_task,
            "--output_dir",
            str(tmp_path / "lean"),
            "--gradient_checkpointing",
            "--dataloader_num_workers",
            "2",
        ]
    )
    plain, lean = (unet_weights(tmp_path / run / "task_01") for run in ("plain", "lean"))
    assert max(float((plain[k] - lean[k]).abs().max()) for k in plain) <= 1e-5
    fisher = [load_file(str(tmp_path / run / "task_01" / "fisher.safetensors")) for run in ("plain", "lean")]
    assert max(float((fisher[0][k] - fisher[1][k]).abs().max()) for k in fisher[0]) <= 1e-5


def test_a_compiled_run_matches_eager_and_resumes(tmp_path):
    """`accelerate launch --dynamo_backend aot_eager ... --compile`: Accelerate compiles the student, the learner the
    teacher and its sampler. Stopped mid task 2 and resumed (compiled checkpoints load), it ends with the eager
    run's weights to float32 rounding (aot_eager: dynamo's capture and AOT autograd; inductor's kernels take minutes
    to build on 2 CPU cores and are measured in benchmarks/bench_throughput.py)."""
    two = [*FAST, "--fid_backend", "none", "--ewc_type", "rank1", "--ewc_mode", "loss", "--checkpointing_steps", "2"]
    launch([*two, "--output_dir", str(tmp_path / "eager")])
    compiled = [*two, "--output_dir", str(tmp_path / "compiled"), "--compile"]
    launch([*compiled, "--stop_after_steps", "9"], dynamo_backend="aot_eager")  # mid task 2 (6 steps per task)
    assert not (tmp_path / "compiled" / "task_02").exists()
    launch(compiled, dynamo_backend="aot_eager")
    eager, resumed = (unet_weights(tmp_path / run / "task_02") for run in ("eager", "compiled"))
    assert max(float((eager[k] - resumed[k]).abs().max()) for k in eager) <= 1e-4


def test_accumulated_replay_pools_sample_each_class_once(tmp_path):
    """--replay_pool accumulate on 3 tasks: at task 2 its pool is regenerate's (same teacher, classes and seed); at
    task 3 the teacher samples only task 2's classes while task 1's keep their images; the pools go when the run
    ends, and the method is named apart from regenerate's in results.json."""
    from safetensors.torch import load_file

    three = [*FAST, "--tasks", "0,1;2,3;4,5", "--fid_backend", "none", "--checkpointing_steps", "2"]
    regenerate, accumulate = tmp_path / "regenerate", tmp_path / "accumulate"
    run([*three, "--output_dir", str(regenerate), "--stop_after_steps", "8"])  # mid task 2 (6 steps per task)
    run([*three, "--output_dir", str(accumulate), "--replay_pool", "accumulate", "--stop_after_steps", "14"])
    pools = accumulate / "replay" / "accumulated"
    assert sorted(p.name for p in pools.iterdir()) == ["task_01", "task_02"]  # task 3 is under way
    assert json.loads((pools / "task_02" / "pool.json").read_text())["classes"] == [2, 3]
    for chunk in sorted((regenerate / "replay" / "task_02").glob("chunk-*.safetensors")):
        a, b = load_file(str(chunk)), load_file(str(pools / "task_01" / chunk.name))
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    run([*three, "--output_dir", str(accumulate), "--replay_pool", "accumulate"])  # resumes and finishes
    assert not pools.exists()
    assert "generative replay (accumulated pool)" in json.loads((accumulate / "results.json").read_text())["method"]


def test_experience_replay_with_rank1_runs_under_accelerate_launch(tmp_path):
    """--method er+rank1 through a real `accelerate launch`: task 2 trains on its real batch with exemplars of
    classes 0 and 1 and the rank-1 penalty; its folder records the buffer as indices (no images) and the penalty."""
    launch(
        [
            *FAST,
            "--method",
            "er+rank1",
            "--er_per_class",
            "5",
            "--fid_backend",
            "none",
            "--output_dir",
            str(tmp_path / "er"),
        ]
    )
    folder = tmp_path / "er" / "task_02"
    buffer = json.loads((folder / "er_buffer.json").read_text())
    assert len(buffer["indices"]) == 4 * 5 and (folder / "ewc_penalty.safetensors").exists()
    manifest = json.loads((tmp_path / "er" / "run_manifest.json").read_text())
    assert buffer["train_sha256"] == manifest["dataset"]["train_sha256"]
    results = json.loads((tmp_path / "er" / "results.json").read_text())
    assert results["method"].startswith("rank1 EWC (lambda=15000, decoupled) + experience replay (5 per class)")


@pytest.mark.parametrize("method", ["si+er+agem+kd", "mas"])
def test_the_fields_methods_resume_bit_for_bit_on_two_processes(tmp_path, method):
    """Under 2 gloo processes, a run stopped after step 5 (mid task 2: SI's path integral and A-GEM's count have
    moved on all-reduced gradients; ER's and A-GEM's exemplars, KD's teacher, MAS's all-reduced importances in place)
    and re-run ends with the uninterrupted run's weights, bit for bit."""
    flags = [*FAST, "--method", method, "--fid_backend", "none", "--train_batch_size", "16"]
    flags += ["--num_epochs_per_task", "1", "--checkpointing_steps", "1"]
    launch([*flags, "--output_dir", str(tmp_path / "whole")], num_processes=2)
    launch([*flags, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "5"], num_processes=2)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-5").exists()
    assert not (tmp_path / "resumed" / "task_02").exists()
    launch([*flags, "--output_dir", str(tmp_path / "resumed")], num_processes=2)
    whole, resumed = unet_weights(tmp_path / "whole" / "task_02"), unet_weights(tmp_path / "resumed" / "task_02")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    metrics = json.loads((tmp_path / "whole" / "task_02" / "metrics.json").read_text())
    assert metrics.get("agem_memory_size", 80) == 4 * 20 and ("mas_importance_mean" in metrics) == (method == "mas")


def test_the_class_by_task_grid_washes_out_the_classes_a_model_had_not_learned(two_task_run, tmp_path):
    """samples_by_task.png's grid: class 2 (task 2) after task 1 is drawn washed out, within [0.2, 0.7]; the classes
    learned by then are drawn as sampled."""
    from hf_r1ewc.evaluate import sample_grid_across_tasks

    grid = sample_grid_across_tasks(two_task_run, [0, 2], tmp_path / "grid.png", steps=2)
    class0_task1, class0_task2, class2_task1, class2_task2 = grid
    assert 0.2 - 1e-5 <= float(class2_task1.min()) and float(class2_task1.max()) <= 0.7 + 1e-5
    for cell in (class0_task1, class0_task2, class2_task2):
        assert float(cell.min()) < 0.2  # the digits' dark background: not washed


@pytest.mark.parametrize("method", ["lora"])  # (the ensemble passed too: 65 s more of CI for a simpler case)
def test_parameter_isolation_resumes_bit_for_bit_under_two_processes(tmp_path, method):
    """--method lora (or ensemble) on 2 gloo processes, stopped mid task 2 and re-run: the shared model, every route
    (LoRA's adapter, the ensemble's task-1 model) and the routing table end as in the uninterrupted run."""
    from safetensors.torch import load_file

    common = [*FAST, "--num_epochs_per_task", "1", "--fid_backend", "none", "--method", method, "--no-use_ema"]
    common += ["--train_batch_size", "8"]  # 6 steps per task on 2 processes
    launch([*common, "--output_dir", str(tmp_path / "whole")], num_processes=2)
    launch([*common, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "8"], num_processes=2)
    assert not (tmp_path / "cut" / "task_02").exists()
    launch([*common, "--output_dir", str(tmp_path / "cut")], num_processes=2)
    whole, cut = tmp_path / "whole" / "task_02", tmp_path / "cut" / "task_02"
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert any(p.parts[0] == "routes" for p in files)
    for path in files:
        a, b = load_file(str(whole / path)), load_file(str(cut / path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    index = lambda folder: json.loads((folder / "model_index.json").read_text())["routes"]  # noqa: E731
    assert index(whole) == index(cut) == {"0": "task_01", "1": "task_01", "2": "denoiser", "3": "denoiser"} or (
        method == "lora"
        and index(whole) == index(cut) == {"0": "denoiser", "1": "denoiser", "2": "task_02", "3": "task_02"}
    )


# ------------------------------------------------------------------------------------------ continued runs

EXTEND_FLAGS = [*FAST, "--num_epochs_per_task", "1", "--fid_num_samples", "16"]


def with_tasks(flags: list[str], tasks: str) -> list[str]:
    flags = list(flags)
    flags[flags.index("--tasks") + 1] = tasks
    return flags


@pytest.mark.parametrize(
    "method",
    ["gd", "er", "rank1+gd", "lora --no-use_ema", "ensemble", "si+er+agem+kd", "mas+der", "l2"],
    ids=["gd", "er", "rank1+gd", "lora", "ensemble", "si+er+agem+kd", "mas+der", "l2"],
)
def test_a_finished_run_extended_by_a_task_equals_the_run_planned_with_it(tmp_path, method):
    """The promise of open-ended learning: a 2-task run re-run into its folder with a third task appended ends with
    the task_03 folder (weights, method files, card, pipeline) and the FID matrix of the run planned with 3 tasks,
    and its manifest records the longer task list as a change."""
    flags = [*EXTEND_FLAGS, "--method", *method.split()]
    run([*with_tasks(flags, "0,1;2,3;4,5"), "--output_dir", str(tmp_path / "planned")])
    run([*flags, "--output_dir", str(tmp_path / "extended")])
    assert not (tmp_path / "extended" / "task_03").exists()
    run([*with_tasks(flags, "0,1;2,3;4,5"), "--output_dir", str(tmp_path / "extended")])
    assert_same_task_folder(tmp_path / "planned" / "task_03", tmp_path / "extended" / "task_03")
    planned, extended = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("planned", "extended"))
    assert planned["fid"] == extended["fid"] and set(planned["fid"]) == {"1", "2", "3"}
    manifest = json.loads((tmp_path / "extended" / "run_manifest.json").read_text())
    assert manifest["tasks"] == [[0, 1], [2, 3], [4, 5]] and [c["setting"] for c in manifest["changes"]] == ["tasks"]


@pytest.mark.parametrize("method", ["rank1+gd+er", "lora", "ensemble"])
def test_a_run_extended_on_two_processes_equals_the_run_planned_with_it(tmp_path, method):
    """The same promise on 2 gloo processes (the Fisher, the replay pool, the exemplars and the routes sharded and
    gathered): task_03 of an extended 2-task run is the planned 3-task run's, bit for bit."""
    flags = [*EXTEND_FLAGS, "--method", method, "--train_batch_size", "8", "--no-use_ema"]
    launch([*with_tasks(flags, "0,1;2,3;4,5"), "--output_dir", str(tmp_path / "planned")], num_processes=2)
    launch([*flags, "--output_dir", str(tmp_path / "extended")], num_processes=2)
    launch([*with_tasks(flags, "0,1;2,3;4,5"), "--output_dir", str(tmp_path / "extended")], num_processes=2)
    assert_same_task_folder(tmp_path / "planned" / "task_03", tmp_path / "extended" / "task_03")
    planned, extended = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("planned", "extended"))
    assert planned["fid"] == extended["fid"]


def test_a_task_folder_learns_new_tasks_given_alone_by_name(tmp_path):
    """--resume_from_task FOLDER --tasks with only the new tasks, by name: the new run's tasks are the folder's
    learned ones followed by the new ones, its task_03 has the weights of the run planned with them, and its pipeline
    samples by name; a --tasks list that repeats a learned class after other tasks is refused, showing both lists."""
    from safetensors.torch import load_file

    flags = [*EXTEND_FLAGS, "--method", "er", "--class_names", "zero,one,two,three,four,five,six,seven,eight,nine"]
    run([*with_tasks(flags, "0,1;2,3;4,5"), "--output_dir", str(tmp_path / "planned")])
    source = str(tmp_path / "planned" / "task_02")
    run([*with_tasks(flags, "four,five"), "--output_dir", str(tmp_path / "next"), "--resume_from_task", source])
    results = json.loads((tmp_path / "next" / "results.json").read_text())
    planned = json.loads((tmp_path / "planned" / "results.json").read_text())
    assert results["tasks"] == [[0, 1], [2, 3], [4, 5]] and results["fid"] == planned["fid"]  # history from task 1
    assert results["class_names"]["4"] == "four"
    for name in ("unet/diffusion_pytorch_model.safetensors", "er_buffer.json"):
        a, b = tmp_path / "planned" / "task_03" / name, tmp_path / "next" / "task_03" / name
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            x, y = load_file(str(a)), load_file(str(b))
            assert all(torch.equal(x[k], y[k]) for k in x)
    index = json.loads((tmp_path / "next" / "task_03" / "model_index.json").read_text())
    assert index["id2label"]["5"] == "five" and index["learned_classes"] == [0, 1, 2, 3, 4, 5]
    pipe = quiet_pipeline(tmp_path / "next" / "task_03")
    named = pipe(["five", "one"], 2, generator=row_generators([0, 1]), output_type="pt").images
    assert torch.equal(named, pipe([5, 1], 2, generator=row_generators([0, 1]), output_type="pt").images)
    message = refusal(
        [*with_tasks(flags, "4,5;two"), "--output_dir", str(tmp_path / "x"), "--resume_from_task", source]
    )
    assert "trained on the tasks [[0, 1], [2, 3]], and --tasks gives [[4, 5], [2]]" in message
    assert not (tmp_path / "x").exists()


def test_a_digits_run_learns_named_classes_from_new_data_and_grows_its_label_table(tmp_path):
    """A finished digits run (classes 0-3 of 10) re-run with a parquet dataset of two named classes appended: the
    label table grows to 12 ids (circle, square = 10, 11), the pipeline samples by name, the EWC penalty's old terms
    carry no Fisher mass on the new rows, the manifest names each task's data, and the digits tasks' FIDs come from
    the statistics the task folder carried (equal to a recomputation on the digits)."""
    from safetensors.torch import load_file

    from hf_r1ewc.features import ClassifierFeatures
    from hf_r1ewc.metrics import TaskFID
    from hf_r1ewc.pipeline import sampling_scheduler

    shapes = named_shapes_parquet(tmp_path / "shapes")
    flags, out = [*EXTEND_FLAGS, "--method", "rank1+gd"], tmp_path / "run"
    run([*flags, "--output_dir", str(out)])
    new = with_tasks(flags, "0,1;2,3;circle,square")
    new[new.index("--dataset_name") + 1] = str(shapes)
    run([*new, "--output_dir", str(out)])
    folder = out / "task_03"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["id2label"] == {**{str(i): str(i) for i in range(10)}, "10": "circle", "11": "square"}
    assert index["learned_classes"] == [0, 1, 2, 3, 10, 11]
    assert json.loads((folder / "unet" / "config.json").read_text())["num_class_embeds"] == 12
    mu = load_file(str(folder / "ewc_penalty.safetensors"))["mu.class_embedding.weight"]
    assert mu.shape[:2] == (3, 12) and not mu[:2, 10:].any() and mu[:2, :4].any() and mu[2, 10:].any()
    pipe = quiet_pipeline(folder)
    named = pipe(["circle", "3"], 2, generator=row_generators([0, 1]), output_type="pt").images
    assert torch.equal(named, pipe([10, 3], 2, generator=row_generators([0, 1]), output_type="pt").images)
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["task_sources"] == ["digits", "digits", str(shapes)]
    assert manifest["changes"][0]["setting"] == "data" and manifest["changes"][0]["from_task"] == 3
    results = json.loads((out / "results.json").read_text())
    assert set(results["fid"]["3"]) == {"1", "2", "3"} and results["class_names"]["11"] == "square"
    # FID_1(m_3) from the carried statistics equals FID_1(m_3) recomputed on the digits' own test images
    from hf_r1ewc.data import load_task_data

    digits = load_task_data("digits", tasks="0,1;2,3", resolution=8, max_train_per_class=48)
    extractor = ClassifierFeatures.from_pretrained(str(out / "fid_classifier"))
    evaluator = TaskFID(
        extractor, digits.test_inputs, digits.test.labels, digits.tasks, num_samples=16, num_inference_steps=4
    )
    score = evaluator(pipe.denoiser, sampling_scheduler("ddim", pipe.scheduler.config), 1)
    assert score.fid == pytest.approx(results["fid"]["3"]["1"], rel=1e-6)  # (the saved copy: other rounding)
    assert results["task_sources"] == manifest["task_sources"]
    from hf_r1ewc.evaluate import complete_run

    with pytest.raises(ValueError, match="tasks come from several datasets"):  # it would score digits on shapes
        complete_run(out, all_tasks=True)
    assert (out / "samples_by_task.png").exists()


def test_new_classes_grow_the_model_on_two_processes(tmp_path):
    """The same growth under 2 gloo processes, the new tasks given alone (each process grows its copy before
    Accelerate prepares it): the run goes through the replay pool, training, FID and Fisher sharded over both, and
    the grown folder names all 12 classes with a 12-row label table."""
    shapes = named_shapes_parquet(tmp_path / "shapes")
    flags, out = [*EXTEND_FLAGS, "--method", "rank1+gd", "--train_batch_size", "8"], tmp_path / "run"
    launch([*flags, "--output_dir", str(out)], num_processes=2)
    new = with_tasks(flags, "circle,square")
    new[new.index("--dataset_name") + 1] = str(shapes)
    launch([*new, "--output_dir", str(out)], num_processes=2)
    index = json.loads((out / "task_03" / "model_index.json").read_text())
    assert index["learned_classes"] == [0, 1, 2, 3, 10, 11] and len(index["id2label"]) == 12
    assert unet_weights(out / "task_03")["class_embedding.weight"].shape[0] == 12


def test_real_exemplars_carry_onto_new_data_as_images(tmp_path):
    """DER++ (der+er) on digits, continued with the shapes data: both buffers replay the digits' exemplars from the
    8-bit images the task folder keeps (bit-identical to the digits' pixels) and add the new classes' from the new
    data; a folder without those images (as pulled from the Hub) continues on its own data only, refused by name."""
    from safetensors.torch import load_file

    from hf_r1ewc.data import load_task_data

    shapes = named_shapes_parquet(tmp_path / "shapes")
    flags = [*EXTEND_FLAGS, "--method", "der+er", "--er_per_class", "3", "--der_per_class", "2"]
    run([*flags, "--output_dir", str(tmp_path / "run")])
    new = with_tasks(flags, "circle,square")
    new[new.index("--dataset_name") + 1] = str(shapes)
    source = ["--resume_from_task", str(tmp_path / "run" / "task_02"), "--fid_backend", "none"]
    run([*new, *source, "--output_dir", str(tmp_path / "next")])
    digits = load_task_data("digits", tasks="0,1;2,3", resolution=8, max_train_per_class=48).train
    manifest = json.loads((tmp_path / "next" / "run_manifest.json").read_text())
    assert manifest["task_sources"] == ["digits", "digits", str(shapes)]  # a new folder knows its tasks' data
    for stem, per_class in (("er_buffer", 3), ("der_buffer", 2)):
        record = json.loads((tmp_path / "next" / "task_03" / f"{stem}.json").read_text())
        kept = load_file(str(tmp_path / "next" / "task_03" / f"{stem}_images.safetensors"))
        assert record["carried"] == 4 * per_class and len(record["indices"]) == 2 * per_class
        assert kept["labels"].tolist() == [c for c in (0, 1, 2, 3, 10, 11) for _ in range(per_class)]
        old = json.loads((tmp_path / "run" / "task_02" / f"{stem}.json").read_text())["indices"]
        assert torch.equal(kept["images"][: 4 * per_class], digits.images[old])  # the digits' own pixels
    (tmp_path / "run" / "task_02" / "er_buffer_images.safetensors").unlink()
    message = refusal([*new, *source, "--output_dir", str(tmp_path / "x")])
    assert "er_buffer_images.safetensors) are not in" in message and "--push_exemplars" in message


@pytest.mark.parametrize("method", ["lora", "ensemble"])
def test_parameter_isolation_learns_new_classes_from_new_data_forgetting_nothing(tmp_path, method):
    """LoRA and the ensemble continued onto new classes of new data: the shared (or newest) model's label table
    grows, a finished task's route keeps its own model, the routing table gains the new classes, the pipeline samples
    an old and a new class in one batch, and the old tasks' FIDs are exactly what they were."""
    shapes = named_shapes_parquet(tmp_path / "shapes")
    flags, out = [*EXTEND_FLAGS, "--method", method, "--no-use_ema"], tmp_path / "run"
    run([*flags, "--output_dir", str(out)])
    new = with_tasks(flags, "circle,square")
    new[new.index("--dataset_name") + 1] = str(shapes)
    run([*new, "--output_dir", str(out)])
    routes = json.loads((out / "task_03" / "model_index.json").read_text())["routes"]
    assert {c: routes[c] for c in ("10", "11")} == (
        {"10": "task_03", "11": "task_03"} if method == "lora" else {"10": "denoiser", "11": "denoiser"}
    )
    pipe = quiet_pipeline(out / "task_03")
    assert pipe(["circle", 0], 2, generator=row_generators([0, 1]), output_type="pt").images.shape == (2, 1, 8, 8)
    fid = json.loads((out / "results.json").read_text())["fid"]
    assert fid["3"]["1"] == fid["1"]["1"] and fid["3"]["2"] == fid["2"]["2"]
    if method == "lora":  # the shared model's old rows, all ten ids', are the rows before the table grew
        before, after = (unet_weights(out / f"task_0{k}")["class_embedding.weight"] for k in (2, 3))
        assert after.shape[0] == 12 and torch.equal(after[:10], before)


def test_a_gd_task_folder_continues_with_er_added_its_buffer_starting_empty(tmp_path, caplog):
    """--resume_from_task of a GD run's folder with --method gd+er: ER joins with an empty buffer (said in the log),
    keeps exemplars of the new classes only, and the new run resumes and extends from its own folders (the classes
    learned before ER joined stay absent); a method that keeps something of every finished task (si) cannot join."""
    flags = [*EXTEND_FLAGS, "--method", "gd"]
    run([*flags, "--output_dir", str(tmp_path / "run")])
    added = with_tasks(flags, "4,5")
    added[added.index("--method") + 1] = "gd+er"
    source = ["--resume_from_task", str(tmp_path / "run" / "task_02"), "--output_dir", str(tmp_path / "next")]
    with caplog.at_level(logging.INFO):
        run([*added, *source])
    assert "--method adds er, which" in caplog.text and "its buffer starts empty" in caplog.text
    record = json.loads((tmp_path / "next" / "task_03" / "er_buffer.json").read_text())
    assert record["absent"] == [0, 1, 2, 3] and len(record["indices"]) == 2 * 20
    task_03 = (tmp_path / "next" / "task_03" / "training_state.json").read_bytes()
    run([*with_tasks(added, "6,7"), "--output_dir", str(tmp_path / "next")])  # its own folder, one more task
    assert (tmp_path / "next" / "task_03" / "training_state.json").read_bytes() == task_03  # not redone
    record = json.loads((tmp_path / "next" / "task_04" / "er_buffer.json").read_text())
    assert record["absent"] == [0, 1, 2, 3] and len(record["indices"]) == 4 * 20
    added[added.index("--method") + 1] = "gd+si"
    message = refusal([*added, *source[:2], "--output_dir", str(tmp_path / "si")])
    assert "--method si keeps something of every finished task, which that run did not make" in message
