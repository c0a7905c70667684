"""SVD-LLM: truncation-aware whitening with the input Gram matrix.

With A = E[x x^T] = S S^T, the SVD of W S truncated at r minimises E||(W - W') x||^2 exactly;
the factors fold S^-1 back into `down`. Priced for allocation with B ~ mean output-gradient energy.
"""

from ..linalg.whitening import sqrt_factor
from .base import Method, Weighting, identity, register


@register("svd-llm")
class WhitenedSVD(Method):
    needs_inputs = True

    def weighting(self, weight, stats):
        root = sqrt_factor(stats.inputs.mean_gram.to(weight.device), self.options.damping)
        return Weighting(weight @ root.factor, identity, lambda right: right @ root.inverse, metric="E||(W - W') x||^2")
