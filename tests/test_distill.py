from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.distill import (
    POOL_CHUNK,
    ReplayPool,
    frozen_teacher,
    online_replay_batch,
)
from hf_r1ewc.pipeline import sampling_scheduler


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)  # the training schedule (noising)
SAMPLER = sampling_scheduler("ddim", SCHEDULER.config)  # what the pool samples with


def test_pool_samples_through_the_pipeline_sampler(tmp_path):
    """The pool's images are the pipeline's images for the same labels and noise (one sampler)."""
    from hf_r1ewc.pipeline import ClassConditionalPipeline

    teacher = frozen_teacher(make_tiny_unet())
    pool = ReplayPool.generate(
        teacher, SAMPLER, [0, 3], 2, tmp_path, num_inference_steps=5, seed=4, autocast_dtype=None, show_progress=False
    )
    pipe = ClassConditionalPipeline(teacher, SAMPLER)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        pool.labels, num_inference_steps=5, generator=torch.Generator().manual_seed(4 * 1_000_003), output_type="pt"
    ).images
    torch.testing.assert_close((pool.images.float() + 1) / 2, ref, atol=2e-3, rtol=0)  # pool stored as fp16


def test_teacher_is_frozen_copy():
    unet = make_tiny_unet()
    teacher = frozen_teacher(unet)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    assert not torch.equal(next(unet.parameters()), next(teacher.parameters()))


def test_pool_size_labels_determinism_and_reload(tmp_path):
    teacher = frozen_teacher(make_tiny_unet())
    kwargs = dict(classes=[2, 0], per_class=POOL_CHUNK // 2 + 3, num_inference_steps=3, seed=5, show_progress=False)
    pool = ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "a", **kwargs)
    assert len(pool) == 2 * kwargs["per_class"] and pool.classes == [0, 2]
    assert pool.labels.bincount().tolist() == [kwargs["per_class"], 0, kwargs["per_class"]]
    assert pool.images.shape[1:] == (1, 8, 8) and pool.images.dtype == torch.float16
    assert float(pool.images.abs().max()) <= 1
    again = ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "b", **kwargs)
    assert torch.equal(pool.images, again.images)
    reloaded = ReplayPool.load(tmp_path / "a")
    assert torch.equal(reloaded.images, pool.images) and torch.equal(reloaded.labels, pool.labels)
    images, labels = pool.sample(16, torch.Generator().manual_seed(0))
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.float32 and set(labels.tolist()) <= {0, 2}


def test_pool_shards_across_processes_and_resumes(tmp_path):
    teacher = frozen_teacher(make_tiny_unet())
    kwargs = dict(classes=[1, 3], per_class=POOL_CHUNK, num_inference_steps=2, seed=1, show_progress=False)
    whole = ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "one", **kwargs)
    # two "processes" share the chunks; the second one finds the first one's chunks and completes the pool
    with pytest.raises(ValueError, match="incomplete"):
        ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "two", rank=0, world_size=2, **kwargs)
    chunk0 = (tmp_path / "two" / "chunk-00000.safetensors").stat().st_mtime_ns
    shared = ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "two", rank=1, world_size=2, **kwargs)
    assert torch.equal(whole.images, shared.images)
    ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "two", **kwargs)  # resume: nothing regenerated
    assert (tmp_path / "two" / "chunk-00000.safetensors").stat().st_mtime_ns == chunk0
    with pytest.raises(ValueError, match="other settings"):
        ReplayPool.generate(teacher, SAMPLER, directory=tmp_path / "two", **{**kwargs, "seed": 2})


def test_pool_errors(tmp_path):
    teacher = frozen_teacher(make_tiny_unet())
    with pytest.raises(ValueError, match="at least one class"):
        ReplayPool.generate(teacher, SAMPLER, [], 2, tmp_path)
    with pytest.raises(ValueError, match=r"replay classes \[7\] are outside"):
        ReplayPool.generate(teacher, SAMPLER, [0, 7], 2, tmp_path)


def test_online_replay_batch():
    teacher = frozen_teacher(make_tiny_unet())
    images, labels = online_replay_batch(
        teacher, SAMPLER, [1, 2], 7, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (7, 1, 8, 8) and set(labels.tolist()) <= {1, 2} and images.requires_grad is False


@pytest.mark.parametrize("native", [False, True], ids=["without_native_bf16", "with_native_bf16"])
def test_pool_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(tmp_path, request, native):
    """``autocast_dtype="auto"`` branches on the CPU's native bf16 (AVX512-BF16 or AMX): both branches, on any CPU."""
    from hf_r1ewc.pipeline import default_autocast_dtype

    if native:
        request.getfixturevalue("native_bf16")
    assert default_autocast_dtype("cpu") == (torch.bfloat16 if native else None)
    teacher = frozen_teacher(make_tiny_unet())
    args = dict(num_inference_steps=3, seed=1, show_progress=False)
    auto = ReplayPool.generate(teacher, SAMPLER, [1], 4, tmp_path / "auto", **args)
    expected = ReplayPool.generate(
        teacher, SAMPLER, [1], 4, tmp_path / "explicit", autocast_dtype=torch.bfloat16 if native else None, **args
    )
    other = ReplayPool.generate(
        teacher, SAMPLER, [1], 4, tmp_path / "other", autocast_dtype=None if native else torch.bfloat16, **args
    )
    assert torch.equal(auto.images, expected.images) and not torch.equal(auto.images, other.images)
