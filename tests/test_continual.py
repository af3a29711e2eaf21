"""hf_r1ewc.continual and the GPU path reproduced on CPU: seeding under gradient accumulation, skipped optimizer
steps, fp32 Fisher under bf16 autocast, reductions on the parameters' device, the Fisher subset, streamed epochs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.continual import ContinualLearner, NonFiniteLossError, fisher_loader, step_generator
from hf_r1ewc.fisher import FisherStatistics, FisherSums, estimate_fisher, subset_indices
from hf_r1ewc.methods import EWC, GenerativeDistillation, TaskStart
from hf_r1ewc.methods.generative_distillation import Replay
from hf_r1ewc.penalty import EWCPenalty


ROOT = Path(__file__).resolve().parent.parent
SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def ewc_learner(penalty: EWCPenalty, ewc_mode: str = "loss", *more) -> ContinualLearner:
    """A learner whose EWC method holds ``penalty`` (already consolidated tasks)."""
    method = EWC(SCHEDULER, penalty.kind, penalty.ewc_lambda, ewc_mode)
    method.penalty_module = penalty
    return ContinualLearner(SCHEDULER, [method, *more])


def _batches(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 4, (n,), generator=g)


def test_step_generators_never_collide():
    """(seed, task, epoch, micro-step, process) -> distinct streams, also from 8 processes up, where the old
    (seed * 1_000_003 + step) * 8 + process formula collided."""
    keys = [(t, e, s, p) for t in (1, 2) for e in (0, 1) for s in range(40) for p in range(16)]
    first_draws = {tuple(torch.randint(0, 2**62, (2,), generator=step_generator(0, *k)).tolist()) for k in keys}
    assert len(first_draws) == len(keys)
    a = torch.rand(3, generator=step_generator(0, 1, 0, 5, 0))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, 1, 0, 5, 0)))  # reproducible (resume)


def test_accumulation_micro_batches_draw_different_noise(tmp_path, monkeypatch):
    """Every micro-batch of an accumulation window gets its own t, eps and replay draw (the seed used to follow
    the optimizer step, so the 2 micro-batches of a window drew the same noise)."""
    import hf_r1ewc.continual as continual

    seen = []
    real_forward = continual.ContinualLearner._forward

    def recording(self, model, images, labels, generator):
        seen.append(
            torch.rand(
                4,
                generator=generator.clone_state()
                if hasattr(generator, "clone_state")
                else torch.Generator().manual_seed(generator.initial_seed()),
            ).tolist()
        )
        return real_forward(self, model, images, labels, generator)

    monkeypatch.setattr(continual.ContinualLearner, "_forward", recording)
    sys.path.insert(0, str(ROOT))
    import train_continual_ddpm

    train_continual_ddpm.main(
        [
            "--dataset_name",
            "digits",
            "--preset",
            "demo",
            "--tasks",
            "0,1",
            "--num_epochs_per_task",
            "1",
            "--train_batch_size",
            "16",
            "--max_train_per_class",
            "32",
            "--gradient_accumulation_steps",
            "2",
            "--fid_backend",
            "none",
            "--ewc_type",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert len(seen) == 4 and len({tuple(s) for s in seen}) == 4


def test_no_proximal_step_or_ema_update_after_a_skipped_optimizer_step():
    """fp16's gradient scaler skips steps with inf/nan gradients; the decoupled penalty must not move theta then.
    A real torch.amp.GradScaler on CPU (Accelerate builds none for CPU, so it is set here) sees an inf gradient
    (a hook on one parameter) and skips the step, as it does after an fp16 overflow on a GPU."""
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    unet = make_tiny_unet()
    next(unet.parameters()).register_hook(lambda grad: grad * float("inf"))
    penalty = EWCPenalty("rank1", 1e6)
    mu = {n: torch.randn_like(p) for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 1.0, 8), {n: p.detach() + 0.1 for n, p in unet.named_parameters()})
    learner = ewc_learner(penalty, "decoupled")
    ema = EMAModel(unet.parameters(), decay=0.5)
    model, optimizer = accelerator.prepare(unet, torch.optim.Adam(unet.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(4)
    out = learner.training_step(accelerator, model, optimizer, x, y, torch.Generator().manual_seed(0), ema)
    assert accelerator.optimizer_step_was_skipped and out.optimizer_stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert ema.optimization_step == 0


def test_non_finite_term_is_named():
    accelerator = Accelerator(cpu=True)
    unet = make_tiny_unet()
    penalty = EWCPenalty("rank1_unscaled", 1e300)
    mu = {n: torch.ones_like(p) for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 1.0, 8), {n: p.detach() + 1 for n, p in unet.named_parameters()})
    model, optimizer = accelerator.prepare(unet, torch.optim.Adam(unet.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError) as err:
        ewc_learner(penalty).training_step(
            accelerator, model, optimizer, *_batches(4), torch.Generator().manual_seed(0)
        )
    assert err.value.term == "ewc"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was updated


def _fisher(model, loader, kinds, reduce_sum=None):
    return estimate_fisher(
        model,
        SCHEDULER,
        loader,
        kinds=kinds,
        generator=torch.Generator().manual_seed(3),
        reduce_sum=reduce_sum,
        show_progress=False,
    )


@pytest.mark.parametrize("kinds", [("rank1",), ("diag",), ("rank1", "diag")])
def test_fisher_reduces_only_tensors_on_the_parameters_device(kinds):
    """NCCL reduces GPU tensors only: every tensor handed to reduce_sum lives on the parameters' device, for every
    kind (rank-1 alone used to build its second-pass sums on the CPU)."""
    model = make_tiny_unet()
    x, y = _batches(8)
    devices = []

    def recording(t):
        devices.append(t.device)
        return t

    _fisher(model, [(x, y)], kinds, recording)
    assert devices and set(devices) == {next(model.parameters()).device}
    FisherSums(count=3, proj_sq_sum=2.0).all_reduce(
        lambda t: devices.append(t.device) or torch.zeros(t.shape, dtype=t.dtype), torch.device("meta")
    )
    assert devices[-1] == torch.device("meta")  # the scalars follow the device asked for, not a CPU default


def test_fisher_is_fp32_under_accelerate_bf16_autocast():
    """The model Accelerate prepared with bf16 keeps its autocast forward after unwrap_model (keep_fp32_wrapper=True
    is the default): the Fisher must still be the fp32 one (<= 1e-5 relative)."""
    reference_model = make_tiny_unet().eval()
    x, y = _batches(16)
    reference = _fisher(reference_model, [(x, y)], ("rank1", "diag"))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.unwrap_model(accelerator.prepare(make_tiny_unet()))
    assert "forward" in prepared.__dict__  # the autocast wrapper is there
    with torch.no_grad():
        assert not torch.equal(
            prepared(x, torch.full((16,), 500), class_labels=y).sample,
            reference_model(x, torch.full((16,), 500), class_labels=y).sample,
        )
    stats = _fisher(prepared, [(x, y)], ("rank1", "diag"))
    assert stats.c_star == pytest.approx(reference.c_star, rel=1e-5)
    for name in reference.mu:
        torch.testing.assert_close(stats.mu[name], reference.mu[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(stats.diag[name], reference.diag[name], rtol=1e-5, atol=1e-12)
    assert "forward" in prepared.__dict__  # and it is put back


def test_fisher_subset_is_random_and_independent_of_the_process_count():
    """--fisher_num_samples takes a seeded random subset (not the first N of a class-sorted task), the same one
    whatever the number of processes sharing it."""
    labels = torch.tensor([0] * 50 + [1] * 50)  # sorted by class, as IDX and most Hub datasets are
    images = torch.arange(100).float().view(100, 1, 1, 1)
    chosen = subset_indices(100, 20, seed=7)
    assert len(chosen) == 20 and set(labels[chosen].tolist()) == {0, 1}
    assert torch.equal(chosen, subset_indices(100, 20, seed=7)) and not torch.equal(chosen, subset_indices(100, 20, 8))
    one = torch.cat([b[2] for b in fisher_loader(images, labels, 20, 8, seed=7)])
    two = torch.cat(
        [b[2] for r in range(2) for b in fisher_loader(images, labels, 20, 8, seed=7, rank=r, world_size=2)]
    )
    assert sorted(one.tolist()) == sorted(two.tolist()) == chosen.tolist()
    assert len(subset_indices(10, None, 0)) == 10 and len(subset_indices(10, 50, 0)) == 10


def test_streamed_epoch_end_closes_the_accumulation_window():
    """A streamed loader (not prepared by Accelerate) tells the GradientState where its epoch ends: with 3 batches
    per epoch and 2 accumulation steps, each epoch syncs after batches 2 and 3; nothing spills into the next."""
    import datasets

    from hf_r1ewc.data import StreamedTaskLoader

    rows = {"pixel_values": [[[[0.0]]]] * 12, "class_labels": list(range(12))}
    stream = datasets.Dataset.from_dict(rows).to_iterable_dataset().with_format("torch")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    loader = StreamedTaskLoader(stream, batch_size=4, num_batches=3)
    syncs = []
    for _ in range(2):
        for _batch in loader:
            with accelerator.accumulate(model):
                syncs.append(accelerator.sync_gradients)
    assert syncs == [False, True, True, False, True, True]


def test_penalty_gradient_ratio_against_separate_backward_passes():
    """||grad lambda*EWC|| / ||grad of the rest||, measured from one step's gradients, equals the ratio of two
    separate backward passes (in the loss: the penalty's gradient is taken out of the total)."""
    accelerator = Accelerator(cpu=True)
    unet = make_tiny_unet()
    penalty = EWCPenalty("rank1", 50.0)
    g = torch.Generator().manual_seed(1)
    mu = {n: torch.randn(p.shape, generator=g) for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 1.0, 8), {n: p.detach() + 0.01 for n, p in unet.named_parameters()})
    x, y = _batches(4)
    params = list(unet.parameters())
    rest = torch.autograd.grad(
        ContinualLearner(SCHEDULER).loss(unet, x, y, torch.Generator().manual_seed(0))["loss"], params
    )
    pen = torch.autograd.grad(penalty(unet), params)
    norm = lambda gs: sum(float(t.double().pow(2).sum()) for t in gs) ** 0.5  # noqa: E731
    model, optimizer = accelerator.prepare(unet, torch.optim.SGD(unet.parameters(), lr=0.0))
    out = ewc_learner(penalty).training_step(
        accelerator, model, optimizer, x, y, torch.Generator().manual_seed(0), measure_penalty=True
    )
    assert out.penalty_gradient_ratio == pytest.approx(norm(pen) / norm(rest), rel=1e-4)


def test_penalty_gradient_ratio_is_not_reported_under_a_gradient_scaler():
    """Under fp16's scaler the gradients are still scaled when the ratio would be taken (the penalty's are not):
    no number rather than a wrong one."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    unet = make_tiny_unet()
    penalty = EWCPenalty("rank1", 50.0)
    mu = {n: torch.ones_like(p) for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 1.0, 8), {n: p.detach() + 0.01 for n, p in unet.named_parameters()})
    model, optimizer = accelerator.prepare(unet, torch.optim.SGD(unet.parameters(), lr=0.0))
    out = ewc_learner(penalty).training_step(
        accelerator, model, optimizer, *_batches(4), torch.Generator().manual_seed(0), measure_penalty=True
    )
    assert out.penalty_gradient_ratio is None


def _learner_with_a_task(unet, ewc_mode: str, lam: float = 1e3) -> ContinualLearner:
    penalty = EWCPenalty("rank1", lam)
    g = torch.Generator().manual_seed(3)
    mu = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 2.0, 8), {n: p.detach() + 0.01 for n, p in unet.named_parameters()})
    return ewc_learner(penalty, ewc_mode)


@pytest.mark.parametrize("ewc_mode", ["loss", "decoupled"])
def test_own_loop_with_an_lr_scheduler_matches_training_step(ewc_mode):
    """``loss`` + backward + optimizer + LR scheduler + ``after_optimizer_step``, written out as a user's loop,
    gives the weights ``training_step`` gives when the learning rate is changed between its steps the same way."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    weights = []
    for own_loop in (True, False):
        accelerator = Accelerator(cpu=True)
        unet = make_tiny_unet()
        learner = _learner_with_a_task(unet, ewc_mode)
        optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
        schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=6)
        model, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
        for step in range(6):
            x, y = _batches(8, seed=step)
            generator = step_generator(0, 1, 0, step, 0)
            if own_loop:
                with accelerator.accumulate(model):
                    terms = learner.loss(model, x, y, generator)
                    accelerator.backward(terms["loss"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                learner.after_optimizer_step(model, optimizer.param_groups[0]["lr"])
                assert terms["ewc"].item() > 0 if ewc_mode == "loss" else terms["ewc"].item() == 0
            else:
                learner.training_step(accelerator, model, optimizer, x, y, generator)
            schedule.step()
        weights.append([p.detach().clone() for p in accelerator.unwrap_model(model).parameters()])
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    untouched = make_tiny_unet()
    assert any(not torch.equal(a, b) for a, b in zip(weights[0], untouched.parameters()))


def test_learner_state_round_trips_through_safetensors_checked_against_the_model(tmp_path):
    """``state_dict`` is safetensors-ready: a fresh learner loaded from the file has the same penalty value; a learner
    without that method refuses the state, and so does a model of other shapes."""
    from safetensors.torch import load_file, save_file

    from hf_r1ewc.methods import Expected

    unet = make_tiny_unet()
    learner = _learner_with_a_task(unet, "loss")
    save_file(learner.state_dict(), str(tmp_path / "state.safetensors"))
    state = load_file(str(tmp_path / "state.safetensors"))
    fresh = ContinualLearner(SCHEDULER, [EWC(SCHEDULER, "rank1", 1.0)])
    fresh.load_state_dict(state, Expected.of(unet, [[0, 1]], 1))
    restored, saved = fresh.method("rank1").penalty_module, learner.method("rank1").penalty_module
    assert restored.num_tasks == 1 and restored.ewc_lambda == 1e3
    assert torch.equal(restored(unet).detach(), saved(unet).detach())
    with pytest.raises(ValueError, match=r"holds methods \['rank1'\] that this learner \(\['diag'\]\) does not"):
        ContinualLearner(SCHEDULER, [EWC(SCHEDULER, "diag", 1.0)]).load_state_dict(state, Expected.of(unet, [[0]], 1))
    with pytest.raises(ValueError, match=r"rank1: .*shape"):
        fresh.load_state_dict(state, Expected.of(make_tiny_unet(num_classes=6), [[0, 1]], 1))


def test_the_first_non_finite_term_in_the_loss_order_is_named():
    """NaN images (denoise NaN) and a penalty that overflows (ewc inf): denoise, first in the loss's order, is named."""
    accelerator = Accelerator(cpu=True)
    unet = make_tiny_unet()
    penalty = EWCPenalty("rank1_unscaled", 1e300)
    mu = {n: torch.ones_like(p) for n, p in unet.named_parameters()}
    penalty.add_task(FisherStatistics(mu, None, 1.0, 8), {n: p.detach() + 1 for n, p in unet.named_parameters()})
    model, optimizer = accelerator.prepare(unet, torch.optim.Adam(unet.parameters()))
    images, labels = _batches(4)
    learner = ewc_learner(penalty)
    with pytest.raises(NonFiniteLossError) as err:
        learner.loss(model, images * float("nan"), labels, torch.Generator().manual_seed(0))
    assert err.value.term == "denoise"
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("make", ["unet", "dit"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make):
    """--gradient_checkpointing trades compute for memory only: the learner's loss and every gradient agree."""
    from conftest import make_tiny_dit

    images, labels = _batches(8)
    learner = ContinualLearner(SCHEDULER)
    results = []
    for checkpointed in (False, True):
        model = (make_tiny_unet() if make == "unet" else make_tiny_dit()).train()
        if checkpointed:
            model.enable_gradient_checkpointing()
        loss = learner.loss(model, images, labels, torch.Generator().manual_seed(3))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain), (loss, grads) = results
    assert torch.equal(loss, plain_loss)
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records where a tensor's value is read back to Python (item, float, bool: ``_local_scalar_dense``; and
    ``tolist``, which bypasses the dispatcher), each of which waits for a GPU, from code outside torch.optim, whose
    non-capturable Adam keeps its step count on the host by design (fused Adam on CUDA keeps it on the device)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def _record(self) -> None:
        import traceback

        frames = [
            f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename or "torch/optim" in f.filename
        ]
        if not any("torch/optim" in f.filename for f in frames):
            self.reads.append(f"{frames[-1].filename}:{frames[-1].lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(tensor):
            self._record()
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _gd_rank1_learner(unet, max_grad_norm=None):
    from hf_r1ewc.distill import ReplayPool, frozen_teacher

    learner = _learner_with_a_task(unet, "loss")
    g = torch.Generator().manual_seed(5)
    pool = ReplayPool((torch.rand(16, 1, 8, 8, generator=g) * 2 - 1).half(), torch.arange(16) % 2)
    gd = GenerativeDistillation(per_class=8)
    gd.replay = Replay(frozen_teacher(unet), [0, 1], pool)
    return ContinualLearner(SCHEDULER, [*learner.methods, gd], max_grad_norm)


def test_the_training_step_never_reads_a_value_back_to_the_host():
    """The script's step (GD replay, teacher, rank-1 penalty in the loss, EMA, gradient accumulation and clipping,
    check_finite=False) reads nothing back: the device never has to drain between steps. The checked step reads
    the three terms once."""
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    unet = make_tiny_unet()
    learner = _gd_rank1_learner(unet, max_grad_norm=1.0)
    ema = EMAModel(unet.parameters(), decay=0.9)
    model, optimizer = accelerator.prepare(unet, torch.optim.Adam(unet.parameters(), lr=1e-3, foreach=True))
    x, y = _batches(4)
    for i in range(4):
        with _HostReads() as reads:
            out = learner.training_step(accelerator, model, optimizer, x, y, step_generator(0, i), ema, False, False)
        assert reads.reads == [], reads.reads
        assert out.terms.shape == (4,) and out.optimizer_stepped == (i % 2 == 1)
    with _HostReads() as reads:
        learner.training_step(accelerator, model, optimizer, x, y, step_generator(0, 9), ema)
    assert len(reads.reads) == 1  # one tolist of the three checked terms
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_loss_log_reads_many_steps_at_once_and_names_the_first_non_finite_one():
    """Terms as each step returns them; read returns them in order, in one go; a NaN in step 3's distill term (and
    an inf in step 4's denoise) raises for step 3's distill, and the log starts empty after a read."""
    from hf_r1ewc.continual import LossLog, StepOutput

    log = LossLog()
    rows = [[1.0, 0.5, 0.5, 0.0], [2.0, 1.0, 1.0, 0.0]]
    for step, row in enumerate(rows, 1):
        log.append(StepOutput(torch.tensor(row), True), step)
    with _HostReads() as reads:
        assert log.read() == rows
    assert len(reads.reads) == 1 and log.read() == []
    log.append(StepOutput(torch.tensor([1.0, 0.5, 0.5, 0.0]), True), 2)
    log.append(StepOutput(torch.tensor([float("nan"), 0.5, float("nan"), 0.0]), True), 3)
    log.append(StepOutput(torch.tensor([float("inf"), float("inf"), 0.0, 0.0]), True), 4)
    with pytest.raises(NonFiniteLossError) as err:
        log.read()
    assert (err.value.term, err.value.step) == ("distill", 3) and log.read() == []


def test_a_device_generator_draws_the_step_where_the_model_is():
    """The step's noise, timesteps and replay indices come from the generator's device (no host copy); on the CPU
    a generator made for the device draws exactly what the host generator draws, so CPU runs are unchanged."""
    from hf_r1ewc.distill import ReplayPool

    unet = make_tiny_unet()
    x, y = _batches(4)
    pool = ReplayPool((torch.rand(16, 1, 8, 8) * 2 - 1).half(), torch.arange(16) % 2)
    host = step_generator(0, 1, 2, device="cpu")
    on_device = step_generator(0, 1, 2, device=torch.device("cpu"))
    assert on_device.device == torch.device("cpu")
    gd = GenerativeDistillation(per_class=8)
    gd.replay = Replay(unet, [0, 1], pool)
    learner = ContinualLearner(SCHEDULER, [gd])
    assert torch.equal(learner.loss(unet, x, y, host)["loss"], learner.loss(unet, x, y, on_device)["loss"])
    moved = pool.to("meta")
    assert moved.images.device.type == "meta" and pool.images.device.type == "cpu"


def test_a_compiled_student_and_teacher_match_eager_and_compile_once(tmp_path):
    """Accelerate compiles the student (as --compile asks), start_task the teacher the same way: the GD + rank-1 step
    gives eager's loss and gradients, dynamo breaks no graph, and after the first step nothing recompiles (static
    shapes). The backend here is aot_eager (dynamo's capture and AOT autograd, what a compile can get wrong in our
    code); inductor's kernels take minutes to build on 2 CPU cores and are measured in bench_throughput instead."""
    from accelerate.utils import TorchDynamoPlugin
    from torch._dynamo.utils import counters

    from hf_r1ewc.methods import compile_like_student
    from hf_r1ewc.pipeline import sampling_scheduler

    torch._dynamo.reset()
    counters.clear()
    results = {}
    for backend in ("no", "aot_eager"):
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend=backend, dynamic=False))
        probe = torch.nn.Linear(1, 1)
        assert (compile_like_student(probe, accelerator) is probe) == (backend == "no")
        unet = make_tiny_unet()
        gd = GenerativeDistillation(per_class=4, num_inference_steps=2)
        learner = ContinualLearner(SCHEDULER, [*_learner_with_a_task(unet, "loss").methods, gd])
        sampler = sampling_scheduler("ddim", SCHEDULER.config)
        learner.start_task(TaskStart(2, unet, [0, 1], [2, 3], sampler, tmp_path / backend, 0, accelerator, False))
        assert isinstance(gd.replay.teacher, torch._dynamo.eval_frame.OptimizedModule) == (backend != "no")
        model, optimizer = accelerator.prepare(unet, torch.optim.SGD(unet.parameters(), lr=0.05))
        x, y = _batches(4)
        terms, graphs = [], []
        for i in range(4):
            out = learner.training_step(accelerator, model, optimizer, x, y, step_generator(0, i), check_finite=False)
            terms.append(out.terms)
            graphs.append(counters["stats"]["unique_graphs"])
        results[backend] = (torch.stack(terms), [p.detach().clone() for p in unet.parameters()], graphs)
        AcceleratorState._reset_state(reset_partial_state=True)
    terms, weights, graphs = results["aot_eager"]
    torch.testing.assert_close(terms, results["no"][0], rtol=1e-5, atol=1e-6)  # every step's loss terms
    for a, b in zip(weights, results["no"][1]):  # the weights 4 SGD steps made: the gradients agreed
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs  # compiled at step 1, never again
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_methods_compose_in_one_forward_and_the_gradient_hook_runs_before_the_step():
    """Two methods' extra batches join the one forward in method order; the denoising loss is the mean over the
    real rows and the rows that join it, weighted (by hand); a method's term joins the loss and is logged under its name;
    after_backward runs once per accumulation window, after backward and before the optimizer step (a hook that
    zeroes the gradients leaves SGD's weights unchanged)."""
    from hf_r1ewc.methods import ContinualMethod, ExtraBatch, Term

    g = torch.Generator().manual_seed(4)
    batches = {"a": (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([2, 3, 2])), "b": _batches(2, seed=5)}

    class Extra(ContinualMethod):
        def __init__(self, name, denoise_weight, term=None):
            self.name, self.denoise_weight, self.term, self.hook_calls = name, denoise_weight, term, 0

        def extra_batch(self, batch_size, generator, device):
            return ExtraBatch(*batches[self.name], self.denoise_weight)

        def loss_terms(self, step):
            if self.term is None:
                return {}
            value = step.prediction[step.slices[self.name]].float().pow(2).mean()
            return {self.term: Term(2.0 * value, value.detach())}

        def after_backward(self, model):
            self.hook_calls += 1
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            for p in model.parameters():
                p.grad.zero_()

    a, b = Extra("a", denoise_weight=0.0, term="size"), Extra("b", denoise_weight=0.5)
    learner = ContinualLearner(SCHEDULER, [a, b])
    assert learner.term_names == ("loss", "denoise", "distill", "ewc", "size")
    unet = make_tiny_unet().eval()
    x, y = _batches(4)
    terms = learner.loss(unet, x, y, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat([x, batches["a"][0], batches["b"][0]])
    labels = torch.cat([y, batches["a"][1], batches["b"][1]])
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (9,), generator=gen)
    with torch.no_grad():
        pred = unet(SCHEDULER.add_noise(x0, noise, t), t, class_labels=labels).sample
    per_row = (pred - noise).pow(2).flatten(1).mean(1)
    denoise = (per_row[:4].sum() + 0.5 * per_row[7:].sum()) / 6  # b's rows at half weight, a's not at all
    assert float(terms["denoise"]) == pytest.approx(float(denoise), rel=1e-6)
    assert float(terms["size"]) == pytest.approx(float(pred[4:7].pow(2).mean()), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(denoise + 2 * pred[4:7].pow(2).mean()), rel=1e-6)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(unet, torch.optim.SGD(unet.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(4):
        out = learner.training_step(accelerator, model, optimizer, x, y, step_generator(0, i), check_finite=False)
        assert out.terms.shape == (5,)
    assert a.hook_calls == b.hook_calls == 2  # once per window of 2 micro-batches
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    AcceleratorState._reset_state(reset_partial_state=True)
