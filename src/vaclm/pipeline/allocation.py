"""Choose every matrix's rank: uniform, or a knapsack over estimated losses.

The knapsack is first solved up front, from a walk over the dense model: every matrix's error
curve (singular values of its weighted matrix, no singular vectors) times the method's loss
scale prices each candidate rank. With `resolve` (sequential runs), when a block is reached its
matrices are priced again from the inputs the compressed prefix really produces (the same SVD
that gives its factors, so at no extra cost), and the knapsack is solved again over that block
and the blocks still to come, for the budget the finished blocks left; only the block at hand
is fixed. Blocks still to come keep their dense-walk prices: fresh ones would need another walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..allocate.candidates import Candidates, candidates
from ..allocate.costs import PARAMETERS, CostModel, int8_bytes
from ..allocate.knapsack import solve_lagrangian
from ..errors import VaclmError
from ..methods import LayerStats
from ..model.blocks import BlockRunner
from ..model.surgery import Targets, dense_weight
from .statistics import input_stats


def keep_for_target_bytes(model, shapes: dict[str, tuple[int, int]], target_bytes: int) -> float:
    """The keep fraction of decoder linears at which the whole model's weights take `target_bytes`."""
    element = next(model.parameters()).element_size()
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_targets = sum(o * i for o, i in shapes.values())
    fixed = total_bytes - dense_targets * element  # embeddings, norms, lm_head: never compressed
    keep = (target_bytes - fixed) / (dense_targets * element)
    if not 0 < keep <= 1:
        raise VaclmError(
            f"target size {target_bytes:,} bytes is out of reach: the uncompressed parts alone take {fixed:,} bytes "
            f"and the dense model {total_bytes:,}; choose a size in between"
        )
    return keep


@dataclass
class KnapsackPlan:
    """The knapsack over every target, re-solvable as blocks are fixed one after another."""

    options: dict[str, Candidates]
    budget: float  # in the units of `cost` (parameters, or bytes with int8 factors)
    cost: CostModel = PARAMETERS
    fixed: dict[str, int] = field(default_factory=dict)  # name -> chosen candidate index, final
    planned: dict[str, int] = field(default_factory=dict)  # the up-front solution, for the report
    # name -> factor on its loss estimates when solving (depth_weights); absent: 1. The estimates
    # themselves (and the report's estimated_loss) stay as the method measured them
    weights: dict[str, float] = field(default_factory=dict)

    def solve(self, fresh: dict[str, Candidates] | None = None) -> dict[str, int | None]:
        """Re-price `fresh` matrices, solve over everything not yet fixed, fix `fresh`; their ranks."""
        self.options.update(fresh or {})
        free = [n for n in self.options if n not in self.fixed]
        spent = sum(float(self.options[n].costs[j]) for n, j in self.fixed.items())
        try:
            choice = solve_lagrangian([self.options[n].costs for n in free],
                                      [self.options[n].losses * self.weights.get(n, 1.0) for n in free], self.budget - spent)
        except ValueError as exc:
            raise VaclmError(f"the budget is below what the smallest ranks allow ({exc}); raise --keep") from exc
        picked = dict(zip(free, choice))
        if fresh is not None:
            self.fixed.update({n: picked[n] for n in fresh})
        return {n: self.options[n].ranks[j] for n, j in picked.items() if fresh is None or n in fresh}

    def fix(self, name: str, rank: int | None) -> None:
        """Record a rank decided earlier (a resumed run's finished blocks)."""
        self.fixed[name] = self.options[name].ranks.index(rank)

    def table(self) -> dict[str, dict]:
        return {n: {"rank": c.ranks[j], "cost": float(c.costs[j]), "estimated_loss": float(c.losses[j])}
                for n, c in self.options.items() for j in [self.fixed.get(n, self.planned.get(n))] if j is not None}


def depth_weights(per_block: list[list[str]], tilt: float) -> dict[str, float]:
    """exp(tilt * i / (blocks - 1)) for every matrix of block i (config.depth_tilt)."""
    last = max(len(per_block) - 1, 1)
    return {n: float(np.exp(tilt * i / last)) for i, names in enumerate(per_block) for n in names} if tilt else {}


def cost_model(model, config) -> CostModel:
    """Parameters, except for a byte budget with int8 factors: then bytes, factors at one byte an
    element plus scales (--keep alone means the same ranks with or without --int8)."""
    if config.int8 and config.target_bytes is not None:
        return int8_bytes(next(model.parameters()).element_size())
    return PARAMETERS


def priced(options: Candidates, shape: tuple[int, int], cost: CostModel) -> Candidates:
    """The same candidates with their costs under `cost`."""
    if cost == PARAMETERS:
        return options
    return Candidates(options.ranks, np.asarray([cost.cost(shape, r) for r in options.ranks], float), options.losses)


def knapsack_ranks(model, targets: Targets, method, calib, grads, config, device, progress
                   ) -> tuple[dict[str, int | None], dict[str, dict], KnapsackPlan]:
    per_block, modules, shapes, keep = targets.per_block, targets.modules, targets.shapes, config.keep
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
    plan = KnapsackPlan(options, keep * sum(cost.dense(s) for s in shapes.values()), cost,
                        weights=depth_weights(per_block, config.depth_tilt))
    ranks = plan.solve()
    plan.planned = {n: options[n].ranks.index(r) for n, r in ranks.items()}
    assert sum(float(options[n].costs[j]) for n, j in plan.planned.items()) <= plan.budget + 1e-6
    return ranks, plan.table(), plan
