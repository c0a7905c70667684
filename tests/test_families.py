"""Every supported architecture family through the whole pipeline, on tiny random models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import vaclm
from vaclm.config import CompressConfig
from vaclm.io.export import to_dense
from vaclm.model.arch import get_submodule, spec_for, target_names
from vaclm.model.lowrank import LowRankLinear
from vaclm.model.surgery import dense_weight

from conftest import FAMILIES, token_batch, tiny_model, svd_llm_config


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def full_ranks(model):
    spec = spec_for(model.config.model_type)
    return {n: min(dense_weight(get_submodule(model, n))[0].shape) for b in target_names(model, spec) for n in b}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_pipeline_gives_identical_logits(family):
    model = tiny_model(family)
    ids = token_batch(2, 24, seed=5)
    before = logits(model, ids)
    vaclm.compress(model, svd_llm_config(calib_samples=4, calib_seq_len=16), token_batch(4, 16),
                   ranks=full_ranks(model), progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(full_ranks(model))
    torch.testing.assert_close(logits(model, ids), before, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_save_reload_and_dense_export(family, tmp_path):
    model = tiny_model(family)
    result = vaclm.compress(model, svd_llm_config(keep=0.5, calib_samples=8, calib_seq_len=16),
                            token_batch(8, 16), progress=False)
    assert abs(result.kept_fraction - 0.5) < 0.1
    ids = token_batch(2, 20, seed=7)
    compressed = logits(model, ids)
    assert torch.isfinite(compressed).all()

    vaclm.save(model, tmp_path / "m", result=result)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == len(result.ranks)
    torch.testing.assert_close(logits(reloaded, ids), compressed, atol=1e-5, rtol=1e-5)

    to_dense(reloaded)
    assert not any(isinstance(m, LowRankLinear) for m in reloaded.modules())
    vaclm.save(reloaded, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert getattr(plain.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(plain, ids), compressed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["front-to-back", "back-to-front", "middle-out"])
def test_orders_and_one_shot_compress_every_block(order):
    model = tiny_model("llama")
    result = vaclm.compress(model, svd_llm_config(keep=0.6, order=order, calib_samples=4, calib_seq_len=16),
                            token_batch(4, 16), progress=False)
    assert all(isinstance(get_submodule(model, n), LowRankLinear) for n, r in result.ranks.items() if r)
    one_shot = tiny_model("llama")
    r2 = vaclm.compress(one_shot, svd_llm_config(keep=0.6, sequential=False, calib_samples=4, calib_seq_len=16),
                        token_batch(4, 16), progress=False)
    assert r2.ranks == result.ranks
    if order == "front-to-back":  # first block sees identical (dense) inputs in both modes
        first = "model.layers.0.self_attn.q_proj"
        torch.testing.assert_close(dense_weight(get_submodule(model, first))[0],
                                   dense_weight(get_submodule(one_shot, first))[0])


def test_sequential_recapture_changes_later_blocks():
    seq, one = tiny_model("llama"), tiny_model("llama")
    cfg = svd_llm_config(keep=0.4, calib_samples=4, calib_seq_len=16)
    vaclm.compress(seq, cfg, token_batch(4, 16), progress=False)
    vaclm.compress(one, CompressConfig(**{**cfg.__dict__, "sequential": False}), token_batch(4, 16), progress=False)
    last = "model.layers.2.mlp.down_proj"
    assert not torch.allclose(dense_weight(get_submodule(seq, last))[0], dense_weight(get_submodule(one, last))[0])


@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd", "gfwsvd"])
def test_every_method_compresses_gpt2_and_qwen2(method):
    for family in ("gpt2", "qwen2"):
        model = tiny_model(family)
        config = CompressConfig(allocation="uniform", keep=0.6, method=method, calib_samples=4, calib_seq_len=16)
        result = vaclm.compress(model, config, token_batch(4, 16), progress=False)
        assert torch.isfinite(logits(model, token_batch(1, 8))).all()
        assert all(e >= 0 for e in result.errors.values())


@pytest.mark.parametrize("method", ["gfwsvd", "svd-llm"])
def test_knapsack_allocation_meets_budget_and_differs_from_uniform(method, tmp_path):
    model = tiny_model("qwen2", num_hidden_layers=4)
    config = CompressConfig(keep=0.5, method=method, allocation="knapsack", calib_samples=6, calib_seq_len=24)
    result = vaclm.compress(model, config, token_batch(6, 24), progress=False)
    total = sum(o * i for o, i in result.shapes.values())
    largest_step = max(8 * (o + i) for o, i in result.shapes.values())
    assert 0.5 - largest_step / total <= result.kept_fraction <= 0.5
    uniform = vaclm.compress(tiny_model("qwen2", num_hidden_layers=4),
                             CompressConfig(allocation="uniform", keep=0.5, method=method), token_batch(6, 24),
                             progress=False)
    assert result.ranks != uniform.ranks
    assert all(m["estimated_loss"] is not None for m in result.allocation.values())
    vaclm.save(model, tmp_path / "m", result=result)
    table = __import__("json").loads((tmp_path / "m" / "allocation.json").read_text())
    assert table["modules"]["model.layers.0.mlp.up_proj"]["rank"] == result.ranks["model.layers.0.mlp.up_proj"]
    assert (tmp_path / "m" / "allocation.png").stat().st_size > 1000


def test_target_size_budget_in_bytes():
    model = tiny_model("llama")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = int(dense_bytes * 0.8)
    result = vaclm.compress(model, svd_llm_config(target_bytes=target, calib_samples=4, calib_seq_len=16),
                            token_batch(4, 16), progress=False)
    now = sum(p.numel() * p.element_size() for p in model.parameters())
    assert now <= target and now > 0.7 * dense_bytes
    assert result.config.keep < 0.8  # the budget became a keep fraction of the decoder linears
    with pytest.raises(vaclm.VaclmError, match="out of reach"):
        vaclm.compress(tiny_model("llama"), svd_llm_config(target_bytes=1000, calib_samples=4, calib_seq_len=16),
                       token_batch(4, 16), progress=False)
