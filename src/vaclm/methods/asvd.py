"""ASVD: activation-aware SVD, columns scaled by mean|x|^alpha of the layer input."""

from dataclasses import dataclass

from ..errors import VaclmError
from ..options import option
from .base import Method, Weighting, identity, normalized_scale, register


@dataclass(frozen=True)
class ActivationOptions:
    asvd_alpha: float = option(0.5, "asvd: column scaling by mean|x|^ALPHA")
    scale_clamp: float = option(1e3, "fwsvd/asvd: scales are clamped to [mean/CLAMP, mean*CLAMP]")

    def __post_init__(self):
        if not self.scale_clamp >= 1:
            raise VaclmError(f"scale clamp must be >= 1, got {self.scale_clamp}")


@register("asvd")
class ActivationAwareSVD(Method):
    Options = ActivationOptions
    needs_inputs = True

    def _cols(self, stats):
        return normalized_scale(stats.inputs.mean_abs, self.options.asvd_alpha, self.options.scale_clamp)

    def weighting(self, weight, stats):
        cols = self._cols(stats).to(weight.device)
        return Weighting(weight * cols[None, :], identity, lambda right: right / cols[None, :],
                         metric="||(W - W') diag(s)||_F^2")

    def loss_scale(self, weight, stats):
        # ||dW diag(s)||^2 stands in for E||dW x||^2 = ||dW S_A||^2: rescale by input energy / mean s^2
        return self._output_energy(stats) * self._input_energy(stats) / float(self._cols(stats).square().mean())
