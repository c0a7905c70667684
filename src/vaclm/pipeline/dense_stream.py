"""The dense model's hidden states beside a sequential run, for `--dense-targets`.

A block's paired statistics need the dense model's inputs of that block on the same calibration
windows. They are walked forward through blocks not yet edited: before block i is edited, its
dense outputs are recorded as block i + 1's dense inputs and block i is frozen for this stream
(walking through it would give the compressed model's outputs). Front-to-back order keeps one
entry cached; other orders keep, as the runner does for the model's own stream, the nearest
entry before every pending block.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..linalg.stats import InputStats
from ..model.blocks import BlockRunner, InputCache
from .statistics import paired_input_stats


class DenseStream:
    def __init__(self, runner: BlockRunner):
        self.runner = runner
        self.cache = InputCache(runner.inputs[0])  # block 0's inputs are the embeddings: the same
        self.block: nn.Module | None = None  # unedited copy of the block being compressed
        self.outputs: list[torch.Tensor] | None = None  # its dense outputs, once computed

    def begin_block(self, i: int) -> None:
        """Copy block i before any of it is edited."""
        self.block = copy.deepcopy(self.runner.blocks[i])
        self.outputs = None

    def paired_stats(self, i: int, modules: dict[str, nn.Module], prefix: str,
                     stop_early: bool = False) -> dict[str, InputStats]:
        stats, self.outputs = paired_input_stats(self.runner, i, self.block, self.cache.inputs_for(i, self.runner.run_block),
                                                 self.runner.inputs_for(i), modules, prefix, stop_early)
        return stats

    def end_block(self, i: int, pending: set[int]) -> None:
        """Block i is about to be edited (a resumed run) or was, from its copy: keep its dense outputs
        if a pending block lies beyond it, then never walk through it again."""
        if any(j > i for j in pending):
            if self.outputs is None:  # a resumed block: run it now, before its saved factors go in
                self.outputs = self.runner.run_block(i, self.cache.inputs_for(i, self.runner.run_block))
            self.cache.record(i + 1, self.outputs)
        self.cache.frozen.add(i)
        self.cache.prune(pending)
        self.block, self.outputs = None, None
