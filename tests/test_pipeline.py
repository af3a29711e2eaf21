from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_dit, make_tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler

from hf_r1ewc.pipeline import SAMPLERS, ClassConditionalPipeline, sampling_scheduler


@pytest.fixture
def pipe():
    pipe = ClassConditionalPipeline(make_tiny_unet(), sampling_scheduler("ddim", DDPMScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_old_name_still_imports():
    from hf_r1ewc.pipeline import ClassConditionalDDIMPipeline

    assert ClassConditionalDDIMPipeline is ClassConditionalPipeline


def test_scheduler_is_swappable_as_in_diffusers(pipe, tmp_path):
    """pipe.scheduler = X.from_config(pipe.scheduler.config) works, every --replay_scheduler samples, and the
    scheduler is saved with the folder."""
    assert isinstance(pipe.scheduler, DDIMScheduler)
    ddim = pipe([0, 1], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    dpm = pipe([0, 1], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(dpm).all() and not torch.equal(ddim, dpm)
    pipe.save_pretrained(tmp_path / "f")
    assert isinstance(ClassConditionalPipeline.from_pretrained(tmp_path / "f").scheduler, DPMSolverMultistepScheduler)
    for name in SAMPLERS:
        pipe.scheduler = sampling_scheduler(name, DDPMScheduler().config)
        out = pipe([2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all(), name


def test_deterministic_with_generator_and_output_types(pipe):
    a = pipe([0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe([0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    c = pipe([0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (3, 1, 8, 8) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    arr = pipe([0], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 8, 8, 1)
    np.testing.assert_allclose(arr[0, :, :, 0], a[0, 0].numpy(), atol=1e-5)  # batch of 1 vs 3
    pil = pipe([0, 3], num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    (tuple_out,) = pipe([1], num_inference_steps=2, output_type="pt", return_dict=False)
    assert tuple_out.shape == (1, 1, 8, 8)


def test_labels_respected(pipe):
    """Same noise, different labels -> different images; the class embedding is really used."""
    outs = [
        pipe([label], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
        for label in (0, 1)
    ]
    with torch.no_grad():
        pipe.unet.class_embedding.weight[1] = pipe.unet.class_embedding.weight[0]
    same = pipe([1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], same)


def test_bad_labels_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="class_labels is empty"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"class labels \[4, 9\] are outside this model's classes 0..3"):
        pipe([0, 4, 9], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], num_inference_steps=2, output_type="latent")


@pytest.mark.parametrize("backbone, subfolder", [("unet", "unet"), ("dit", "transformer")])
def test_save_load_round_trip_and_custom_pipeline(backbone, subfolder, tmp_path):
    model = make_tiny_unet() if backbone == "unet" else make_tiny_dit()
    pipe = ClassConditionalPipeline.for_model(model.eval(), sampling_scheduler("ddim", DDPMScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "task_01"  # (eval: from_pretrained returns eval-mode models)
    pipe.save_pretrained(folder)
    assert (folder / "pipeline.py").exists() and (folder / subfolder / "diffusion_pytorch_model.safetensors").exists()
    ref = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    loaded = ClassConditionalPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    out = loaded([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(ref, out)
    assert type(loaded.denoiser) is type(model)
    generic = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(generic).__name__ == "ClassConditionalPipeline"
    generic.set_progress_bar_config(disable=True)
    out2 = generic([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(ref, out2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(pipe, dtype):
    pipe.to(dtype=dtype)
    out = pipe([0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pipe.unet.dtype == dtype and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_exactly_one_denoiser():
    scheduler = sampling_scheduler("ddim", DDPMScheduler().config)
    with pytest.raises(ValueError, match="pass exactly one denoiser"):
        ClassConditionalPipeline(make_tiny_unet(), scheduler, transformer=make_tiny_dit())
    with pytest.raises(ValueError, match="pass exactly one denoiser"):
        ClassConditionalPipeline(None, scheduler)


def test_a_class_never_learned_is_sampled_with_one_warning_that_names_the_learned_ones(tmp_path):
    """A task folder's pipeline knows the classes trained so far (model_index.json): asking for another warns once
    per call, naming them; a pipeline without the record (built by hand, older folders) says nothing."""
    import warnings

    pipe = ClassConditionalPipeline(make_tiny_unet(), DDIMScheduler(num_train_timesteps=1000), learned_classes=[1, 0])
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "task")
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path / "task")
    assert loaded.config.learned_classes == [0, 1]
    loaded.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning) as caught:
        loaded([0, 3, 3, 2], num_inference_steps=2, output_type="pt")
    messages = [str(w.message) for w in caught if "never trained" in str(w.message)]
    assert messages == [
        "class labels [2, 3] were never trained into this model (it has learned classes [0, 1]): "
        "their samples come from untrained class embeddings"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded([1, 0], num_inference_steps=2, output_type="pt")
        ClassConditionalPipeline(make_tiny_unet(), DDIMScheduler())([3], num_inference_steps=2, output_type="pt")


def test_classes_are_asked_for_by_name_or_id_and_the_names_are_saved(pipe, tmp_path):
    """id2label (as diffusers' DiTPipeline takes it, synonyms after commas) names the classes: a name samples what
    its id samples, names and ids mix, an unknown name lists the names, and model_index.json keeps them."""
    pipe.set_class_names({0: "T-shirt/top", 1: "Trouser", 2: "Sneaker, trainer", 3: "3"})
    assert pipe.get_label_ids(["trainer", "Sneaker", "Trouser"]) == [2, 2, 1]
    by_name = pipe(["Sneaker", 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    by_id = pipe([2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(by_name.images, by_id.images)
    with pytest.raises(ValueError, match=r"no class named 'Sneakers' in this model: its classes are \['T-shirt/top'"):
        pipe(["Sneakers"], num_inference_steps=2)
    pipe.save_pretrained(tmp_path / "f")
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path / "f")
    assert loaded.config.id2label == {"0": "T-shirt/top", "1": "Trouser", "2": "Sneaker, trainer", "3": "3"}
    assert loaded.get_label_ids("trainer") == [2]
    unnamed = ClassConditionalPipeline(make_tiny_unet(), sampling_scheduler("ddim", DDPMScheduler().config))
    with pytest.raises(ValueError, match="this model names no classes"):
        unnamed.check_class_labels(["Trouser"])
