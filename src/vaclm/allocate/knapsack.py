"""Multiple-choice knapsack: one candidate per item, minimum total loss, total cost <= budget.

Two solvers over the same input (per item: candidate costs and losses):
- `solve_exact`: dynamic programme over integer costs (divided by their gcd); exact, used to
  check the fast solver and for small problems.
- `solve_lagrangian`: for a multiplier lam each item independently takes argmin(loss + lam*cost);
  bisection finds the smallest lam whose choice fits, then a repair step spends what is left on
  the upgrades with the best loss saved per parameter. Hits the budget to within one candidate
  step; 210 matrices solve in milliseconds.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np


def _padded(costs: list[np.ndarray], losses: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(c) for c in costs)
    c = np.full((len(costs), width), np.inf)
    l = np.full((len(costs), width), np.inf)
    for i, (ci, li) in enumerate(zip(costs, losses)):
        c[i, : len(ci)], l[i, : len(li)] = ci, li
    return c, l


def total(costs, choice) -> float:
    return float(sum(costs[i][j] for i, j in enumerate(choice)))


def solve_lagrangian(costs: list[np.ndarray], losses: list[np.ndarray], budget: float) -> list[int]:
    c, l = _padded([np.asarray(x, float) for x in costs], [np.asarray(x, float) for x in losses])
    rows = np.arange(len(costs))
    valid = np.isfinite(c)
    c0, l0 = np.where(valid, c, 0.0), np.where(valid, l, 0.0)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(np.where(valid, l0 + lam * c0, np.inf), axis=1)

    cheapest = np.nanmin(np.where(np.isfinite(c), c, np.nan), axis=1)
    if cheapest.sum() > budget:
        raise ValueError(f"budget {budget:.0f} is below the cheapest choice {cheapest.sum():.0f}")
    lo, hi = 0.0, 1.0
    while c[rows, pick(hi)].sum() > budget:  # grow until the choice fits
        hi *= 4.0
        if hi > 1e300:
            break
    if c[rows, pick(lo)].sum() <= budget:
        hi = lo
    for _ in range(200):  # bisection on the multiplier, in log space when possible
        if hi - lo <= 1e-12 * hi:
            break
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1024 if hi > 1e-200 else 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            mid = 0.5 * (lo + hi)
        if c[rows, pick(mid)].sum() <= budget:
            hi = mid
        else:
            lo = mid
    choice = pick(hi)
    return _repair(c, l, choice, budget).tolist()


def _repair(c: np.ndarray, l: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend the leftover budget: repeatedly take the affordable move with the best loss saved per cost."""
    choice = choice.copy()
    rows = np.arange(len(c))
    spent = c[rows, choice].sum()
    while True:
        left = budget - spent
        extra = c - c[rows, choice][:, None]
        gain = l[rows, choice][:, None] - l
        ok = np.isfinite(c) & (extra > 0) & (extra <= left) & (gain > 0)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
        i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra[i, j]
        choice[i] = j


def solve_exact(costs: list[np.ndarray], losses: list[np.ndarray], budget: float, max_cells: int = 50_000_000) -> list[int]:
    ints = [np.asarray(x, dtype=np.int64) for x in costs]
    if any((np.asarray(x) != i).any() for x, i in zip(costs, ints)):
        raise ValueError("exact knapsack needs integer costs")
    unit = reduce(math.gcd, (int(v) for x in ints for v in x))
    ints = [x // unit for x in ints]
    cap = int(budget // unit)
    if cap * len(ints) > max_cells:
        raise ValueError(f"exact knapsack table too large ({cap} x {len(ints)}); use the Lagrangian solver")
    best = np.zeros(cap + 1)  # best[b]: minimum loss of the items so far with total cost <= b
    choices = np.zeros((len(ints), cap + 1), dtype=np.int32)
    for k, (ck, lk) in enumerate(zip(ints, losses)):
        new = np.full(cap + 1, np.inf)
        for j, (cost, loss) in enumerate(zip(ck, lk)):
            if cost > cap:
                continue
            cand = best[: cap + 1 - cost] + loss
            better = cand < new[cost:]
            new[cost:][better] = cand[better]
            choices[k, cost:][better] = j
        best = new
    if not np.isfinite(best[cap]):
        raise ValueError(f"budget {budget:.0f} is below the cheapest choice")
    choice, b = [], cap
    for k in range(len(ints) - 1, -1, -1):
        j = int(choices[k, b])
        choice.append(j)
        b -= int(ints[k][j])
    return choice[::-1]
