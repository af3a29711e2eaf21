"""hf_r1ewc.methods.agem: the reference gradient on a memory batch (by hand) and the projection: g^T g_ref < 0 ->
g - (g^T g_ref / ||g_ref||^2) g_ref, orthogonal to g_ref after; g^T g_ref >= 0 -> g untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from hf_r1ewc.methods import AGEM, Expected, TaskEnd, TaskStart, TrainingSplit


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def _agem_with_memory(unet) -> AGEM:
    g = torch.Generator().manual_seed(0)
    train = TrainingSplit(torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2] * 4), "sha")
    agem = AGEM(SCHEDULER, per_class=2, batch_size=3)
    agem.start_task(TaskStart(1, unet, [], [0, 1], seed=4, train=train))
    agem.end_task(TaskEnd(1, unet, [], [0, 1], seed=4, train=train))
    agem.start_task(TaskStart(2, unet, [0, 1], [2], seed=4, train=train))
    return agem


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])


def test_the_reference_gradient_is_the_memory_batchs_loss_gradient():
    unet = make_tiny_unet().eval()
    agem = _agem_with_memory(unet)
    params = list(unet.parameters())
    reference = agem.reference_gradient(unet, params)
    generator = torch.Generator().manual_seed((4 * 1_000_003 + 2 * 10_007 + 0) * 1_000_033 + 0)
    index = torch.randint(0, 4, (3,), generator=generator)
    images, labels = agem.memory.images[index], agem.memory.labels[index]
    assert set(labels.tolist()) <= {0, 1}  # only the old classes' exemplars
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, 1000, (3,), generator=generator)
    loss = (unet(SCHEDULER.add_noise(images, noise, t), t, class_labels=labels).sample - noise).pow(2).mean()
    by_hand = torch.autograd.grad(loss, params)
    torch.testing.assert_close(_flat(reference), _flat(by_hand), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_the_gradient_is_projected_only_when_it_conflicts(sign):
    unet = make_tiny_unet().eval()
    agem = _agem_with_memory(unet)
    params = list(unet.parameters())
    reference = _flat(agem.reference_gradient(unet, params))
    agem.count = 0  # the hook draws the same memory batch again
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    direction -= (direction @ reference) / (reference @ reference) * reference  # orthogonal to g_ref
    grad = direction + sign * 0.5 * reference  # g^T g_ref has the sign of ``sign``
    for p, piece in zip(params, grad.split([p.numel() for p in params])):
        p.grad = piece.view_as(p).float().clone()
    grad = _flat(p.grad for p in params)  # as float32 holds it
    agem.after_backward(unet)
    after = _flat(p.grad for p in params)
    if sign < 0:
        expected = grad - (grad @ reference) / (reference @ reference) * reference
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-7)
        assert abs(float(after @ reference)) < 1e-6 * float(reference.norm() * after.norm())
        assert agem.projected == 1
    else:
        assert torch.equal(after, grad)
        assert agem.projected == 0


@pytest.mark.parametrize(
    "state, message",
    [
        ({"indices": [0, 1], "count": 3, "projected": 4}, r"projected is 4, outside \[0, 3\]"),
        ({"indices": [0, 1], "count": -1, "projected": 0}, r"count is -1"),
        ({"indices": [0, 5], "count": 3, "projected": 1}, r"exemplars of classes \[2\]"),
        ({"indices": [0, 1], "count": 3}, "without 'count' and 'projected'"),
        ({"count": 3, "projected": 1}, r"the buffer's state holds \[\], not \['indices'\]"),
    ],
)
def test_a_checkpoints_agem_state_is_checked_before_it_is_taken(state, message):
    """A-GEM's state within a task (its memory and the counts that seed the next reference batch) comes from a
    checkpoint: checked against the finished tasks and the training split like a task folder's buffer."""
    train = TrainingSplit(torch.rand(12, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2] * 4), "sha")
    agem = AGEM(SCHEDULER, per_class=1)
    expected = Expected.of(make_tiny_unet(), [[0, 1], [2]], 1, train, within_task=True)
    tensors = {k: torch.tensor(v) for k, v in state.items()}
    with pytest.raises(ValueError, match=message):
        agem.load_state_dict(tensors, expected)
    assert len(agem.memory.indices) == 0 and agem.count == 0
    agem.load_state_dict(
        {"indices": torch.tensor([0, 1]), "count": torch.tensor(3), "projected": torch.tensor(1)}, expected
    )
    assert agem.memory.indices.tolist() == [0, 1] and (agem.count, agem.projected) == (3, 1)
