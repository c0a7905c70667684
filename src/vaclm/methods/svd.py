"""Plain truncated SVD of W: the naive reference (collapses LLMs at 20% compression)."""

from .base import Method, Weighting, identity, register


@register("svd")
class PlainSVD(Method):
    def weighting(self, weight, stats):
        return Weighting(weight, identity, identity, metric="||W - W'||_F^2")

    def loss_scale(self, weight, stats):
        return self._output_energy(stats) * self._input_energy(stats)
