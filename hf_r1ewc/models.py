"""Model configurations and training defaults by preset, and the models the method trains.

``paper``: the continual-learning UNet of the paper (block_out_channels 128/256/256/256, 2 layers per block,
attention in one down and one up block; 35.75M parameters at 32x32 for 1 channel and 10 classes) with its
hyperparameters (Adam 2e-4, batch 128, 200 epochs per task, lambda 15000 in the loss, 5000 replay images per
class). ``cpu-small`` (1.11M parameters) and ``demo`` (0.70M, for 8x8 digits) are scaled down to run on a laptop CPU,
with the penalty as a decoupled proximal step (the CPU table-1 measurements: lambda 15000 in the loss freezes
learning far from convergence). ``dit-small`` and ``dit-paper-scale`` are class-conditional pixel-space DiTs
(diffusers ``DiTTransformer2DModel``, patch size 2): one sized for CPU tests, one with about the paper UNet's
parameter count at 32x32 (DiT-S: 12 layers, width 384), trained with the same protocol as their UNet counterparts.

Any diffusers model that is called as ``model(x_t, t, class_labels=y).sample`` works with the library; the training
script builds the two kinds named in ``MODEL_CLASSES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, ModelMixin, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from .data import parse_tasks
from .methods import Growth
from .pipeline import num_classes_of


if TYPE_CHECKING:
    from .data import TaskData


# the denoisers the training script builds, by config ``_class_name``, and the pipeline folder each is saved in
MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
MODEL_SUBFOLDERS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}


@dataclass(frozen=True)
class Preset:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_block: int  # index of the down block (and mirrored up block) with self-attention
    defaults: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DiTPreset:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int
    defaults: dict = field(default_factory=dict)


PAPER_SAMPLING = dict(num_inference_steps=50, use_ema=False, ema_decay=0.999)
PRESETS = {
    "paper": Preset(
        (128, 256, 256, 256),
        2,
        1,
        dict(
            learning_rate=2e-4,
            train_batch_size=128,
            num_epochs_per_task=200,
            replay_per_class=5000,
            fisher_num_samples=None,
            fid_num_samples=None,
            ewc_mode="loss",
            **PAPER_SAMPLING,
        ),
    ),
    "cpu-small": Preset(
        (32, 64, 64),
        1,
        2,
        dict(
            learning_rate=1e-3,
            train_batch_size=64,
            num_epochs_per_task=10,
            replay_per_class=200,
            fisher_num_samples=1024,
            fid_num_samples=500,
            ewc_mode="decoupled",
            **PAPER_SAMPLING,
        ),
    ),
    # chosen from measured runs (README "The demo"): decoupled, because at small budgets lambda = 15000 in the loss
    # freezes learning; DDIM-10, whose samples of this under-trained model the classifier recognises more often than
    # DDIM-50's; an EMA with a short window; 32 replay images per step to fit the 3-minute budget
    "demo": Preset(
        (32, 64),
        1,
        1,
        dict(
            learning_rate=2e-3,
            train_batch_size=64,
            num_epochs_per_task=40,
            replay_per_class=150,
            fisher_num_samples=None,
            fid_num_samples=200,
            ewc_mode="decoupled",
            num_inference_steps=10,
            use_ema=True,
            ema_decay=0.95,
            replay_batch_size=32,
        ),
    ),
}
PRESETS |= {
    "dit-small": DiTPreset(4, 4, 16, 2, PRESETS["cpu-small"].defaults),
    "dit-paper-scale": DiTPreset(12, 6, 64, 2, PRESETS["paper"].defaults),
}


def model_from_preset(preset: str, resolution: int, channels: int, num_classes: int) -> ModelMixin:
    """A fresh label-conditioned ``UNet2DModel`` or ``DiTTransformer2DModel`` of the preset's shape."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    if isinstance(spec, DiTPreset):
        if resolution % spec.patch_size:
            raise ValueError(
                f"--resolution {resolution} is not divisible by the {preset!r} DiT's patch size {spec.patch_size}"
            )
        return DiTTransformer2DModel(
            num_attention_heads=spec.num_attention_heads,
            attention_head_dim=spec.attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=spec.num_layers,
            sample_size=resolution,
            patch_size=spec.patch_size,
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
        )
    return unet_from_preset(preset, resolution, channels, num_classes)


def model_from_config(config_name_or_path: str) -> ModelMixin:
    """A fresh model from a ``UNet2DModel`` or ``DiTTransformer2DModel`` config (json file or folder)."""
    config = UNet2DModel.load_config(config_name_or_path)
    name = config.get("_class_name", "UNet2DModel")
    if name not in MODEL_CLASSES:
        raise ValueError(f"{config_name_or_path} is a {name} config; this script trains {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name].from_config(config)


def unet_from_preset(preset: str, resolution: int, channels: int, num_classes: int) -> UNet2DModel:
    """A fresh label-conditioned ``UNet2DModel`` of a UNet preset's shape."""
    spec = PRESETS[preset]
    if not isinstance(spec, Preset):
        raise ValueError(f"{preset!r} is not a UNet preset; use model_from_preset")
    levels = len(spec.block_out_channels)
    if resolution % 2 ** (levels - 1):
        raise ValueError(
            f"--resolution {resolution} is not divisible by {2 ** (levels - 1)}, which the "
            f"{preset!r} UNet's {levels} levels need; pad or resize to a multiple."
        )
    down = ["DownBlock2D"] * levels
    down[spec.attention_block] = "AttnDownBlock2D"
    up = list(reversed(["AttnUpBlock2D" if t.startswith("Attn") else "UpBlock2D" for t in down]))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(32, spec.block_out_channels[0] // 4),
        num_class_embeds=num_classes,
    )


def training_noise_scheduler() -> DDPMScheduler:
    """The paper's DDPM schedule: 1000 steps, linear betas 1e-4 .. 0.02."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def build_model(
    data: TaskData, preset: str, config_path: str | None = None, gradient_checkpointing: bool = False
) -> ModelMixin:
    """The denoiser: the ``preset``'s UNet or DiT, or a ``UNet2DModel`` / ``DiTTransformer2DModel`` config (a file or
    folder), checked against the data and its tasks (``SystemExit`` naming the mismatch)."""
    try:
        if config_path:
            model = model_from_config(config_path)
        else:
            model = model_from_preset(preset, data.resolution, data.num_channels, data.num_classes)
        if num_classes_of(model) is None:
            raise ValueError(
                f"the model config has no class embedding (num_class_embeds: null); this method "
                f"trains a label-conditioned model: set num_class_embeds (a DiT: num_embeds_ada_norm) "
                f"to at least {data.num_classes}"
            )
        parse_tasks(None, 1, sorted({c for t in data.tasks for c in t}), num_classes_of(model))  # in the embedding
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if model.config.sample_size != data.resolution:
        raise SystemExit(
            f"error: the model's sample_size {model.config.sample_size} differs from --resolution {data.resolution}"
        )
    if model.config.in_channels != data.num_channels:
        raise SystemExit(
            f"error: the model takes {model.config.in_channels} channels but the images have {data.num_channels}"
        )
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def label_tables(model: ModelMixin) -> dict[str, torch.nn.Embedding]:
    """The class-label embedding tables of ``model`` by parameter name (without ``.weight``): a UNet2DModel's
    ``class_embedding``, a DiT's ``embedding_table`` in every block (``num_classes`` rows, plus a null row last when
    the model was built with label dropout). Empty for a model without a learned class table."""
    if isinstance(model, UNet2DModel):
        table = model.class_embedding
        return {"class_embedding": table} if isinstance(table, torch.nn.Embedding) else {}
    return {
        f"{n}.embedding_table": m.embedding_table for n, m in model.named_modules() if isinstance(m, LabelEmbedding)
    }


def grow_class_embedding(model: ModelMixin, num_classes: int, learned: list[int]) -> tuple[Growth, ...]:
    """Give ``model`` (in place) a label space of ``num_classes`` ids: every label table gains rows for the new ids,
    inserted before a DiT's null row, so that every old id keeps its row bit for bit; the config follows
    (``num_class_embeds`` / ``num_embeds_ada_norm``). The new rows start as the mean of the ``learned`` classes'
    rows (an average learned class; no random draw). Returns what grew, for the methods' state (``Expected``)."""
    old = num_classes_of(model)
    tables = label_tables(model)
    if old is None or not tables:
        raise ValueError(f"{type(model).__name__} has no class-label table to grow (num_class_embeds: {old})")
    if num_classes <= old:
        return ()
    grown = []
    for name, table in tables.items():
        rows = table.weight.data
        start = rows[learned].mean(0, keepdim=True) if learned else rows.new_zeros((1, rows.shape[1]))
        new = torch.cat([rows[:old], start.expand(num_classes - old, -1), rows[old:]])  # rows[old:]: the null row
        table.weight = torch.nn.Parameter(new, requires_grad=table.weight.requires_grad)
        table.num_embeddings = new.shape[0]
        grown.append(Growth(f"{name}.weight", rows.shape[0], new.shape[0], old))
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.num_classes = num_classes
    key = "num_class_embeds" if isinstance(model, UNet2DModel) else "num_embeds_ada_norm"
    model.register_to_config(**{key: num_classes})
    return tuple(grown)
