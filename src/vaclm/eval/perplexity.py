"""Perplexity over non-overlapping windows (the GPTQ / SVD-LLM protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import VaclmError


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               device: str = "cpu", progress: bool = True) -> dict:
    """exp(mean next-token NLL) over the first `max_windows` windows of `seq_len` tokens."""
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise VaclmError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len")
    total_nll, predicted = 0.0, 0
    bar = tqdm(range(n_windows), desc="perplexity", disable=not progress, unit="window")
    for i in bar:
        window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        predicted += seq_len - 1
        bar.set_postfix(ppl=f"{math.exp(total_nll / predicted):.2f}")
    ppl = math.exp(total_nll / predicted)
    return {"ppl": ppl, "nll": total_nll / predicted, "tokens": n_windows * seq_len, "windows": n_windows,
            "seq_len": seq_len}
