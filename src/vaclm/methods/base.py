"""The interface every factorisation method implements.

Every method here is "weight the matrix, truncate its SVD, unweight the factors": a method only
says how it weights (`weighting`). From that the base class gives factors at a maximum rank with
the truncation error for *every* rank in the method's own metric (`factorize`), the error curve
alone without singular vectors (`error_curve`, what the allocator prices ranks with), and the
scale that turns that metric into an estimate of the loss increase (`loss_scale`).
Truncations are nested: rank-r factors are the first r columns of `up` and rows of `down`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import VaclmError
from ..linalg.stats import GradientStats, InputStats
from ..linalg.svd import error_curve, truncated_svd
from ..options import NoOptions, Registry

# name -> Method subclass; filled by the method modules that vaclm.methods imports
METHODS = Registry("method")
register = METHODS.register
method_class = METHODS.get_class


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
    Options: type = NoOptions  # the method's own options: a frozen dataclass of option() fields
    needs_inputs: bool = False  # input Gram / mean |x|
    needs_cov: bool = False  # output-gradient covariance B
    needs_fisher: bool = False  # diagonal-Fisher row/column sums

    def __init__(self, options=None):
        self.options = self.Options() if options is None else options

    @abstractmethod
    def weighting(self, weight: torch.Tensor, stats: LayerStats) -> Weighting: ...

    def factorize(self, weight: torch.Tensor, stats: LayerStats, max_rank: int) -> Factorization:
        self._require(stats)
        w = self.weighting(weight.double(), stats)
        t = truncated_svd(w.matrix, max_rank)
        return Factorization(w.unweight_left(t.left), w.unweight_right(t.right), t.errors, w.metric)

    def error_curve(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        self._require(stats)
        return error_curve(self.weighting(weight.double(), stats).matrix)

    def loss_scale(self, weight: torch.Tensor, stats: LayerStats) -> float:
        """Multiplier turning this method's error into an estimated loss increase, in nats per token.

        The second-order estimate of the loss increase of dW is 1/2 vec(dW)^T F vec(dW) with the
        Kronecker Fisher F ~ A (x) (B * fisher_scale) (linalg/stats.py). A method whose metric
        ignores B (or A) is priced with B (or A) replaced by its mean diagonal, an isotropic
        stand-in: the layer's gradient (or input) energy per dimension. Without gradient
        statistics B is taken as the identity.
        """
        return self._output_energy(stats)

    @property
    def needs_gradients(self) -> bool:
        return self.needs_cov or self.needs_fisher

    @staticmethod
    def _fisher_unit(stats: LayerStats) -> float:
        """1/2 times the factor that makes B the per-token Fisher: scales every method's estimate."""
        return 0.5 * (stats.gradients.fisher_scale if stats.gradients is not None else 1.0)

    @classmethod
    def _output_energy(cls, stats: LayerStats) -> float:
        return cls._fisher_unit(stats) * (stats.gradients.output_energy if stats.gradients is not None else 1.0)

    @staticmethod
    def _input_energy(stats: LayerStats) -> float:
        return float(stats.inputs.mean_gram.diagonal().mean()) if stats.inputs is not None else 1.0

    def _require(self, stats: LayerStats) -> None:
        if self.needs_inputs and stats.inputs is None:
            raise ValueError(f"method {self.name} needs input statistics")
        if self.needs_gradients and stats.gradients is None:
            raise ValueError(f"method {self.name} needs gradient statistics")


def method_options(name: str, options=None, **overrides):
    """The options of method `name`: its defaults, an instance of its Options, or a dict of its
    fields (a saved report), with `overrides` applied. Another method's option is refused."""
    cls = method_class(name)
    if options is None:
        options = {}
    if isinstance(options, dict):
        options = {**options, **overrides}
        overrides = {}
    elif not isinstance(options, cls.Options):
        raise VaclmError(f"method {name} takes {cls.Options.__name__}, got {type(options).__name__}")
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options if isinstance(options, dict) else {}) - known | set(overrides) - known)
    if unknown:
        raise VaclmError(f"method {name} has no option {unknown[0]!r}; its options: {', '.join(sorted(known)) or 'none'}")
    return cls.Options(**options) if isinstance(options, dict) else dataclasses.replace(options, **overrides)


def build_method(name: str, options=None, **overrides) -> Method:
    """Method `name` with `options` (see method_options), e.g. build_method("gfwsvd", damping=1e-4)."""
    return method_class(name)(method_options(name, options, **overrides))


def normalized_scale(values: torch.Tensor, exponent: float, clamp: float) -> torch.Tensor:
    """values**exponent divided by its mean and clamped to [1/clamp, clamp]; ones if degenerate."""
    scale = values.double().clamp_min(0).pow(exponent)
    mean = scale.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(scale)
    return (scale / mean).clamp(1.0 / clamp, clamp)

