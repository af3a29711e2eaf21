"""The class-conditional pipeline and the one sampler every part of hf_r1ewc samples through.

diffusers' own DDPM/DDIM pipelines cannot pass class labels. ``ClassConditionalPipeline`` can, with any diffusers
scheduler (DDIM by default)::

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

``sample`` is its denoising loop; the replay pool, online replay, FID samples and ``samples.png`` call the same
function, so the FID in ``metrics.json`` is the FID of the pipeline that ``save_pretrained`` writes. This module
imports only torch and diffusers, so ``save_pretrained`` copies it into the folder as ``pipeline.py`` and the folder
loads anywhere with::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


# --replay_scheduler names -> (scheduler class, config overrides). All are built from the training DDPM config.
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


def sampling_scheduler(name: str, config: dict) -> SchedulerMixin:
    """The scheduler named ``name`` (a key of ``SAMPLERS``) on the noise schedule of ``config`` (a scheduler config)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(config, **overrides)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The ``SAMPLERS`` key of a scheduler (its class name when it is none of them)."""
    for name, (cls, _) in SAMPLERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def default_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else None (fp32).
    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which measured 1.7x SLOWER than fp32 here."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        native = [
            getattr(torch.cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        ]
        return torch.bfloat16 if any(native) else None
    return None


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16': how the UNet ran while sampling (the scheduler update is always fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]


@torch.inference_mode()
def sample(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    class_labels: torch.Tensor,
    num_inference_steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    autocast_dtype: torch.dtype | None = None,
    eta: float = 0.0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Samples for ``class_labels`` through ``scheduler.step``: the one sampler of the package (replay pools, FID
    samples, grids and ``ClassConditionalPipeline``).

    Args:
        unet: the denoiser, called as ``unet(x_t, t, class_labels=y).sample``.
        scheduler: any diffusers sampling scheduler (DDIM, DPM-Solver++, UniPC, ...).
        class_labels: ``[N]`` int64.
        num_inference_steps: sampler steps; eta: passed to schedulers whose ``step`` takes it (DDIM).
        generator: draws the initial noise on its own device (CPU generators give the same images everywhere).
        autocast_dtype: the UNet's autocast dtype (None: its own dtype); the scheduler update stays float32.
        progress: wraps the timestep loop (e.g. a progress bar).

    Returns:
        ``[N, C, H, W]`` float32 in [-1, 1]; the latents follow the UNet's memory format (channels_last for
        ``frozen_teacher`` copies).
    """
    params = next(unet.parameters())
    device = params.device
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (class_labels.shape[0], unet.config.in_channels, *size)
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    conv = next((p for p in unet.parameters() if p.ndim == 4), None)
    if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    labels = class_labels.to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = x * scheduler.init_noise_sigma
    extra = {}
    step_parameters = set(inspect.signature(scheduler.step).parameters)
    if "eta" in step_parameters:
        extra["eta"] = eta
    if "generator" in step_parameters:
        extra["generator"] = generator
    timesteps = scheduler.timesteps
    for t in progress(timesteps) if progress is not None else timesteps:
        model_input = scheduler.scale_model_input(x, t)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            eps = unet(
                model_input.to(params.dtype) if autocast_dtype is None else model_input,
                t.expand(x.shape[0]),
                class_labels=labels,
            ).sample  # [N] timesteps: DiTs take no scalar
        x = scheduler.step(eps.float(), t, x, **extra).prev_sample
    return x.clamp(-1, 1).float()


def num_classes_of(model: torch.nn.Module) -> int | None:
    """The size of the model's class embedding (``num_class_embeds``, or a DiT's ``num_embeds_ada_norm``)."""
    return getattr(model.config, "num_class_embeds", None) or getattr(model.config, "num_embeds_ada_norm", None)


OWN_ROUTE = "denoiser"  # the route a pipeline's own unet/transformer serves
ROUTES_FOLDER = "routes"  # a task folder's other routes: routes/<name>/ (a diffusers model folder each)
ROUTED_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")  # the model classes a route folder may hold


@dataclass
class RoutedOutput(BaseOutput):
    """A routed forward's prediction ``sample`` ``[N, C, H, W]``, rows in the order of the batch."""

    sample: torch.Tensor


class RoutedDenoiser(torch.nn.Module):
    """Serves each class label with the denoiser of its route (parameter isolation: a model per task).

    ``models``: route name -> denoiser (one architecture); ``routes``: class -> route name. A batch of mixed labels
    is split by route, each group goes through its own model (one forward per route in the batch) and the rows are
    put back in the batch's order; a label without a route goes to ``default`` (None: refused). ``config``: the
    default model's (the newest: after new classes, the one with the whole label table), else the first's."""

    def __init__(self, models: dict[str, torch.nn.Module], routes: dict[int, str], default: str | None = None) -> None:
        super().__init__()
        missing = sorted((set(routes.values()) | ({default} if default else set())) - set(models))
        if missing:
            raise ValueError(f"routes name models {missing} that are not given (have {sorted(models)})")
        self.models = torch.nn.ModuleDict(models)
        self.routes, self.default = {int(c): r for c, r in routes.items()}, default

    @property
    def config(self):
        return (self.models[self.default] if self.default else next(iter(self.models.values()))).config

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor, return_dict: bool = True
    ) -> RoutedOutput | tuple:
        labels = class_labels.flatten()
        names = [self.routes.get(c, self.default) for c in labels.tolist()]
        if None in names:
            unrouted = sorted({c for c, n in zip(labels.tolist(), names) if n is None})
            raise ValueError(f"class labels {unrouted} have no route (routed classes: {sorted(self.routes)})")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.dim() == 0 else t
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=sample.device)
            pred = self.models[name](sample[rows], t[rows], class_labels=labels[rows]).sample
            out = pred.new_empty((sample.shape[0], *pred.shape[1:])) if out is None else out
            out[rows] = pred
        return RoutedOutput(sample=out) if return_dict else (out,)


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's own files
PEFT_PREFIX = "base_model.model."  # how a PeftModel's saved adapter names the wrapped model's modules


class AdapterRoute(torch.nn.Module):
    """One route of a model shared by several LoRA adapters (injected with ``peft``): its forward makes ``adapter``
    the active one and runs the shared model."""

    def __init__(self, shared: torch.nn.Module, adapter: str) -> None:
        super().__init__()
        self.shared, self.adapter = shared, adapter

    @property
    def config(self):
        return self.shared.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict=True):
        from peft.functional import set_adapter

        set_adapter(self.shared, self.adapter, inference_mode=True)
        return self.shared(sample, timestep, class_labels=class_labels, return_dict=return_dict)


def inject_lora_adapters(model: torch.nn.Module, adapters: dict[str, tuple]) -> torch.nn.Module:
    """``model`` (in place) with each adapter of ``adapters`` (name -> (``peft.LoraConfig``, its weights keyed as
    ``get_peft_model_state_dict`` gives them)) injected by ``peft`` and loaded exactly; refuses weights that do not
    fit the injected layers. The global random stream is left as it was (injection draws an initialisation)."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

    for name, (config, state) in adapters.items():
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # several adapters are the point
            inject_adapter_in_model(config, model, adapter_name=name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {name}'s weights do not fit its configuration (unexpected {result.unexpected_keys[:3]}, "
                f"missing {missing[:3]})"
            )
    return model


def read_lora_adapter(folder: str | os.PathLike) -> tuple:
    """(``peft.LoraConfig``, weights) of an adapter folder in peft's own format (``adapter_config.json`` +
    ``adapter_model.safetensors``: JSON and safetensors, nothing pickled)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    config = LoraConfig.from_pretrained(str(folder))
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def load_route_model(folder: str | os.PathLike) -> torch.nn.Module:
    """The diffusers model of a route folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), only of
    ``ROUTED_CLASSES`` (a folder cannot name another class to import)."""
    import diffusers

    folder = Path(folder)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name not in ROUTED_CLASSES:
        raise ValueError(f"{folder}/config.json names the model class {name!r}; a route holds one of {ROUTED_CLASSES}")
    return getattr(diffusers, name).from_pretrained(folder)


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[0, 0, 3])`` or ``pipe(class_labels=["Sneaker", 3])`` -> one image per label (default: DDIM,
    50 steps, eta 0; any scheduler). ``id2label`` (class id -> name, as diffusers' ``DiTPipeline`` takes it; a name
    may list synonyms separated by commas) lets labels be given by name: ``pipe.labels`` maps each name to its id.

    The denoiser is a ``unet`` (``UNet2DModel``) or a ``transformer`` (``DiTTransformer2DModel``, saved in
    ``transformer/`` as diffusers' DiT pipeline names it): any model called as ``model(x_t, t, class_labels=y)``.
    ``routes`` (class -> route name; a task folder of a parameter-isolation method): each class is served by its
    route's model, ``OWN_ROUTE`` by the pipeline's own denoiser and the others from ``ROUTES_FOLDER/<name>/`` of the
    folder it was loaded from (``RoutedDenoiser``): a diffusers model folder (an ensemble's) or a LoRA adapter in
    peft's format, injected into a copy of the own denoiser (needs ``peft``).
    """

    model_cpu_offload_seq = "unet->transformer"
    _optional_components = ["unet", "transformer"]

    def __init__(
        self,
        unet: torch.nn.Module | None,
        scheduler: SchedulerMixin,
        transformer: torch.nn.Module | None = None,
        learned_classes: list[int] | None = None,
        routes: dict[str, str] | None = None,
        id2label: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError(
                "pass exactly one denoiser: a UNet2DModel as unet, or a DiTTransformer2DModel as "
                "transformer (with unet=None); ClassConditionalPipeline.for_model picks the slot"
            )
        self.register_modules(unet=unet, scheduler=scheduler, transformer=transformer)
        # the classes trained so far (a task folder records them in model_index.json); None: not recorded
        self.register_to_config(learned_classes=None if learned_classes is None else sorted(learned_classes))
        self.register_to_config(routes=None if routes is None else {str(c): r for c, r in routes.items()})
        self.set_class_names(id2label)
        self._route_models: dict[str, torch.nn.Module] | None = None

    def set_class_names(self, id2label: dict[int, str] | None) -> None:
        """Name the classes: ``id2label`` (class id -> name), recorded in ``model_index.json``."""
        self.register_to_config(
            id2label=None
            if id2label is None
            else {str(c): n for c, n in sorted(id2label.items(), key=lambda x: int(x[0]))}
        )

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id, every synonym of ``id2label`` a name of its own (empty when the classes have no names)."""
        return {
            name.strip(): int(c)
            for c, names in (self.config.get("id2label") or {}).items()
            for name in names.split(",")
        }

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """The ids of class names (as ``DiTPipeline.get_label_ids``); an unknown name raises, listing the names."""
        names, labels = [label] if isinstance(label, str) else list(label), self.labels
        unknown = [n for n in names if n not in labels]
        if unknown:
            known = f"its classes are {sorted(labels, key=labels.get)}" if labels else "this model names no classes"
            raise ValueError(f"no class named {unknown[0]!r} in this model: {known}; pass a name or an id")
        return [labels[n] for n in names]

    def set_routes(self, routes: dict[int, str] | None, models: dict[str, torch.nn.Module] | None = None) -> None:
        """Serve class c with ``models[routes[c]]`` (``OWN_ROUTE``: this pipeline's denoiser); ``models`` None: read
        them from the folder the pipeline is loaded from when first needed. Recorded in ``model_index.json``."""
        self.register_to_config(routes=None if routes is None else {str(c): r for c, r in sorted(routes.items())})
        self._route_models = models

    @classmethod
    def for_model(cls, model: torch.nn.Module, scheduler: SchedulerMixin) -> "ClassConditionalPipeline":
        """The pipeline around ``model``, in the ``transformer`` slot for a transformer and ``unet`` otherwise."""
        if "Transformer" in type(model).__name__:
            return cls(None, scheduler, transformer=model)
        return cls(model, scheduler)

    @property
    def own_denoiser(self) -> torch.nn.Module:
        """The ``unet`` or the ``transformer``, whichever this pipeline holds."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model that serves every class: ``own_denoiser``, or a ``RoutedDenoiser`` over the routes."""
        own, routes = self.own_denoiser, self.config.get("routes")
        if not routes:
            return own
        if self._route_models is None:
            folder = Path(self.config.get("_name_or_path") or "")
            names = sorted(set(routes.values()) - {OWN_ROUTE})
            if names and not (folder / ROUTES_FOLDER).is_dir():
                raise ValueError(
                    f"this pipeline routes classes to the models {names} in {ROUTES_FOLDER}/ of its folder, and "
                    f"{folder} has none: load it from the whole task folder (huggingface_hub.snapshot_download)"
                )
            adapters = {
                n: folder / ROUTES_FOLDER / n for n in names if (folder / ROUTES_FOLDER / n / ADAPTER_CONFIG).exists()
            }
            self._route_models = {n: load_route_model(folder / ROUTES_FOLDER / n) for n in names if n not in adapters}
            if adapters:  # one copy of the denoiser holds every adapter; each route activates its own
                shared = inject_lora_adapters(
                    copy.deepcopy(own), {n: read_lora_adapter(f) for n, f in adapters.items()}
                )
                self._route_models |= {n: AdapterRoute(shared, n) for n in adapters}
        param = next(own.parameters())
        for m in self._route_models.values():  # follow the pipeline's .to() (diffusers warns on a no-op dtype cast)
            if (p := next(m.parameters())).device != param.device or p.dtype != param.dtype:
                m.to(param.device, param.dtype)
        models = self._route_models
        return RoutedDenoiser({**models, OWN_ROUTE: own}, {int(c): r for c, r in routes.items()}, OWN_ROUTE)

    def check_class_labels(self, class_labels: Sequence[int | str] | torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 labels from ids or names (``get_label_ids``), validated against the model's class
        embedding."""
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        if not isinstance(class_labels, torch.Tensor):
            class_labels = [self.get_label_ids(c)[0] if isinstance(c, str) else int(c) for c in class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: pass at least one class label, e.g. class_labels=[0, 1].")
        num_classes = num_classes_of(self.denoiser)
        if num_classes is None:
            raise ValueError("this model has no class embedding (num_class_embeds is None); it cannot take labels.")
        bad = sorted({int(c) for c in labels if not 0 <= int(c) < num_classes})
        if bad:
            raise ValueError(f"class labels {bad} are outside this model's classes 0..{num_classes - 1}.")
        learned = self.config.get("learned_classes")
        if learned is not None and (unlearned := sorted({int(c) for c in labels} - set(learned))):
            warnings.warn(
                f"class labels {unlearned} were never trained into this model (it has learned classes {learned}): "
                f"their samples come from untrained class embeddings",
                stacklevel=3,
            )
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str] | torch.Tensor,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per entry of ``class_labels`` (ids, or names of ``id2label``).

        ``output_type``: ``"pil"`` (list of PIL images), ``"np"`` (float ``[N, H, W, C]`` in [0, 1]) or ``"pt"``
        (float ``[N, C, H, W]`` in [0, 1]). ``autocast_dtype=torch.bfloat16`` runs the model under bf16 autocast
        (the task folder's ``metrics.json`` says which precision its FID samples used).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        labels = self.check_class_labels(class_labels)
        image = sample(
            self.denoiser,
            self.scheduler,
            labels,
            num_inference_steps,
            generator,
            autocast_dtype,
            eta,
            progress=self.progress_bar,
        )
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = image
        else:
            output = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=output) if return_dict else (output,)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained`` plus this file as ``pipeline.py`` (for ``custom_pipeline=``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, "pipeline.py"))


def __getattr__(name: str):
    # The old name stays importable. Not a module-level binding: diffusers' custom_pipeline loader refuses a
    # pipeline.py that defines two DiffusionPipeline classes, and an alias would count as a second one.
    if name == "ClassConditionalDDIMPipeline":
        return ClassConditionalPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
