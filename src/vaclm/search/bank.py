"""Factors of every target at its largest candidate rank, from which any candidate is a slice.

Truncated SVDs are nested (rank-r factors are the first r columns of `up` and rows of `down`), so
each matrix is factorised once, from statistics of the dense model (one-shot), and a candidate
allocation costs no SVD at all: `SlicedLowRank` modules hold the bank's factors and compute with
the first `rank` of them (views, no copies). `rank = None` runs the original dense module.

Why one-shot: sequential compression re-captures each block's inputs from the already-compressed
prefix, so a block's factors depend on the ranks of every block before it; nothing of it can be
reused between candidates except the gradient statistics. The search therefore scores one-shot
candidates; the sequential re-capture is one of the ways the winner is materialised
(pipeline/evolve.py), kept only if held-out windows prefer it.
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
from ..model.statistics import input_stats

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (up^T: rmax x out, down: rmax x in)


def build_bank(model: nn.Module, targets: Targets, method, calib: torch.Tensor, grads: dict, align: int,
               batch_size: int, device: str = "cpu", progress: bool = True) -> Factors:
    """Factorise every target once at its largest candidate rank, with dense-model statistics.
    Targets without candidate ranks (factorising them never saves parameters) are left out."""
    top = {n: max(rank_grid(s, align), default=0) for n, s in targets.shapes.items()}
    if not method.needs_inputs:  # svd, fwsvd: weights and gradients suffice
        return {name: _factorise(module, method, LayerStats(gradients=grads.get(name)), top[name], device)
                for name, module in tqdm(targets.modules.items(), desc=f"search: factor bank ({method.name})",
                                         disable=not progress, unit="matrix") if top[name]}
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


def set_ranks(modules: dict[str, SlicedLowRank], ranks: dict[str, int | None]) -> None:
    for name, module in modules.items():
        rank = ranks.get(name)
        if rank is not None and rank > module.down.shape[0]:
            raise ValueError(f"rank {rank} of {name} exceeds the bank's {module.down.shape[0]}")
        module.rank = rank
