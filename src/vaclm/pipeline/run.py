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

    @cached_property
    def targets(self) -> Targets:
        return Targets.of(self.model)

    @cached_property
    def method(self) -> Method:
        return build_method(self.config.method, self.config.options)

    def gradients(self, needed: bool = True) -> dict:
        """Gradient statistics with what the method needs: given, else the checkpoint's, else
        computed (and saved to the checkpoint). {} when neither the method nor `needed` asks."""
        method = self.method
        if not (needed or method.needs_gradients):
            return {}
        for grads in (self.given_gradients, self.checkpoint.gradients() if self.checkpoint else None):
            if grads and not (method.needs_cov and any(g.cov is None for g in grads.values())) and not (
                    method.needs_fisher and any(g.fisher_rows is None for g in grads.values())):
                return grads
        grads = gradient_stats(self.model.to(self.device), self.targets.modules, self.calib, self.device,
                               cov=method.needs_cov, fisher=method.needs_fisher, progress=self.progress,
                               labels=self.config.fisher_labels, seed=self.config.seed)
        self.model.to("cpu")  # blocks go back to the device one at a time
        if self.checkpoint:
            self.checkpoint.save_gradients(grads)
        _warn_if_singular(method, grads)
        self.given_gradients = grads
        return grads


def check_finite(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise VaclmError(f"weight {name} contains NaN or Inf; the checkpoint is damaged, re-download or re-convert it")


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
