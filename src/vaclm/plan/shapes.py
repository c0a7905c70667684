"""A model's shapes from its config alone: a meta-device model, no weights read.

MODEL may be a hub id (only config.json is fetched), a folder holding config.json (weights
optional), a .gguf file (its metadata) or the demo alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VaclmError
from ..model.surgery import Targets


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    blocks: int
    hidden: int
    vocab: int
    parameters: int  # every parameter, a tied embedding and lm_head counted once
    targets: dict[str, tuple[int, int]]  # (out, in) of every decoder linear, block by block
    per_block: tuple[tuple[str, ...], ...]
    input_widths: tuple[int, ...]  # width of each distinct input of a block (q/k/v and gate/up share one)
    attention_width: int  # heads x head_dim: the width of one position's attention scores' inputs
    needs_conversion: bool = False  # a .gguf not yet converted: load dequantises it once

    @property
    def target_parameters(self) -> int:
        return sum(o * i for o, i in self.targets.values())


def read_config(source: str):
    """The transformers config of `source` without reading weights."""
    from transformers import AutoConfig

    from ..io.loading import cache_root, resolve_source

    resolved = resolve_source(source)
    try:
        if resolved.endswith(".gguf"):
            path = Path(resolved)
            cached = sorted((cache_root() / "gguf").glob(f"{path.stem}-*/config.json"))
            if cached:
                return AutoConfig.from_pretrained(cached[0].parent), False
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), True
        return AutoConfig.from_pretrained(resolved), False
    except VaclmError:
        raise
    except Exception as exc:  # transformers raises many types for a bad or unreachable config
        raise VaclmError(f"could not read the config of {source!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); give a folder with config.json, "
                         "a .gguf file or a hub id") from exc


def model_shape(source: str) -> ModelShape:
    from transformers import AutoModelForCausalLM

    config, needs_conversion = read_config(source)
    config.__dict__.pop("quantization_config", None)  # a vaclm folder: plan its dense original
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of(model, needs_conversion)


def shape_of(model, needs_conversion: bool = False) -> ModelShape:
    """The shape of a model object (meta or real)."""
    targets = Targets.of(model)
    first = f"{targets.spec.blocks}.0"
    config = model.config
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    unique = {id(p): p.numel() for p in model.parameters()}
    return ModelShape(
        model_type=config.model_type, blocks=len(targets.per_block), hidden=hidden,
        vocab=int(model.get_input_embeddings().weight.shape[0]), parameters=sum(unique.values()),
        targets=dict(targets.shapes), per_block=tuple(tuple(b) for b in targets.per_block),
        input_widths=tuple(targets.shapes[f"{first}.{stage[0]}"][1] for stage in targets.spec.stages),
        attention_width=heads * head_dim, needs_conversion=needs_conversion)
