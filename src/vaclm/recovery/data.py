"""Disjoint training and validation windows of the healing text."""

from __future__ import annotations

import math

import torch

from ..data.text import calibration_windows
from ..errors import VaclmError
from .config import HealConfig


def heal_windows(ids: torch.Tensor, config: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, validation windows), non-overlapping windows of seq_len tokens drawn with
    the seed; validation windows are never training windows."""
    seq_len = config.seq_len
    n_train = math.ceil(config.tokens / seq_len)
    n_val = math.ceil(config.val_tokens / seq_len)
    available = ids.numel() // seq_len
    if available < n_train + n_val:
        raise VaclmError(
            f"healing text has {ids.numel()} tokens ({available} windows of {seq_len}), too few for "
            f"{n_train} training + {n_val} validation windows; give more text or lower --tokens / --val-tokens"
        )
    train, rest = calibration_windows(ids.flatten(), n_train, seq_len, config.seed)
    return train, rest[:n_val].clone()
