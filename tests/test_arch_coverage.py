"""Architecture specs cover their families, and the gradient methods run on gemma2 and olmo2.

test_families.py runs every family (gemma2 and olmo2 included) through the svd-llm pipeline; here:
no linear layer of a decoder block escapes its family's spec (a projection the spec missed would be
left dense and silently uncounted), and the default method and allocation (gfwsvd + knapsack,
backward passes through gemma2's logit soft-capping and olmo2's q/k norms) work on both.
"""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import vaclm
from vaclm.config import CompressConfig
from vaclm.model.arch import decoder_blocks, spec_for, target_names
from vaclm.model.lowrank import LowRankLinear

from conftest import FAMILIES, tiny_model, token_batch


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_in_a_block_is_a_target(family):
    model = tiny_model(family, num_hidden_layers=2)
    spec = spec_for(model.config.model_type)
    linears = {f"{spec.blocks}.{name}" for name, m in decoder_blocks(model, spec).named_modules()
               if isinstance(m, (nn.Linear, Conv1D))}
    targets = [n for block in target_names(model, spec) for n in block]
    assert len(targets) == len(set(targets))
    assert set(targets) == linears


@pytest.mark.filterwarnings("ignore:.*calibration tokens for")  # tiny calibration on purpose
@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_default_method_and_allocation(family):
    model = tiny_model(family)
    ids = token_batch(2, 20, seed=7)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    result = vaclm.compress(model, CompressConfig(keep=0.6, calib_samples=4, calib_seq_len=16), token_batch(4, 16),
                            progress=False)
    assert result.config.method == "gfwsvd" and result.config.allocation == "knapsack"
    assert 0.5 < result.kept_fraction <= 0.6 + 1e-9
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(e >= 0 for e in result.errors.values())
    with torch.no_grad():
        compressed = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(compressed).all() and not torch.allclose(compressed, dense)
