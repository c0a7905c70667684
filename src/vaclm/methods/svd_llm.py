"""SVD-LLM: truncation-aware whitening with the input Gram matrix.

With A = E[x x^T] = S S^T, the SVD of W S truncated at r minimises E||(W - W') x||^2 exactly;
the factors fold S^-1 back into `down`. With paired statistics (sequential runs) the target is
the dense model's output instead: E||W x_d - W' x||^2 (linalg/whitening.py, right_whitened).
Priced for allocation with B ~ mean output-gradient energy.
"""

from ..linalg.whitening import dense_target_offset, right_whitened, sqrt_factor
from .base import Method, Weighting, identity, register


@register("svd-llm")
class WhitenedSVD(Method):
    needs_inputs = True
    fits_dense_targets = True

    def weighting(self, weight, stats):
        root = sqrt_factor(stats.inputs.mean_gram.to(weight.device), self.options.damping)
        matrix = right_whitened(weight, stats.inputs, root)
        return Weighting(matrix, identity, root.times_inverse, metric="E||(W - W') x||^2",
                         offset=dense_target_offset(weight, stats.inputs, root, matrix))
