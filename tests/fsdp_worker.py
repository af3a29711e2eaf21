"""One process of the 2-process FSDP2 check in test_sharding.py (run by torch.distributed.run on CPU with gloo).

Every process builds the same tiny UNet and the same EWC penalties; a plain copy is the unsharded reference. The
model is then sharded by Accelerate's own ``fsdp2_prepare_model`` with the plugin that accelerate_configs/fsdp.yaml
describes (Accelerate will not build an FSDP ``Accelerator`` on CPU, so a namespace with the attributes that
function reads stands in for it), and we compare,
for each penalty kind: the value, the gradient of (denoising loss + penalty) gathered from the shards, the
proximal step, and the Fisher estimated on the gathered weights with each process's half of the data. Rank 0 writes
the largest relative errors to the JSON file named on the command line.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from conftest import make_tiny_unet
from torch.distributed.fsdp import FSDPModule

from hf_r1ewc.fisher import FisherStatistics, estimate_fisher, trainable_parameters
from hf_r1ewc.models import training_noise_scheduler
from hf_r1ewc.penalty import PENALTY_KINDS, EWCPenalty
from hf_r1ewc.sharding import full_model_copy, model_is_sharded


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def random_penalty(kind: str, names_shapes: dict, num_tasks: int = 3) -> EWCPenalty:
    penalty = EWCPenalty(kind, ewc_lambda=50.0)
    for k in range(num_tasks):
        g = torch.Generator().manual_seed(100 + k)
        rand = {n: torch.randn(s, generator=g) * 0.1 for n, s in names_shapes.items()}
        diag = {n: torch.rand(s, generator=g) for n, s in names_shapes.items()}
        anchor = {n: torch.randn(s, generator=g) * 0.05 for n, s in names_shapes.items()}
        penalty.add_task(FisherStatistics(mu=rand, diag=diag, c_star=0.5 + k, num_samples=8), anchor)
    return penalty


def shard_as_configured(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2-shard ``model`` the way ``accelerate launch --config_file accelerate_configs/fsdp.yaml`` would."""
    config = yaml.safe_load((Path(__file__).parent.parent / "accelerate_configs" / "fsdp.yaml").read_text())
    fsdp = config["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        state_dict_type=fsdp["fsdp_state_dict_type"].lower(),
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
    )
    stand_in = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        parallelism_config=None,
        torch_device_mesh=None,
        device=torch.device("cpu"),
        mixed_precision="no",
        is_main_process=dist.get_rank() == 0,
    )
    return fsdp2_prepare_model(stand_in, model)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    scheduler = training_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    timesteps, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 1, 8, 8, generator=g)
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    errors: dict[str, float] = {}

    def denoise_loss(model, part):
        noisy = scheduler.add_noise(images[part], noise[part], timesteps[part])
        return F.mse_loss(model(noisy, timesteps[part], class_labels=labels[part]).sample, noise[part])

    for kind in PENALTY_KINDS:
        reference = make_tiny_unet()
        shapes = {n: p.shape for n, p in reference.named_parameters()}
        ref_penalty, penalty = random_penalty(kind, shapes), random_penalty(kind, shapes)
        model = shard_as_configured(copy.deepcopy(reference))
        assert model_is_sharded(model)
        errors["fsdp_units"] = float(sum(isinstance(m, FSDPModule) for m in model.modules()))
        penalty.to("cpu")  # statistics stay whole on the CPU; only local slices move next to the shards

        value, ref_value = penalty(model), ref_penalty(reference)
        errors[f"{kind}/value"] = rel(value.detach(), ref_value.detach())
        (denoise_loss(model, mine) + value).backward()
        (denoise_loss(reference, slice(0, 8)) + ref_value).backward()
        errors[f"{kind}/gradient"] = max(
            rel(p.grad.full_tensor(), q.grad) for p, q in zip(model.parameters(), reference.parameters())
        )

        with torch.no_grad():  # move off the anchors so the proximal step has work to do
            for p, q in zip(model.parameters(), reference.parameters()):
                p.to_local().add_(0.01)
                q.add_(0.01)
        penalty.proximal_step(model, 0.05)
        ref_penalty.proximal_step(reference, 0.05)
        gathered = full_model_copy(model)
        assert not model_is_sharded(gathered)
        errors[f"{kind}/proximal_step"] = max(
            rel(p.data, q.data) for p, q in zip(gathered.parameters(), reference.parameters())
        )

    # Fisher on the gathered weights: each process its half of the samples, partial sums all-reduced
    indices = torch.arange(8)
    loader = [(images[mine], labels[mine], indices[mine])]

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    sharded_stats = estimate_fisher(
        gathered,
        scheduler,
        loader,
        generator=torch.Generator().manual_seed(3),
        reduce_sum=all_reduce,
        show_progress=False,
    )
    single = estimate_fisher(
        reference,
        scheduler,
        [(images, labels, indices)],
        generator=torch.Generator().manual_seed(3),
        show_progress=False,
    )
    names = list(trainable_parameters(reference))
    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    errors["fisher/mu"] = rel(flat(sharded_stats.mu), flat(single.mu))
    errors["fisher/diag"] = rel(flat(sharded_stats.diag), flat(single.diag))
    errors["fisher/c_star"] = abs(sharded_stats.c_star - single.c_star) / abs(single.c_star)
    errors["fisher/num_samples"] = float(sharded_stats.num_samples != single.num_samples)
    errors["empty_local_shards"] = float(sum(p.to_local().numel() == 0 for p in model.parameters()))

    worst = torch.tensor([errors[k] for k in sorted(errors)], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(zip(sorted(errors), worst.tolist())), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
