"""hf_r1ewc.models: growing a model's label space (new classes from new data), and the methods' state along with it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_dit, make_tiny_unet, tiny_unet_config
from diffusers import UNet2DModel

from hf_r1ewc.methods import Expected, Growth
from hf_r1ewc.models import grow_class_embedding, label_tables


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_growing_the_label_space_keeps_every_old_row_and_starts_new_rows_at_the_learned_mean(kind):
    """4 -> 6 ids: each old id's row is bit-identical (a DiT's null row stays last, as the null id moves to 6), the
    new rows are the mean of the learned classes' rows, the config says 6, and the grown model takes labels 4, 5."""
    model = make_tiny_unet() if kind == "unet" else make_tiny_dit()
    before = {n: t.weight.detach().clone() for n, t in label_tables(model).items()}
    growth = grow_class_embedding(model, 6, learned=[0, 2])
    after = {n: t.weight.detach() for n, t in label_tables(model).items()}
    assert len(growth) == len(before) >= 1
    assert {g.name for g in growth} <= set(dict(model.named_parameters()))  # named as the methods' state keys them
    for name, old in before.items():
        new = after[name]
        assert torch.equal(new[:4], old[:4])
        assert torch.equal(new[4], (old[0] + old[2]) / 2) and torch.equal(new[5], new[4])
        if kind == "dit":  # the null (label dropout) row keeps being last
            assert new.shape[0] == 7 and torch.equal(new[6], old[4])
    config = model.config.num_class_embeds if kind == "unet" else model.config.num_embeds_ada_norm
    assert config == 6 and {g.at for g in growth} == {4}
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([3, 3]), class_labels=torch.tensor([5, 1])).sample.shape == x.shape
    if kind == "dit":
        assert all(m.num_classes == 6 for m in model.modules() if hasattr(m, "token_drop"))


def test_a_model_without_a_label_table_cannot_grow():
    unconditional = UNet2DModel(**{**tiny_unet_config(), "num_class_embeds": None})
    with pytest.raises(ValueError, match="has no class-label table to grow"):
        grow_class_embedding(unconditional, 6, learned=[])


def test_method_state_grows_with_zero_rows_on_the_parameters_axes():
    """A rank-1 penalty's mu [K, rows, D] and a per-parameter [rows, D] state written at 4 rows read at 6: zeros
    inserted at row 4 (before a null row), leading axes kept, other parameters untouched."""
    growth = Growth("emb.weight", 5, 7, 4)
    expected = Expected({"emb.weight": (7, 3), "other": (2,)}, 2, [0, 1], growth=(growth,))
    mu, anchor, other = torch.randn(2, 5, 3), torch.randn(5, 3), torch.randn(2)
    grown = expected.grown({"mu.emb.weight": mu, "anchor.emb.weight": anchor, "anchor.other": other})
    assert grown["mu.emb.weight"].shape == (2, 7, 3) and grown["anchor.emb.weight"].shape == (7, 3)
    assert torch.equal(grown["mu.emb.weight"][:, :4], mu[:, :4]) and torch.equal(
        grown["mu.emb.weight"][:, 6], mu[:, 4]
    )
    assert not grown["mu.emb.weight"][:, 4:6].any() and not grown["anchor.emb.weight"][4:6].any()
    assert grown["anchor.other"] is other
