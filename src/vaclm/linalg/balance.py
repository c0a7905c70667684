"""Rebalancing a factorisation: the same product up @ down, with each factor carrying the square
root of its singular values.

Whitened methods unwhiten their factors (gfwsvd multiplies `up` by B^-1/2 and `down` by A^-1/2),
which can leave `down` a thousand times smaller than `up`. The product does not care, but a
first-order optimizer does: AdamW moves every entry by about the learning rate, a relative change
that is huge for the small factor and negligible for the large one. Balanced factors make one
learning rate fit both. For int8 rounding, unit_up_columns scales columns only (it keeps the
components, and so the nesting of ranks that elastic folders rely on).
"""

from __future__ import annotations

import torch


def balanced_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up', down') with up' @ down' == up @ down (to rounding) and up' = U sqrt(S), down' = sqrt(S) V^T
    for the product's thin SVD U S V^T; costs two QRs and one rank x rank SVD, in float64."""
    q_up, r_up = torch.linalg.qr(up.double())  # out x r, r x r
    q_down, r_down = torch.linalg.qr(down.double().T)  # in x r, r x r
    left, s, right = torch.linalg.svd(r_up @ r_down.T)
    root = s.sqrt()
    new_up = (q_up @ left) * root
    new_down = root[:, None] * (right @ q_down.T)
    return new_up.to(up.dtype), new_down.to(down.dtype)


def unit_up_columns(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product up @ down with every column of `up` of unit norm, its norm moved into the
    matching row of `down`. Per-row int8 scales then suit both factors: a row of `down` is scaled as
    a whole, and a row of `up` no longer mixes columns of very different sizes (a factorisation
    leaves the singular values in `up`'s columns, spreading 3-7x at keep 0.6, so its small
    columns lost bits). Measured on validation windows at keep 0.6: int8 PPL change +0.76% -> +0.35%;
    scaling by each column's maximum instead of its norm: +1.5%."""
    norm = up.detach().float().norm(dim=0)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    return (up.detach().float() / norm).to(up.dtype), (down.detach().float() * norm[:, None]).to(down.dtype)
