"""The interface every factorisation method implements.

Every method here is "weight the matrix, truncate its SVD, unweight the factors": a method only
says how it weights (`weighting`). From that the base class gives factors at a maximum rank with
the truncation error for *every* rank in the method's own metric (`factorize`), the error curve
alone without singular vectors (`error_curve`, what the allocator prices ranks with), and the
scale that turns that metric into an estimate of the loss increase (`loss_scale`).
Truncations are nested: rank-r factors are the first r columns of `up` and rows of `down`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import MethodOptions
from ..errors import VaclmError
from ..linalg.stats import GradientStats, InputStats
from ..linalg.svd import error_curve, truncated_svd

_REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class LayerStats:
    inputs: InputStats | None = None
    gradients: GradientStats | None = None


@dataclass
class Weighting:
    matrix: torch.Tensor  # the matrix whose plain truncated SVD is optimal in the method's metric
    unweight_left: Callable[[torch.Tensor], torch.Tensor]  # out x k -> `up`
    unweight_right: Callable[[torch.Tensor], torch.Tensor]  # k x in -> `down`
    metric: str
    offset: float = 0.0  # added to every truncation error (dense targets: relative to keeping W)
    # errors measured in another left metric than `matrix` is truncated in (linalg/svd.py): maps
    # weighted-space columns (out x k) to the pricing space; None: the truncation's own metric
    price_left: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Factorization:
    up: torch.Tensor  # out x max_rank, float64
    down: torch.Tensor  # max_rank x in, float64
    errors: torch.Tensor  # (min(out, in) + 1,): errors[r] = truncation error at rank r
    metric: str  # what `errors` measures, for reports

    @property
    def max_rank(self) -> int:
        return self.down.shape[0]

    def at_rank(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the factorised maximum {self.max_rank}")
        return self.up[:, :rank].contiguous(), self.down[:rank].contiguous()


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Method(ABC):
    name: str
    needs_inputs: bool = False  # input Gram / mean |x|
    needs_cov: bool = False  # output-gradient covariance B
    needs_fisher: bool = False  # diagonal-Fisher row/column sums
    # whitens by the input Gram, so paired statistics let it fit the dense model's outputs
    # (linalg/whitening.py, right_whitened); the sequential pipeline then collects them
    fits_dense_targets: bool = False

    def __init__(self, options: MethodOptions):
        self.options = options

    @abstractmethod
    def weighting(self, weight: torch.Tensor, stats: LayerStats) -> Weighting: ...

    def factorize(self, weight: torch.Tensor, stats: LayerStats, max_rank: int) -> Factorization:
        self._require(stats)
        w = self.weighting(weight.double(), stats)
        t = truncated_svd(w.matrix, max_rank, w.price_left)
        return Factorization(w.unweight_left(t.left), w.unweight_right(t.right), t.errors + w.offset, w.metric)

    def error_curve(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        self._require(stats)
        w = self.weighting(weight.double(), stats)
        return error_curve(w.matrix, w.price_left) + w.offset

    def loss_scale(self, weight: torch.Tensor, stats: LayerStats) -> float:
        """Multiplier turning this method's error into an estimated loss increase.

        The second-order estimate of the loss increase of dW is 1/2 vec(dW)^T F vec(dW) with the
        Kronecker Fisher F ~ A (x) B. A method whose metric ignores B (or A) is priced with B (or A)
        replaced by its mean diagonal, an isotropic stand-in: the layer's gradient (or input)
        energy per dimension. Without gradient statistics B is taken as the identity.
        """
        return self._output_energy(stats)

    @property
    def needs_gradients(self) -> bool:
        return self.needs_cov or self.needs_fisher

    @staticmethod
    def _output_energy(stats: LayerStats) -> float:
        return stats.gradients.output_energy if stats.gradients is not None else 1.0

    @staticmethod
    def _input_energy(stats: LayerStats) -> float:
        return float(stats.inputs.mean_gram.diagonal().mean()) if stats.inputs is not None else 1.0

    def _require(self, stats: LayerStats) -> None:
        if self.needs_inputs and stats.inputs is None:
            raise ValueError(f"method {self.name} needs input statistics")
        if self.needs_gradients and stats.gradients is None:
            raise ValueError(f"method {self.name} needs gradient statistics")


def register(name: str):
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def build_method(name: str, options: MethodOptions) -> Method:
    from . import asvd, fwsvd, gfwsvd, svd, svd_llm  # noqa: F401  (fill the registry)

    if name not in _REGISTRY:
        raise VaclmError(f"unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](options)


def normalized_scale(values: torch.Tensor, exponent: float, clamp: float) -> torch.Tensor:
    """values**exponent divided by its mean and clamped to [1/clamp, clamp]; ones if degenerate."""
    scale = values.double().clamp_min(0).pow(exponent)
    mean = scale.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(scale)
    return (scale / mean).clamp(1.0 / clamp, clamp)

