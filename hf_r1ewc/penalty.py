"""The multi-task EWC penalty (rank-1, rank-1 without c*, diagonal) and its exact proximal step.

After tasks 1..K, with theta*_k the weights after task k (DESIGN section 2)::

    rank1           lambda/2 * sum_k c*_k (mu_k^T theta - b_k)^2,   b_k = mu_k^T theta*_k      (paper eq. 6)
    rank1_unscaled  lambda/2 * sum_k      (mu_k^T theta - b_k)^2
    diag            lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
                  = lambda/2 * sum_i A_i (theta_i - m_i)^2 + const,   A = sum_k F_k,  m = sum_k F_k theta*_k / A

Two small term types hold the statistics and the math, with one interface (``add``, ``value``, ``proximal_step``,
``state_dict``, per-parameter tensors to cut into shards): ``Rank1Terms`` stores mu_k stacked per parameter
(``[K, *shape]``) with b_k fixed once, so one step costs one small mat-vec per parameter tensor for all K tasks;
``DiagonalQuadratic`` is ONE merged quadratic (A, m, const) whose memory does not grow with K. ``EWCPenalty``
composes one of them with lambda. Values are computed in float32 (autocast off) and summed in float64.

FSDP2: with DTensor (sharded) parameters each process uses the matching slices of the statistics and all-reduces the
K projections (rank-1) or the one partial sum (diagonal) per step, so the value is exact and every shard gets its
exact gradient; the statistics themselves may stay on the CPU (``penalty.to("cpu")``): only the local slices are
moved next to the parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .fisher import FisherStatistics
from .sharding import all_reduce_keeping_local_grad, local_slice, local_tensor, shard_groups

PENALTY_KINDS = ("rank1", "rank1_unscaled", "diag")


class LocalView(NamedTuple):
    """One constrained parameter with the matching (local-shard) slices of the stored tensors."""

    param: torch.Tensor
    stored: tuple[torch.Tensor, ...]
    groups: tuple


def sum_over_shards(parts: list[tuple[torch.Tensor, tuple]]) -> torch.Tensor:
    """Sum per-parameter partial results; the parts of sharded parameters are all-reduced (one call per group)."""
    by_groups: dict[tuple, torch.Tensor] = {}
    for part, groups in parts:
        by_groups[groups] = part if groups not in by_groups else by_groups[groups] + part
    return sum(all_reduce_keeping_local_grad(part, groups) for groups, part in by_groups.items())


def _check_names(fisher: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(params) - set(fisher)), sorted(set(fisher) - set(params))
    if missing or extra:
        raise ValueError(f"Fisher statistics do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")


class Rank1Terms:
    """1/2 sum_k c_k (mu_k^T theta - b_k)^2 with c_k = c*_k (``scaled``) or 1. ``mu[name]`` is ``[K, *shape]`` in
    ``mu_dtype``; b_k and the Gram matrix mu_j^T mu_k come from the STORED mu, so the value is 0 at theta*_k and the
    proximal step exact whatever the storage precision."""

    leading_dims = 1

    def __init__(self, scaled: bool, mu_dtype: torch.dtype = torch.float32) -> None:
        self.scaled, self.mu_dtype = scaled, mu_dtype
        self.mu: dict[str, torch.Tensor] = {}
        self.b = torch.zeros(0, dtype=torch.float64)  # [K]
        self.c = torch.zeros(0, dtype=torch.float64)  # [K]
        self.gram = torch.zeros(0, 0, dtype=torch.float64)  # [K, K]

    @property
    def num_tasks(self) -> int:
        return int(self.b.shape[0])

    def add(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        if stats.mu is None or (self.scaled and stats.c_star is None):
            raise ValueError("the rank-1 penalty needs rank-1 statistics (estimate with kinds=('rank1',))")
        _check_names(stats.mu, params)
        if self.mu and set(self.mu) != set(stats.mu):
            raise ValueError("the new task's Fisher statistics name other parameters than the earlier tasks'")
        new = {n: stats.mu[n].detach().to(params[n].device, self.mu_dtype) for n in params}
        b = sum(float(new[n].double().flatten() @ params[n].double().flatten()) for n in params)
        cross = torch.zeros(self.num_tasks, dtype=torch.float64)
        for n, m in self.mu.items():
            cross += (m.double().flatten(1) @ new[n].double().flatten().to(m.device)).cpu()
        k = self.num_tasks
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        gram[:k, :k] = self.gram
        gram[k, :k] = gram[:k, k] = cross
        gram[k, k] = float(sum(v.double().pow(2).sum() for v in new.values()))
        self.gram = gram
        self.mu = {n: new[n][None] if n not in self.mu else torch.cat([self.mu[n], new[n][None]]) for n in params}
        self.b = torch.cat([self.b, torch.tensor([b], dtype=torch.float64)])
        c = float(stats.c_star) if self.scaled else 1.0
        self.c = torch.cat([self.c, torch.tensor([c], dtype=torch.float64)])

    def per_parameter(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {n: (m,) for n, m in self.mu.items()}

    def projections(self, views: list[LocalView]) -> torch.Tensor:
        """``[K]`` float64 mu_k^T theta (differentiable; summed over shards)."""
        return sum_over_shards([((mu.flatten(1).float() @ local_tensor(v.param).flatten().float()).double(), v.groups)
                                for v in views for mu in v.stored])

    def value(self, views: list[LocalView]) -> torch.Tensor:
        projections = self.projections(views)
        residual = projections - self.b.to(projections.device)
        return 0.5 * (self.c.to(projections.device) * residual.pow(2)).sum()

    @torch.no_grad()
    def proximal_step(self, views: list[LocalView], scale: float) -> None:
        """theta <- theta - U^T ((scale C)^-1 + U U^T)^-1 (U theta - b): Woodbury, a K x K solve in float64."""
        weight = scale * self.c  # [K]
        active = weight > 0
        if not bool(active.any()):
            return
        index = torch.nonzero(active).flatten()
        residual = (self.projections(views).cpu() - self.b)[index]
        system = torch.diag(1.0 / weight[index]) + self.gram[index][:, index]
        solution = torch.linalg.solve(system, residual)  # [K_active] float64
        for v in views:
            (mu,), p = v.stored, local_tensor(v.param)
            update = (solution.to(mu.device, torch.float32) @ mu[index.to(mu.device)].flatten(1).float()).view_as(p)
            p.sub_(update.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"mu.{n}": v for n, v in self.mu.items()}, "b": self.b, "c": self.c, "gram": self.gram}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "b" not in state:
            raise ValueError(f"state holds no rank-1 penalty (keys {sorted(state)[:5]}...)")
        self.mu = {k[len("mu."):]: v.to(self.mu_dtype) for k, v in state.items() if k.startswith("mu.")}
        self.b, self.c, self.gram = state["b"].double(), state["c"].double(), state["gram"].double()

    def to(self, device: torch.device | str) -> None:
        self.mu = {n: v.to(device) for n, v in self.mu.items()}


class DiagonalQuadratic:
    """1/2 sum_i A_i (theta_i - m_i)^2 + const: the K diagonal terms merged (``precision`` A, ``anchor`` m)."""

    leading_dims = 0

    def __init__(self) -> None:
        self.precision: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.constant = 0.0  # 1/2 sum_i (sum_k F_k,i theta*_k,i^2 - A_i m_i^2)
        self.num_tasks = 0

    def add(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        if stats.diag is None:
            raise ValueError("the diag penalty needs diagonal statistics (estimate with kinds=('diag',))")
        _check_names(stats.diag, params)
        for n, theta in params.items():
            f = stats.diag[n].detach().to(theta.device, torch.float64)
            theta = theta.double()
            a_old = self.precision.get(n, torch.zeros_like(f)).double()
            m_old = self.anchor.get(n, torch.zeros_like(f)).double()
            a_new = a_old + f
            m_new = torch.where(a_new > 0, (a_old * m_old + f * theta) / a_new.clamp_min(1e-300), theta)
            # sum_k F_k theta*_k^2 - A m^2 changes by: F theta^2 + A_old m_old^2 - A_new m_new^2
            self.constant += 0.5 * float((f * theta**2 + a_old * m_old**2 - a_new * m_new**2).sum())
            self.precision[n], self.anchor[n] = a_new.float(), m_new.float()
        self.num_tasks += 1

    def per_parameter(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {n: (a, self.anchor[n]) for n, a in self.precision.items()}

    def value(self, views: list[LocalView]) -> torch.Tensor:
        total = sum_over_shards([((a * (local_tensor(v.param).float() - m).pow(2)).sum(dtype=torch.float64), v.groups)
                                 for v in views for a, m in [v.stored]])
        return 0.5 * total + self.constant

    @torch.no_grad()
    def proximal_step(self, views: list[LocalView], scale: float) -> None:
        """theta_i <- (theta~_i + s A_i m_i) / (1 + s A_i), s = ``scale``."""
        for v in views:
            (a, m), p = v.stored, local_tensor(v.param)
            weight = scale * a.float()
            p.copy_(((p.float() + weight * m) / (1.0 + weight)).to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"precision.{n}": v for n, v in self.precision.items()},
                **{f"anchor.{n}": v for n, v in self.anchor.items()},
                "constant": torch.tensor(self.constant, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "constant" not in state:
            raise ValueError(f"state holds no diagonal penalty (keys {sorted(state)[:5]}...)")
        self.precision = {k[len("precision."):]: v for k, v in state.items() if k.startswith("precision.")}
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
        self.constant = float(state["constant"])
        self.num_tasks = int(state["num_tasks"])

    def to(self, device: torch.device | str) -> None:
        self.precision = {n: v.to(device) for n, v in self.precision.items()}
        self.anchor = {n: v.to(device) for n, v in self.anchor.items()}


class EWCPenalty:
    """``penalty(model)`` -> lambda * terms (scalar, differentiable); ``add_task(stats, params)`` after each task."""

    def __init__(self, kind: str, ewc_lambda: float, mu_dtype: torch.dtype = torch.float32) -> None:
        if kind not in PENALTY_KINDS:
            raise ValueError(f"unknown EWC penalty kind {kind!r}; choose from {PENALTY_KINDS}")
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        self.kind = kind
        self.ewc_lambda = float(ewc_lambda)
        self.terms = DiagonalQuadratic() if kind == "diag" else Rank1Terms(kind == "rank1", mu_dtype)
        self._bound: tuple[int, list[LocalView]] | None = None

    @property
    def num_tasks(self) -> int:
        return self.terms.num_tasks

    def add_task(self, stats: FisherStatistics, params: dict[str, torch.Tensor] | nn.Module) -> None:
        """Consolidate one finished task: ``stats`` estimated at ``params`` (theta*_k, a dict or the model)."""
        if isinstance(params, nn.Module):
            params = {n: p for n, p in params.named_parameters() if p.requires_grad}
        self.terms.add(stats, {n: p.detach() for n, p in params.items()})
        self._bound = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): ``mu.<name>`` [K, *shape], ``b``, ``c``, ``gram`` (rank-1) or
        ``precision.<name>``, ``anchor.<name>``, ``constant`` (diagonal); plus ``num_tasks`` and ``ewc_lambda``."""
        state = {"num_tasks": torch.tensor(self.num_tasks),
                 "ewc_lambda": torch.tensor(self.ewc_lambda, dtype=torch.float64), **self.terms.state_dict()}
        return {k: v.contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.terms.load_state_dict(state)
        self.ewc_lambda = float(state["ewc_lambda"])
        self._bound = None

    def to(self, device: torch.device | str) -> "EWCPenalty":
        """Move the stored statistics (e.g. next to the model's parameters, or to the CPU under FSDP)."""
        self.terms.to(device)
        self._bound = None
        return self

    def views(self, model: nn.Module) -> list[LocalView]:
        """Each constrained parameter with its stored tensors cut to the local shard, on its device (cached)."""
        if self._bound is not None and self._bound[0] == id(model):
            return self._bound[1]
        named = dict(model.named_parameters())
        per_parameter = self.terms.per_parameter()
        missing = sorted(set(per_parameter) - set(named))
        if missing:
            raise ValueError(f"the model has no parameters {missing[:5]} that the penalty constrains")
        lead = self.terms.leading_dims
        views = [LocalView(named[n], tuple(local_slice(t, named[n], lead if i == 0 else 0) for i, t in enumerate(ts)),
                           shard_groups(named[n])) for n, ts in per_parameter.items()]
        self._bound = (id(model), views)
        return views

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The scalar penalty (already multiplied by lambda), float32, differentiable w.r.t. the model."""
        device = local_tensor(next(model.parameters())).device
        if self.num_tasks == 0 or self.ewc_lambda == 0:
            return torch.zeros((), device=device)
        with torch.autocast(device_type=device.type, enabled=False):
            return (self.ewc_lambda * self.terms.value(self.views(model))).float()

    @torch.no_grad()
    def proximal_step(self, model: nn.Module, step_size: float) -> None:
        """Replace theta by argmin_theta 1/2 ||theta - theta~||^2 + step_size * penalty(theta), exactly."""
        if step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        if self.num_tasks == 0 or self.ewc_lambda == 0 or step_size == 0:
            return
        self.terms.proximal_step(self.views(model), step_size * self.ewc_lambda)
