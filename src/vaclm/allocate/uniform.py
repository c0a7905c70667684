"""Uniform allocation: every matrix keeps the same fraction of its parameters.

r = keep * out * in / (out + in), rounded down to the alignment (at least one step); rounding
down loses about 2% of the budget on small models, so the leftover is handed back one alignment
step at a time to the matrices that rounding cost most, never exceeding the budget. A matrix
whose factorisation would save nothing stays dense (rank None).
"""

from __future__ import annotations

import math


def lowrank_cost(shape: tuple[int, int], rank: int | None) -> int:
    out_f, in_f = shape
    return out_f * in_f if rank is None else rank * (out_f + in_f)


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float, align: int) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    ideal: dict[str, float] = {}
    for name, (out_f, in_f) in shapes.items():
        exact = keep * out_f * in_f / (out_f + in_f)
        rank = max(align, math.floor(exact / align) * align)
        ranks[name] = rank if rank * (out_f + in_f) < out_f * in_f else None
        ideal[name] = exact
    budget = keep * sum(o * i for o, i in shapes.values())
    spent = sum(lowrank_cost(shapes[n], r) for n, r in ranks.items())
    # hand back the rounding loss, largest shortfall (in parameters) first
    factorised = [n for n in ranks if ranks[n] is not None]
    for name in sorted(factorised, key=lambda n: -(ideal[n] - ranks[n]) * sum(shapes[n])):
        rank = ranks[name]
        out_f, in_f = shapes[name]
        step = align * (out_f + in_f)
        if spent + step <= budget and (rank + align) * (out_f + in_f) < out_f * in_f:
            ranks[name] = rank + align
            spent += step
    return ranks


def kept_fraction(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> float:
    dense = sum(o * i for o, i in shapes.values())
    return sum(lowrank_cost(shapes[n], ranks.get(n)) for n in shapes) / dense
