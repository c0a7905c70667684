"""What one compression run works with (`Run`), what it returns (`CompressionResult`), and the
gradient statistics every allocation and Fisher method shares."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..allocate.uniform import kept_fraction
from ..config import CompressConfig
from ..errors import VaclmError
from ..io.checkpoint import Checkpoint
from ..methods import Method, build_method
from ..model.statistics import gradient_stats
from ..model.surgery import Targets
from ..resources import StageLog


@dataclass
class CompressionResult:
    config: CompressConfig
    ranks: dict[str, int | None]  # None: kept dense
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, float] = field(default_factory=dict)  # truncation error at the chosen rank
    allocation: dict[str, dict] = field(default_factory=dict)  # knapsack: cost and estimated loss
    seconds: float = 0.0
    elastic: object = None  # --elastic: the NestedOrder (allocate/nested.py) every smaller size is a prefix of
    spare: dict[str, tuple] = field(default_factory=dict)  # --elastic: (up, down) of matrices dense at the top
    stages: dict[str, dict] = field(default_factory=dict)  # StageLog.to_dict(): seconds and peak memory
    widths: dict[str, int] = field(default_factory=dict)  # --structure prune/mixed: MLP prefix -> neurons kept

    @property
    def kept_fraction(self) -> float:
        if not self.widths:
            return kept_fraction(self.shapes, self.ranks)
        return sum(self.cost(n) for n in self.shapes) / sum(o * i for o, i in self.shapes.values())

    def cost(self, name: str) -> int:
        """Parameters `name` keeps: dense, factorised at its rank, or narrowed by a pruned MLP."""
        out_f, in_f = self.shapes[name]
        width = self.widths.get(name.rpartition(".")[0])
        if width is not None:  # gate/up keep `width` rows, down `width` columns
            return out_f * width if name.endswith("down_proj") else width * in_f
        rank = self.ranks[name]
        return out_f * in_f if rank is None else rank * (out_f + in_f)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "kept_fraction": self.kept_fraction,
            "seconds": self.seconds,
            "factorised": sum(r is not None for r in self.ranks.values()),
            "targets": len(self.ranks),
        }


@dataclass
class Run:
    """One compression of `model` in place: the data of its three roles, where it computes, and
    what it may reuse (`gradients`: statistics of this model and calibration; `checkpoint`)."""

    model: torch.nn.Module
    config: CompressConfig
    calib: torch.Tensor  # samples x seq_len token windows
    fitness: torch.Tensor | None = None  # --allocation evolve only
    device: str = "cpu"
    progress: bool = True
    checkpoint: Checkpoint | None = None
    given_gradients: dict | None = None
    workers: int | str | None = None
    stages: StageLog = field(default_factory=StageLog)

    @cached_property
    def targets(self) -> Targets:
        return Targets.of(self.model)

    @cached_property
    def method(self) -> Method:
        return build_method(self.config.method, self.config.options)

    def accumulator_budget(self) -> int:
        """Bytes the gradient statistics may hold at once (config.memory_budget, else this machine's
        memory, less what is in use): more than that and the layers are walked in groups."""
        from ..plan.memory import accumulator_budget
        from ..plan.shapes import shape_of

        element = next(self.model.parameters()).element_size()
        return accumulator_budget(shape_of(self.model), self.calib.shape[1], element, self.device,
                                  self.config.memory_budget)

    def gradients(self, needed: bool = True) -> dict:
        """Gradient statistics with what the method needs: given, else the checkpoint's, else
        computed (and saved to the checkpoint). {} when neither the method nor `needed` asks."""
        method = self.method
        if not (needed or method.needs_gradients):
            return {}
        for grads in (self.given_gradients, self.checkpoint.gradients() if self.checkpoint else None):
            if grads and not (method.needs_cov and not _holds(grads, "cov")) and not (
                    method.needs_fisher and not _holds(grads, "fisher_rows")):
                return grads
        # with a checkpoint, each group of layers goes to disk as soon as it is done and the walks
        # read one layer's statistics at a time: memory holds one group, not every layer's
        writer = self.checkpoint.gradient_writer() if self.checkpoint else None
        with self.stages.stage("gradient statistics"):
            grads = gradient_stats(self.model.to(self.device), self.targets.modules, self.calib, self.device,
                                   cov=method.needs_cov, fisher=method.needs_fisher, progress=self.progress,
                                   labels=self.config.fisher_labels, seed=self.config.seed,
                                   accumulator_budget=self.accumulator_budget(), spill=writer and writer.add)
            self.model.to("cpu")  # blocks go back to the device one at a time
            if writer:
                writer.finish()
                grads = self.checkpoint.gradients()
        _warn_if_singular(method, grads)
        self.given_gradients = grads
        return grads


def check_finite(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise VaclmError(f"weight {name} contains NaN or Inf; the checkpoint is damaged, re-download or re-convert it")


def _holds(grads, field: str) -> bool:
    """Every layer's statistics include `field` (on disk: from the index, nothing read)."""
    return grads.has(field) if hasattr(grads, "has") else all(getattr(g, field) is not None for g in grads.values())


def _out_dim(grads, name: str) -> int:
    return grads.shape(name)[0] if hasattr(grads, "shape") else grads[name].out_dim


def _warn_if_singular(method, grads: dict) -> None:
    """Fewer calibration tokens than a gradient covariance's width leave it singular: the damping
    alone then decides the weighting (4 x 128 tokens gave PPL 5935 on the demo model)."""
    if not method.needs_cov or not grads:
        return
    stats = grads[max(grads, key=lambda n: _out_dim(grads, n))]
    if stats.tokens < 2 * stats.out_dim:
        warnings.warn(f"{stats.tokens} calibration tokens for {stats.out_dim}-wide gradient covariances: "
                      f"{method.name} needs several times more (e.g. --calib-samples 32 --calib-seq-len 512) "
                      "or use --method svd-llm", stacklevel=3)
