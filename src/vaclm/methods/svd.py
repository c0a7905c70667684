"""Plain truncated SVD of W: the naive reference (collapses LLMs at 20% compression)."""

from ..linalg.svd import truncated_svd
from .base import Factorization, Method, register


@register("svd")
class PlainSVD(Method):
    def factorize(self, weight, stats, max_rank):
        t = truncated_svd(weight, max_rank)
        return Factorization(t.left, t.right, t.errors, metric="||W - W'||_F^2")
