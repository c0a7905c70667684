"""Int8 weights for every decoder linear (and the lm_head) at run time: the CPU int8 treatment.

A saved int8 folder holds int8 factors only; the targets the allocation left dense, and the lm_head
(tied to the embedding in small models, where it is the largest matrix a decode step reads), stay
float. For inference on CPU they can take the same int8 GEMM: `int8_weights` does that in place,
to a compressed model and to a dense one alike (the int8 weight-only baseline), so that both get
the same treatment. Nothing here is saved: it is how a model runs, not a folder format.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .arch import get_submodule, set_submodule, spec_for, target_names
from .int8_lowrank import Int8Linear, Int8LowRankLinear
from .lowrank import LowRankLinear


@torch.no_grad()
def int8_weights(model: nn.Module, lm_head: bool = True) -> dict[str, int]:
    """In place: float factors -> Int8LowRankLinear, dense targets -> Int8Linear, and the lm_head
    -> Int8Linear when `lm_head` (the input embedding keeps its float table: a lookup reads one row).
    Returns how many modules of each kind changed."""
    changed = {"factorised": 0, "dense": 0, "lm_head": 0}
    for name in [n for block in target_names(model, spec_for(model.config.model_type)) for n in block]:
        module = get_submodule(model, name)
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, Int8LowRankLinear.from_lowrank(module))
            changed["factorised"] += 1
        elif isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, Int8Linear):
            weight = module.weight.T if isinstance(module, Conv1D) else module.weight
            set_submodule(model, name, Int8Linear.from_float(weight, module.bias))
            changed["dense"] += 1
    head = model.get_output_embeddings() if lm_head else None
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.from_float(head.weight, head.bias))
        changed["lm_head"] = 1
    return changed
