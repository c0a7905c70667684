"""Run a model one decoder block at a time on cached hidden states (GPTQ's catch-and-walk loop).

The inputs of block 0 are caught by running the model with its blocks replaced by a recorder;
every block's extra arguments (position embeddings, masks, which differ per block for models
with sliding-window layers) are recorded once on a single-sequence batch, so they broadcast over
any batch size. Then each block can be run alone: peak memory is one block plus activations,
and with a CUDA device the blocks not being processed stay on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

from .arch import ArchSpec, decoder_blocks


class _Stop(Exception):
    pass


def move(obj: Any, device) -> Any:
    """Tensors inside nested tuples/lists/dicts moved to `device`; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _recording_blocks(blocks: nn.ModuleList, on_call):
    """Replace every block's forward by `on_call(i, args, kwargs)`, returning its hidden input."""

    def make(i):
        def recorder(*args, **kwargs):
            on_call(i, args, kwargs)
            return _hidden(args, kwargs)

        return recorder

    try:
        for i, block in enumerate(blocks):
            block.forward = make(i)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


class InputCache:
    """Cached inputs of blocks for one stream of hidden states.

    `inputs_for(i)` walks forward from the nearest cached block at or before i and caches what it
    passes; `prune` keeps, for each block still to process, only the nearest entry before it.
    """

    def __init__(self, first: list[torch.Tensor]):
        self.inputs: dict[int, list[torch.Tensor]] = {0: first}

    def inputs_for(self, i: int, run_block) -> list[torch.Tensor]:
        start = max(k for k in self.inputs if k <= i)
        for k in range(start, i):
            self.inputs[k + 1] = run_block(k, self.inputs[k])
        return self.inputs[i]

    def record(self, i: int, inputs: list[torch.Tensor]) -> None:
        self.inputs[i] = inputs

    def drop_after(self, i: int) -> None:
        for k in [k for k in self.inputs if k > i]:
            del self.inputs[k]

    def prune(self, pending: set[int]) -> None:
        needed = {max(k for k in self.inputs if k <= j) for j in pending}
        for k in [k for k in self.inputs if k not in needed]:
            del self.inputs[k]


class BlockRunner:
    """Cached inputs of each block; `inputs_for(i)` recomputes only what an edit invalidated."""

    def __init__(self, model: nn.Module, spec: ArchSpec, calib: torch.Tensor, batch_size: int, device: str = "cpu"):
        self.model = model
        self.blocks = decoder_blocks(model, spec)
        self.device = torch.device(device)
        self.offload = self.device.type != "cpu"
        self.storage = torch.device("cpu")
        self.block_args = self._record_block_args(calib[:1])
        self.cache = InputCache(self._catch_first_inputs(calib.split(batch_size)))

    @property
    def inputs(self) -> dict[int, list[torch.Tensor]]:
        return self.cache.inputs
    @torch.no_grad()
    def _record_block_args(self, sample: torch.Tensor) -> list[tuple[tuple, dict]]:
        recorded: dict[int, tuple[tuple, dict]] = {}

        def on_call(i, args, kwargs):
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            recorded[i] = (move(args[1:], self.storage), move(extra, self.storage))

        with _recording_blocks(self.blocks, on_call):
            self.model(input_ids=sample.to(self._model_device()), use_cache=False)
        return [recorded[i] for i in range(len(self.blocks))]

    @torch.no_grad()
    def _catch_first_inputs(self, batches) -> list[torch.Tensor]:
        caught = []

        def on_call(i, args, kwargs):
            caught.append(_hidden(args, kwargs).to(self.storage))
            raise _Stop

        with _recording_blocks(self.blocks, on_call):
            for batch in batches:
                with contextlib.suppress(_Stop):
                    self.model(input_ids=batch.to(self._model_device()), use_cache=False)
        return caught

    def _model_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def on_device(self, i: int):
        """Block i on the compute device for the duration; back to the CPU after when offloading."""
        block = self.blocks[i]
        if self.offload:
            block.to(self.device)
        try:
            yield block
        finally:
            if self.offload:
                block.to(self.storage)

    def _forward(self, block: nn.Module, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        return _output(block(x.to(self.device), *args, **kwargs)).to(self.storage)

    @torch.no_grad()
    def run_block(self, i: int, batches: list[torch.Tensor], before_batch=None) -> list[torch.Tensor]:
        args, kwargs = move(self.block_args[i], self.device)
        outputs = []
        with self.on_device(i) as block:
            for x in batches:
                if before_batch is not None:
                    before_batch()
                outputs.append(self._forward(block, x, args, kwargs))
        return outputs

    def inputs_for(self, i: int) -> list[torch.Tensor]:
        return self.cache.inputs_for(i, self.run_block)

    def block_changed(self, i: int, pending: set[int]) -> None:
        """Block i was edited: drop the inputs it produced, then what no pending block can use."""
        self.cache.drop_after(i)
        self.prune(pending)

    def prune(self, pending: set[int]) -> None:
        """Keep, for each block still to process, only the nearest cached inputs at or before it."""
        self.cache.prune(pending)
