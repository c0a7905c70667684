"""A generic evolutionary search over discrete allocations under an exact budget (EvoPress-style).

The engine knows nothing about models. A genome is one level per item (an index into that item's
cost table, e.g. a matrix's candidate ranks). Fitness is a callable `score(genomes, stage,
generation) -> list[float]`, lower is better; it is called once per selection stage with every
genome of that stage, so a backend can score them in parallel.

The budget invariant ("full"): total cost <= budget, and no single item can be raised one level
without exceeding it. So the gap to the budget is always smaller than the cheapest step that is
still available: with items whose step is 8 ranks, within one grid step of the smallest matrix.
Every mutation ends with a repair that restores it.

One generation: `offspring` distinct mutants of the parent; stage s scores the pool and keeps the
best `survivors[s]`; the parent joins the last stage (elitism, ties keep the parent). The last
stage must score a genome the same way in every generation (fixed tokens): the parent keeps its
score, so it is not re-scored and the best fitness never gets worse. Each generation draws its
random numbers from (seed, generation), so a resumed search continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

STATE_VERSION = 1


@dataclass(frozen=True)
class Genome:
    levels: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"levels": list(self.levels)}

    @classmethod
    def from_dict(cls, data: dict) -> "Genome":
        if data.get("genes"):  # states of the removed --search-exponent carried its index here
            raise ValueError("search state with a Fisher-exponent gene (--search-exponent, removed): start over")
        return cls(tuple(int(v) for v in data["levels"]))


class Space:
    """Items with increasing cost tables and one budget."""

    def __init__(self, costs: Sequence[Sequence[float]], budget: float):
        width = max(len(c) for c in costs)
        self.table = np.full((len(costs), width + 1), np.inf)  # one inf column: "no next level"
        for i, c in enumerate(costs):
            c = np.asarray(c, float)
            if len(c) == 0 or np.any(np.diff(c) <= 0):
                raise ValueError(f"item {i}: costs must be non-empty and strictly increasing")
            self.table[i, : len(c)] = c
        self.top = np.array([len(c) - 1 for c in costs])
        self.budget = float(budget)
        if self.table[:, 0].sum() > self.budget:
            raise ValueError(f"budget {budget:.0f} is below the cheapest choice {self.table[:, 0].sum():.0f}")

    @property
    def rows(self) -> np.ndarray:
        return np.arange(len(self.top))

    def cost(self, levels) -> float:
        return float(self.table[self.rows, np.asarray(levels)].sum())

    def next_steps(self, levels: np.ndarray) -> np.ndarray:
        """Cost of raising each item one level (inf at its top level)."""
        return self.table[self.rows, levels + 1] - self.table[self.rows, levels]

    def repair(self, levels, rng: np.random.Generator) -> np.ndarray:
        """Restore the invariant: lower random items until the cost fits, then fill."""
        return self.fill(self.lower(levels, rng), rng)

    def lower(self, levels, rng: np.random.Generator, keep: Sequence[int] = ()) -> np.ndarray:
        """Lower random items (not those in `keep` while others can go down) one level at a time until the cost fits."""
        levels = np.array(levels, dtype=np.int64)
        spent, keep = self.cost(levels), [int(k) for k in keep]
        while spent > self.budget:
            down = levels > 0
            others = down.copy()
            others[keep] = False
            j = int(rng.choice(np.flatnonzero(others if others.any() else down)))
            spent -= self.table[j, levels[j]] - self.table[j, levels[j] - 1]
            levels[j] -= 1
        return levels

    def fill(self, levels, rng: np.random.Generator, protect: Sequence[int] = ()) -> np.ndarray:
        """Raise random items whose next step fits (items in `protect` last) until none fits."""
        levels = np.array(levels, dtype=np.int64)
        spent = self.cost(levels)
        protected = np.zeros(len(levels), bool)
        protected[list(protect)] = True
        while True:
            fits = self.next_steps(levels) <= self.budget - spent
            if not fits.any():
                return levels
            preferred = fits & ~protected
            j = int(rng.choice(np.flatnonzero(preferred if preferred.any() else fits)))
            spent += self.table[j, levels[j] + 1] - self.table[j, levels[j]]
            levels[j] += 1

    def level_switch(self, levels: np.ndarray, rng: np.random.Generator, max_step: int) -> np.ndarray:
        """Raise one random item by 1..max_step levels, pay for it by lowering random others one
        level at a time, then fill what is left without handing it straight back to them."""
        raisable = np.flatnonzero(levels < self.top)
        if raisable.size == 0:
            return levels
        i = int(rng.choice(raisable))
        raised = levels.copy()
        raised[i] = min(raised[i] + int(rng.integers(1, max_step + 1)), self.top[i])
        lowered = self.lower(raised, rng, keep=[i])
        return self.fill(lowered, rng, protect=np.flatnonzero(lowered < raised))

    def mutate(self, genome: Genome, rng: np.random.Generator, max_moves: int = 4, max_step: int = 1) -> Genome:
        levels = np.array(genome.levels, dtype=np.int64)
        for _ in range(int(rng.integers(1, max_moves + 1))):
            levels = self.level_switch(levels, rng, max_step)
        return Genome(tuple(int(v) for v in levels))


@dataclass(frozen=True)
class Settings:
    offspring: int = 8
    survivors: tuple[int, ...] = (2, 1)  # kept after each stage; the last stage keeps 1
    max_moves: int = 4  # level switches per mutation: 1..max_moves (compound moves escape local optima)
    max_step: int = 1  # levels one switch raises its item by: 1..max_step

    def __post_init__(self):
        if self.offspring < 1 or not self.survivors or self.survivors[-1] != 1:
            raise ValueError("need offspring >= 1 and survivors ending in 1")
        if any(a < b for a, b in zip(self.survivors, self.survivors[1:])) or min(self.survivors) < 1:
            raise ValueError(f"survivors must be positive and non-increasing, got {self.survivors}")
        if self.max_moves < 1 or self.max_step < 1:
            raise ValueError("max_moves and max_step must be >= 1")


Score = Callable[[list[Genome], int, int], list[float]]


@dataclass
class Evolution:
    space: Space
    score: Score
    settings: Settings
    seed: int
    parent: Genome
    parent_fitness: float | None = None  # its last-stage score, never recomputed
    generation: int = 0
    elapsed: float = 0.0  # seconds spent in generations, summed over resumed runs
    history: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, space: Space, score: Score, settings: Settings, seed: int, genome: Genome) -> "Evolution":
        """From a starting genome (e.g. the knapsack solution), repaired to the invariant and scored."""
        levels = space.repair(genome.levels, np.random.default_rng([seed, 2**31 - 1]))
        evo = cls(space, score, settings, seed, Genome(tuple(int(v) for v in levels)))
        begin = time.time()
        evo.parent_fitness = score([evo.parent], len(settings.survivors) - 1, -1)[0]
        evo.elapsed = time.time() - begin
        evo._record(evaluations=1, improved=False)
        return evo

    def step(self) -> dict:
        """One generation; returns its history entry."""
        begin = time.time()
        self.generation += 1
        rng = np.random.default_rng([self.seed, self.generation])
        s = self.settings
        pool: list[Genome] = []
        for _ in range(20 * s.offspring):  # distinct offspring, none equal to the parent
            child = self.space.mutate(self.parent, rng, s.max_moves, s.max_step)
            if child != self.parent and child not in pool:
                pool.append(child)
            if len(pool) == s.offspring:
                break
        evaluations = 0
        for stage, keep in enumerate(s.survivors):
            scores = self.score(pool, stage, self.generation) if pool else []
            evaluations += len(pool)
            if stage == len(s.survivors) - 1:  # the parent joins with its score: the last stage's tokens are fixed
                pool, scores = [self.parent] + pool, [self.parent_fitness] + scores
            order = np.argsort(np.asarray(scores, float), kind="stable")[:keep]  # stable: ties keep the parent
            pool, scores = [pool[k] for k in order], [scores[k] for k in order]
        improved = pool[0] != self.parent
        self.parent, self.parent_fitness = pool[0], float(scores[0])
        self.elapsed += time.time() - begin
        return self._record(evaluations, improved)

    def _record(self, evaluations: int, improved: bool) -> dict:
        entry = {"generation": self.generation, "fitness": self.parent_fitness, "seconds": self.elapsed,
                 "evaluations": evaluations, "improved": bool(improved), "cost": self.space.cost(self.parent.levels)}
        self.history.append(entry)
        return entry

    def run(self, generations: int | None = None, time_limit: float | None = None,
            on_generation: Callable[["Evolution"], None] | None = None, progress: bool = True) -> "Evolution":
        """Until `generations` in total are done or the next one would pass `time_limit` seconds."""
        if generations is None and time_limit is None:
            raise ValueError("give generations, a time limit, or both")
        bar = tqdm(total=generations, initial=self.generation if generations else 0, desc="evolve", unit="gen",
                   disable=not progress)
        bar.set_postfix(kl=f"{self.parent_fitness:.5f}")
        try:
            while generations is None or self.generation < generations:
                last = self.history[-1]["seconds"] - self.history[-2]["seconds"] if len(self.history) > 1 else 0.0
                if time_limit is not None and self.elapsed + last > time_limit:
                    break
                entry = self.step()
                bar.update(1)
                bar.set_postfix(kl=f"{entry['fitness']:.5f}", s=f"{self.elapsed:.0f}")
                if on_generation is not None:
                    on_generation(self)
        finally:
            bar.close()
        return self

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "generation": self.generation, "elapsed": self.elapsed,
                "parent": self.parent.to_dict(), "parent_fitness": self.parent_fitness, "history": self.history}

    @classmethod
    def from_state(cls, space: Space, score: Score, settings: Settings, state: dict) -> "Evolution":
        if state.get("version", 0) > STATE_VERSION:
            raise ValueError("search state written by a newer vaclm")
        return cls(space, score, settings, int(state["seed"]), Genome.from_dict(state["parent"]),
                   float(state["parent_fitness"]), int(state["generation"]), float(state["elapsed"]),
                   list(state["history"]))
