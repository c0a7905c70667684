"""--depth-tilt: the knapsack weighs later blocks' loss estimates more, under the same budget."""

import math

import pytest

import vaclm
from vaclm.config import CompressConfig
from vaclm.pipeline.knapsack import depth_weights

from conftest import token_batch, tiny_model


def block_cost(result, block):
    prefix = f"model.layers.{block}."
    return sum(m["cost"] for n, m in result.allocation.items() if n.startswith(prefix))


def test_depth_weights_grow_from_one_to_exp_tilt():
    per_block = [["a0", "b0"], ["a1"], ["a2"]]
    w = depth_weights(per_block, 2.0)
    assert w["a0"] == w["b0"] == 1.0 and w["a1"] == pytest.approx(math.e) and w["a2"] == pytest.approx(math.e ** 2)
    assert depth_weights(per_block, 0.0) == {}


def test_positive_tilt_moves_budget_to_later_blocks_and_keeps_the_budget():
    calib = token_batch(8, 24)
    runs = {}
    for tilt in (0.0, 4.0):
        config = CompressConfig(keep=0.5, method="gfwsvd", allocation="knapsack", calib_samples=8, calib_seq_len=24,
                                depth_tilt=tilt)
        runs[tilt] = vaclm.compress(tiny_model("llama", num_hidden_layers=4), config, calib, progress=False)
    flat, tilted = runs[0.0], runs[4.0]
    total = sum(o * i for o, i in flat.shapes.values())
    largest_step = max(8 * (o + i) for o, i in flat.shapes.values())
    for r in (flat, tilted):
        assert 0.5 - largest_step / total <= r.kept_fraction <= 0.5
    assert block_cost(tilted, 3) > block_cost(flat, 3) and block_cost(tilted, 0) < block_cost(flat, 0)
    # the report keeps the method's own loss estimates, not the tilted weights
    same = [n for n in flat.ranks if flat.ranks[n] == tilted.ranks[n] and flat.ranks[n] is not None
            and n.startswith("model.layers.3.")]
    for n in same:
        assert tilted.allocation[n]["estimated_loss"] == pytest.approx(flat.allocation[n]["estimated_loss"])


@pytest.mark.parametrize("bad", [float("nan"), 50.0])
def test_depth_tilt_out_of_range_is_refused(bad):
    with pytest.raises(vaclm.VaclmError, match="depth tilt"):
        CompressConfig(depth_tilt=bad)
