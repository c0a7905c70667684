"""SVD-LLM: truncation-aware whitening with the input Gram matrix.

With A = E[x x^T] = S S^T, the SVD of W S truncated at r minimises E||(W - W') x||^2 exactly;
the factors fold S^-1 back into `down`.
"""

from ..linalg.svd import truncated_svd
from ..linalg.whitening import sqrt_factor
from .base import Factorization, Method, register


@register("svd-llm")
class WhitenedSVD(Method):
    needs_inputs = True

    def factorize(self, weight, stats, max_rank):
        self._require(stats)
        root = sqrt_factor(stats.inputs.mean_gram, self.options.damping)
        t = truncated_svd(weight.double() @ root.factor, max_rank)
        return Factorization(t.left, t.right @ root.inverse, t.errors, metric="E||(W - W') x||^2")
