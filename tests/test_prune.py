"""Structured pruning of MLP neurons: selection, the down_proj refit, the knapsack items, save/load."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model, token_batch


def _data(m=10, out=6, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    down = torch.randn(out, m, generator=g, dtype=torch.float64)
    grads = torch.randn(80, out, generator=g, dtype=torch.float64)
    return h, down, grads.T @ grads / len(grads)


def _reference_error(h, down, cov, kept):
    """Brute force: least squares of the MLP output on the kept activations, residual in the B metric."""
    y = h @ down.T
    fit = torch.linalg.lstsq(h[:, kept], y).solution  # |S| x out
    residual = y - h[:, kept] @ fit
    return float(((residual @ cov) * residual).sum() / len(h)), fit.T


def test_refit_is_the_least_squares_down_projection():
    from vaclm.prune.neurons import refit_down, refit_error

    h, down, cov = _data()
    kept = torch.tensor([0, 2, 3, 7, 9])
    error, fit = _reference_error(h, down, cov, kept)
    gram = h.T @ h / len(h)
    assert torch.allclose(refit_down(gram, down, kept, damping=0), fit, atol=1e-9)
    assert refit_error(gram, down, cov, kept, damping=0) == pytest.approx(error, rel=1e-9)


def test_removal_curve_records_each_widths_exact_refit_error():
    from vaclm.prune.neurons import removal_curve

    h, down, cov = _data()
    curve = removal_curve(h.T @ h / len(h), down, cov, step=3, damping=0)
    assert curve.widths == [10, 9, 6, 3, 0]  # the first block takes the remainder: widths stay multiples of 3
    assert sorted(curve.order.tolist()) == list(range(10))
    for width, error in zip(curve.widths[1:-1], curve.errors[1:-1]):
        assert error == pytest.approx(_reference_error(h, down, cov, curve.kept(width))[0], rel=1e-7)
    assert all(a <= b + 1e-9 for a, b in zip(curve.errors, curve.errors[1:]))


def test_fisher_selection_beats_or_matches_every_alternative_it_can_be_checked_against():
    """One neuron removed: the greedy refit choice is the brute-force optimum; two: within the best few."""
    from vaclm.prune.neurons import refit_error, removal_curve

    h, down, cov = _data(seed=3)
    gram = h.T @ h / len(h)
    curve = removal_curve(gram, down, cov, step=1, damping=0)
    singles = sorted(_reference_error(h, down, cov, torch.tensor([j for j in range(10) if j != i]))[0] for i in range(10))
    assert curve.errors[1] == pytest.approx(singles[0], rel=1e-7)
    # refit_error is checked against least squares above
    pairs = sorted(refit_error(gram, down, cov, torch.tensor(s), damping=0) for s in itertools.combinations(range(10), 8))
    assert curve.errors[2] <= pairs[len(pairs) // 4]  # greedy: not optimal, but among the best quarter


def test_lowrank_frontier_holds_every_lagrangian_optimum():
    from vaclm.allocate.candidates import Candidates
    from vaclm.prune.plan import lowrank_frontier

    rng = np.random.default_rng(0)
    parts = []
    for _ in range(3):
        costs = np.sort(rng.uniform(1, 10, 6))
        losses = np.sort(rng.uniform(0, 5, 6))[::-1].copy()
        parts.append(Candidates(list(range(6)), costs, losses))
    _, costs, losses = lowrank_frontier(parts)
    for lam in (0.01, 0.1, 0.5, 1, 3, 10):
        best = min(sum(p.losses[i] + lam * p.costs[i] for p, i in zip(parts, combo))
                   for combo in itertools.product(range(6), repeat=3))
        assert np.min(losses + lam * costs) == pytest.approx(best)


@pytest.fixture(scope="module")
def pruned():
    """The tiny Llama pruned to keep 0.7 of its decoder linears (and its calibration)."""
    import vaclm
    from vaclm.config import CompressConfig

    model, calib = tiny_model("llama"), token_batch(8, 32)
    result = vaclm.compress(model, CompressConfig(keep=0.7, structure="prune", rank_align=4), calib, progress=False)
    return model, result, calib


def test_prune_meets_the_budget_with_dense_narrower_mlps_only(pruned):
    from vaclm.model.lowrank import LowRankLinear
    from vaclm.model.pruned import pruned_shapes

    model, result, calib = pruned
    assert 0.66 <= result.kept_fraction <= 0.7
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    shapes = pruned_shapes(model)
    assert shapes and all(n.rsplit(".", 1)[0] in result.widths for n in shapes)
    for prefix, width in result.widths.items():
        assert shapes[f"{prefix}.down_proj"] == [64, width] and shapes[f"{prefix}.gate_proj"] == [width, 64]
    assert all(result.ranks[n] is None for n in result.ranks)
    assert torch.isfinite(model(calib[:1]).logits).all()


def test_pruned_folder_loads_in_transformers_and_refuses_tampering(pruned, tmp_path):
    import vaclm
    from transformers import AutoModelForCausalLM
    from vaclm.errors import VaclmError

    model, result, calib = pruned
    vaclm.save(model, tmp_path / "p", result=result)
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == 3 and qc["ranks"] == {} and len(qc["pruned"]) == 3 * len(result.widths)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(loaded(calib[:2]).logits, model(calib[:2]).logits)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    name = next(iter(config["quantization_config"]["pruned"]))
    config["quantization_config"]["pruned"][name][0] += 1
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VaclmError, match="pruned to"):
        vaclm.load(tmp_path / "p")


def test_mixed_mlp_items_are_pruned_or_factorised_never_both():
    import vaclm
    from vaclm.config import CompressConfig

    model, calib = tiny_model("llama", seed=1), token_batch(8, 32)
    result = vaclm.compress(model, CompressConfig(keep=0.6, structure="mixed", rank_align=4), calib, progress=False)
    assert result.kept_fraction <= 0.6 + 1e-9
    for prefix in result.widths:
        assert all(result.ranks[f"{prefix}.{p}"] is None for p in ("gate_proj", "up_proj", "down_proj"))


def test_bad_structure_requests_fail_with_one_line():
    import vaclm
    from vaclm.config import CompressConfig
    from vaclm.errors import VaclmError

    with pytest.raises(VaclmError, match="--structure prune runs with the knapsack"):
        CompressConfig(structure="prune", allocation="uniform")
    with pytest.raises(VaclmError, match="use --structure lowrank"):
        vaclm.compress(tiny_model("gpt2"), CompressConfig(structure="prune"), token_batch(2, 16), progress=False)
