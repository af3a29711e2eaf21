"""L2 to the previous task's weights: weight/2 * sum_i (theta_i - theta*_{k-1,i})^2 in the loss (EWC with the
identity in place of the Fisher; CLoG's default weight 500). theta*_{k-1} are the weights the last task ended with."""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import (
    ContinualMethod,
    Expected,
    Growth,
    SafetensorsFile,
    TaskEnd,
    TaskStart,
    load_task_file,
    parameter_parts,
    quadratic_penalty,
    refused,
    trainable_weights,
)


ANCHOR_FILE = "l2_anchor.safetensors"


class L2(ContinualMethod):
    """``weight``/2 ||theta - theta*_{k-1}||^2 over the trainable parameters (none before the first task ends)."""

    name = term = "l2"

    def __init__(self, weight: float = 500.0) -> None:
        if not 0 <= weight < float("inf"):
            raise ValueError(f"the L2 weight must be finite and >= 0, got {weight}")
        self.weight, self.anchor = float(weight), {}
        self.growth: tuple[Growth, ...] = ()

    def label(self) -> str:
        return f"L2 to the previous weights (weight {self.weight:g})"

    def settings(self) -> dict:
        return {"l2_weight": self.weight}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.anchor:
            return None
        return self.weight / 2 * quadratic_penalty(model, self.anchor)

    def end_task(self, task: TaskEnd) -> dict:
        self.anchor = trainable_weights(task.model)
        return {}

    def task_files(self, task_index: int, classes: list[int]) -> dict:
        return {ANCHOR_FILE: SafetensorsFile(self.anchor)}

    def start_task(self, task: TaskStart) -> None:
        """After the label tables grew (new classes): the new rows of theta*_{k-1} are the model's own (their start),
        so that the anchor is the grown model the task starts from."""
        params = dict(task.model.named_parameters())
        for g in self.growth:
            rows = params[g.name].detach().float().cpu()[g.at : g.at + g.new - g.old]
            self.anchor[g.name] = torch.cat(
                [self.anchor[g.name][: g.at], rows, self.anchor[g.name][g.at + g.new - g.old :]]
            )
        self.growth = ()

    def load_task_folder(self, folder: str | os.PathLike, expected: Expected) -> None:
        anchor = load_task_file(folder, ANCHOR_FILE, "the weights the L2 penalty pulls towards")
        try:
            self.load_state_dict(expected.grown({f"anchor.{n}": v for n, v in anchor.items()}), expected)
        except ValueError as err:
            raise refused(folder, ANCHOR_FILE, err) from None
        self.growth = expected.growth  # the new rows' anchor comes from the model as the next task starts

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"anchor.{n}": a for n, a in self.anchor.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], expected: Expected) -> None:
        """theta*_{k-1} (``anchor.<name>``, the model's shapes, finite) once a task is finished; nothing before."""
        self.anchor = parameter_parts(state, expected, ["anchor"] if expected.finished else []).get("anchor", {})
