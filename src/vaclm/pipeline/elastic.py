"""`--elastic`: one compression at the largest size whose truncations are every smaller model.

The knapsack's error curves (pipeline/knapsack.py) are turned into one global order of rank steps
(allocate/nested.py); the run compresses at the first `top` steps (the --keep of the run), like a
default run, and keeps the order. Factors are nested (methods/base.py: rank-r factors are the
first r columns of `up` and rows of `down`), so the model at any smaller keep is a prefix of every
matrix's factors (io/resize.py). A matrix dense at the top size keeps its dense weight and gets
spare factors at the largest rank a smaller size gives it, made in the same sequential walk.
"""

from __future__ import annotations

from ..allocate.nested import NestedOrder, nested_order
from ..errors import VaclmError
from .allocation import RankAllocation
from .knapsack import knapsack_ranks


class ElasticKnapsack(RankAllocation):
    """The knapsack's losses in one order; the top size's ranks, and spares for the matrices dense there."""

    needs_gradients = True

    def __init__(self):
        self.order: NestedOrder | None = None

    def ranks(self, run, grads):
        _, _, plan = knapsack_ranks(run.model, run.targets, run.method, run.calib, grads, run.config, run.device,
                                    run.progress)
        try:
            self.order = nested_order(plan.options, run.targets.shapes, run.config.keep, plan.weights)
        except ValueError as exc:
            raise VaclmError(f"the budget is below what the smallest ranks allow ({exc}); raise --keep") from exc
        ranks = self.order.ranks_after(self.order.top)
        table = {}
        for name, rank in ranks.items():
            options = plan.options[name]
            j = options.ranks.index(rank)
            table[name] = {"rank": rank, "cost": float(options.costs[j]), "estimated_loss": float(options.losses[j])}
        if run.checkpoint:  # written with the plan (Checkpoint.save_plan), read back by restore()
            run.checkpoint.state["elastic"] = self.order.to_dict()
        return ranks, table

    def restore(self, checkpoint) -> None:
        """A resumed run: the order its plan was made with."""
        self.order = NestedOrder.from_dict(checkpoint.state["elastic"])

    @property
    def spare_ranks(self) -> dict[str, int]:
        return self.order.spare_ranks() if self.order is not None else {}
