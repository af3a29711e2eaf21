"""Working with parameters that FSDP2 (``fully_shard``, what Accelerate's ``fsdp_version: 2`` applies) has sharded.

Under FSDP2 every parameter is a ``DTensor`` whose local shard is a slice of the full tensor. The EWC penalty and its
proximal step only need, per parameter, the matching slice of the stored statistics and, per step, an all-reduce of
K scalars (rank-1) or one (diagonal): nothing full-size is gathered during training. Whole weights are gathered at
task boundaries only (``full_model_copy``): for the Fisher pass, evaluation, the saved pipeline and the replay
teacher.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor parameter (FSDP2)."""
    return DTensor is not None and isinstance(param, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is an FSDP2 DTensor."""
    return any(is_sharded(p) for p in model.parameters())


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: the local shard of a DTensor (differentiable), else the parameter itself."""
    return param.to_local() if is_sharded(param) else param


def local_slice(full: torch.Tensor, like: torch.Tensor, leading_dims: int = 0) -> torch.Tensor:
    """The part of ``full`` (shape ``[*lead, *like.shape]``) that matches the local shard of ``like``, on its device.

    ``leading_dims`` extra dimensions in front (the K tasks of a stacked mu) are kept whole. No communication: every
    process holds ``full`` and cuts its own slice with the DTensor's own sharding rule.
    """
    device = local_tensor(like).device
    if not is_sharded(like):
        return full.to(device)
    placements = [Shard(p.dim + leading_dims) if isinstance(p, Shard) else p for p in like.placements]
    return distribute_tensor(full.to(device), like.device_mesh, placements, src_data_rank=None).to_local()


def shard_groups(param: torch.Tensor) -> tuple:
    """The process groups over which a parameter's local contributions must be summed (its sharded mesh dims)."""
    if not is_sharded(param):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(param.placements) if isinstance(p, Shard))


def all_reduce_keeping_local_grad(partial: torch.Tensor, groups: tuple) -> torch.Tensor:
    """The sum of ``partial`` over ``groups``, with gradient flowing only into this process's own ``partial``.

    For a penalty f(sum_r s_r) every process then gets d f / d theta_local = f'(sum) * d s_local / d theta_local,
    the exact gradient for its shard, without the world-size factor an autograd all-reduce would add.
    """
    if not groups:
        return partial
    total = partial.detach().clone()
    for group in groups:
        dist.all_reduce(total, group=group)
    return partial + (total - partial.detach())


@torch.no_grad()
def full_model_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of an FSDP2-sharded diffusers model on every process (one all-gather of the weights); the
    model itself when it is not sharded. Call it on every process."""
    if not model_is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    from torch.distributed.fsdp import FSDPModule

    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses
    copy = plain_class.from_config(model.config)
    copy.load_state_dict(state)
    return copy.to(local_tensor(next(model.parameters())).device)
