"""The evolutionary engine on toy objectives with known optima, its budget invariant, determinism, resume."""

import json

import numpy as np
import pytest

from vaclm.allocate.candidates import candidates
from vaclm.allocate.knapsack import solve_exact
from vaclm.search.engine import Evolution, Genome, Settings, Space

DEMO_SHAPES = [s for _ in range(30) for s in
               [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]]


def is_full(space, levels):
    """The engine's budget invariant: within the budget, and no single item can be raised one level."""
    levels = np.asarray(levels)
    gap = space.budget - space.cost(levels)
    return bool(gap >= 0 and np.all(levels >= 0) and np.all(levels <= space.top)
                and not np.any(space.next_steps(levels) <= gap))


def separable(costs, losses):
    def score(genomes, stage, generation):
        return [float(sum(l[j] for l, j in zip(losses, g.levels))) for g in genomes]
    return score


def convex_instance(seed, items=6, levels=10):
    """Costs with different step sizes per item (like matrices of different shapes), convex losses."""
    rng = np.random.default_rng(seed)
    costs, losses = [], []
    for _ in range(items):
        step = int(rng.integers(2, 6))
        costs.append(step * np.arange(1, levels + 1, dtype=float))
        losses.append(rng.uniform(1, 10) * np.exp(-rng.uniform(0.2, 0.8) * np.arange(levels)))
    budget = 0.5 * sum(c[-1] for c in costs)
    return costs, losses, budget


def bad_start(space, losses):
    """Full, but the budget spent on the items where it saves least."""
    levels = np.zeros(len(losses), int)
    while True:
        fits = [i for i in range(len(losses)) if space.next_steps(levels)[i] <= space.budget - space.cost(levels)]
        if not fits:
            return Genome(tuple(levels))
        levels[min(fits, key=lambda i: losses[i][levels[i]] - losses[i][levels[i] + 1])] += 1


@pytest.mark.parametrize("seed", range(4))
def test_finds_the_knapsack_optimum_of_a_separable_convex_objective(seed):
    costs, losses, budget = convex_instance(seed)
    space = Space(costs, budget)
    exact = solve_exact(costs, losses, budget)
    best = sum(l[j] for l, j in zip(losses, exact))
    evo = Evolution.start(space, separable(costs, losses), Settings(offspring=8, survivors=(3, 1)), seed,
                          bad_start(space, losses))
    assert evo.parent_fitness > best + 0.5
    evo.run(generations=300, progress=False)
    assert evo.parent_fitness == pytest.approx(best, abs=1e-9)
    assert is_full(space, evo.parent.levels)


def test_finds_the_optimum_of_a_non_separable_objective():
    """f = ||M (l - t)||^2: coupled items, minimum 0 at the full allocation t."""
    rng = np.random.default_rng(7)
    costs = [np.arange(1, 13, dtype=float) * s for s in (1, 2, 3, 1, 2, 3)]
    target = np.array([5, 3, 2, 9, 4, 1])
    space = Space(costs, sum(c[t] for c, t in zip(costs, target)))
    assert is_full(space, target)
    m = np.eye(6) + 0.6 * rng.standard_normal((6, 6))

    def score(genomes, stage, generation):
        return [float(np.sum((m @ (np.array(g.levels) - target)) ** 2)) for g in genomes]

    evo = Evolution.start(space, score, Settings(offspring=12, survivors=(4, 1)), 0, Genome((0,) * 6))
    evo.run(generations=400, progress=False)
    assert evo.parent.levels == tuple(target)
    assert evo.parent_fitness == 0.0


def test_budget_invariant_holds_under_thousands_of_random_mutations():
    """Demo-shaped matrices, ranks on the 8-grid plus dense: after every mutation the cost fits the
    budget and no single step fits in the gap, so the gap is below the cheapest available step."""
    rng = np.random.default_rng(0)
    options = [candidates(s, np.zeros(min(s) + 1), 1.0, 8) for s in DEMO_SHAPES]
    costs = [o.costs for o in options]
    space = Space(costs, 0.6 * sum(o * i for o, i in DEMO_SHAPES))
    smallest_step = 8 * (192 + 576)
    genome = Genome(tuple(space.repair(np.zeros(len(costs), int), rng)))
    for k in range(3000):
        genome = space.mutate(genome, rng, max_moves=4, max_step=3)
        levels = np.array(genome.levels)
        gap = space.budget - space.cost(levels)
        assert 0 <= gap < np.min(space.next_steps(levels)), k
        assert is_full(space, levels)
        if np.any(levels[1::7] < space.top[1::7]):  # a k_proj can still grow: within its 8-rank step
            assert gap < smallest_step
    assert np.unique(levels).size > 5  # the walk really moved


def test_a_start_above_the_budget_is_repaired():
    space = Space([[1.0, 2.0, 3.0]] * 4, 6.0)
    levels = space.repair([2, 2, 2, 2], np.random.default_rng(0))
    assert space.cost(levels) <= 6.0 and is_full(space, levels)


def run_toy(seed, generations):
    costs, losses, budget = convex_instance(11)
    space = Space(costs, budget)
    evo = Evolution.start(space, separable(costs, losses), Settings(), seed, Genome((0,) * len(costs)))
    return evo.run(generations=generations, progress=False), space, separable(costs, losses)


def strip_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_search_is_deterministic_for_a_seed():
    a, _, _ = run_toy(3, 25)
    b, _, _ = run_toy(3, 25)
    c, _, _ = run_toy(4, 25)
    assert a.parent == b.parent and strip_seconds(a.history) == strip_seconds(b.history)
    assert strip_seconds(a.history) != strip_seconds(c.history)


def test_resume_equals_an_uninterrupted_run():
    full, _, _ = run_toy(5, 30)
    part, space, score = run_toy(5, 12)
    state = json.loads(json.dumps(part.state_dict()))  # what is written to disk every generation
    resumed = Evolution.from_state(space, score, Settings(), state).run(generations=30, progress=False)
    assert resumed.parent == full.parent
    assert strip_seconds(resumed.history) == strip_seconds(full.history)


def test_states_of_the_removed_exponent_search_are_refused():
    part, space, score = run_toy(5, 3)
    state = part.state_dict()
    older = {**state, "parent": {**state["parent"], "genes": []}}  # what states without that search held
    assert Evolution.from_state(space, score, Settings(), older).parent == part.parent
    with pytest.raises(ValueError, match="--search-exponent, removed"):
        Evolution.from_state(space, score, Settings(), {**state, "parent": {**state["parent"], "genes": [2]}})


class FakeClock:
    """Stands in for the engine's `time` module: time passes only when the test says so, so the
    time-limit logic is checked exactly, however loaded the machine is."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    perf_counter = monotonic = time


def test_time_limit_stops_the_search(monkeypatch):
    from vaclm.search import engine

    clock, tick = FakeClock(), 2.0**-4  # a power of two: the sums below are exact
    monkeypatch.setattr(engine, "time", clock)
    costs, losses, budget = convex_instance(1)

    def timed(genomes, stage, generation):  # every scoring call takes one tick
        clock.now += tick
        return separable(costs, losses)(genomes, stage, generation)

    evo = Evolution.start(Space(costs, budget), timed, Settings(), 0, Genome((0,) * len(costs)))
    assert evo.elapsed == tick  # the start genome's score
    # each generation scores two stages (2 ticks); a generation starts only if, costing as much as
    # the last, it ends within the limit: 1 + 2k <= 20 ticks -> 9 generations, 19 ticks
    evo.run(generations=1000, time_limit=20 * tick, progress=False)
    assert evo.generation == 9 and evo.elapsed == 19 * tick
    assert [h["seconds"] for h in evo.history] == [(1 + 2 * k) * tick for k in range(10)]
    # the limit counts the time already spent (a resumed search keeps its elapsed time)
    evo.run(generations=1000, time_limit=20 * tick, progress=False)
    assert evo.generation == 9
    evo.run(generations=1000, time_limit=21 * tick, progress=False)
    assert evo.generation == 10 and evo.elapsed == 21 * tick


def test_best_fitness_never_gets_worse_and_parent_is_not_rescored():
    calls = []
    costs, losses, budget = convex_instance(2)

    def score(genomes, stage, generation):
        calls.append((stage, list(genomes)))
        return separable(costs, losses)(genomes, stage, generation)

    evo = Evolution.start(Space(costs, budget), score, Settings(offspring=6, survivors=(2, 1)), 0,
                          Genome((0,) * len(costs)))
    evo.run(generations=20, progress=False)
    fitness = [h["fitness"] for h in evo.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:]))
    last_stage = [g for stage, gs in calls[1:] if stage == 1 for g in gs]
    assert len(last_stage) == 2 * 20  # the two survivors each generation; the parent's score is cached
    assert all(len(gs) == 6 for stage, gs in calls if stage == 0)
