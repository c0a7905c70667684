"""The knapsack items of a structured run: per-matrix ranks for attention, one item per MLP.

An MLP's three projections are no longer independent once pruning is a choice (pruning narrows
all three at once), so each MLP is one knapsack item whose candidates are
- pruned to width w (three dense matrices of w rows/columns), priced by the refit error, and, in
  mixed mode,
- the low-rank frontier of its three matrices: the lower convex hulls of their (cost, loss)
  candidates merged by loss saved per parameter, which is every combination the Lagrangian
  knapsack could pick for them as separate items.
Attention matrices keep their per-matrix low-rank candidates (mixed) or stay dense (prune).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..allocate.candidates import Candidates

STRUCTURES = ("lowrank", "prune", "mixed")


@dataclass
class MLPChoice:
    width: int | None = None  # pruned to this many neurons; None: not pruned
    ranks: tuple[int | None, int | None, int | None] = (None, None, None)  # gate, up, down when not pruned


@dataclass
class MLPItem:
    choices: list[MLPChoice]
    costs: np.ndarray
    losses: np.ndarray


def lower_hull(costs: np.ndarray, losses: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points, cheapest first, loss strictly falling."""
    points = sorted(range(len(costs)), key=lambda i: (costs[i], losses[i]))
    hull: list[int] = []
    for i in points:
        if hull and losses[i] >= losses[hull[-1]]:
            continue  # dearer and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: not on the hull
            if (losses[b] - losses[a]) * (costs[i] - costs[a]) >= (losses[i] - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def lowrank_frontier(parts: list[Candidates]) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """The efficient combinations of one candidate per part: start from every part's cheapest hull
    point, then take hull steps in order of loss saved per unit cost (Minkowski sum of convex chains)."""
    hulls = [lower_hull(p.costs, p.losses) for p in parts]
    position = [0] * len(parts)
    steps = []
    for k, (part, hull) in enumerate(zip(parts, hulls)):
        for s in range(1, len(hull)):
            a, b = hull[s - 1], hull[s]
            steps.append(((part.losses[a] - part.losses[b]) / (part.costs[b] - part.costs[a]), k))
    steps.sort(key=lambda t: -t[0])

    def point():
        idx = [hull[pos] for hull, pos in zip(hulls, position)]
        return (tuple(p.ranks[i] for p, i in zip(parts, idx)), sum(p.costs[i] for p, i in zip(parts, idx)),
                sum(p.losses[i] for p, i in zip(parts, idx)))

    combos = [point()]
    for _, k in steps:
        position[k] += 1
        combos.append(point())
    return [c[0] for c in combos], np.asarray([c[1] for c in combos]), np.asarray([c[2] for c in combos])


def mlp_item(widths: list[int], width_costs: list[float], width_losses: list[float],
             lowrank: list[Candidates] | None) -> MLPItem:
    """Pruned widths (the full width is the dense MLP) and, when given, the low-rank frontier."""
    full = max(widths)
    choices = [MLPChoice(width=None if w == full else w) for w in widths]
    costs, losses = list(width_costs), list(width_losses)
    if lowrank is not None:
        ranks, c, l = lowrank_frontier(lowrank)
        keep = [i for i, r in enumerate(ranks) if any(x is not None for x in r)]  # all-dense is the full width
        choices += [MLPChoice(ranks=ranks[i]) for i in keep]
        costs += list(c[keep])
        losses += list(l[keep])
    return MLPItem(choices, np.asarray(costs, float), np.asarray(losses, float))


def dense_only(shape: tuple[int, int], dense_cost: float) -> Candidates:
    """A matrix that stays dense: one candidate."""
    return Candidates([None], np.asarray([dense_cost], float), np.asarray([0.0]))
