"""Dense targets: sequential runs fit each matrix to the dense model's outputs (pipeline level).

The maths (exact errors, a better fit than the drifting inputs' own target) is tested in
test_methods.py; here: the pairing of dense and compressed inputs, and the dense stream that
must only ever walk through blocks not yet edited, in every order.
"""

import copy

import pytest
import torch

from vaclm.config import ORDERS
from vaclm.model.blocks import BlockRunner, InputCache
from vaclm.model.surgery import Targets
from vaclm.pipeline.compress import compress_model
from vaclm.pipeline.statistics import paired_input_stats

from conftest import svd_llm_config, tiny_model, token_batch


def _inputs_seen(model, module_name, ids):
    """Every input the module gets on `ids`, as tokens x width."""
    seen = []
    handle = model.get_submodule(module_name).register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paired_statistics_pair_dense_and_edited_inputs_token_by_token(family):
    dense = tiny_model(family)
    edited = copy.deepcopy(dense)
    targets = Targets.of(edited)
    with torch.no_grad():  # edit block 0 so block 1's inputs drift from the dense ones
        for name in targets.per_block[0]:
            edited.get_submodule(name).weight.mul_(0.7)
    calib = token_batch(6, 16)
    runner = BlockRunner(edited, targets.spec, calib, batch_size=2)
    dense_runner = BlockRunner(dense, targets.spec, calib, batch_size=2)
    block1 = Targets.of(dense).per_block[1]
    modules = {n: edited.get_submodule(n) for n in block1}
    prefix = f"{targets.spec.blocks}.1."
    stats, dense_out = paired_input_stats(runner, 1, copy.deepcopy(dense_runner.blocks[1]), dense_runner.inputs_for(1),
                                          runner.inputs_for(1), modules, prefix)
    for name in block1:
        x, x_dense = _inputs_seen(edited, name, calib), _inputs_seen(dense, name, calib)
        assert not torch.allclose(x, x_dense)
        torch.testing.assert_close(stats[name].mean_cross, x_dense.T @ x / len(x), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[name].mean_gram, x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    # the dense copy's outputs are the dense model's inputs of block 2
    for got, want in zip(dense_out, dense_runner.inputs_for(2)):
        torch.testing.assert_close(got, want)


def test_dense_stream_refuses_to_walk_through_an_edited_block():
    cache = InputCache([torch.zeros(1)])
    cache.frozen.add(0)
    with pytest.raises(RuntimeError, match="edited"):
        cache.inputs_for(2, lambda k, x: x)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("within_block", [False, True])
def test_dense_targets_in_every_order_fit_the_dense_model_better(order, within_block):
    """Every order runs (the dense stream never needs an edited block), and on enough calibration
    tokens fitting the dense outputs lowers the error of the last block's output on the calibration data."""
    dense = tiny_model("llama", num_hidden_layers=4)
    calib = token_batch(32, 64)
    spec = Targets.of(dense).spec
    reference = BlockRunner(dense, spec, calib, 8).inputs_for(4)
    errors = {}
    for dense_targets in (False, True):
        model = copy.deepcopy(dense)
        config = svd_llm_config(keep=0.5, order=order, within_block=within_block, dense_targets=dense_targets)
        compress_model(model, config, calib, progress=False)
        out = BlockRunner(model, spec, calib, 8).inputs_for(4)
        errors[dense_targets] = sum((a - b).square().sum().item() for a, b in zip(out, reference))
    assert errors[True] < errors[False]
