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
    import time

    rng = np.random.default_rng(0)
    cands = [candidates(s, np.sort(rng.random(min(s) + 1))[::-1], 1.0, 8) for s in DEMO_SHAPES.values()]
    start = time.perf_counter()
    budget = 0.7 * sum(o * i for o, i in DEMO_SHAPES.values())
    solve_lagrangian([c.costs for c in cands], [c.losses for c in cands], budget)
    assert time.perf_counter() - start < 1.0


def test_plan_resolve_moves_budget_to_a_repriced_matrix():
    """When a matrix turns out costlier to truncate than the up-front walk said, re-solving gives
    it a higher rank, takes the budget from matrices not yet fixed, and keeps the total budget."""
    from vaclm.allocate.candidates import candidates
    from vaclm.pipeline.allocation import KnapsackPlan

    shape = (256, 192)
    curve = lambda scale: scale * np.exp(-np.arange(193) / 20.0)
    options = {f"m{k}": candidates(shape, curve(1.0), 1.0, 8) for k in range(4)}
    plan = KnapsackPlan(dict(options), budget=4 * 48 * (256 + 192))
    before = plan.solve()
    assert set(before.values()) == {48}  # identical matrices share the budget evenly
    after = plan.solve({"m0": candidates(shape, curve(4.0), 1.0, 8)})
    assert after["m0"] > before["m0"] and set(after) == {"m0"}
    rest = plan.solve({n: options[n] for n in ("m1", "m2", "m3")})
    assert all(rest[n] <= before[n] for n in rest) and any(rest[n] < before[n] for n in rest)
    spent = sum(float(plan.options[n].costs[j]) for n, j in plan.fixed.items())
    assert plan.budget - 8 * (256 + 192) <= spent <= plan.budget


def test_resolved_knapsack_run_meets_the_budget():
    import vaclm
    from vaclm.config import CompressConfig
    from conftest import tiny_model, token_batch

    model = tiny_model("llama", num_hidden_layers=4)
    config = CompressConfig(keep=0.6, allocation="knapsack", method="gfwsvd", resolve=True,
                            calib_samples=8, calib_seq_len=32)
    result = vaclm.compress(model, config, token_batch(8, 32), progress=False)
    step = min(8 * (o + i) for o, i in result.shapes.values())
    dense = sum(o * i for o, i in result.shapes.values())
    assert 0.6 - step / dense <= result.kept_fraction <= 0.6 + 1e-9
    assert {n: a["rank"] for n, a in result.allocation.items()} == result.ranks
