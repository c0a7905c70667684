"""vaclm bench: last-position prefill, cached decode, every reported number present and positive."""

import json

import pytest
import torch

from vaclm.eval.speed import BenchSettings, benchmark, decode_seconds, last_logits

from conftest import VOCAB, run_cli, svd_llm_config, tiny_model, token_batch

SMALL = BenchSettings(prefill_lens=(24, 48), decode_batches=(1, 3), prompt_len=5, new_tokens=4, reps=2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_logits_equal_full_forward_last_row(family):
    model = tiny_model(family)
    ids = token_batch(2, 20)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last = last_logits(model, ids, use_cache=False).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_cached_decode_follows_the_greedy_path():
    """The timed loop feeds one token at a time through the KV cache; its tokens match a full re-run."""
    model = tiny_model("llama")
    prompt = token_batch(1, 6)
    tokens = []
    real_forward = model.forward

    def spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        tokens.append(int(out.logits[0, -1].argmax()))
        return out

    with torch.inference_mode():
        model.forward = spy
        decode_seconds(model, prompt, 3)
        model.forward = real_forward
        ids = prompt
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert tokens == ids[0, 6:].tolist()


def test_bench_reports_every_key_with_positive_numbers():
    import vaclm

    dense = tiny_model("llama")
    small = tiny_model("llama")
    vaclm.compress(small, svd_llm_config(keep=0.5, calib_samples=4, calib_seq_len=16), token_batch(4, 16), progress=False)
    res = benchmark(small, dense, settings=SMALL, progress=False)
    for key in ("prefill_speedup", "prefill_speedup_48", "decode_speedup", "decode_speedup_b3"):
        assert res[key] > 0, key
    for name in ("model", "baseline"):
        r = res[name]
        assert set(r["prefill_tokens_per_s"]) == {"24", "48"} and set(r["decode_tokens_per_s"]) == {"1", "3"}
        assert min(r["prefill_tokens_per_s"].values()) > 0 and min(r["decode_tokens_per_s"].values()) > 0
        assert all(len(v) == SMALL.reps for v in r["prefill_seconds"].values())
        assert r["weight_bytes"] > 0 and r["peak_memory_rise_bytes"] >= 0 and r["parameters"] > 0
    assert res["model"]["parameters"] < res["baseline"]["parameters"]
    # ratios are the model's tokens/s over the baseline's
    ratio = res["model"]["prefill_tokens_per_s"]["24"] / res["baseline"]["prefill_tokens_per_s"]["24"]
    assert res["prefill_speedup"] == pytest.approx(ratio)
    assert set(res["cpu_time_speedups"]) == {"prefill_speedup", "prefill_speedup_48", "decode_speedup", "decode_speedup_b3"}
    assert min(res["cpu_time_speedups"].values()) > 0


def test_bench_without_baseline_has_no_ratios():
    res = benchmark(tiny_model("llama"), settings=SMALL, progress=False)
    assert "baseline" not in res and "prefill_speedup" not in res and res["model"]["decode_tokens_per_s"]["3"] > 0


def test_bench_settings_checked():
    from vaclm.errors import VaclmError

    with pytest.raises(VaclmError, match="must be at least 1"):
        BenchSettings(reps=0).check()


def test_cli_bench(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "a")
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "b")
    proc = run_cli("bench", str(tmp_path / "a"), "--baseline", str(tmp_path / "b"), "--reps", "1", "--new-tokens", "2",
                   "--prefill-lens", "32,64", "--decode-batches", "1,2", "--threads", "1", "--int8-baseline",
                   "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("prefill_speedup", "prefill_speedup_64", "decode_speedup", "decode_speedup_b2",
                "int8_decode_speedup", "decode_speedup_vs_int8", "prefill_speedup_vs_int8", "decode_speedup_b2_vs_int8"):
        assert out[key] > 0, key
    assert out["configurations"] == ["model", "baseline", "model_int8", "baseline_int8"]
    # int8 weights in every decoder linear and the lm_head: under a third of the float bytes read per token
    for name in ("model", "baseline"):
        assert out[f"{name}_int8"]["weights_read_per_token"] < out[name]["weights_read_per_token"] / 3
    bounds = out["bytes_read_bounds"]
    assert bounds["decode_speedup_vs_int8"] == pytest.approx(
        out["baseline_int8"]["weights_read_per_token"] / out["model_int8"]["weights_read_per_token"])
    assert out["threads"] == 1 and out["baseline_source"] == str(tmp_path / "b")
    assert "speedup  prefill_speedup" in proc.stderr  # with --json the human lines go to stderr
    assert "bound    decode_speedup" in proc.stderr


def test_cli_int8_baseline_needs_a_baseline(capsys):
    from vaclm.cli import main

    assert main(["bench", "demo", "--int8-baseline", "--quiet"]) == 2  # refused before any model loads
    assert "--int8-baseline needs --baseline" in capsys.readouterr().err


def test_lowrank_fast_path_matches_submodules_and_respects_hooks():
    from vaclm.model.lowrank import LowRankLinear

    torch.manual_seed(0)
    m = LowRankLinear(12, 10, 4, bias=True)
    x = torch.randn(2, 3, 12)
    via_modules = m.up(m.down(x))
    torch.testing.assert_close(m(x), via_modules, rtol=0, atol=0)
    seen = []
    m.down.register_forward_hook(lambda mod, args, out: seen.append(out.shape))  # e.g. a statistics hook
    m(x)
    assert seen == [torch.Size([2, 3, 4])]


def test_decode_passes_the_cache_the_supported_way():
    """Newer transformers renamed `past_key_values` to `cache` and warn on the old name."""
    import warnings

    model = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        decode_seconds(model, token_batch(1, 4), 2)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.slow
def test_compiled_decode_follows_the_eager_greedy_path():
    """--compile: the compiled step with a static cache picks the tokens the eager step picks, with the same logits."""
    from vaclm.eval.speed import compiled_step, static_cache

    model = tiny_model("llama")
    prompt = token_batch(1, 6)
    step = compiled_step(model)
    with torch.inference_mode():
        eager = model(input_ids=prompt, use_cache=True)
        static = last_logits(model, prompt, use_cache=True, cache=static_cache(model, 10))
        past_e, past_s = eager.cache, static.cache
        token = eager.logits[:, -1:].argmax(-1)
        for _ in range(3):
            e = model(input_ids=token, use_cache=True, cache=past_e)
            s = step(input_ids=token, use_cache=True, cache=past_s)
            torch.testing.assert_close(s.logits[:, -1], e.logits[:, -1], rtol=1e-4, atol=1e-4)
            past_e, past_s, token = e.cache, s.cache, e.logits[:, -1:].argmax(-1)


@pytest.mark.slow
def test_bench_compile_marks_compiled_configurations_and_times_the_warmup():
    from vaclm.model.int8_dense import int8_weights

    small = tiny_model("llama")
    quantised = tiny_model("llama")
    int8_weights(quantised)  # the int8 kernel path must trace too
    settings = BenchSettings(prefill_lens=(24,), decode_batches=(1,), prompt_len=5, new_tokens=3, reps=1, compile=True)
    res = benchmark(quantised, small, settings=settings, progress=False)
    assert res["compile"] is True and res["model"]["compiled"] and res["baseline"]["compiled"]
    assert res["model"]["decode_tokens_per_s"]["1"] > 0 and res["decode_speedup"] > 0
    assert res["model"]["warmup_seconds"]["decode_1"] > 0
