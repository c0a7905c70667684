"""The block walk that applies chosen ranks (`compress_with_ranks`).

1. Gradient statistics, when the method or the allocation needs them.
2. Ranks from the allocation (or the checkpoint of a resumed run).
3. For each block in the configured order: run the calibration inputs that the already
   compressed prefix produces through it while hooks accumulate input statistics, factorise
   every target, swap in LowRankLinear. With `sequential=False` all statistics come from the
   dense model (the classic one-shot baseline).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..methods import LayerStats
from ..model.arch import get_submodule
from ..model.blocks import BlockRunner
from ..model.statistics import input_stats
from ..model.surgery import dense_weight, replace_with_lowrank
from .order import block_order
from .run import CompressionResult, Run, check_finite


def compress_with_ranks(run: Run, allocation) -> CompressionResult:
    """Compress `run.model` in place with the ranks `allocation` (a RankAllocation) chooses.

    With a checkpoint, gradient statistics, ranks and every finished block are saved as they are
    made, and whatever the checkpoint already holds is reused instead of recomputed.
    """
    start = time.time()
    model, config, targets = run.model, run.config, run.targets
    check_finite(model)
    checkpoint = run.checkpoint
    saved_plan = checkpoint.plan() if checkpoint else None
    grads = run.gradients(needed=saved_plan is None and allocation.needs_gradients)
    if saved_plan is not None:
        ranks, table = saved_plan
        if hasattr(allocation, "restore"):  # --elastic: the order the saved plan was made with
            allocation.restore(checkpoint)
    else:
        with run.stages.stage("allocation"):
            ranks, table = allocation.ranks(run, grads)
        if checkpoint:
            checkpoint.save_plan(ranks, table)
    result = CompressionResult(config=config, ranks=dict(ranks), shapes=targets.shapes, allocation=table,
                               elastic=getattr(allocation, "order", None))

    with run.stages.stage("sequential pass"):
        _walk(run, ranks, grads, result)
    result.seconds = time.time() - start
    result.stages = run.stages.to_dict()
    return result


def _walk(run: Run, ranks: dict, grads: dict, result: CompressionResult) -> None:
    """Factorise block by block in the configured order (one-shot: after a walk of the dense model)."""
    model, config, method, targets, checkpoint = run.model, run.config, run.method, run.targets, run.checkpoint
    per_block = targets.per_block
    runner = BlockRunner(model, targets.spec, run.calib, config.batch_size, run.device)
    order = block_order(len(per_block), config.order if config.sequential else "front-to-back")
    pending = set(order)
    done = checkpoint.completed if checkpoint else set()
    if checkpoint:
        result.errors.update(checkpoint.state["errors"])
    spare = result.elastic.spare_ranks() if result.elastic is not None else {}  # --elastic: kept dense here
    deferred = []  # one-shot mode: (block, names, stats) factorised after the dense walk
    for i in tqdm(order, desc=f"compress ({config.method})", disable=not run.progress, unit="block"):
        todo = [n for n in per_block[i] if ranks[n] is not None or n in spare]
        pending.discard(i)
        if not todo:
            continue
        if i in done and config.sequential:
            _apply(model, checkpoint.load_block(i), result)
            runner.block_changed(i, pending)
            continue
        modules = {n: get_submodule(model, n) for n in todo}
        inputs = input_stats(runner, i, runner.inputs_for(i), modules) if method.needs_inputs and i not in done else {}
        if config.sequential:
            _factorise_block(run, i, todo, inputs, grads, result)
            runner.block_changed(i, pending)
        else:
            deferred.append((i, todo, inputs))
            runner.prune(pending)
    for i, todo, inputs in deferred:
        if i in done:
            _apply(model, checkpoint.load_block(i), result)
        else:
            _factorise_block(run, i, todo, inputs, grads, result)


SPARE = "#spare"  # checkpoint key suffix of an --elastic run's spare factors (the module stays dense)


def _apply(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], result: CompressionResult) -> None:
    for name, (up, down) in factors.items():
        if name.endswith(SPARE):
            result.spare[name.removesuffix(SPARE)] = (up, down)
        else:
            replace_with_lowrank(model, name, up, down)


def _factorise_block(run: Run, block: int, names: list[str], inputs: dict, grads: dict,
                     result: CompressionResult) -> None:
    """Factorise `names` (block `block`) in place at their ranks; record errors and checkpoint."""
    made, errors = {}, {}
    spare = result.elastic.spare_ranks() if result.elastic is not None else {}
    for name in names:
        rank = result.ranks[name]
        dense = dense_weight(get_submodule(run.model, name))[0]
        weight = dense.detach().to(run.device)
        stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
        if rank is None:  # --elastic: dense at the top size; factors for the smaller sizes, module unchanged
            up, down = run.method.factorize(weight, stats, max_rank=spare[name]).at_rank(spare[name])
            result.spare[name] = made[name + SPARE] = (up.to("cpu", dense.dtype), down.to("cpu", dense.dtype))
            continue
        factors = run.method.factorize(weight, stats, max_rank=rank)
        module = replace_with_lowrank(run.model, name, *factors.at_rank(rank))
        made[name] = (module.up.weight, module.down.weight)
        errors[name] = float(factors.errors[rank])
    result.errors.update(errors)
    if run.checkpoint:
        run.checkpoint.save_block(block, made, errors)
