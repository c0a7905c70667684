"""The interface every factorisation method implements.

A method takes a weight W (out x in) and the statistics of its layer, and returns factors at a
maximum rank plus the truncation error for *every* rank in the method's own metric, so the
allocator can price each choice without recomputing. Truncations are nested: the rank-r factors
are the first r columns of `up` and rows of `down`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import MethodOptions
from ..errors import VaclmError
from ..linalg.stats import GradientStats, InputStats

_REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class LayerStats:
    inputs: InputStats | None = None
    gradients: GradientStats | None = None


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


class Method(ABC):
    name: str
    needs_inputs: bool = False  # input Gram / mean |x|
    needs_gradients: bool = False  # output-gradient covariance / diagonal Fisher

    def __init__(self, options: MethodOptions):
        self.options = options

    @abstractmethod
    def factorize(self, weight: torch.Tensor, stats: LayerStats, max_rank: int) -> Factorization: ...

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
