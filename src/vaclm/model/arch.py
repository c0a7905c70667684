"""Architectures described as data: where the decoder blocks are and which linears they hold.

Embeddings, lm_head and norms are never targets. Fused projections (GPT-2 c_attn, GPT-NeoX
query_key_value, Phi-3 qkv_proj / gate_up_proj) are factorised as the one matrix they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import VaclmError

_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # attribute path of the ModuleList of decoder blocks
    # linear modules inside one block, in the order the block uses them, grouped by shared input
    stages: tuple[tuple[str, ...], ...]
    conv1d: bool = False  # weights stored transposed (in x out), as GPT-2's Conv1D

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for stage in self.stages for t in stage)


SPECS = (
    ArchSpec(
        "llama-like",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"),
        "model.layers",
        _LLAMA_LIKE,
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
    ),
    ArchSpec(
        "gpt-neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    ),
)
SUPPORTED_MODEL_TYPES = tuple(t for spec in SPECS for t in spec.model_types)


def spec_for(model_type: str) -> ArchSpec:
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise VaclmError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def decoder_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)


def target_names(model: nn.Module, spec: ArchSpec) -> list[list[str]]:
    """Fully qualified target module names, one list per decoder block."""
    n_blocks = len(decoder_blocks(model, spec))
    return [[f"{spec.blocks}.{i}.{t}" for t in spec.targets] for i in range(n_blocks)]
