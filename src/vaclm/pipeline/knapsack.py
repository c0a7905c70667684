"""`--allocation knapsack`: every matrix's rank from one multiple-choice knapsack over estimated losses.

A walk over the dense model gives every matrix's error curve (singular values of its weighted
matrix, no singular vectors) times the method's loss scale: the estimated loss of each candidate
rank. The knapsack (allocate/knapsack.py) picks one candidate per matrix with the least total
loss under the budget. `depth_tilt` weights block i's estimates by exp(tilt * i / (blocks - 1))
when solving (the report keeps the method's own estimates).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..allocate.candidates import Candidates, candidates
from ..allocate.costs import PARAMETERS, CostModel
from ..allocate.knapsack import solve_lagrangian
from ..errors import VaclmError
from ..methods import LayerStats
from ..model.blocks import BlockRunner
from ..model.statistics import input_stats
from ..model.surgery import Targets, dense_weight
from .allocation import RankAllocation, cost_model, register


@register("knapsack")
class Knapsack(RankAllocation):
    needs_gradients = True

    def ranks(self, run, grads):
        ranks, table, _ = knapsack_ranks(run.model, run.targets, run.method, run.calib, grads, run.config, run.device,
                                         run.progress)
        return ranks, table


class KnapsackPlan:
    """The knapsack over every target: candidates, budget, and per-matrix weights on the losses."""

    def __init__(self, options: dict[str, Candidates], budget: float, cost: CostModel = PARAMETERS,
                 weights: dict[str, float] | None = None):
        self.options, self.budget, self.cost = options, budget, cost
        # name -> factor on its loss estimates when solving (depth_weights); absent: 1
        self.weights = weights or {}
        self.chosen: dict[str, int] = {}  # name -> index of the chosen candidate

    def solve(self) -> dict[str, int | None]:
        names = list(self.options)
        try:
            choice = solve_lagrangian([self.options[n].costs for n in names],
                                      [self.options[n].losses * self.weights.get(n, 1.0) for n in names], self.budget)
        except ValueError as exc:
            raise VaclmError(f"the budget is below what the smallest ranks allow ({exc}); raise --keep") from exc
        self.chosen = dict(zip(names, choice))
        return {n: self.options[n].ranks[j] for n, j in self.chosen.items()}

    def table(self) -> dict[str, dict]:
        return {n: {"rank": c.ranks[j], "cost": float(c.costs[j]), "estimated_loss": float(c.losses[j])}
                for n, c in self.options.items() for j in [self.chosen[n]]}


def depth_weights(per_block: list[list[str]], tilt: float) -> dict[str, float]:
    """exp(tilt * i / (blocks - 1)) for every matrix of block i (config.depth_tilt)."""
    last = max(len(per_block) - 1, 1)
    return {n: float(np.exp(tilt * i / last)) for i, names in enumerate(per_block) for n in names} if tilt else {}


def priced(options: Candidates, shape: tuple[int, int], cost: CostModel) -> Candidates:
    """The same candidates with their costs under `cost`."""
    if cost == PARAMETERS:
        return options
    return Candidates(options.ranks, np.asarray([cost.cost(shape, r) for r in options.ranks], float), options.losses)


def knapsack_ranks(model, targets: Targets, method, calib, grads, config, device, progress
                   ) -> tuple[dict[str, int | None], dict[str, dict], KnapsackPlan]:
    per_block, modules, shapes = targets.per_block, targets.modules, targets.shapes
    cost = cost_model(model, config)
    runner = BlockRunner(model, targets.spec, calib, config.batch_size, device)
    options: dict[str, Candidates] = {}
    for i in tqdm(range(len(per_block)), desc="allocation: error curves", disable=not progress, unit="block"):
        batches = runner.inputs_for(i)
        block_modules = {n: modules[n] for n in per_block[i]}
        inputs = input_stats(runner, i, batches, block_modules) if method.needs_inputs else {}
        for name, module in block_modules.items():
            weight = dense_weight(module)[0].detach().to(device)
            stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
            errors = method.error_curve(weight, stats).cpu().numpy()
            options[name] = priced(candidates(shapes[name], errors, method.loss_scale(weight, stats), config.rank_align),
                                   shapes[name], cost)
        runner.prune(set(range(i + 1, len(per_block))))
    plan = KnapsackPlan(options, config.keep * sum(cost.dense(s) for s in shapes.values()), cost,
                        weights=depth_weights(per_block, config.depth_tilt))
    ranks = plan.solve()
    assert sum(float(options[n].costs[j]) for n, j in plan.chosen.items()) <= plan.budget + 1e-6
    return ranks, plan.table(), plan
