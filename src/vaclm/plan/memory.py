"""Memory of the parts of a run, in bytes, from shapes alone (the plan's and the pipeline's terms).

The constants are autograd's and the pipeline's own: what a backward pass keeps per token of a
decoder block, what the statistics hold. They were checked against measured peaks on this
project's models (docs/scale.md, bench/scale.py).
"""

from __future__ import annotations

import torch

from ..errors import VaclmError
from ..resources import rss_bytes, total_host_bytes
from .shapes import ModelShape

# a backward pass with activation gradients only (no weight gradients) keeps, per token of a
# block, about this many values per hidden unit and per MLP unit (norm inputs, attention q/k/v/out,
# SiLU input, both products of the gated MLP); measured on Llama-shaped models
SAVED_PER_HIDDEN = 6
SAVED_PER_MLP = 4
# the loss keeps logits, their float32 log-softmax and its gradient: values per vocabulary entry
SAVED_PER_VOCAB = 3
ACCUMULATOR_SHARE = 0.8  # of the free memory, for the gradient accumulators; the rest: temporaries


def mlp_width(shape: ModelShape) -> int:
    return max(max(o, i) for o, i in shape.targets.values())


def backward_bytes(shape: ModelShape, seq_len: int, element: int) -> int:
    """What one sequence's forward and backward pass holds beyond the weights."""
    per_token = shape.blocks * (SAVED_PER_HIDDEN * shape.hidden + SAVED_PER_MLP * mlp_width(shape))
    return seq_len * (per_token * element + SAVED_PER_VOCAB * shape.vocab * 4)


def limits(device: str, budget: int | None) -> tuple[int, int]:
    """(host limit, device limit) in bytes: the budget where given for the compute device, else
    what this machine has (host: physical memory; CUDA: the GPU's total memory)."""
    host = total_host_bytes()
    if not str(device).startswith("cuda"):
        return (budget or host), 0
    if budget:
        return host, budget
    if not torch.cuda.is_available():
        raise VaclmError("no CUDA device here to read the GPU memory from: give the GPU's with --memory-budget "
                         "(e.g. 80GB), or plan with --device cpu")
    return host, torch.cuda.get_device_properties(torch.device(device)).total_memory


def accumulator_budget(shape: ModelShape, seq_len: int, element: int, device: str, budget: int | None) -> int:
    """Bytes the gradient accumulators may take now: the limit less what is in use and one
    sequence's backward pass. Layers are grouped to fit it (one walk over the data per group)."""
    host, gpu = limits(device, budget)
    if str(device).startswith("cuda"):  # the weights move to the GPU for the walk
        in_use = torch.cuda.memory_allocated(torch.device(device)) + shape.parameters * element
        limit = gpu
    else:
        in_use, limit = rss_bytes(), host
    return max(int(ACCUMULATOR_SHARE * (limit - in_use - backward_bytes(shape, seq_len, element))), 1)
