"""One interface for choosing every matrix's rank under the budget, and its registry.

An `Allocation` turns a `Run` into a compressed model. Most choose ranks up front and leave the
block walk to the sequential pass (`RankAllocation`: uniform, knapsack, or ranks the caller
gives); `evolve` searches and materialises on its own. `ALLOCATIONS` maps the names users pick
(`--allocation`) to the classes; each lives in its own module and registers itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..allocate.costs import PARAMETERS, CostModel, int8_bytes
from ..allocate.uniform import uniform_ranks
from ..errors import VaclmError
from ..options import Registry
from .run import CompressionResult, Run

ALLOCATIONS = Registry("allocation")
register = ALLOCATIONS.register
allocation_class = ALLOCATIONS.get_class


class Allocation(ABC):
    name: str
    uses_fitness = False  # scores candidates on fitness windows held out from calibration

    @abstractmethod
    def run(self, run: Run) -> CompressionResult: ...


class RankAllocation(Allocation):
    """Ranks chosen once, before any block is edited; then the sequential pass applies them."""

    needs_gradients = False  # prices ranks with the gradient statistics (loss estimates)

    @abstractmethod
    def ranks(self, run: Run, grads: dict) -> tuple[dict[str, int | None], dict[str, dict]]:
        """Every target's rank (None: dense) and a report table {name: {...}} (may be empty)."""

    def run(self, run: Run) -> CompressionResult:
        from .sequential import compress_with_ranks

        return compress_with_ranks(run, self)


@register("uniform")
class Uniform(RankAllocation):
    """Every matrix keeps the same fraction of its cost (allocate/uniform.py)."""

    def ranks(self, run, grads):
        config = run.config
        return uniform_ranks(run.targets.shapes, config.keep, config.rank_align, cost_model(run.model, config)), {}


class Given(RankAllocation):
    """Ranks the caller chose (`vaclm.compress(..., ranks=...)`)."""

    def __init__(self, ranks: dict[str, int | None]):
        self.given = dict(ranks)

    def ranks(self, run, grads):
        missing = set(run.targets.shapes) - set(self.given)
        if missing:
            raise VaclmError(f"no rank given for {sorted(missing)[0]} (and {len(missing) - 1} more); give one per target")
        return dict(self.given), {}


def cost_model(model, config) -> CostModel:
    """Parameters, except for a byte budget with int8 factors: then bytes, factors at one byte an
    element plus scales (--keep alone means the same ranks with or without --int8)."""
    if config.int8 and config.target_bytes is not None:
        return int8_bytes(next(model.parameters()).element_size())
    return PARAMETERS


def keep_for_target_bytes(model, shapes: dict[str, tuple[int, int]], target_bytes: int) -> float:
    """The keep fraction of decoder linears at which the whole model's weights take `target_bytes`."""
    element = next(model.parameters()).element_size()
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_targets = sum(o * i for o, i in shapes.values())
    fixed = total_bytes - dense_targets * element  # embeddings, norms, lm_head: never compressed
    keep = (target_bytes - fixed) / (dense_targets * element)
    if not 0 < keep <= 1:
        raise VaclmError(
            f"target size {target_bytes:,} bytes is out of reach: the uncompressed parts alone take {fixed:,} bytes "
            f"and the dense model {total_bytes:,}; choose a size in between"
        )
    return keep
