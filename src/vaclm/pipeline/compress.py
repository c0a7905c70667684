"""Compress a model in place, block by block.

For each block (in the configured order): run the calibration inputs that the already
compressed prefix produces through it while hooks accumulate input statistics, factorise every
target with the chosen method, swap in LowRankLinear, and move on. With `sequential=False` all
statistics come from the dense model (one walk), the classic one-shot baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..allocate.uniform import kept_fraction, uniform_ranks
from ..config import CompressConfig
from ..errors import VaclmError
from ..methods import LayerStats, build_method
from ..model.arch import get_submodule, spec_for, target_names
from ..model.blocks import BlockRunner
from ..model.surgery import dense_weight, replace_with_lowrank
from .order import block_order
from .statistics import gradient_stats, input_stats


@dataclass
class CompressionResult:
    config: CompressConfig
    ranks: dict[str, int | None]  # None: kept dense
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, float] = field(default_factory=dict)  # truncation error at the chosen rank
    seconds: float = 0.0

    @property
    def kept_fraction(self) -> float:
        return kept_fraction(self.shapes, self.ranks)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "kept_fraction": self.kept_fraction,
            "seconds": self.seconds,
            "modules": {
                n: {"shape": list(self.shapes[n]), "rank": self.ranks[n], "error": self.errors.get(n)} for n in self.shapes
            },
        }


def check_finite(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise VaclmError(f"weight {name} contains NaN or Inf; the checkpoint is damaged, re-download or re-convert it")


def compress_model(model, config: CompressConfig, calib: torch.Tensor, ranks: dict[str, int | None] | None = None,
                   device: str = "cpu", progress: bool = True) -> CompressionResult:
    """Compress `model` in place with `calib` token windows (samples x seq_len)."""
    start = time.time()
    spec = spec_for(model.config.model_type)
    check_finite(model)
    per_block = target_names(model, spec)
    modules = {n: get_submodule(model, n) for names in per_block for n in names}
    shapes = {n: tuple(dense_weight(m)[0].shape) for n, m in modules.items()}
    if ranks is None:
        ranks = uniform_ranks(shapes, config.keep, config.rank_align)
    missing = set(shapes) - set(ranks)
    if missing:
        raise VaclmError(f"no rank given for {sorted(missing)[0]} (and {len(missing) - 1} more); give one per target")
    method = build_method(config.method, config.options)
    result = CompressionResult(config=config, ranks=dict(ranks), shapes=shapes)

    grads = {}
    if method.needs_gradients:
        targets = {n: m for n, m in modules.items() if ranks[n] is not None}
        grads = gradient_stats(model.to(device), targets, calib, device, progress)
        model.to("cpu")  # blocks go back to the device one at a time below

    runner = BlockRunner(model, spec, calib, config.batch_size, device)
    order = block_order(len(per_block), config.order if config.sequential else "front-to-back")
    pending = set(order)
    deferred = []  # one-shot mode: (block, stats) factorised after the dense walk
    for i in tqdm(order, desc=f"compress ({config.method})", disable=not progress, unit="block"):
        todo = {n: get_submodule(model, n) for n in per_block[i] if ranks[n] is not None}
        pending.discard(i)
        if not todo:
            continue
        batches = runner.inputs_for(i)
        inputs = input_stats(runner, i, batches, todo) if method.needs_inputs else {}
        if config.sequential:
            _factorise(model, method, todo, inputs, grads, result, device)
            runner.block_changed(i, pending)
        else:
            deferred.append((todo, inputs))
            runner.prune(pending)
    for todo, inputs in deferred:
        _factorise(model, method, todo, inputs, grads, result, device)
    result.seconds = time.time() - start
    return result


def _factorise(model, method, todo, inputs, grads, result, device) -> None:
    for name in todo:
        weight = dense_weight(get_submodule(model, name))[0].detach().to(device)
        stats = LayerStats(inputs=inputs.get(name), gradients=grads.get(name))
        rank = result.ranks[name]
        factors = method.factorize(weight, stats, max_rank=rank)
        up, down = factors.at_rank(rank)
        replace_with_lowrank(model, name, up, down)
        result.errors[name] = float(factors.errors[rank])
