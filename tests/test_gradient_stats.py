"""gradient_stats checked against plain per-sample autograd on a tiny float64 Llama.

The reference never looks at how the code forms its statistics: one ordinary forward and
`torch.autograd.grad` per calibration sequence, of the next-token cross-entropy written out here,
with respect to every target's output (held by a forward hook) and to its weight (the per-sample
weight gradient, formed by autograd rather than as G^T X). From those:
  cov[o, o']      = sum over samples and tokens of g_o g_o'            (B before the mean)
  mean_cov        = cov / (samples * tokens per sample)                 (a mean over tokens)
  sq_sum[o]       = sum over samples and tokens of g_o^2                (the diagonal of cov)
  fisher_rows[o]  = sum over samples and input columns of (dL_n/dW)^2[o, i]
  fisher_cols[i]  = sum over samples and output rows of (dL_n/dW)^2[o, i]
where L_n is sample n's mean next-token loss.
"""

import pytest
import torch
import torch.nn.functional as F

from vaclm.linalg.stats import GradientStats
from vaclm.model.arch import get_submodule, spec_for, target_names

from conftest import tiny_model, token_batch

try:  # moved by the refactor; the function keeps its name
    from vaclm.pipeline.statistics import gradient_stats
except ImportError:
    from vaclm.model.statistics import gradient_stats

SAMPLES, SEQ_LEN = 3, 12


def targets(model):
    spec = spec_for(model.config.model_type)
    return {n: get_submodule(model, n) for block in target_names(model, spec) for n in block}


def reference(model, modules, calib):
    """Per-sample autograd: {name: {field: tensor}} in float64."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n, m in modules.items()]
    names = list(modules)
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    acc = {n: {"cov": 0, "sq_sum": 0, "fisher_rows": 0, "fisher_cols": 0} for n in names}
    try:
        for w in weights:
            w.requires_grad_(True)
        for ids in calib:
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1], ids[1:])  # the sequence's mean next-token loss
            grads = torch.autograd.grad(loss, [outputs[n] for n in names] + weights)
            for k, n in enumerate(names):
                g, weight_grad = grads[k][0], grads[len(names) + k]  # tokens x out, out x in
                a = acc[n]
                a["cov"] = a["cov"] + g.T @ g
                a["sq_sum"] = a["sq_sum"] + g.square().sum(0)
                a["fisher_rows"] = a["fisher_rows"] + weight_grad.square().sum(1)
                a["fisher_cols"] = a["fisher_cols"] + weight_grad.square().sum(0)
    finally:
        for h in hooks:
            h.remove()
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return acc


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_hidden_layers=2).double()
    modules = targets(model)
    calib = token_batch(SAMPLES, SEQ_LEN, seed=2)
    stats = gradient_stats(model, modules, calib, "cpu", cov=True, fisher=True, progress=False)
    return model, modules, calib, stats, reference(model, modules, calib)


def close(got, want, rtol):
    """Relative to the largest entry: the code accumulates float32 products into float64 sums."""
    got, want = got.double(), torch.as_tensor(want).double()
    assert got.shape == want.shape
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(scale))


def test_every_target_gets_statistics_of_its_shape(setup):
    model, modules, calib, stats, _ = setup
    assert set(stats) == set(modules)
    for name, s in stats.items():
        assert isinstance(s, GradientStats)
        out_f, in_f = modules[name].weight.shape
        assert s.cov.shape == (out_f, out_f) and s.fisher_rows.shape == (out_f,) and s.fisher_cols.shape == (in_f,)
        assert s.tokens == SAMPLES * SEQ_LEN and s.samples == SAMPLES


@pytest.mark.parametrize("field", ["cov", "sq_sum", "fisher_rows", "fisher_cols"])
def test_sums_equal_per_sample_autograd(setup, field):
    *_, stats, ref = setup
    for name, s in stats.items():
        close(getattr(s, field), ref[name][field], rtol=2e-6)  # measured: <= 2e-7 (float32 products)


def test_means_are_over_tokens(setup):
    *_, stats, ref = setup
    tokens = SAMPLES * SEQ_LEN
    for name, s in stats.items():
        close(s.mean_cov, ref[name]["cov"] / tokens, rtol=2e-6)
        diag_mean = float(ref[name]["sq_sum"].sum()) / tokens / s.out_dim  # mean diagonal of B
        assert s.output_energy == pytest.approx(diag_mean, rel=2e-6)


def test_statistics_are_not_trivial(setup):
    """Guards the comparisons above: gradients reach every layer and differ between layers."""
    *_, stats, ref = setup
    energies = [s.output_energy for s in stats.values()]
    assert min(energies) > 0 and len({round(e, 12) for e in energies}) == len(energies)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    # q and k see the same input but different output gradients: their column sums differ
    assert not torch.allclose(stats[q].fisher_cols, stats[k].fisher_cols * (stats[q].fisher_cols.sum() / stats[k].fisher_cols.sum()))


def test_grouped_walks_give_the_same_statistics(setup):
    """A memory budget too small for two layers' accumulators splits the walk into one pass per layer."""
    model, modules, calib, stats, _ = setup
    picked = {n: modules[n] for n in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj")}
    grouped = gradient_stats(model, picked, calib, "cpu", cov=True, fisher=True, progress=False, accumulator_budget=1)
    for name in picked:
        for field in ("cov", "sq_sum", "fisher_rows", "fisher_cols"):
            close(getattr(grouped[name], field), getattr(stats[name], field), rtol=1e-12)


def test_groups_spilled_to_disk_read_back_layer_by_layer(setup, tmp_path):
    """Each group goes to files as it finishes (memory holds one group); the index reads any layer back."""
    from vaclm.io.checkpoint import Checkpoint

    model, modules, calib, stats, _ = setup
    picked = {n: modules[n] for n in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj")}
    writer = Checkpoint(tmp_path / "ck", "run", resume=False).gradient_writer()
    kept = gradient_stats(model, picked, calib, "cpu", cov=True, fisher=True, progress=False, accumulator_budget=1,
                          spill=writer.add)
    writer.finish()
    assert kept == {}  # nothing held in memory
    on_disk = Checkpoint(tmp_path / "ck", "run", resume=True).gradients()
    assert set(on_disk) == set(picked) and on_disk.has("cov") and on_disk.has("fisher_rows")
    assert len(set(on_disk.files.values())) == 2  # one file per group here
    for name in picked:
        assert on_disk.shape(name) == (stats[name].out_dim, stats[name].in_dim)
        for field in ("cov", "sq_sum", "fisher_rows", "fisher_cols"):
            close(getattr(on_disk[name], field), getattr(stats[name], field), rtol=1e-12)


def test_parameters_keep_their_requires_grad_flags(setup):
    model, modules, calib, _, _ = setup
    before = [p.requires_grad for p in model.parameters()]
    gradient_stats(model, {n: modules[n] for n in list(modules)[:1]}, calib[:1], "cpu", cov=True, fisher=False,
                   progress=False)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was formed
