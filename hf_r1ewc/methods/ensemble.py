"""An ensemble of one model per task, routed by class label (parameter isolation; CLoG's "ensemble").

Task k trains its own copy of the whole model, initialised from theta*_{k-1} (the previous task's model; with
``from_scratch`` from a fresh initialisation seeded by the run's seed and k) on task k's data alone. When it ends, a
frozen copy theta*_k serves task k's classes from then on: a class's samples never change after its task, so nothing
is forgotten by construction, at T models' memory after T tasks. The label a user asks for names the task that
learned it, so routing needs no task oracle.

A task folder keeps the task's model as its pipeline's own denoiser, every earlier task's model in
``routes/task_XX/`` (a diffusers model folder each) and the routing table class -> route in ``model_index.json``
(``ClassConditionalPipeline``'s ``routes``); a plain ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=
folder)`` samples every learned class through its own model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..distill import frozen_teacher
from ..pipeline import OWN_ROUTE, ROUTED_CLASSES, ROUTES_FOLDER, RoutedDenoiser
from .base import (
    ContinualMethod,
    Expected,
    SafetensorsFile,
    TaskEnd,
    TaskStart,
    check_tensors,
    load_task_file,
    refused,
    task_folder_name,
)


WEIGHTS = "diffusion_pytorch_model.safetensors"
CURRENT = "current"  # the route of the task in training (or just trained, before end_task)


class Ensemble(ContinualMethod):
    """A frozen model per finished task serves that task's classes; ``from_scratch``: each task's model starts from
    a fresh initialisation instead of the previous task's weights."""

    name = "ensemble"
    isolates_parameters = True

    def __init__(self, from_scratch: bool = False) -> None:
        self.from_scratch = from_scratch
        self.models: dict[str, nn.Module] = {}  # task_XX -> theta*_XX, frozen
        self.class_routes: dict[int, str] = {}  # class -> task_XX of the finished tasks
        self.classes: list[int] = []  # the current task's

    def label(self) -> str:
        return f"ensemble (a model per task{', each from scratch' if self.from_scratch else ''})"

    def settings(self) -> dict:
        return {"ensemble_from_scratch": self.from_scratch}

    def start_task(self, task: TaskStart) -> None:
        self.classes = list(task.classes)
        if self.from_scratch and task.task_index > 1:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(task.seed * 1000 + task.task_index)
                fresh = type(task.model).from_config(task.model.config)
            task.model.load_state_dict(fresh.state_dict())

    def serve(self, model: nn.Module) -> nn.Module:
        if not self.models:
            return model
        param = next(model.parameters())
        finished = {name: m.to(param.device) for name, m in self.models.items()}
        routes = {**self.class_routes, **{c: CURRENT for c in self.classes}}
        return RoutedDenoiser({**finished, CURRENT: model}, routes, default=CURRENT)

    def end_task(self, task: TaskEnd) -> dict:
        name = task_folder_name(task.task_index)
        self.models[name] = frozen_teacher(task.model)  # as the task's FID sampled it (channels_last on the CPU)
        self.class_routes.update({int(c): name for c in task.classes})
        return {}

    def routes(self, task_index: int) -> dict[int, str]:
        own = task_folder_name(task_index)
        return {c: OWN_ROUTE if r == own else r for c, r in sorted(self.class_routes.items())}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        files: dict = {}
        for name, model in self.models.items():
            if name == task_folder_name(task_index):  # the folder's pipeline holds it
                continue
            folder = f"{ROUTES_FOLDER}/{name}"
            files[f"{folder}/config.json"] = json.loads(model.to_json_string())
            state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
            files[f"{folder}/{WEIGHTS}"] = SafetensorsFile(state, {"format": "pt"})
        return files

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        folder, k = Path(folder), expected.finished
        index = folder / "model_index.json"
        try:
            pipeline_config = json.loads(index.read_text())
            routes = {int(c): r for c, r in (pipeline_config.get("routes") or {}).items()}
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"{index} holds no routing table ({err}); copy the whole folder again") from None
        names = {task_folder_name(j): j for j in range(1, k)}
        if sorted(routes) != expected.seen_classes or set(routes.values()) - {*names, OWN_ROUTE}:
            raise refused(
                folder,
                "model_index.json",
                ValueError(
                    f"its routes {routes} do not send each class learned so far ({expected.seen_classes}) to one of "
                    f"{sorted(names)} or {OWN_ROUTE!r}"
                ),
            )
        own = "unet" if (pipeline_config.get("unet") or [None])[0] else "transformer"
        models = {task_folder_name(k): self._load(folder, own, expected)}
        for name in sorted(set(routes.values()) - {OWN_ROUTE}):
            models[name] = self._load(folder, f"{ROUTES_FOLDER}/{name}", expected)
        self.models = dict(sorted(models.items()))
        self.class_routes = {c: task_folder_name(k) if r == OWN_ROUTE else r for c, r in routes.items()}

    @staticmethod
    def _load(folder: Path, subfolder: str, expected: Expected) -> nn.Module:
        """The frozen model of ``folder/subfolder``, its weights checked against ``expected`` before it is built."""
        import diffusers

        config_path = folder / subfolder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{config_path} cannot be read ({err}); copy the whole folder again") from None
        if config.get("_class_name") not in ROUTED_CLASSES:
            raise refused(folder, f"{subfolder}/config.json", ValueError(f"it names {config.get('_class_name')!r}"))
        state = load_task_file(folder, f"{subfolder}/{WEIGHTS}", "a task's model")
        try:
            check_tensors(state, expected.before_growth())  # a finished task's model keeps its label table
            model = getattr(diffusers, config["_class_name"]).from_config(config)
            model.load_state_dict(state)
        except (ValueError, RuntimeError, TypeError) as err:
            raise refused(folder, f"{subfolder}/{WEIGHTS}", ValueError(str(err))) from None
        return frozen_teacher(model)
