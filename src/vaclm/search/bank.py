"""Factors of every target at its largest candidate rank, from which any candidate is a slice.

Truncated SVDs are nested (rank-r factors are the first r columns of `up` and rows of `down`), so
each matrix is factorised once, from statistics of the dense model (one-shot), and a candidate
allocation costs no SVD at all: `SlicedLowRank` modules hold the bank's factors and compute with
the first `rank` of them (views, no copies). `rank = None` runs the original dense module.

Why one-shot: sequential compression re-captures each block's inputs from the already-compressed
prefix, so a block's factors depend on the ranks of every block before it; nothing of it can be
reused between candidates except the gradient statistics. The search therefore scores one-shot
candidates, and the order/sequential re-capture is applied when the winner is materialised
(pipeline/evolve.py), where it is kept only if it lowers the fitness KL.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..allocate.candidates import rank_grid
from ..methods import LayerStats
from ..model.arch import get_submodule, set_submodule
from ..model.blocks import BlockRunner
from ..model.surgery import Targets, dense_weight
from ..pipeline.statistics import input_stats

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (up^T: rmax x out, down: rmax x in)


def max_ranks(shapes: dict[str, tuple[int, int]], align: int) -> dict[str, int]:
    """The largest candidate rank of each matrix (0 when factorising it never saves parameters)."""
    return {n: max(rank_grid(s, align), default=0) for n, s in shapes.items()}


def build_bank(model: nn.Module, targets: Targets, method, calib: torch.Tensor, grads: dict, align: int,
               batch_size: int, device: str = "cpu", progress: bool = True) -> Factors:
    """Factorise every target once at its largest candidate rank, with dense-model statistics."""
    if not method.needs_inputs:
        return bank_from_weights(targets.modules, method, grads, max_ranks(targets.shapes, align), device, progress)
    top = max_ranks(targets.shapes, align)
    runner = BlockRunner(model, targets.spec, calib, batch_size, device)
    bank: Factors = {}
    n_blocks = len(targets.per_block)
    for i in tqdm(range(n_blocks), desc="search: factor bank", disable=not progress, unit="block"):
        modules = {n: targets.modules[n] for n in targets.per_block[i]}
        inputs = input_stats(runner, i, runner.inputs_for(i), modules)
        for name, module in modules.items():
            if top[name]:
                bank[name] = _factorise(module, method, LayerStats(inputs.get(name), grads.get(name)), top[name], device)
        runner.prune(set(range(i + 1, n_blocks)))
    return bank


def bank_from_weights(modules: dict[str, nn.Module], method, grads: dict, top: dict[str, int], device: str = "cpu",
                      progress: bool = True) -> Factors:
    """The bank of a method that needs no input statistics (svd, fwsvd): weights and gradients only."""
    assert not method.needs_inputs
    return {name: _factorise(module, method, LayerStats(gradients=grads.get(name)), top[name], device)
            for name, module in tqdm(modules.items(), desc=f"search: factor bank ({method.name})",
                                     disable=not progress, unit="matrix") if top[name]}


def _factorise(module: nn.Module, method, stats: LayerStats, rank: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = dense_weight(module)[0].detach()
    f = method.factorize(weight.to(device), stats, max_rank=rank)
    return f.up.T.to("cpu", weight.dtype).contiguous(), f.down.to("cpu", weight.dtype).contiguous()


class SlicedLowRank(nn.Module):
    """A target during the search: the dense module at rank None, else the bank's first `rank` factors."""

    def __init__(self, dense: nn.Module, up_t: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.dense = dense
        self.up_t, self.down = up_t, down  # plain attributes: not parameters, never copied by .to()
        self.bias = dense_weight(dense)[1]
        self.rank: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return self.dense(x)
        y = F.linear(x, self.down[: self.rank]) @ self.up_t[: self.rank]
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def sliced(model: nn.Module, bank: Factors):
    """Swap every banked target for a SlicedLowRank (all dense at first); restore the originals after."""
    originals = {name: get_submodule(model, name) for name in bank}
    param = next(model.parameters())
    modules = {}
    try:
        for name, module in originals.items():
            up_t, down = bank[name]
            modules[name] = SlicedLowRank(module, up_t.to(param.device, param.dtype), down.to(param.device, param.dtype))
            set_submodule(model, name, modules[name])
        yield modules
    finally:
        for name, module in originals.items():
            set_submodule(model, name, module)


def set_factors(modules: dict[str, SlicedLowRank], bank: Factors) -> None:
    """Point the modules at another bank (e.g. the factors of another Fisher exponent)."""
    for name, module in modules.items():
        weight = dense_weight(module.dense)[0]
        module.up_t, module.down = (bank[name][0].to(weight.device, weight.dtype),
                                    bank[name][1].to(weight.device, weight.dtype))


def set_ranks(modules: dict[str, SlicedLowRank], ranks: dict[str, int | None]) -> None:
    for name, module in modules.items():
        rank = ranks.get(name)
        if rank is not None and rank > module.down.shape[0]:
            raise ValueError(f"rank {rank} of {name} exceeds the bank's {module.down.shape[0]}")
        module.rank = rank
