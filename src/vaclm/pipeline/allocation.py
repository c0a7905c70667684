"""Choose every matrix's rank before compressing: uniform, or a knapsack over estimated losses.

The knapsack is solved once, up front, from a walk over the dense model: every matrix's error
curve (singular values of its weighted matrix, no singular vectors) times the method's loss
scale prices each candidate rank. Re-solving for the remaining budget as blocks are compressed
was considered: the ranks already spent are fixed, and the remaining blocks' curves are still the
dense-walk estimates, so it would return the same ranks; fresh curves would need another walk.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..allocate.candidates import Candidates, candidates
from ..allocate.costs import PARAMETERS, CostModel, int8_bytes
from ..allocate.knapsack import solve_lagrangian, total
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
                   ) -> tuple[dict[str, int | None], dict[str, dict]]:
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
    names = list(options)
    budget = keep * sum(cost.dense(s) for s in shapes.values())
    try:
        choice = solve_lagrangian([options[n].costs for n in names], [options[n].losses for n in names], budget)
    except ValueError as exc:
        raise VaclmError(f"keep {keep:.4f} is below what the smallest ranks allow ({exc}); raise --keep") from exc
    ranks = {n: options[n].ranks[j] for n, j in zip(names, choice)}
    table = {n: {"rank": ranks[n], "cost": float(options[n].costs[j]), "estimated_loss": float(options[n].losses[j])}
             for n, j in zip(names, choice)}
    assert total([options[n].costs for n in names], choice) <= budget + 1e-6
    return ranks, table
