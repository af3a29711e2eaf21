"""The multi-task EWC penalty (rank-1, rank-1 without c*, diagonal) and its exact proximal step.

After tasks 1..K, with theta*_k the weights after task k (docs/method.md)::

    rank1           lambda/2 * sum_k c*_k (mu_k^T theta - b_k)^2,   b_k = mu_k^T theta*_k      (paper eq. 6)
    rank1_unscaled  lambda/2 * sum_k      (mu_k^T theta - b_k)^2
    diag            lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
                  = lambda/2 * sum_i A_i (theta_i - m_i)^2 + const,   A = sum_k F_k,  m = sum_k F_k theta*_k / A

Two small term types hold the statistics and the math, with one interface (``add``, ``value``, ``proximal_step``,
``state_dict``, per-parameter tensors to cut into shards): ``Rank1Terms`` stores mu_k stacked per parameter
(``[K, *shape]``) with b_k fixed once; ``DiagonalQuadratic`` is ONE merged quadratic (A, m, const) whose memory does
not grow with K. ``EWCPenalty`` composes one of them with lambda and binds them to a model once per task: the stored
tensors laid out flat ``[K, P]`` on the model's device, so a step costs one concatenation of the parameters and one
mat-vec for all K tasks (never per task). Values are computed in float32 (autocast off) and summed in float64.

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


class FlatGroup(NamedTuple):
    """Parameters that share shard groups, with the matching (local-shard) slices of the stored tensors laid out
    flat, in parameter order: ``stored[i]`` is ``[*lead_i, P_local]``. One value or proximal step is then a few
    large kernels per group instead of several per parameter tensor (per-tensor kernels cost 60 % of a 35.75M-UNet
    training step on an H200, ``benchmarks/results/gpu_check.md``). Rank-1 projections are taken relative to
    ``anchor`` (``[P_local]``: theta*_K, the weights the newest task was consolidated at), with ``offset`` =
    mu^T anchor (float64 ``[K]``) added back: mu^T theta - b is a cancellation of large terms near theta*, and the
    float32 part then only sees the small theta - anchor. The anchor changes only the rounding, never the maths; it is
    fixed by the penalty's state (not by when ``bind`` runs), so a resumed run rounds as the uninterrupted one."""

    params: list[torch.Tensor]
    stored: tuple[torch.Tensor, ...]
    groups: tuple
    anchor: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def theta(self) -> torch.Tensor:
        """``[P_local]`` float32: the local parameter values, flat (differentiable)."""
        return torch.cat([local_tensor(p).reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> None:
        """Write ``flat`` ``[P_local]`` back into the parameters (one multi-tensor copy)."""
        locals_ = [local_tensor(p) for p in self.params]
        pieces = flat.split([t.numel() for t in locals_])
        torch._foreach_copy_(locals_, [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, locals_)])


BLOCK = 1 << 22  # columns of a low-precision matrix up-cast at a time


def _matvec(matrix: torch.Tensor, vector: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``matrix [K, P] @ vector [P]`` computed in ``dtype`` (a matrix stored in another dtype is up-cast block by
    block), returned as float64 ``[K]``."""
    if matrix.dtype == dtype:
        return (matrix @ vector.to(dtype)).double()
    return sum(
        (matrix[:, i : i + BLOCK].to(dtype) @ vector[i : i + BLOCK].to(dtype)).double()
        for i in range(0, matrix.shape[1], BLOCK)
    )


def _combination(weights: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``weights [K] @ matrix [K, P]`` in float32, a bf16-stored matrix up-cast block by block."""
    if matrix.dtype == torch.float32:
        return weights @ matrix
    return torch.cat([weights @ matrix[:, i : i + BLOCK].float() for i in range(0, matrix.shape[1], BLOCK)])


def sum_over_shards(parts: list[tuple[torch.Tensor, tuple]]) -> torch.Tensor:
    """Sum per-group partial results; the parts of sharded parameters are all-reduced (one call per group)."""
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
        # theta*_K (name -> float32 tensor, where mu is): the projections' anchor (FlatGroup); None: theta at bind
        self.anchor: dict[str, torch.Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        """K, the tasks consolidated so far."""
        return int(self.b.shape[0])

    def add(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        """Consolidate a task: ``stats`` estimated at ``params`` (theta*_k, name -> tensor)."""
        if stats.mu is None or (self.scaled and stats.c_star is None):
            raise ValueError("the rank-1 penalty needs rank-1 statistics (estimate with kinds=('rank1',))")
        _check_names(stats.mu, params)
        if self.mu and set(self.mu) != set(stats.mu):
            raise ValueError("the new task's Fisher statistics name other parameters than the earlier tasks'")
        new = {n: stats.mu[n].detach().to(params[n].device, self.mu_dtype) for n in params}
        b = sum(float(new[n].double().flatten() @ params[n].double().flatten()) for n in params)
        cross = torch.zeros(self.num_tasks, dtype=torch.float64)
        for n in params if self.mu else ():  # the model's order, whatever the order of a loaded file
            m = self.mu[n]
            cross += (m.double().flatten(1) @ new[n].double().flatten().to(m.device)).cpu()
        k = self.num_tasks
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        gram[:k, :k] = self.gram
        gram[k, :k] = gram[:k, k] = cross
        gram[k, k] = float(sum(v.double().pow(2).sum() for v in new.values()))
        self.gram = gram
        # stored where the earlier tasks' statistics are (the CPU in the script), new tensors moved there
        self.mu = {
            n: new[n][None] if n not in self.mu else torch.cat([self.mu[n], new[n][None].to(self.mu[n].device)])
            for n in params
        }
        self.b = torch.cat([self.b, torch.tensor([b], dtype=torch.float64)])
        c = float(stats.c_star) if self.scaled else 1.0
        self.c = torch.cat([self.c, torch.tensor([c], dtype=torch.float64)])
        self.set_anchor(params)

    def set_anchor(self, params: dict[str, torch.Tensor]) -> None:
        """Take projections relative to ``params`` (theta*_K, name -> tensor), kept as float32 where mu is."""
        missing = sorted(set(self.mu) - set(params))
        if missing:
            raise ValueError(f"the anchor weights lack parameters {missing[:5]} that the penalty constrains")
        self.anchor = {n: params[n].detach().to(self.mu[n].device, torch.float32, copy=True) for n in self.mu}

    def per_parameter(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """name -> the stored tensors of that parameter, to be cut into shards and laid out flat."""
        return {n: (m,) for n, m in self.mu.items()}

    def projections(self, groups: list[FlatGroup]) -> torch.Tensor:
        """``[K]`` float64 mu_k^T theta (differentiable; summed over shards)."""
        return sum_over_shards([(_matvec(g.stored[0], g.theta() - g.anchor) + g.offset, g.groups) for g in groups])

    def value(self, groups: list[FlatGroup]) -> torch.Tensor:
        """The penalty without lambda: float64 scalar, differentiable w.r.t. the bound parameters."""
        projections = self.projections(groups)
        residual = projections - self.b.to(projections.device)
        return 0.5 * (self.c.to(projections.device) * residual.pow(2)).sum()

    @torch.no_grad()
    def proximal_step(self, groups: list[FlatGroup], scale: float) -> None:
        """theta <- theta - U^T ((scale C)^-1 + U U^T)^-1 (U theta - b): Woodbury, a K x K solve in float64."""
        weight = scale * self.c  # [K]
        active = weight > 0
        if not bool(active.any()):
            return
        index = torch.nonzero(active).flatten()
        residual = (self.projections(groups).cpu() - self.b)[index]
        system = torch.diag(1.0 / weight[index]) + self.gram[index][:, index]
        solution = torch.zeros(self.num_tasks, dtype=torch.float64)
        solution[index] = torch.linalg.solve(system, residual)  # float64
        for g in groups:
            mu = g.stored[0]
            g.assign(g.theta() - _combination(solution.to(mu.device, torch.float32), mu))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, the ``ewc_penalty.safetensors`` layout."""
        anchor = {f"theta_star.{n}": v for n, v in self.anchor.items()} if self.anchor is not None else {}
        return {**{f"mu.{n}": v for n, v in self.mu.items()}, "b": self.b, "c": self.c, "gram": self.gram, **anchor}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict`` tensors (as read from safetensors)."""
        if "b" not in state:
            raise ValueError(f"state holds no rank-1 penalty (keys {sorted(state)[:5]}...)")
        self.mu = {k[len("mu.") :]: v.to(self.mu_dtype) for k, v in state.items() if k.startswith("mu.")}
        self.b, self.c, self.gram = state["b"].double(), state["c"].double(), state["gram"].double()
        # files written before the anchor was stored: anchored at theta when first bound (same maths, other rounding)
        anchor = {k[len("theta_star.") :]: v.float() for k, v in state.items() if k.startswith("theta_star.")}
        self.anchor = None
        if anchor:
            self.set_anchor(anchor)

    def to(self, device: torch.device | str) -> None:
        """Move the stored statistics to ``device``."""
        self.mu = {n: v.to(device) for n, v in self.mu.items()}
        if self.anchor is not None:
            self.anchor = {n: v.to(device) for n, v in self.anchor.items()}


class DiagonalQuadratic:
    """1/2 sum_i A_i (theta_i - m_i)^2 + const: the K diagonal terms merged (``precision`` A, ``anchor`` m)."""

    leading_dims = 0

    def __init__(self) -> None:
        self.precision: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.constant = 0.0  # 1/2 sum_i (sum_k F_k,i theta*_k,i^2 - A_i m_i^2)
        self.num_tasks = 0

    def add(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        """Consolidate a task: ``stats`` estimated at ``params`` (theta*_k, name -> tensor)."""
        if stats.diag is None:
            raise ValueError("the diag penalty needs diagonal statistics (estimate with kinds=('diag',))")
        _check_names(stats.diag, params)
        for n, theta in params.items():
            store = self.precision[n].device if n in self.precision else theta.device  # where earlier tasks' are
            f = stats.diag[n].detach().to(theta.device, torch.float64)
            theta = theta.double()
            a_old = self.precision[n].to(theta.device, torch.float64) if n in self.precision else torch.zeros_like(f)
            m_old = self.anchor[n].to(theta.device, torch.float64) if n in self.anchor else torch.zeros_like(f)
            a_new = a_old + f
            m_new = torch.where(a_new > 0, (a_old * m_old + f * theta) / a_new.clamp_min(1e-300), theta)
            # sum_k F_k theta*_k^2 - A m^2 changes by: F theta^2 + A_old m_old^2 - A_new m_new^2
            self.constant += 0.5 * float((f * theta**2 + a_old * m_old**2 - a_new * m_new**2).sum())
            self.precision[n], self.anchor[n] = a_new.float().to(store), m_new.float().to(store)
        self.num_tasks += 1

    def per_parameter(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """name -> the stored tensors of that parameter, to be cut into shards and laid out flat."""
        return {n: (a, self.anchor[n]) for n, a in self.precision.items()}

    def value(self, groups: list[FlatGroup]) -> torch.Tensor:
        """The penalty without lambda: float64 scalar, differentiable w.r.t. the bound parameters."""
        total = sum_over_shards(
            [((g.stored[0] * (g.theta() - g.stored[1]).pow(2)).sum(dtype=torch.float64), g.groups) for g in groups]
        )
        return 0.5 * total + self.constant

    @torch.no_grad()
    def proximal_step(self, groups: list[FlatGroup], scale: float) -> None:
        """theta_i <- (theta~_i + s A_i m_i) / (1 + s A_i), s = ``scale``."""
        for g in groups:
            weight = scale * g.stored[0].float()
            g.assign((g.theta() + weight * g.stored[1]) / (1.0 + weight))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, the ``ewc_penalty.safetensors`` layout."""
        return {
            **{f"precision.{n}": v for n, v in self.precision.items()},
            **{f"anchor.{n}": v for n, v in self.anchor.items()},
            "constant": torch.tensor(self.constant, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict`` tensors (as read from safetensors)."""
        if "constant" not in state:
            raise ValueError(f"state holds no diagonal penalty (keys {sorted(state)[:5]}...)")
        self.precision = {k[len("precision.") :]: v for k, v in state.items() if k.startswith("precision.")}
        self.anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}
        self.constant = float(state["constant"])
        self.num_tasks = int(state["num_tasks"])

    def to(self, device: torch.device | str) -> None:
        """Move the stored statistics to ``device``."""
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
        self._bound: tuple[int, list[FlatGroup]] | None = None

    @property
    def num_tasks(self) -> int:
        """K, the tasks consolidated so far."""
        return self.terms.num_tasks

    def add_task(self, stats: FisherStatistics, params: dict[str, torch.Tensor] | nn.Module) -> None:
        """Consolidate one finished task: ``stats`` estimated at ``params`` (theta*_k, a dict or the model)."""
        if isinstance(params, nn.Module):
            params = {n: p for n, p in params.named_parameters() if p.requires_grad}
        self.terms.add(stats, {n: p.detach() for n, p in params.items()})
        self._bound = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): ``mu.<name>`` [K, *shape], ``b``, ``c``, ``gram``, ``theta_star.<name>``
        (rank-1; theta*_K, the projections' float32 anchor, so that a restored penalty rounds as the saved one) or
        ``precision.<name>``, ``anchor.<name>``, ``constant`` (diagonal); plus ``num_tasks`` and ``ewc_lambda``."""
        state = {
            "num_tasks": torch.tensor(self.num_tasks),
            "ewc_lambda": torch.tensor(self.ewc_lambda, dtype=torch.float64),
            **self.terms.state_dict(),
        }
        return {k: v.contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict`` tensors (as read from safetensors); refuses non-finite values."""
        bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if bad:
            raise ValueError(
                f"the penalty state holds non-finite values in {bad[:3]}{' ...' if len(bad) > 3 else ''}"
                f" ({len(bad)} tensors): damaged, or estimated from weights that were not finite"
            )
        self.terms.load_state_dict(state)
        self.ewc_lambda = float(state["ewc_lambda"])
        self._bound = None

    def to(self, device: torch.device | str) -> "EWCPenalty":
        """Move the stored statistics (e.g. next to the model's parameters, or to the CPU under FSDP)."""
        self.terms.to(device)
        self._bound = None
        return self

    def bind(self, model: nn.Module) -> list[FlatGroup]:
        """The constrained parameters grouped by shard groups, with the stored tensors cut to the local shards and
        laid out flat on the parameters' device (built once per model and task; keep the statistics themselves on
        the CPU with ``penalty.to("cpu")`` so that the device holds this one copy)."""
        if self._bound is not None and self._bound[0] == id(model):
            return self._bound[1]
        named = dict(model.named_parameters())
        per_parameter = self.terms.per_parameter()
        missing = sorted(set(per_parameter) - set(named))
        if missing:
            raise ValueError(f"the model has no parameters {missing[:5]} that the penalty constrains")
        lead = self.terms.leading_dims
        by_groups: dict[tuple, list[str]] = {}
        for name in (n for n in named if n in per_parameter):  # the model's order, whatever the file's order
            by_groups.setdefault(shard_groups(named[name]), []).append(name)
        bound = []
        for groups, names in by_groups.items():
            stored = []
            for i in range(len(per_parameter[names[0]])):
                keep = lead if i == 0 else 0
                parts = [local_slice(per_parameter[n][i], named[n], keep) for n in names]
                stored.append(torch.cat([t.reshape(*t.shape[:keep], -1) for t in parts], dim=keep))
            group = FlatGroup([named[n] for n in names], tuple(stored), groups)
            if lead:  # rank-1: projections relative to theta*_K (see FlatGroup), or to theta now
                anchor = (
                    group.theta().detach()
                    if self.terms.anchor is None
                    else torch.cat([local_slice(self.terms.anchor[n], named[n]).reshape(-1) for n in names])
                )
                group = group._replace(anchor=anchor, offset=_matvec(stored[0], anchor, torch.float64))
            bound.append(group)
        self._bound = (id(model), bound)
        return bound

    def __call__(self, model: nn.Module) -> torch.Tensor:
        r"""The penalty over the K consolidated tasks, multiplied by λ (rank-1; the other kinds in the module text):

        .. math::

            \frac{\lambda}{2}\sum_{k=1}^{K} c^*_k\,(\mu_k^\top\theta - \mu_k^\top\theta^*_k)^2

        Args:
            model: the model being trained (its trainable parameters are θ; FSDP2 shards allowed).

        Returns:
            A float32 0-dim tensor on the parameters' device, differentiable w.r.t. θ (0 before any task).
        """
        device = local_tensor(next(model.parameters())).device
        if self.num_tasks == 0 or self.ewc_lambda == 0:
            return torch.zeros((), device=device)
        with torch.autocast(device_type=device.type, enabled=False):
            return (self.ewc_lambda * self.terms.value(self.bind(model))).float()

    @torch.no_grad()
    def proximal_step(self, model: nn.Module, step_size: float) -> None:
        r"""Replace θ̃ (the weights after an optimizer step) by the exact proximal point

        .. math::

            \theta \leftarrow \arg\min_\theta \tfrac{1}{2}\|\theta - \tilde\theta\|^2 + \eta\,
            \mathrm{penalty}(\theta)

        (rank-1: a K×K linear solve in the span of the μ_k; diagonal: elementwise).

        Args:
            model: updated in place; step_size: η ≥ 0, the optimizer's learning rate.
        """
        if step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        if self.num_tasks == 0 or self.ewc_lambda == 0 or step_size == 0:
            return
        self.terms.proximal_step(self.bind(model), step_size * self.ewc_lambda)
