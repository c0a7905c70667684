"""SVD-LLM: truncation-aware whitening with the input Gram matrix.

With A = E[x x^T] = S S^T, the SVD of W S truncated at r minimises E||(W - W') x||^2 exactly;
the factors fold S^-1 back into `down`. Priced for allocation with B ~ mean output-gradient energy.
"""

from dataclasses import dataclass

from ..errors import VaclmError
from ..linalg.whitening import sqrt_factor
from ..options import option
from .base import Method, Weighting, identity, register


def check_damping(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:
        raise VaclmError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class WhiteningOptions:
    damping: float = option(1e-6, "svd-llm/gfwsvd: relative damping of the input Gram: G + DAMPING * mean(diag G) * I")

    def __post_init__(self):
        check_damping("damping", self.damping)


@register("svd-llm")
class WhitenedSVD(Method):
    Options = WhiteningOptions
    needs_inputs = True

    def weighting(self, weight, stats):
        root = sqrt_factor(stats.inputs.mean_gram.to(weight.device), self.options.damping)
        return Weighting(weight @ root.factor, identity, root.times_inverse, metric="E||(W - W') x||^2")
