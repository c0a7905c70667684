"""`--structure prune|mixed`: one knapsack over MLP widths (and low ranks), then the sequential pass.

1. Gradient statistics (the down projections' output-gradient covariances price the neurons).
2. A walk over the dense model: each MLP's pruning curve (prune/neurons.py: the refit error of
   every width, times the method's Fisher unit: nats per token) and, in mixed mode, every
   matrix's low-rank error curve; the knapsack (prune/plan.py) picks one candidate per MLP and per
   attention matrix under the budget.
3. The sequential pass: block by block, statistics from the inputs the compressed prefix produces;
   attention matrices and unpruned MLPs are factorised as in the low-rank pass, pruned MLPs keep
   the neurons the same criterion selects on the fresh statistics, with down_proj refitted.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..allocate.candidates import Candidates, candidates
from ..allocate.knapsack import solve_lagrangian
from ..errors import VaclmError
from ..methods import LayerStats
from ..model.arch import get_submodule
from ..model.blocks import BlockRunner
from ..model.pruned import GatedMLP, gated_mlps, narrow_mlp
from ..model.statistics import input_stats
from ..model.surgery import dense_weight
from ..prune.neurons import refit_down, removal_curve
from ..prune.plan import MLPItem, dense_only, mlp_item
from .allocation import cost_model
from .knapsack import depth_weights, priced
from .order import block_order
from .run import CompressionResult, Run, check_finite
from .sequential import _factorise_block

DAMPING = 1e-6  # relative ridge on the intermediate Gram: keeps A[S, S] invertible for dead neurons


def compress_structured(run: Run) -> CompressionResult:
    """A checkpoint keeps the gradient statistics (what --resume reuses); the rest is recomputed."""
    start = time.time()
    check_finite(run.model)
    mlps = gated_mlps(run.model)
    grads = run.gradients(needed=True) if run.config.structure == "mixed" or run.given_gradients else \
        _down_gradients(run, mlps)
    with run.stages.stage("allocation"):
        ranks, widths, table = structured_plan(run, mlps, grads)
    result = CompressionResult(config=run.config, ranks=ranks, shapes=run.targets.shapes, allocation=table,
                               widths=widths)
    with run.stages.stage("sequential pass"):
        _walk(run, mlps, grads, result)
    result.seconds = time.time() - start
    result.stages = run.stages.to_dict()
    return result


def _down_gradients(run: Run, mlps: list[GatedMLP]) -> dict:
    """Pure pruning prices only the MLP outputs: the down projections' gradient covariances, a small
    part of what the low-rank methods collect (the 1536-wide gate/up covariances dominate that)."""
    from ..model.statistics import gradient_stats

    modules = {m.down: get_submodule(run.model, m.down) for m in mlps}
    with run.stages.stage("gradient statistics"):
        grads = gradient_stats(run.model.to(run.device), modules, run.calib, run.device, cov=True, fisher=False,
                               progress=run.progress, labels=run.config.fisher_labels, seed=run.config.seed)
        run.model.to("cpu")
    return grads


def _unit(method, stats: LayerStats, cov_used: bool) -> float:
    """Nats per token per unit of refit error: the Fisher unit with B, the output energy without it."""
    return method._fisher_unit(stats) if cov_used else method._output_energy(stats)


def _cov(grads: dict, name: str):
    g = grads.get(name)
    return g.mean_cov if g is not None and g.cov is not None else None


def down_and_gram(run: Run, mlp: GatedMLP, inputs: dict):
    """The down projection's weight and its input Gram (the intermediate activations'), on the run's device."""
    down = dense_weight(get_submodule(run.model, mlp.down))[0].detach().to(run.device)
    return down, inputs[mlp.down].mean_gram.to(run.device)


def pruning_curve(run: Run, mlp: GatedMLP, inputs: dict, grads: dict, min_width: int = 0):
    """(curve, loss unit) of `mlp` from the down projection's input Gram and output-gradient covariance."""
    down, gram = down_and_gram(run, mlp, inputs)
    cov = _cov(grads, mlp.down)
    curve = removal_curve(gram, down, cov, run.config.rank_align, DAMPING, min_width=min_width)
    stats = LayerStats(inputs=inputs[mlp.down], gradients=grads.get(mlp.down))
    return curve, _unit(run.method, stats, cov is not None)


def structured_plan(run: Run, mlps: list[GatedMLP], grads: dict):
    """(ranks, widths, report table) from one knapsack over attention matrices and whole MLPs."""
    model, config, method, targets = run.model, run.config, run.method, run.targets
    mixed = config.structure == "mixed"
    cost = cost_model(model, config)
    by_block, by_prefix = {m.block: m for m in mlps}, {m.prefix: m for m in mlps}
    runner = BlockRunner(model, targets.spec, run.calib, config.batch_size, run.device)
    matrices: dict[str, Candidates] = {}
    items: dict[str, MLPItem] = {}
    for i in tqdm(range(len(targets.per_block)), desc="allocation: error curves", disable=not run.progress, unit="block"):
        mlp = by_block[i]
        names = targets.per_block[i]
        wanted = names if method.needs_inputs else [mlp.down]
        inputs = input_stats(runner, i, runner.inputs_for(i), {n: targets.modules[n] for n in wanted})
        curves = {}
        for name in names:
            shape = targets.shapes[name]
            if name in mlp.names and not mixed:
                continue
            if not mixed:
                matrices[name] = dense_only(shape, cost.dense(shape))
                continue
            weight = dense_weight(targets.modules[name])[0].detach().to(run.device)
            stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
            errors = method.error_curve(weight, stats).cpu().numpy()
            options = priced(candidates(shape, errors, method.loss_scale(weight, stats), config.rank_align), shape, cost)
            if name in mlp.names:
                curves[name] = options
            else:
                matrices[name] = options
        # at least one alignment step of neurons: an MLP of width 0 is a different architecture
        curve, unit = pruning_curve(run, mlp, inputs, grads, min_width=config.rank_align)
        hidden_shapes = [targets.shapes[n] for n in mlp.names]
        width_costs = [sum(cost.dense(_narrowed(n, s, w)) for n, s in zip(mlp.names, hidden_shapes))
                       for w in curve.widths]
        items[mlp.prefix] = mlp_item(curve.widths, width_costs, [e * unit for e in curve.errors],
                                     [curves[n] for n in mlp.names] if mixed else None)
        runner.prune(set(range(i + 1, len(targets.per_block))))
    weights = depth_weights(targets.per_block, config.depth_tilt)
    keys = list(matrices) + list(items)
    options = [matrices.get(k) or items[k] for k in keys]
    factor = [weights.get(k, weights.get(f"{k}.gate_proj", 1.0)) for k in keys]
    budget = config.keep * sum(cost.dense(s) for s in targets.shapes.values())
    try:
        choice = solve_lagrangian([o.costs for o in options], [o.losses * f for o, f in zip(options, factor)], budget)
    except ValueError as exc:
        raise VaclmError(f"the budget is below what the smallest widths and ranks allow ({exc}); raise --keep") from exc
    ranks: dict[str, int | None] = {n: None for n in targets.shapes}
    widths: dict[str, int] = {}
    table: dict[str, dict] = {}
    for key, option, j in zip(keys, options, choice):
        entry = {"cost": float(option.costs[j]), "estimated_loss": float(option.losses[j])}
        if key in matrices:
            ranks[key] = option.ranks[j]
            table[key] = {"rank": option.ranks[j], **entry}
            continue
        picked = option.choices[j]
        mlp = by_prefix[key]
        if picked.width is not None:
            widths[key] = picked.width
        for name, rank in zip(mlp.names, picked.ranks):
            ranks[name] = rank
        table[key] = {"width": picked.width, "ranks": list(picked.ranks), **entry}
    spent = sum(float(o.costs[j]) for o, j in zip(options, choice))
    assert spent <= budget + 1e-6, (spent, budget)
    return ranks, widths, table


def _narrowed(name: str, shape: tuple[int, int], width: int) -> tuple[int, int]:
    """The shape of an MLP projection at `width` neurons (down keeps columns, gate/up rows)."""
    out_f, in_f = shape
    return (out_f, width) if name.endswith("down_proj") else (width, in_f)


def _walk(run: Run, mlps: list[GatedMLP], grads: dict, result: CompressionResult) -> None:
    model, config, method, targets = run.model, run.config, run.method, run.targets
    by_block = {m.block: m for m in mlps}
    runner = BlockRunner(model, targets.spec, run.calib, config.batch_size, run.device)
    order = block_order(len(targets.per_block), config.order)
    pending = set(order)
    for i in tqdm(order, desc=f"compress ({config.structure})", disable=not run.progress, unit="block"):
        pending.discard(i)
        mlp = by_block[i]
        width = result.widths.get(mlp.prefix)
        factorise = [n for n in targets.per_block[i] if result.ranks[n] is not None]
        if not factorise and width is None:
            continue
        wanted = (factorise if method.needs_inputs else []) + ([mlp.down] if width is not None else [])
        modules = {n: get_submodule(model, n) for n in dict.fromkeys(wanted)}
        inputs = input_stats(runner, i, runner.inputs_for(i), modules) if modules else {}
        if factorise:
            _factorise_block(run, i, factorise, inputs, grads, result)
        if width is not None:
            curve, _ = pruning_curve(run, mlp, inputs, grads, min_width=width)
            kept = curve.kept(width)
            down, gram = down_and_gram(run, mlp, inputs)
            narrow_mlp(model, mlp, kept, refit_down(gram, down, kept.to(run.device), DAMPING))
            result.errors[mlp.prefix] = curve.errors[curve.widths.index(width)]
        runner.block_changed(i, pending)
