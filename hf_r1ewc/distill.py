"""Generative distillation's pieces (paper section 3.4): a frozen teacher, its replay pool, the distillation loss.

After task k a frozen copy of the model (the teacher) generates a replay pool for every class seen so far through
``hf_r1ewc.pipeline.sample`` (the paper: DDIM, 50 steps, eta 0; any diffusers scheduler), or (Masip et al.) a fresh
few-step batch every step (``online_replay_batch``). The method that composes them into a training step is
``hf_r1ewc.methods.generative_distillation``: each step's replay batch is noised ONCE at uniform t with the real
batch, joins the denoising loss, and the distillation term ``mean_pixels (eps_student(x~_t) - eps_teacher(x~_t))^2``
reads the same forward.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import SchedulerMixin
from torch import nn

from .pipeline import default_autocast_dtype, sample, sampler_name
from .progress import progress_bar


POOL_CHUNK = 250  # images per pool chunk: the unit of generation, of resume and of multi-process sharing


def frozen_teacher(unet: nn.Module) -> nn.Module:
    """A frozen copy of ``unet`` (eval mode, no gradients) to generate replay, to distil from and to evaluate.
    channels_last on the CPU only: it sampled 1.09x faster there and 1.22x slower on an H200 (bench_sampling,
    gpu_check)."""
    teacher = copy.deepcopy(unet).eval()
    if next(teacher.parameters()).device.type == "cpu":
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.requires_grad_(False)
    return teacher


def _class_list(classes: Sequence[int], num_class_embeds: int | None) -> list[int]:
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("the replay pool needs at least one class; pass the classes of the tasks seen so far.")
    if num_class_embeds is not None:
        bad = [c for c in classes if not 0 <= c < num_class_embeds]
        if bad:
            raise ValueError(f"replay classes {bad} are outside the teacher's classes 0..{num_class_embeds - 1}.")
    return classes


@dataclass
class ReplayPool:
    """Teacher-generated replay images: ``images`` float16 ``[M, C, H, W]`` in [-1, 1], ``labels`` int64 ``[M]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def classes(self) -> list[int]:
        """The sorted classes the pool holds."""
        return sorted(int(c) for c in torch.unique(self.labels))

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly drawn replay batch: (float32 images ``[B, C, H, W]``, labels ``[B]``) on ``device``; the
        indices are drawn on the generator's device and gathered where the pool lives (see ``to``)."""
        draw_on = generator.device if generator is not None else self.images.device
        index = torch.randint(0, len(self), (batch_size,), generator=generator, device=draw_on)
        index = index.to(self.images.device)
        return self.images[index].to(device, torch.float32), self.labels[index].to(device)

    def to(self, device: torch.device | str) -> ReplayPool:
        """The pool on ``device`` (float16: 2 bytes per pixel, e.g. 7.6 GB for ImageNet-32's 1.235M images), so a
        batch is gathered there with no copy from the host."""
        return ReplayPool(self.images.to(device), self.labels.to(device))

    @classmethod
    def generate(
        cls,
        teacher: nn.Module,
        scheduler: SchedulerMixin,
        classes: Sequence[int],
        per_class: int,
        directory: str | os.PathLike,
        num_inference_steps: int = 50,
        seed: int = 0,
        batch_size: int = POOL_CHUNK,
        autocast_dtype: torch.dtype | None | str = "auto",
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        show_progress: bool = True,
    ) -> "ReplayPool":
        """Generate (or finish generating) ``per_class`` images of every class into ``directory`` and load them.

        The pool is cut into chunks of ``POOL_CHUNK`` images, each with its own seed, written atomically as
        safetensors: a resumed run generates only the missing chunks, the result depends on ``seed`` alone (not on
        the number of processes on the same hardware), and process ``rank`` of ``world_size`` generates chunks rank,
        rank + world_size, ... then waits at ``barrier`` so that every process loads the whole pool.
        ``autocast_dtype="auto"`` samples under bf16 autocast where the hardware runs bf16 fast
        (``default_autocast_dtype``); pass None for fp32.
        """
        from safetensors.torch import save_file

        classes = _class_list(classes, getattr(teacher.config, "num_class_embeds", None))
        if autocast_dtype == "auto":
            autocast_dtype = default_autocast_dtype(next(teacher.parameters()).device)
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {
            "classes": classes,
            "per_class": per_class,
            "num_inference_steps": num_inference_steps,
            "seed": seed,
            "chunk": POOL_CHUNK,
            "sampler": sampler_name(scheduler),
            "eta": 0.0,
        }
        spec_path = directory / "pool.json"
        if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
            raise ValueError(
                f"{directory} holds a replay pool made with other settings "
                f"({spec_path.read_text().strip()}); delete it or choose another folder."
            )
        if rank == 0:
            _atomic_write_text(spec_path, json.dumps(spec))
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
        num_chunks = -(-len(labels) // POOL_CHUNK)
        mine = [
            c for c in range(rank, num_chunks, world_size) if not (directory / f"chunk-{c:05d}.safetensors").exists()
        ]
        bar = progress_bar(
            mine,
            show=show_progress,
            unit="chunk",
            desc=f"replay pool ({len(classes)} classes x {per_class} images, chunks of {POOL_CHUNK})",
        )
        for chunk in bar:
            chunk_labels = labels[chunk * POOL_CHUNK : (chunk + 1) * POOL_CHUNK]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            parts = [
                sample(
                    teacher,
                    scheduler,
                    chunk_labels[i : i + batch_size],
                    num_inference_steps,
                    generator,
                    autocast_dtype,
                )
                for i in range(0, len(chunk_labels), batch_size)
            ]
            path = directory / f"chunk-{chunk:05d}.safetensors"
            save_file(
                {"images": torch.cat(parts).half().cpu().contiguous(), "labels": chunk_labels.contiguous()},
                f"{path}.{os.getpid()}.tmp",
            )
            os.replace(f"{path}.{os.getpid()}.tmp", path)
        if barrier is not None:
            barrier()
        return cls.load(directory)

    @classmethod
    def concat(cls, pools: Sequence["ReplayPool"]) -> "ReplayPool":
        """One pool holding the images of ``pools``, in order."""
        return cls(torch.cat([p.images for p in pools]), torch.cat([p.labels for p in pools]))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ReplayPool":
        """Load a complete pool written by ``generate`` (safetensors chunks + ``pool.json``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        spec = json.loads((directory / "pool.json").read_text())
        total = len(spec["classes"]) * spec["per_class"]
        num_chunks = -(-total // spec["chunk"])
        paths = [directory / f"chunk-{c:05d}.safetensors" for c in range(num_chunks)]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"replay pool in {directory} is incomplete: missing {missing[:3]}; run generate again.")
        chunks = [load_file(str(p)) for p in paths]
        return cls(torch.cat([c["images"] for c in chunks]), torch.cat([c["labels"] for c in chunks]))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def online_replay_batch(
    teacher: nn.Module,
    scheduler: SchedulerMixin,
    classes: Sequence[int],
    batch_size: int,
    num_inference_steps: int = 2,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh replay batch from the teacher (Masip et al.): uniform labels over ``classes``, few-step sampling with
    ``scheduler`` (a sampling scheduler, e.g. DDIM)."""
    classes = torch.tensor(_class_list(classes, getattr(teacher.config, "num_class_embeds", None)))
    labels = classes[torch.randint(0, len(classes), (batch_size,), generator=generator)]
    images = sample(teacher, scheduler, labels, num_inference_steps, generator, autocast_dtype)
    return images.clone(), labels.to(images.device)


def distillation_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """mean over samples and pixels of (eps_student - eps_teacher)^2, in float32."""
    return (student_eps.float() - teacher_eps.float()).pow(2).mean()
