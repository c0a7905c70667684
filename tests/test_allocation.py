import itertools

import numpy as np
import pytest

from vaclm.allocate.candidates import candidates, rank_grid
from vaclm.allocate.knapsack import solve_exact, solve_lagrangian, total
from vaclm.allocate.uniform import kept_fraction, uniform_ranks

DEMO_SHAPES = {f"b{b}.{n}": s for b in range(30) for n, s in
               {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}.items()}


@pytest.mark.parametrize("keep", [0.9, 0.8, 0.6, 0.3])
def test_uniform_ranks_are_aligned_and_hit_the_budget(keep):
    ranks = uniform_ranks(DEMO_SHAPES, keep, 8)
    assert all(r is None or (r % 8 == 0 and r >= 8) for r in ranks.values())
    assert keep - 0.01 <= kept_fraction(DEMO_SHAPES, ranks) <= keep


def test_uniform_keeps_dense_where_factorising_saves_nothing():
    ranks = uniform_ranks({"a": (64, 64), "b": (8, 4096)}, 0.99, 8)
    assert ranks["b"] is None  # even rank 8 costs more than the 8 x 4096 matrix
    assert ranks["a"] == 24  # 31.7 rounds down to 24; 32 would cost as much as the dense matrix
    assert uniform_ranks({"a": (64, 64)}, 0.5, 8)["a"] == 16


def test_rank_grid_never_includes_a_rank_that_costs_the_dense_matrix():
    assert rank_grid((64, 64), 8) == [8, 16, 24]
    assert all(r * (1536 + 576) < 1536 * 576 for r in rank_grid((1536, 576), 8))


def random_instance(rng, items, options):
    costs, losses = [], []
    for _ in range(items):
        c = np.sort(rng.choice(np.arange(1, 30), size=options, replace=False))
        l = np.sort(rng.random(options) * 10)[::-1]  # more cost, less loss (not necessarily convex)
        costs.append(c.astype(float))
        losses.append(l)
    return costs, losses


def brute_force(costs, losses, budget):
    best = np.inf
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if total(costs, choice) <= budget:
            loss = sum(l[j] for l, j in zip(losses, choice))
            best = min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs, losses = random_instance(rng, items=4, options=4)
    budget = float(rng.integers(sum(c[0] for c in costs), sum(c[-1] for c in costs) + 1))
    choice = solve_exact(costs, losses, budget)
    assert total(costs, choice) <= budget
    assert sum(l[j] for l, j in zip(losses, choice)) == pytest.approx(brute_force(costs, losses, budget))


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_is_near_exact_on_demo_sized_convex_curves(seed):
    rng = np.random.default_rng(seed)
    shapes = list(DEMO_SHAPES.values())
    cands = []
    for shape in shapes:
        sv = np.sort(rng.gamma(1.0, 1.0, min(shape)))[::-1] * rng.uniform(0.1, 10)
        errors = np.concatenate([np.cumsum((sv ** 2)[::-1])[::-1], [0.0]])
        cands.append(candidates(shape, errors, 1.0, 8))
    costs, losses = [c.costs for c in cands], [c.losses for c in cands]
    budget = 0.6 * sum(o * i for o, i in shapes)
    fast = solve_lagrangian(costs, losses, budget)
    spent = total(costs, fast)
    assert spent <= budget
    assert budget - spent < 8 * (1536 + 576)  # within one grid step of the largest matrix
    exact = solve_exact(costs, losses, budget)
    loss = lambda ch: sum(l[j] for l, j in zip(losses, ch))
    assert loss(fast) <= loss(exact) * 1.002 + 1e-9


def test_lagrangian_on_small_instances_matches_brute_force_closely():
    worst = 0.0
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        costs, losses = random_instance(rng, items=4, options=4)
        budget = float(rng.integers(sum(c[0] for c in costs), sum(c[-1] for c in costs) + 1))
        choice = solve_lagrangian(costs, losses, budget)
        assert total(costs, choice) <= budget
        best = brute_force(costs, losses, budget)
        worst = max(worst, sum(l[j] for l, j in zip(losses, choice)) - best)
    assert worst < 3.0  # non-convex random curves: a greedy repair can miss, but not by much


def test_lagrangian_solves_210_matrices_fast():
    """CPU time of this process, best of three: other processes on a loaded machine slow the wall
    clock, not this. Measured 2-4 ms; the exact DP on the same instance takes 0.7 s, which fails."""
    import time

    rng = np.random.default_rng(0)
    cands = [candidates(s, np.sort(rng.random(min(s) + 1))[::-1], 1.0, 8) for s in DEMO_SHAPES.values()]
    budget = 0.7 * sum(o * i for o, i in DEMO_SHAPES.values())
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        choice = solve_lagrangian([c.costs for c in cands], [c.losses for c in cands], budget)
        best = min(best, time.process_time() - start)
    assert total([c.costs for c in cands], choice) <= budget
    assert best < 0.25
