"""The multi-task EWC penalty (rank-1, rank-1 without c*, diagonal) and its exact proximal step.

After tasks 1..K, with theta*_k the weights after task k (DESIGN section 2)::

    rank1           lambda/2 * sum_k c*_k (mu_k^T theta - b_k)^2,   b_k = mu_k^T theta*_k      (paper eq. 6)
    rank1_unscaled  lambda/2 * sum_k      (mu_k^T theta - b_k)^2
    diag            lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
                  = lambda/2 * sum_i A_i (theta_i - m_i)^2 + const,   A = sum_k F_k,  m = sum_k F_k theta*_k / A

The rank-1 family stores mu_k stacked per parameter (``[K, *shape]``), so one step costs one small mat-vec per
parameter tensor for all K tasks together, with b_k fixed once: no concatenation of all parameters. The diagonal
family is ONE merged quadratic (A, m, const) whose memory does not grow with K. Values are computed in float32
(autocast off) and summed over parameters in float64.

FSDP2: with DTensor (sharded) parameters each process uses the matching slices of the statistics and all-reduces the
K projections (rank-1) or the one partial sum (diagonal) per step, so the value is exact and every shard gets its
exact gradient; the statistics themselves may stay on the CPU (``penalty.to("cpu")``): only the local slices are
moved next to the parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .fisher import FisherStatistics
from .sharding import all_reduce_keeping_local_grad, local_slice, local_tensor, shard_groups

PENALTY_KINDS = ("rank1", "rank1_unscaled", "diag")


class EWCPenalty:
    """``penalty(model)`` -> scalar tensor (differentiable); ``add_task(stats, params)`` after each task."""

    def __init__(self, kind: str, ewc_lambda: float, mu_dtype: torch.dtype = torch.float32) -> None:
        if kind not in PENALTY_KINDS:
            raise ValueError(f"unknown EWC penalty kind {kind!r}; choose from {PENALTY_KINDS}")
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        self.kind = kind
        self.ewc_lambda = float(ewc_lambda)
        self.mu_dtype = mu_dtype
        self.num_tasks = 0
        # rank-1 family
        self.mu: dict[str, torch.Tensor] = {}  # name -> [K, *shape]
        self.b = torch.zeros(0, dtype=torch.float64)  # [K]  mu_k^T theta*_k
        self.c = torch.zeros(0, dtype=torch.float64)  # [K]  c*_k (1 for rank1_unscaled)
        self.gram = torch.zeros(0, 0, dtype=torch.float64)  # [K, K]  mu_j^T mu_k (for the proximal step)
        # diagonal family
        self.precision: dict[str, torch.Tensor] = {}  # A = sum_k F_k
        self.anchor: dict[str, torch.Tensor] = {}  # m = sum_k F_k theta*_k / A
        self.constant = 0.0  # 1/2 sum_i (sum_k F_k,i theta*_k,i^2 - A_i m_i^2)
        self._bound: tuple[int, list] | None = None

    # ------------------------------------------------------------------------------------------------ state

    def add_task(self, stats: FisherStatistics, params: dict[str, torch.Tensor] | nn.Module) -> None:
        """Consolidate one finished task: ``stats`` estimated at ``params`` (theta*_k, a dict or the model)."""
        if isinstance(params, nn.Module):
            params = {n: p for n, p in params.named_parameters() if p.requires_grad}
        params = {n: p.detach() for n, p in params.items()}
        if self.kind == "diag":
            self._add_diag(stats, params)
        else:
            self._add_rank1(stats, params)
        self.num_tasks += 1
        self._bound = None

    def _check_names(self, fisher: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(params) - set(fisher))
        extra = sorted(set(fisher) - set(params))
        if missing or extra:
            raise ValueError(f"Fisher statistics do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")

    def _add_rank1(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        if stats.mu is None or (self.kind == "rank1" and stats.c_star is None):
            raise ValueError(f"the {self.kind} penalty needs rank-1 statistics (estimate with kinds=('rank1',))")
        self._check_names(stats.mu, params)
        if self.mu and set(self.mu) != set(stats.mu):
            raise ValueError("the new task's Fisher statistics name other parameters than the earlier tasks'")
        b = sum(float(stats.mu[n].double().flatten() @ params[n].double().flatten().to(stats.mu[n].device))
                for n in params)
        cross = torch.zeros(self.num_tasks, dtype=torch.float64)
        for n, m in self.mu.items():
            cross += (m.double().flatten(1) @ stats.mu[n].double().flatten().to(m.device)).cpu()
        new_norm = float(sum(v.double().pow(2).sum() for v in stats.mu.values()))
        k = self.num_tasks
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        gram[:k, :k] = self.gram
        gram[k, :k] = gram[:k, k] = cross
        gram[k, k] = new_norm
        self.gram = gram
        for n in params:
            new = stats.mu[n].detach().to(params[n].device, self.mu_dtype)[None]
            self.mu[n] = new if n not in self.mu else torch.cat([self.mu[n], new])
        self.b = torch.cat([self.b, torch.tensor([b], dtype=torch.float64)])
        c = float(stats.c_star) if self.kind == "rank1" else 1.0
        self.c = torch.cat([self.c, torch.tensor([c], dtype=torch.float64)])

    def _add_diag(self, stats: FisherStatistics, params: dict[str, torch.Tensor]) -> None:
        if stats.diag is None:
            raise ValueError("the diag penalty needs diagonal statistics (estimate with kinds=('diag',))")
        self._check_names(stats.diag, params)
        for n, theta in params.items():
            f = stats.diag[n].detach().to(theta.device, torch.float64)
            theta = theta.double()
            a_old = self.precision.get(n, torch.zeros_like(f, dtype=torch.float64)).double()
            m_old = self.anchor.get(n, torch.zeros_like(f, dtype=torch.float64)).double()
            a_new = a_old + f
            m_new = torch.where(a_new > 0, (a_old * m_old + f * theta) / a_new.clamp_min(1e-300), theta)
            # sum_k F_k theta*_k^2 - A m^2 changes by: F theta^2 + A_old m_old^2 - A_new m_new^2
            self.constant += 0.5 * float((f * theta**2 + a_old * m_old**2 - a_new * m_new**2).sum())
            self.precision[n] = a_new.float()
            self.anchor[n] = m_new.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): ``mu.<name>`` [K, *shape], ``b``, ``c``, ``gram``, or ``precision.<name>``,
        ``anchor.<name>``, ``constant``; plus ``num_tasks`` and ``ewc_lambda``."""
        state = {"num_tasks": torch.tensor(self.num_tasks), "ewc_lambda": torch.tensor(self.ewc_lambda, dtype=torch.float64)}
        if self.kind == "diag":
            state.update({f"precision.{n}": v for n, v in self.precision.items()})
            state.update({f"anchor.{n}": v for n, v in self.anchor.items()})
            state["constant"] = torch.tensor(self.constant, dtype=torch.float64)
        else:
            state.update({f"mu.{n}": v for n, v in self.mu.items()})
            state.update({"b": self.b, "c": self.c, "gram": self.gram})
        return {k: v.contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.num_tasks = int(state["num_tasks"])
        self.ewc_lambda = float(state["ewc_lambda"])
        if self.kind == "diag":
            self.precision = {k[len("precision."):]: v for k, v in state.items() if k.startswith("precision.")}
            self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
            self.constant = float(state["constant"])
        else:
            if "b" not in state:
                raise ValueError(f"state holds no rank-1 penalty (keys {sorted(state)[:5]}...)")
            self.mu = {k[len("mu."):]: v.to(self.mu_dtype) for k, v in state.items() if k.startswith("mu.")}
            self.b, self.c, self.gram = state["b"].double(), state["c"].double(), state["gram"].double()
        self._bound = None

    def to(self, device: torch.device | str) -> "EWCPenalty":
        """Move the stored statistics next to the model's parameters."""
        for store in (self.mu, self.precision, self.anchor):
            for n in store:
                store[n] = store[n].to(device)
        self._bound = None
        return self

    # ------------------------------------------------------------------------------------------------ value

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple]]:
        """(parameter, stored tensor, anchor, shard groups) per stored parameter, cached per model; the stored
        tensors are cut to the parameter's local shard and moved to its device."""
        if self._bound is not None and self._bound[0] == id(model):
            return self._bound[1]
        named = dict(model.named_parameters())
        store = self.precision if self.kind == "diag" else self.mu
        missing = sorted(set(store) - set(named))
        if missing:
            raise ValueError(f"the model has no parameters {missing[:5]} that the penalty constrains")
        lead = 0 if self.kind == "diag" else 1
        pairs = [(named[n], local_slice(store[n], named[n], lead),
                  local_slice(self.anchor[n], named[n]) if n in self.anchor else None, shard_groups(named[n]))
                 for n in store]
        self._bound = (id(model), pairs)
        return pairs

    @staticmethod
    def _sum_over_shards(parts: list[tuple[torch.Tensor, tuple]]) -> torch.Tensor:
        """Sum per-parameter partial results; the parts of sharded parameters are all-reduced (one call per group)."""
        by_groups: dict[tuple, torch.Tensor] = {}
        for part, groups in parts:
            by_groups[groups] = part if groups not in by_groups else by_groups[groups] + part
        return sum(all_reduce_keeping_local_grad(part, groups) for groups, part in by_groups.items())

    def projections(self, model: nn.Module) -> torch.Tensor:
        """``[K]`` float64 mu_k^T theta for the rank-1 family (differentiable; summed over shards)."""
        return self._sum_over_shards([
            ((mu.flatten(1).float() @ local_tensor(param).flatten().float()).double(), groups)
            for param, mu, _, groups in self._pairs(model)])

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The scalar penalty (already multiplied by lambda), float32, differentiable w.r.t. the model."""
        device = local_tensor(next(model.parameters())).device
        if self.num_tasks == 0 or self.ewc_lambda == 0:
            return torch.zeros((), device=device)
        with torch.autocast(device_type=device.type, enabled=False):
            if self.kind == "diag":
                total = self._sum_over_shards([
                    ((a * (local_tensor(p).float() - m).pow(2)).sum(dtype=torch.float64), groups)
                    for p, a, m, groups in self._pairs(model)])
                value = 0.5 * total + self.constant
            else:
                residual = self.projections(model) - self.b.to(device)
                value = 0.5 * (self.c.to(device) * residual.pow(2)).sum()
        return (self.ewc_lambda * value).float()

    # ---------------------------------------------------------------------------------------- proximal step

    @torch.no_grad()
    def proximal_step(self, model: nn.Module, step_size: float) -> None:
        """Replace theta by argmin_theta 1/2 ||theta - theta~||^2 + step_size * penalty(theta), exactly.

        Rank-1 family (Woodbury, a K x K solve in float64)::

            theta = theta~ - U^T ((step_size C)^-1 + U U^T)^-1 (U theta~ - b),   C = diag(lambda c_k)

        Diagonal: theta_i = (theta~_i + s lambda A_i m_i) / (1 + s lambda A_i) with s = step_size.
        """
        if self.num_tasks == 0 or self.ewc_lambda == 0 or step_size == 0:
            return
        if step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        pairs = self._pairs(model)
        if self.kind == "diag":
            for p, a, m, _ in pairs:
                p = local_tensor(p)
                weight = step_size * self.ewc_lambda * a.float()
                p.copy_(((p.float() + weight * m) / (1.0 + weight)).to(p.dtype))
            return
        scale = step_size * self.ewc_lambda * self.c  # [K], diagonal of step_size * C
        active = scale > 0
        if not bool(active.any()):
            return
        index = torch.nonzero(active).flatten()
        residual = (self.projections(model).cpu() - self.b)[index]
        system = torch.diag(1.0 / scale[index]) + self.gram[index][:, index]
        weights = torch.linalg.solve(system, residual)  # [K_active] float64
        for p, mu, _, _ in pairs:
            p = local_tensor(p)
            w = weights.to(mu.device, torch.float32)
            update = (w @ mu[index.to(mu.device)].flatten(1).float()).view_as(p)
            p.sub_(update.to(p.dtype))

