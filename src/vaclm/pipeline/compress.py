"""Compress a model in place: the configured allocation runs the pipeline (pipeline/allocation.py)."""

from __future__ import annotations

from dataclasses import replace

from ..errors import VaclmError
from ..resources import StageLog
from . import evolve, knapsack  # noqa: F401  (register their allocations)
from .allocation import ALLOCATIONS, Given, allocation_class, keep_for_target_bytes
from .elastic import ElasticKnapsack
from .run import CompressionResult, Run

__all__ = ["ALLOCATIONS", "CompressionResult", "compress_model"]


def compress_model(model, config, calib, ranks: dict[str, int | None] | None = None, *, fitness=None,
                   device: str = "cpu", progress: bool = True, checkpoint=None, gradients: dict | None = None,
                   workers: int | str | None = None) -> CompressionResult:
    """Compress `model` in place with `calib` token windows (samples x seq_len).

    `ranks`: every target's rank (None: dense) instead of the configured allocation's choice.
    `gradients`: precomputed gradient statistics of this model and calibration (they depend on
    nothing else), e.g. to compare budgets or methods without recomputing them.
    """
    if ranks is not None and config.allocation == "evolve":
        raise VaclmError("given ranks leave nothing to search; drop them or choose another allocation")
    cls = allocation_class(config.allocation)
    run = Run(model, config, calib, fitness, device, progress, checkpoint, gradients, workers, StageLog(device))
    if config.target_bytes is not None:
        run.config = replace(config, keep=keep_for_target_bytes(model, run.targets.shapes, config.target_bytes))
    if config.structure != "lowrank":
        if ranks is not None:
            raise VaclmError("given ranks cannot say which MLP neurons to prune; drop them or use --structure lowrank")
        from .structured import compress_structured

        return compress_structured(run)
    if ranks is not None and config.elastic:
        raise VaclmError("given ranks leave nothing to order; drop them or drop --elastic")
    allocation = Given(ranks) if ranks is not None else ElasticKnapsack() if config.elastic else cls()
    return allocation.run(run)
