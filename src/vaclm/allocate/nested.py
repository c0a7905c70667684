"""One global order of rank steps over every matrix, so that every budget is a prefix of it.

Each matrix's candidates (allocate/candidates.py: grid ranks ascending, then dense) are walked
from dense down to the smallest rank, one candidate at a time. A step costs the loss it adds and
frees the parameters it saves; the steps of all matrices are sorted by loss added per parameter
freed, each step priced at the slope of the lower convex hull segment it lies on, so a matrix's
steps stay in its own order (hull slopes only grow) and the sorted list is the multiple-choice
knapsack's Lagrangian solution path. Taking the first n steps gives the model at every size:
ranks at a smaller budget never exceed those at a larger one, so truncated factors of the
largest model are the factors of every smaller one. A budget is met to within the last step
taken: one rank-grid step (or a dense matrix's drop to its largest saving rank, also less than
one grid step of parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .candidates import Candidates


@dataclass
class NestedOrder:
    shapes: dict[str, tuple[int, int]]
    steps: list[tuple[str, int]]  # (matrix, its rank after the step), from every matrix dense
    costs: list[float]  # parameters of the decoder linears after each step (costs[0]: before any)
    keep: float  # the largest size asked for (the --keep of the run)
    top: int  # steps taken for the largest size

    @property
    def dense_cost(self) -> float:
        return self.costs[0]

    @property
    def min_keep(self) -> float:
        return self.costs[-1] / self.dense_cost

    @property
    def top_kept(self) -> float:
        return self.costs[self.top] / self.dense_cost

    def steps_for(self, keep: float) -> int:
        """The fewest steps, at least the top size's, whose cost fits `keep`; ValueError outside the range."""
        if not self.min_keep <= keep <= self.keep + 1e-12:
            raise ValueError(f"keep {keep} is outside this elastic model's range {self.min_keep:.4f} to {self.keep}")
        budget = keep * self.dense_cost
        # costs only fall: the first index from `top` on whose cost fits
        n = self.top + int(np.searchsorted(-np.asarray(self.costs[self.top:]), -budget * (1 + 1e-12), side="left"))
        return min(n, len(self.steps))

    def ranks_after(self, n: int) -> dict[str, int | None]:
        ranks: dict[str, int | None] = {name: None for name in self.shapes}
        for name, rank in self.steps[:n]:
            ranks[name] = rank
        return ranks

    def ranks_at(self, keep: float) -> dict[str, int | None]:
        return self.ranks_after(self.steps_for(keep))

    def spare_ranks(self) -> dict[str, int]:
        """Matrices dense at the top size: the largest rank any smaller size gives them."""
        top = self.ranks_after(self.top)
        spare: dict[str, int] = {}
        for name, rank in self.steps[self.top:]:
            if top[name] is None and name not in spare:
                spare[name] = rank
        return spare

    def to_dict(self) -> dict:
        return {"keep": self.keep, "top": self.top, "shapes": {n: list(s) for n, s in self.shapes.items()},
                "steps": [[n, r] for n, r in self.steps], "costs": self.costs}

    @classmethod
    def from_dict(cls, data: dict) -> "NestedOrder":
        return cls(shapes={n: (int(s[0]), int(s[1])) for n, s in data["shapes"].items()},
                   steps=[(str(n), int(r)) for n, r in data["steps"]], costs=[float(c) for c in data["costs"]],
                   keep=float(data["keep"]), top=int(data["top"]))


def step_slopes(options: Candidates) -> np.ndarray:
    """Loss added per parameter freed by each step down (dense -> largest rank -> ... -> smallest),
    at the slope of the lower convex hull segment the step lies on; non-decreasing."""
    costs, losses = np.asarray(options.costs, float), np.asarray(options.losses, float)
    order = np.argsort(costs, kind="stable")  # ranks ascending, dense last (the most parameters)
    c, l = costs[order], losses[order]
    hull = [0]
    for j in range(1, len(c)):  # lower convex hull, left to right (monotone chain)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (l[b] - l[a]) * (c[j] - c[a]) >= (l[j] - l[a]) * (c[b] - c[a]):
                hull.pop()  # b lies on or above the chord a -> j
            else:
                break
        hull.append(j)
    # slope of going down from candidate j to j-1: that of the hull segment containing (j-1, j)
    slopes = np.empty(len(c) - 1)
    for a, b in zip(hull[:-1], hull[1:]):
        slopes[a:b] = (l[a] - l[b]) / (c[b] - c[a])
    down = slopes[::-1]  # first step: from dense
    return np.maximum.accumulate(down)  # guard the hull's monotonicity against rounding


def nested_order(options: dict[str, Candidates], shapes: dict[str, tuple[int, int]], keep: float,
                 weights: dict[str, float] | None = None) -> NestedOrder:
    """The global order of every matrix's steps down, and the number of steps for `keep`."""
    weights = weights or {}
    keys, moves = [], []
    for m, (name, opt) in enumerate(options.items()):
        scaled = Candidates(opt.ranks, opt.costs, np.asarray(opt.losses, float) * weights.get(name, 1.0))
        slopes = step_slopes(scaled)
        order = np.argsort(np.asarray(opt.costs, float), kind="stable")
        ranks = [opt.ranks[j] for j in order]
        costs = np.asarray(opt.costs, float)[order]
        for s, slope in enumerate(slopes):  # step s: candidate len-1-s -> len-2-s
            hi, lo = len(ranks) - 1 - s, len(ranks) - 2 - s
            keys.append((float(slope), m, s))
            moves.append((name, ranks[lo], float(costs[hi] - costs[lo])))
    sequence = sorted(range(len(keys)), key=keys.__getitem__)
    dense = float(sum(o * i for o, i in shapes.values()))
    steps, costs = [], [dense]
    for k in sequence:
        name, rank, freed = moves[k]
        if rank is None:
            raise ValueError(f"{name}: a step down must end at a rank")
        steps.append((name, int(rank)))
        costs.append(costs[-1] - freed)
    order = NestedOrder(dict(shapes), steps, costs, keep, 0)
    if keep < order.min_keep:
        raise ValueError(f"keep {keep} is below the smallest ranks' {order.min_keep:.4f}")
    order.top = order.steps_for(keep)
    return order
