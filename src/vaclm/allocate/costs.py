"""What one target matrix costs to store, dense or at rank r, in the allocators' budget unit.

Costs are affine in the rank: cost(r) = r * per_rank + fixed. `PARAMETERS` counts parameters
(the --keep budget). With int8 factors and a byte budget (--target-size with --int8) a factor
element costs one byte and every output channel of each factor a float scale, while a matrix
left dense keeps its float elements: `int8_bytes(element)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    factor_element: float = 1.0  # cost of one factor element
    dense_element: float = 1.0  # cost of one element of a matrix left dense
    scale: float = 0.0  # cost of one per-row scale (int8 factors: rank + out of them)

    def per_rank(self, shape: tuple[int, int]) -> float:
        out_f, in_f = shape
        return (out_f + in_f) * self.factor_element + self.scale  # one row of down, one column of up

    def fixed(self, shape: tuple[int, int]) -> float:
        return shape[0] * self.scale  # the up factor's scales, one per output

    def dense(self, shape: tuple[int, int]) -> float:
        return shape[0] * shape[1] * self.dense_element

    def cost(self, shape: tuple[int, int], rank: int | None) -> float:
        return self.dense(shape) if rank is None else rank * self.per_rank(shape) + self.fixed(shape)

    def rank_at(self, shape: tuple[int, int], keep: float) -> float:
        """The (fractional) rank whose cost is `keep` times the dense cost."""
        return (keep * self.dense(shape) - self.fixed(shape)) / self.per_rank(shape)


PARAMETERS = CostModel()


def int8_bytes(element: int) -> CostModel:
    """Bytes: factors at one byte per element plus scales; dense matrices at `element` bytes."""
    return CostModel(factor_element=1.0, dense_element=float(element), scale=float(element))
