"""A causal LM split into its body (embeddings + blocks + final norm) and its output head.

Distillation runs the body once and applies the head to a few positions at a time: the full
logits of a 49k-token vocabulary are the biggest tensor of a small model's forward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits `model` would produce from `hidden`, including Gemma-2/3 soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def run_body(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The base model's (LlamaModel, GPT2Model, ...) last hidden state: what the head turns into logits."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
