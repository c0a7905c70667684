"""ASVD: activation-aware SVD, columns scaled by mean|x|^alpha of the layer input."""

from ..linalg.svd import truncated_svd
from .base import Factorization, Method, normalized_scale, register


@register("asvd")
class ActivationAwareSVD(Method):
    needs_inputs = True

    def factorize(self, weight, stats, max_rank):
        self._require(stats)
        cols = normalized_scale(stats.inputs.mean_abs, self.options.asvd_alpha, self.options.scale_clamp)
        t = truncated_svd(weight.double() * cols[None, :], max_rank)
        return Factorization(t.left, t.right / cols[None, :], t.errors, metric="||(W - W') diag(s)||_F^2")
