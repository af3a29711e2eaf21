"""A LoRA adapter per task, made with ``peft``, routed by class label (parameter isolation; CLoG's "LoRA").

Task 1 trains the whole model. From task 2 on the shared weights are frozen and task k trains a fresh LoRA adapter
``task_XX`` (``peft.LoraConfig``: rank r, alpha, dropout, target modules; injected with ``peft``'s own
``inject_adapter_in_model``, its initialisation seeded by the run's seed and k), together with the class-embedding
rows of task k's classes: every other row is put back after each optimizer step, so an old class's embedding never
moves. Task k's classes are then served by the shared model with adapter k active, task 1's by the shared model
alone: a class's samples never change after its task. Memory: one model plus, per task after the first, the
adapter's 2 r (d_in + d_out) numbers per adapted layer (times the kernel area for a convolution's A).

A task folder keeps the shared model as its pipeline's own denoiser, each adapter in ``routes/task_XX/`` in peft's
own format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``),
and the routing table class -> route in ``model_index.json``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..distill import frozen_teacher
from ..pipeline import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OWN_ROUTE,
    PEFT_PREFIX,
    ROUTES_FOLDER,
    AdapterRoute,
    RoutedDenoiser,
    inject_lora_adapters,
    read_lora_adapter,
)
from .base import (
    ContinualMethod,
    Expected,
    SafetensorsFile,
    TaskEnd,
    TaskStart,
    refused,
    task_folder_name,
)


# the UNet's resnet convolutions, time projections and attention, and the DiT's attention, feed-forward and adaLN
DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,time_emb_proj,ff.net.0.proj,ff.net.2,norm1.linear"
CLASS_TABLES = re.compile(r"(^|\.)(class_embedding|class_embedder\.embedding_table)$")
CURRENT = "current"  # the route of the task in training (or just trained, before end_task)


def class_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The model's class-embedding tables: a UNet's ``class_embedding``, each DiT block's label table."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and CLASS_TABLES.search(n)}


def without_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every peft layer replaced by the layer it wraps (the shared weights alone)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    plain = copy.deepcopy(model)
    recurse_remove_peft_layers(plain)
    vars(plain).pop("peft_config", None)
    return plain


class LoRA(ContinualMethod):
    """A LoRA adapter per task after the first, of rank ``rank`` (scale ``alpha / rank``; alpha None: = rank),
    ``dropout`` on its input, on the modules whose names end with one of ``target_modules``."""

    name = "lora"
    isolates_parameters = True

    def __init__(
        self, rank: int = 8, alpha: float | None = None, dropout: float = 0.0, target_modules: str = DEFAULT_TARGETS
    ) -> None:
        from peft import LoraConfig

        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
        if rank < 1 or not 0 <= dropout < 1 or not targets:
            raise ValueError(f"LoRA needs rank >= 1, dropout in [0, 1) and a target, got {rank}, {dropout}, {targets}")
        self.config = LoraConfig(
            r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=targets
        )
        self.adapters: dict[str, tuple] = {}  # task_XX -> (LoraConfig, weights on the CPU) of the finished tasks
        self.class_routes: dict[int, str] = {}  # class -> task_XX (task_01: the shared model alone)
        self.classes: list[int] = []
        self.task_index = 0
        self._kept_rows: dict[
            str, tuple[nn.Embedding, torch.Tensor, torch.Tensor]
        ] = {}  # name -> (table, rows, values)

    def label(self) -> str:
        return f"LoRA per task (rank {self.config.r}, alpha {self.config.lora_alpha:g})"

    def settings(self) -> dict:
        return {
            "lora_rank": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": self.config.lora_dropout,
            "lora_target_modules": ",".join(sorted(self.config.target_modules)),
        }

    # ------------------------------------------------------------------------------------------------ training

    def start_task(self, task: TaskStart) -> None:
        """Task 1: nothing (the whole model trains). Task k >= 2: inject a fresh adapter (seeded), freeze the rest
        but the class tables, and remember the rows of the other classes to put them back after each step."""
        self.classes, self.task_index, self._kept_rows = list(task.classes), task.task_index, {}
        if task.task_index == 1:
            return
        from peft.functional import inject_adapter_in_model

        model, name = task.model, task_folder_name(task.task_index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(task.seed * 1000 + task.task_index)
            inject_adapter_in_model(self.config, model, adapter_name=name)
        for n, p in model.named_parameters():
            p.requires_grad_(f".{name}." in n)
        for n, table in class_tables(model).items():  # found once here, not on every optimizer step
            table.weight.requires_grad_(True)
            others = [c for c in range(table.num_embeddings) if c not in self.classes]
            rows = torch.tensor(others, device=table.weight.device)
            self._kept_rows[n] = (table, rows, table.weight.detach()[rows].clone())

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        with torch.no_grad():
            for table, rows, values in self._kept_rows.values():
                table.weight[rows] = values.to(table.weight.dtype)

    def end_task(self, task: TaskEnd) -> dict:
        """Keep adapter k's weights and take its layers out of the model, which goes on as the shared weights."""
        name = task_folder_name(task.task_index)
        if task.task_index > 1:
            from diffusers.utils.peft_utils import recurse_remove_peft_layers
            from peft.functional import get_peft_model_state_dict

            weights = get_peft_model_state_dict(task.model, adapter_name=name)
            self.adapters[name] = (
                copy.deepcopy(self.config),
                {k: v.detach().float().cpu() for k, v in weights.items()},
            )
            recurse_remove_peft_layers(task.model)
            vars(task.model).pop("peft_config", None)  # peft's record of the injected adapter goes with its layers
            task.model.requires_grad_(True)
        self.class_routes.update({int(c): name for c in task.classes})
        self._kept_rows = {}
        n = sum(v.numel() for v in self.adapters.get(name, (None, {}))[1].values())
        return {"lora_parameters": n}

    # ----------------------------------------------------------------------------------------------- serving

    def serve(self, model: nn.Module) -> nn.Module:
        """Task 1's classes: the shared weights alone; task j's: with adapter j (the current task's from ``model``)."""
        if self.task_index <= 1 and not self.adapters:
            return model
        adapters = dict(self.adapters)
        current = task_folder_name(self.task_index)
        if self.task_index > 1 and current not in adapters:
            from peft.functional import get_peft_model_state_dict

            adapters[current] = (self.config, get_peft_model_state_dict(model, adapter_name=current))
        plain = without_adapters(model)
        shared = frozen_teacher(inject_lora_adapters(copy.deepcopy(plain), adapters))
        first = task_folder_name(1)
        routes = {**self.class_routes, **{c: current for c in self.classes}}
        models = {first: frozen_teacher(plain), **{n: AdapterRoute(shared, n) for n in adapters}}
        return RoutedDenoiser(models, routes, default=first)

    def routes(self, task_index: int) -> dict[int, str]:
        first = task_folder_name(1)
        return {c: OWN_ROUTE if r == first else r for c, r in sorted(self.class_routes.items())}

    # ------------------------------------------------------------------------------------------- task folders

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        files: dict = {}
        for name, (config, weights) in self.adapters.items():
            folder = f"{ROUTES_FOLDER}/{name}"
            files[f"{folder}/{ADAPTER_CONFIG}"] = json.loads(json.dumps(config.to_dict(), default=_json_value))
            files[f"{folder}/{ADAPTER_WEIGHTS}"] = SafetensorsFile(
                {PEFT_PREFIX + k: v.contiguous() for k, v in weights.items()}, {"format": "pt"}
            )
        return files

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        folder, k = Path(folder), expected.finished
        index = folder / "model_index.json"
        try:
            routes = {int(c): r for c, r in (json.loads(index.read_text()).get("routes") or {}).items()}
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"{index} holds no routing table ({err}); copy the whole folder again") from None
        names = [task_folder_name(j) for j in range(2, k + 1)]
        if sorted(routes) != expected.seen_classes or set(routes.values()) - {*names, OWN_ROUTE}:
            message = f"its routes {routes} do not send each class learned so far ({expected.seen_classes}) to one of"
            raise refused(folder, "model_index.json", ValueError(f"{message} {names} or {OWN_ROUTE!r}"))
        adapters = {}
        for name in names:
            path = folder / ROUTES_FOLDER / name
            try:
                config, weights = read_lora_adapter(path)
                check_adapter(config, weights, expected.shapes)
            except (OSError, ValueError, TypeError) as err:
                raise refused(folder, f"{ROUTES_FOLDER}/{name}", ValueError(str(err))) from None
            adapters[name] = (config, {n: w.float() for n, w in weights.items()})
        self.adapters = adapters
        first = task_folder_name(1)
        self.class_routes = {c: first if r == OWN_ROUTE else r for c, r in routes.items()}
        self.task_index, self.classes = k, []


def check_adapter(config, weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuses (``ValueError``) adapter weights that are not a LoRA pair of rank ``config.r`` on the model's layers
    (``<layer>.lora_A.weight`` ``[r, d_in, ...]`` and ``<layer>.lora_B.weight`` ``[d_out, r, 1, ...]`` for each
    ``<layer>.weight`` of ``shapes``), or that hold non-finite values."""
    if getattr(config, "peft_type", None) is None or str(config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise ValueError(f"it is a {getattr(config, 'peft_type', None)} adapter, not LoRA")
    if not weights:
        raise ValueError("it holds no weights")
    r = int(config.r)
    for key, value in weights.items():
        layer, _, part = key.rpartition(".lora_")
        base = shapes.get(f"{layer}.weight")
        if part not in ("A.weight", "B.weight") or base is None:
            raise ValueError(f"{key} is not a LoRA weight of one of this model's layers")
        want = (r, *base[1:]) if part == "A.weight" else (base[0], r, *([1] * (len(base) - 2)))
        if tuple(value.shape) != want:
            raise ValueError(f"{key} has shape {list(value.shape)}, rank {r} on this layer needs {list(want)}")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} is not a finite floating-point tensor")


def _json_value(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)
