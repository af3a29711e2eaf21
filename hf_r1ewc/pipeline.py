"""A class-conditional DDIM pipeline for label-conditioned ``UNet2DModel``s.

diffusers' own DDPM/DDIM pipelines cannot pass class labels. This module imports only torch and diffusers, so
``save_pretrained`` copies it into the folder as ``pipeline.py`` and the folder loads anywhere with::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDIMPipeline(DiffusionPipeline):
    """``pipe(class_labels=[0, 0, 3])`` -> one image per label, sampled with DDIM (default 50 steps, eta 0)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        scheduler = DDIMScheduler.from_config(scheduler.config)  # any DDPM-family scheduler config works
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_class_labels(self, class_labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 labels, validated against the UNet's class embedding."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: pass at least one class label, e.g. class_labels=[0, 1].")
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            raise ValueError("this UNet has no class embedding (num_class_embeds is None); it cannot take labels.")
        bad = sorted({int(c) for c in labels if not 0 <= int(c) < num_classes})
        if bad:
            raise ValueError(f"class labels {bad} are outside this UNet's classes 0..{num_classes - 1}.")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per entry of ``class_labels``.

        ``output_type``: ``"pil"`` (list of PIL images), ``"np"`` (float ``[N, H, W, C]`` in [0, 1]) or ``"pt"``
        (float ``[N, C, H, W]`` in [0, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        labels = self.check_class_labels(class_labels).to(self._execution_device)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (labels.shape[0], self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, eta=eta, generator=generator).prev_sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
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

