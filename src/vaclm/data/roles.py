"""The three data roles kept apart: calibration (statistics), fitness (search), evaluation (reports).

Fitness windows taken from the calibration source are the windows `calibration_windows` did not
draw: the same tiling of the token stream into non-overlapping windows, so their positions are
disjoint from the calibration samples by construction. Texts passed separately are compared by
content: two token streams overlap when more than `MAX_SHARED` of either side's 32-token
sequences also occur in the other (wiki.valid and wiki.test share none; a text passed twice
shares all of them).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import VaclmError
from .text import calibration_windows

NGRAM = 32
MAX_SHARED = 0.01


def fitness_split(ids: torch.Tensor, samples: int, seq_len: int, seed: int, tokens: int,
                  extra_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, fitness windows) of one token stream: at least `tokens` fitness tokens
    in whole windows of `seq_len`, none of them a calibration window, then up to `extra_tokens`
    more where the text has them (the search's held-out selection windows)."""
    calib, rest = calibration_windows(ids, samples, seq_len, seed)
    needed = math.ceil(tokens / seq_len)
    if rest.shape[0] < needed:
        raise VaclmError(
            f"the calibration text leaves {rest.shape[0]} windows of {seq_len} tokens beside the calibration samples, "
            f"too few for {tokens} fitness tokens; give more text, a separate --fitness text, or fewer --fitness-tokens"
        )
    return calib, rest[: needed + math.ceil(extra_tokens / seq_len)].clone()


def _hashes(ids: torch.Tensor, n: int) -> np.ndarray:
    """Polynomial hashes of every n-gram inside each row (n-grams never span two windows)."""
    rows = ids.reshape(1, -1) if ids.dim() == 1 else ids
    out = []
    for row in rows.cpu().numpy().astype(np.uint64):
        if row.size < n:
            continue
        h = np.zeros(row.size - n + 1, np.uint64)
        for k in range(n):  # wraps modulo 2^64, which is what we want
            h = h * np.uint64(1_000_003) + row[k : row.size - n + 1 + k]
        out.append(h)
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def shared_fraction(a: torch.Tensor, b: torch.Tensor, n: int = NGRAM) -> float:
    """The larger of: the fraction of a's n-grams found in b, and of b's found in a."""
    ha, hb = _hashes(a, n), _hashes(b, n)
    if ha.size == 0 or hb.size == 0:
        return 0.0
    return float(max(np.isin(ha, hb).mean(), np.isin(hb, ha).mean()))


def check_disjoint(roles: dict[str, torch.Tensor | None]) -> None:
    """Refuse any two roles (e.g. {"calibration": ..., "fitness": ..., "evaluation": ...}) that overlap."""
    named = [(k, v) for k, v in roles.items() if v is not None]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1 :]:
            shared = shared_fraction(a, b, min(NGRAM, a.shape[-1], b.shape[-1]))
            if shared > MAX_SHARED:
                raise VaclmError(
                    f"{name_a} and {name_b} data overlap ({shared:.1%} of their {NGRAM}-token sequences are shared); "
                    f"{name_b} text must be held out from {name_a} text"
                )
