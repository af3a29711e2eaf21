"""What each continual method costs, beside the GD step, on the CPU table-1 model (the (16, 32, 32) UNet at 16x16,
batch 32 real images, 100 replay images per old class, DDIM-20), measured in one run.

    python benchmarks/bench_methods.py [--quick] [--device cpu|cuda]

Per method (built from its --method word and the script's defaults, as the training script builds it) at task 2 of
2-class tasks (classes 0, 1 old; 2, 3 new; 200 training images per class): the training step's median time relative
to the GD step's (interleaved, same run), the memory it holds beyond the model (its tensors, teacher, pool or buffer,
in parameters' worth: bytes / (4 x parameters)), and the seconds of its start of task 2 (teacher, pool, buffer) and
of its end of task 1 (Fisher, importances, exemplars). Writes benchmarks/results/methods_cost{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, interleaved_medians, machine, write_results  # noqa: E402
from _runs import UNET_CONFIG  # noqa: E402

from hf_r1ewc.config import parse_args  # noqa: E402
from hf_r1ewc.continual import fisher_loader, make_optimizer, step_generator  # noqa: E402
from hf_r1ewc.methods import TaskEnd, TaskStart, TrainingSplit  # noqa: E402
from hf_r1ewc.models import training_noise_scheduler  # noqa: E402
from hf_r1ewc.pipeline import sampling_scheduler  # noqa: E402
from hf_r1ewc.recipe import make_learner  # noqa: E402


METHODS = [
    *(
        "naive",
        "gd",
        "rank1+gd",
        "diag+gd",
        "er",
        "er+rank1",
        "er+gd",
        "der",
        "er+der",
        "agem",
        "kd",
        "l2",
        "si",
        "mas",
    ),
    "si+gd",
    "lora",
    "ensemble",
]
ISOLATION_TASKS = 5  # parameter isolation's memory and sampling are measured after this many tasks


def held_bytes(obj, seen: set) -> int:
    """Bytes of the tensors reachable from ``obj`` (attributes, dicts, lists, modules' parameters and buffers), each
    storage counted once."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen:  # an object reached twice (or a cycle: a peft config refers to itself)
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return sum(held_bytes(t, seen) for t in [*obj.parameters(), *obj.buffers()])
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k not in ("noise_scheduler", "accelerator"))
    return 0


def imagenet32_buffer_note(per_class: int = 20, classes: int = 1000, pixels: int = 3 * 32 * 32) -> str:
    """What ER's buffer holds on the ImageNet-32 protocol (arithmetic, not a measurement)."""
    exemplars = per_class * classes
    return (
        f"On the ImageNet-32 protocol (20 tasks of 50 classes, `--streaming`) ER's default buffer ends with {per_class} "
        f"per class x {classes} classes = {exemplars:,} exemplars: {exemplars} x 3x32x32 B = "
        f"{exemplars * pixels / 1e6:.1f} MB as stored (uint8, in each task folder's `er_buffer.safetensors`; A-GEM's "
        f"also in its checkpoints) and {4 * exemplars * pixels / 1e6:.1f} MB as float32 model inputs next to the "
        f"model while it trains (arithmetic, not measured)."
    )


def isolation_costs(
    method: str, model, noise_scheduler, sampler, repeats: int, device, per_class: int = 10, steps: int = 20
) -> dict:
    """A parameter-isolation method after ISOLATION_TASKS 2-class tasks (no training: the structure is what costs):
    the memory beyond one model, per task and in all, and sampling a batch of every class (``per_class`` each,
    DDIM with ``steps``) through its routes against the one model, median of ``repeats`` interleaved runs."""
    from hf_r1ewc.pipeline import sample

    model = copy.deepcopy(model)
    flags = ["--dataset_name", "digits", "--preset", "cpu-small", "--method", method]
    learner = make_learner(parse_args(flags), noise_scheduler)
    for k in range(1, ISOLATION_TASKS + 1):
        classes = [2 * k - 2, 2 * k - 1]
        learner.start_task(TaskStart(k, model, list(range(2 * k - 2)), classes, sampler, None, 0, show_progress=False))
        learner.end_task(TaskEnd(k, model, [], classes, seed=0, show_progress=False))
    seen = {t.untyped_storage().data_ptr() for t in model.parameters()}
    kept = held_bytes(learner.methods, seen)
    isolating = learner.methods[0]
    stored = len(getattr(isolating, "models", None) or getattr(isolating, "adapters", {}))  # models or adapters kept
    routed = learner.serve(model.eval())
    labels = torch.arange(2 * ISOLATION_TASKS).repeat_interleave(per_class)

    def one(m):
        return lambda: sample(m, sampler, labels, steps, torch.Generator().manual_seed(0))

    medians = interleaved_medians({"one model": one(model), "routed": one(routed)}, repeats, device)
    return {
        "tasks": ISOLATION_TASKS,
        "memory_beyond_one_model_mb": kept / 2**20,
        "stored": stored,
        "memory_per_task_mb": kept / 2**20 / stored,
        "sampling_vs_one_model": medians["routed"] / medians["one model"],
        "forwards_per_sampler_step": ISOLATION_TASKS,
    }


def isolation_lines(isolation: dict, num_params: int) -> list[str]:
    if not isolation:
        return []
    lines = [
        f"\n## Parameter isolation after {ISOLATION_TASKS} tasks\n",
        f"Memory the method keeps beyond the one model ({num_params / 1e6:.2f}M parameters = "
        f"{4 * num_params / 2**20:.2f} MB): LoRA's adapters (one per task after the first), the ensemble's frozen "
        "models (one per finished task; a task folder keeps one fewer, its own model being the pipeline's). LoRA at its "
        "default rank 8 on this small UNet adapts 3x3 convolutions of 16-32 channels, where r = 8 is a quarter of a "
        "full layer. Sampling: 100 images, 10 of each of the "
        f"{2 * ISOLATION_TASKS} classes, DDIM-20, routed by label ({ISOLATION_TASKS} forwards per sampler step, one "
        "per route) against the one model's single forward, medians of interleaved runs in this process.\n",
        "| method | trained per task (parameters) | memory per task (MB) | kept after 5 tasks | memory after 5 tasks "
        "beyond one model (MB) | sampling ÷ one model |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in isolation.items():
        lines.append(
            f"| {method} | {r['trained_params']:,} | {r['memory_per_task_mb']:.3f} | {r['stored']} | "
            f"{r['memory_beyond_one_model_mb']:.3f} | {r['sampling_vs_one_model']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 methods, 20 images per class, 3 repeats (< 1 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="2 methods, 4 images per class, 1 repeat (for the tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    methods, per_class, replay, repeats = (
        (["gd", "er+rank1", "lora"], 4, 2, 1)
        if args.tiny
        else (["gd", "rank1+gd", "er"], 20, 10, 3)
        if args.quick
        else (METHODS, 200, 100, 15)
    )
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel.from_config({k: v for k, v in UNET_CONFIG.items() if k != "_class_name"}).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(per_class)
    train = TrainingSplit(torch.rand(len(labels), 1, 16, 16, generator=g) * 2 - 1, labels, "synthetic")
    task1 = labels < 2
    x, y = train.images[~task1][:32].to(device), train.labels[~task1][:32].to(device)
    noise_scheduler = training_noise_scheduler()
    sampler = sampling_scheduler("ddim", noise_scheduler.config)
    accelerator = Accelerator(cpu=device.type == "cpu")
    rows, steps = {}, {}
    base_model = model
    for method in methods:
        model = copy.deepcopy(base_model)  # a method may change the model (LoRA injects its adapter)
        flags = ["--dataset_name", "digits", "--preset", "cpu-small", "--method", method, "--replay_per_class"]
        settings = parse_args([*flags, str(replay), "--num_inference_steps", "20", "--fisher_num_samples", "200"])
        learner = make_learner(settings, noise_scheduler)
        batches = fisher_loader(train.images[task1], train.labels[task1], 200, 64, seed=1)
        learner.start_task(TaskStart(1, model, [], [0, 1], sampler, None, 0, show_progress=False, train=train))
        start = time.perf_counter()
        learner.end_task(TaskEnd(1, model, batches, [0, 1], seed=0, train=train, show_progress=False))
        end_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:  # the replay pool's chunks
            task = TaskStart(2, model, [0, 1], [2, 3], sampler, Path(scratch), 0, show_progress=False, train=train)
            learner.start_task(task)
        start_seconds = time.perf_counter() - start
        extra = held_bytes(learner.methods, {t.untyped_storage().data_ptr() for t in model.parameters()})
        trained = copy.deepcopy(model)  # as the task starts: LoRA's adapter in, the shared weights frozen
        prepared, optimizer = accelerator.prepare(trained, make_optimizer(trained, 1e-3, device=device))
        counter = {"step": 0}

        def step(learner=learner, prepared=prepared, optimizer=optimizer, counter=counter):
            counter["step"] += 1
            generator = step_generator(0, 2, 0, counter["step"], device=device)
            learner.training_step(accelerator, prepared, optimizer, x, y, generator, check_finite=False)

        steps[method] = step
        rows[method] = {
            "extra_memory_params_worth": extra / (4 * num_params),
            "extra_memory_mb": extra / 2**20,
            "start_of_task_s": start_seconds,
            "end_of_task_s": end_seconds,
            "trained_params": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        }
        print(f"{method}: set up (end of task 1 {end_seconds:.1f} s, start of task 2 {start_seconds:.1f} s)")
    medians = interleaved_medians(steps, repeats, device)
    for method, seconds in medians.items():
        rows[method] |= {"step_s": seconds, "step_vs_gd": seconds / medians["gd"]}
    sampling = (1, 2) if args.tiny else (10, 20)  # images per class, sampler steps
    isolation = {
        m: isolation_costs(m, base_model, noise_scheduler, sampler, max(1, repeats // 5), device, *sampling)
        for m in methods
        if m in ("lora", "ensemble")
    }
    name = "methods_cost_tiny" if args.tiny else "methods_cost_quick" if args.quick else "methods_cost"
    scale = {"params": num_params, "per_class": per_class, "replay_per_class": replay, "batch": 32, "repeats": repeats}
    path = write_results(name, {"scale": scale, "methods": rows, "parameter_isolation": isolation})
    lines = [
        "# What each method costs beside GD (CPU table-1 model)\n",
        f"`python benchmarks/bench_methods.py{' --quick' if args.quick else ''}` on {machine()['cpu']}, "
        f"{machine()['cpu_count']} CPU cores, torch {torch.__version__}; the (16, 32, 32) UNet at 16x16 "
        f"({num_params / 1e6:.2f}M parameters), batch 32, {replay} replay images per old class (DDIM-20), Fisher and "
        f"MAS on 200 samples, the cpu-small preset's settings (EWC decoupled at λ = 15000), ER/A-GEM defaults (20 "
        f"exemplars per class, A-GEM reference batch 64). Task 2 of 2-class tasks. Step time: median of {repeats} interleaved steps, relative to the GD step measured in the same run.\n",
        "| method | step ÷ GD step | extra memory (parameters' worth) | extra memory (MB) | start of task (s) | "
        "end of task (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in isolation:
        isolation[method]["trained_params"] = rows[method]["trained_params"]
    for method, r in rows.items():
        lines.append(
            f"| {method} | {r['step_vs_gd']:.2f} | {r['extra_memory_params_worth']:.1f} | {r['extra_memory_mb']:.2f} "
            f"| {r['start_of_task_s']:.1f} | {r['end_of_task_s']:.1f} |"
        )
    lines.append(
        "\nExtra memory counts every tensor the method holds beyond the model: a teacher (1 parameters' worth), the "
        "replay pool (float16 images), the exemplar buffer (float32 images), DER's kept noise and predictions "
        "(float32, 4 draws per exemplar), EWC's statistics, SI's and MAS's per-parameter state; the optimizer's state and activations are the same for all and are not counted."
    )
    lines += isolation_lines(isolation, num_params)
    lines.append("\n" + imagenet32_buffer_note())
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
