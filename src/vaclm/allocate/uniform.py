"""Uniform allocation: every matrix keeps the same fraction of its parameters.

r = keep * out * in / (out + in), rounded down to the alignment (at least one step); rounding
down loses about 2% of the budget on small models, so the leftover is handed back one alignment
step at a time to the matrices that rounding cost most, never exceeding the budget. A matrix
whose factorisation would save nothing stays dense (rank None). With a byte cost model (int8
factors, see costs.py) the same fraction is one of bytes.
"""

from __future__ import annotations

import math

from .candidates import rank_grid
from .costs import PARAMETERS, CostModel


def lowrank_cost(shape: tuple[int, int], rank: int | None) -> int:
    out_f, in_f = shape
    return out_f * in_f if rank is None else rank * (out_f + in_f)


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float, align: int,
                  cost: CostModel = PARAMETERS) -> dict[str, int | None]:
    """`keep` is a fraction of the dense cost under `cost` (parameters unless told otherwise)."""
    ranks: dict[str, int | None] = {}
    ideal: dict[str, float] = {}
    for name, shape in shapes.items():
        exact = cost.rank_at(shape, keep)
        rank = max(align, math.floor(exact / align) * align)
        if not _saves(shape, rank) and keep < 1:
            # cheaper factor elements (int8) can ask for more rank than still saves parameters: cap it
            grid = rank_grid(shape, align)
            rank = grid[-1] if grid else rank
        ranks[name] = rank if _saves(shape, rank) else None
        ideal[name] = exact
    budget = keep * sum(cost.dense(s) for s in shapes.values())
    spent = sum(cost.cost(shapes[n], r) for n, r in ranks.items())
    # hand back the rounding loss, largest shortfall (in cost) first
    factorised = [n for n in ranks if ranks[n] is not None]
    for name in sorted(factorised, key=lambda n: -(ideal[n] - ranks[n]) * cost.per_rank(shapes[n])):
        rank = ranks[name]
        step = align * cost.per_rank(shapes[name])
        if spent + step <= budget and _saves(shapes[name], rank + align):
            ranks[name] = rank + align
            spent += step
    return ranks


def _saves(shape: tuple[int, int], rank: int) -> bool:
    out_f, in_f = shape
    return rank * (out_f + in_f) < out_f * in_f


def kept_fraction(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> float:
    dense = sum(o * i for o, i in shapes.values())
    return sum(lowrank_cost(shapes[n], ranks.get(n)) for n in shapes) / dense
