"""Compress a model in place, block by block.

1. Statistics that need the whole model: gradients of the LM loss (methods that use the Fisher,
   and the knapsack's loss estimates).
2. Ranks: uniform, or a knapsack over error curves from a walk over the dense model.
3. For each block in the configured order: run the calibration inputs that the already
   compressed prefix produces through it while hooks accumulate input statistics, (knapsack with
   `resolve`) price the block's ranks again from those statistics and re-solve the knapsack for
   the budget left, factorise every target, swap in LowRankLinear. With `dense_targets` an
   unedited copy of the block runs beside it on the dense model's inputs, and whitening methods
   fit the dense outputs from the real inputs. With `sequential=False` all statistics come from
   the dense model (the classic one-shot baseline).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..allocate.uniform import kept_fraction, uniform_ranks
from ..config import CompressConfig
from ..errors import VaclmError
from ..io.checkpoint import Checkpoint
from ..methods import LayerStats, build_method
from ..model.arch import get_submodule
from ..model.blocks import BlockRunner
from ..model.surgery import Targets, dense_weight, replace_with_lowrank
from ..allocate.candidates import Candidates, candidates
from .allocation import KnapsackPlan, cost_model, depth_weights, keep_for_target_bytes, knapsack_ranks, priced
from .order import block_order
from .dense_stream import DenseStream
from .statistics import gradient_stats, input_stats


@dataclass
class CompressionResult:
    config: CompressConfig
    ranks: dict[str, int | None]  # None: kept dense
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, float] = field(default_factory=dict)  # truncation error at the chosen rank
    allocation: dict[str, dict] = field(default_factory=dict)  # knapsack: cost and estimated loss
    seconds: float = 0.0

    @property
    def kept_fraction(self) -> float:
        return kept_fraction(self.shapes, self.ranks)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "kept_fraction": self.kept_fraction,
            "seconds": self.seconds,
            "factorised": sum(r is not None for r in self.ranks.values()),
            "targets": len(self.ranks),
        }


def check_finite(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise VaclmError(f"weight {name} contains NaN or Inf; the checkpoint is damaged, re-download or re-convert it")


def compress_model(model, config: CompressConfig, calib: torch.Tensor, ranks: dict[str, int | None] | None = None,
                   device: str = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None,
                   gradients: dict | None = None) -> CompressionResult:
    """Compress `model` in place with `calib` token windows (samples x seq_len).

    With a `checkpoint`, gradient statistics, ranks and every finished block are saved as they
    are made, and whatever the checkpoint already holds is reused instead of recomputed.
    `gradients`: precomputed gradient statistics of this model and calibration (they depend on
    nothing else), e.g. to compare budgets or methods without recomputing them.
    """
    start = time.time()
    check_finite(model)
    targets = Targets.of(model)
    per_block, shapes = targets.per_block, targets.shapes
    if config.target_bytes is not None:
        config = replace(config, keep=keep_for_target_bytes(model, shapes, config.target_bytes))
    method = build_method(config.method, config.options)
    plan_knapsack = ranks is None and config.allocation == "knapsack"
    grads = {}
    if method.needs_gradients or plan_knapsack:
        grads = _gradients(model, targets, method, calib, device, progress, gradients, checkpoint, config)
        _warn_if_singular(method, grads)

    allocation, plan = {}, None
    saved_plan = checkpoint.plan() if checkpoint else None
    if saved_plan is not None:
        ranks, allocation, saved_options = saved_plan
        if saved_options is not None:
            cost = cost_model(model, config)
            plan = KnapsackPlan(_candidates_from_json(saved_options), config.keep * sum(cost.dense(s) for s in shapes.values()),
                                cost, weights=depth_weights(per_block, config.depth_tilt))
    elif ranks is None and plan_knapsack:
        ranks, allocation, plan = knapsack_ranks(model, targets, method, calib, grads, config, device, progress)
    elif ranks is None:
        ranks = uniform_ranks(shapes, config.keep, config.rank_align, cost_model(model, config))
    if checkpoint and saved_plan is None:
        checkpoint.save_plan(ranks, allocation, _candidates_to_json(plan.options) if plan else None)
    if not (config.resolve and config.sequential):
        plan = None  # the up-front ranks are final
    missing = set(shapes) - set(ranks)
    if missing:
        raise VaclmError(f"no rank given for {sorted(missing)[0]} (and {len(missing) - 1} more); give one per target")
    result = CompressionResult(config=config, ranks=dict(ranks), shapes=shapes, allocation=allocation)

    runner = BlockRunner(model, targets.spec, calib, config.batch_size, device)
    order = block_order(len(per_block), config.order if config.sequential else "front-to-back")
    pending = set(order)
    done = checkpoint.completed if checkpoint else set()
    if checkpoint:
        result.errors.update(checkpoint.state["errors"])
    dense = DenseStream(runner) if uses_dense_targets(config, method) else None  # --dense-targets
    deferred = []  # one-shot mode: (block, stats) factorised after the dense walk
    for i in tqdm(order, desc=f"compress ({config.method})", disable=not progress, unit="block"):
        # with a re-solved plan a matrix planned dense may still be factorised, and vice versa
        todo = [n for n in per_block[i] if plan is not None or ranks[n] is not None]
        pending.discard(i)
        if not todo:
            continue
        if config.sequential and i in done:
            if dense is not None:
                dense.end_block(i, pending)  # before the saved factors edit it
            factors = checkpoint.load_block(i)
            _apply(model, factors)
            if plan is not None:
                for name in todo:
                    result.ranks[name] = factors[name][1].shape[0] if name in factors else None
                    plan.fix(name, result.ranks[name])
            runner.block_changed(i, pending)
            continue
        if config.sequential:
            made, errors = {}, {}
            if dense is not None:
                dense.begin_block(i)
            for stage in _stages(targets, i, todo, config.within_block):
                inputs = {}
                modules = {n: get_submodule(model, n) for n in stage}
                if dense is not None:
                    inputs = dense.paired_stats(i, modules, f"{targets.spec.blocks}.{i}.", config.within_block)
                elif method.needs_inputs:
                    inputs = input_stats(runner, i, runner.inputs_for(i), modules, stop_early=config.within_block)
                _factorise(model, method, stage, inputs, grads, result, device, made, errors, plan, config.rank_align)
            if dense is not None:
                dense.end_block(i, pending)
            if checkpoint:
                checkpoint.save_block(i, made, errors)
            runner.block_changed(i, pending)
        else:
            inputs = {}
            if i not in done and method.needs_inputs:
                inputs = input_stats(runner, i, runner.inputs_for(i), {n: get_submodule(model, n) for n in todo})
            deferred.append((i, todo, inputs))
            runner.prune(pending)
    for i, todo, inputs in deferred:
        if i in done:
            _apply(model, checkpoint.load_block(i))
        else:
            made, errors = {}, {}
            _factorise(model, method, todo, inputs, grads, result, device, made, errors)
            if checkpoint:
                checkpoint.save_block(i, made, errors)
    if plan is not None:
        result.allocation = plan.table()
    result.seconds = time.time() - start
    return result


def uses_dense_targets(config: CompressConfig, method) -> bool:
    """Sequential runs of a Gram-whitening method fit each matrix to the dense model's outputs."""
    return config.sequential and config.dense_targets and method.fits_dense_targets


def _candidates_to_json(options: dict[str, Candidates]) -> dict:
    return {n: {"ranks": c.ranks, "costs": c.costs.tolist(), "losses": c.losses.tolist()} for n, c in options.items()}


def _candidates_from_json(data: dict) -> dict[str, Candidates]:
    return {n: Candidates(d["ranks"], np.asarray(d["costs"], float), np.asarray(d["losses"], float))
            for n, d in data.items()}


def _gradients(model, targets, method, calib, device, progress, given, checkpoint, config) -> dict:
    """Given statistics if they hold what the method needs, else the checkpoint's, else computed."""
    for grads in (given, checkpoint.gradients() if checkpoint else None):
        if grads and not (method.needs_cov and any(g.cov is None for g in grads.values())) and not (
                method.needs_fisher and any(g.fisher_rows is None for g in grads.values())):
            return grads
    grads = gradient_stats(model.to(device), targets.modules, calib, device, cov=method.needs_cov,
                           fisher=method.needs_fisher, progress=progress, labels=config.fisher_labels, seed=config.seed)
    model.to("cpu")  # blocks go back to the device one at a time
    if checkpoint:
        checkpoint.save_gradients(grads)
    return grads


def _warn_if_singular(method, grads: dict) -> None:
    """Fewer calibration tokens than a gradient covariance's width leave it singular: the damping
    alone then decides the weighting (4 x 128 tokens gave PPL 5935 on the demo model)."""
    if not method.needs_cov or not grads:
        return
    stats = max(grads.values(), key=lambda g: g.out_dim)
    if stats.tokens < 2 * stats.out_dim:
        warnings.warn(f"{stats.tokens} calibration tokens for {stats.out_dim}-wide gradient covariances: "
                      f"{method.name} needs several times more (e.g. --calib-samples 32 --calib-seq-len 512) "
                      "or use --method svd-llm", stacklevel=3)


def _apply(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (up, down) in factors.items():
        replace_with_lowrank(model, name, up, down)


def _stages(targets: Targets, block: int, todo: list[str], within_block: bool) -> list[list[str]]:
    """The groups factorised between two statistics passes: the whole block, or its stages in order."""
    if not within_block:
        return [todo]
    prefix = f"{targets.spec.blocks}.{block}."
    stages = [[prefix + t for t in stage if prefix + t in todo] for stage in targets.spec.stages]
    return [s for s in stages if s]


def _factorise(model, method, names, inputs, grads, result, device, made, errors,
               plan: KnapsackPlan | None = None, align: int = 8) -> None:
    """Factorise `names` in place; their factors and errors are added to `made` and `errors`.

    With a `plan`, every matrix is factorised at full rank first: the errors of that one SVD
    re-price its candidate ranks, the knapsack is re-solved, and the chosen rank is a slice.
    """
    full = {}
    if plan is not None:
        fresh = {}
        for name in names:
            weight = dense_weight(get_submodule(model, name))[0].detach().to(device)
            stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
            full[name] = method.factorize(weight, stats, max_rank=min(weight.shape))
            shape = tuple(weight.shape)
            fresh[name] = priced(candidates(shape, full[name].errors.cpu().numpy(), method.loss_scale(weight, stats),
                                            align), shape, plan.cost)
        result.ranks.update(plan.solve(fresh))
    for name in names:
        rank = result.ranks[name]
        if rank is None:
            continue
        weight = dense_weight(get_submodule(model, name))[0].detach().to(device)
        stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
        factors = full[name] if name in full else method.factorize(weight, stats, max_rank=rank)
        module = replace_with_lowrank(model, name, *factors.at_rank(rank))
        made[name] = (module.up.weight, module.down.weight)
        errors[name] = float(factors.errors[rank])
        result.errors[name] = errors[name]
