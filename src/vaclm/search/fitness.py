"""Fitness of a candidate allocation: KL divergence of its next-token distribution from the dense model's.

The dense distributions of the fitness windows are computed once (`Reference`). To keep them small
for large vocabularies only the dense top-k log-probabilities are stored, with the mass outside
them as one extra "tail" outcome: the KL of these coarsened distributions, a lower bound of the
full KL that is exact when k covers the vocabulary (it is, for the tiny test models).

`Evaluator` scores genomes on a model whose targets are SlicedLowRank modules: stage s < last uses
a subset of the fitness windows drawn from (seed, generation, s), fresh every generation as in
EvoPress; the last stage always uses the same windows, so the parent keeps its score.
Everything it needs travels in a `FitnessSpec`, so a Ray worker builds the same evaluator.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .bank import Factors, set_ranks, sliced
from .engine import Genome


@dataclass
class Reference:
    indices: torch.Tensor  # windows x L x k: the dense top-k token ids
    logp: torch.Tensor  # windows x L x k: their dense log-probabilities
    tail: torch.Tensor  # windows x L: log of the dense mass outside the top k (-inf when none)
    const: torch.Tensor  # windows x L: sum p log p of the coarsened dense distribution

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, windows: torch.Tensor, top_k: int, progress: bool = True) -> "Reference":
        device = next(model.parameters()).device
        parts = []
        batches = list(window_batches(windows.shape))
        for batch in tqdm(batches, desc="search: dense logits", disable=not progress, unit="batch"):
            logits = model(input_ids=windows[batch].to(device), use_cache=False).logits
            for row in logits:
                logp = torch.log_softmax(row.float(), -1)
                k = min(top_k, logp.shape[-1])
                values, indices = logp.topk(k, dim=-1)
                tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0)) if k < logp.shape[-1] else \
                    torch.full(values.shape[:-1], -torch.inf, device=values.device)
                const = (values.exp() * values).sum(-1) + torch.where(tail > -torch.inf, tail.exp() * tail, 0.0)
                parts.append((indices.int().cpu(), values.cpu(), tail.cpu(), const.cpu()))
        return cls(*(torch.stack(p) for p in zip(*parts)))

    def kl(self, window: int, logits: torch.Tensor) -> torch.Tensor:
        """Per-token KL(dense || candidate) of one window, from the candidate's logits (L x vocab).

        One pass over the vocabulary (log-normaliser, then a gather): the candidate's mass outside
        the dense top k is 1 - its mass inside, floored at 1e-7 (float32 rounding), which is where
        this differs from the exact coarsened KL, by at most the dense tail mass times log(1e-7 / q_tail)."""
        dev = logits.device
        logits = logits.float()
        logq = logits.gather(-1, self.indices[window].to(dev).long()) - torch.logsumexp(logits, -1, keepdim=True)
        cross = (self.logp[window].to(dev).exp() * logq).sum(-1)
        tail = self.tail[window].to(dev)
        if torch.isfinite(tail).any():
            logq_tail = torch.log1p(-logq.exp().sum(-1).clamp(max=1 - 1e-7))
            cross = cross + torch.where(tail > -torch.inf, tail.exp() * logq_tail, 0.0)
        return self.const[window].to(dev) - cross


BATCH_TOKENS = 2048  # tokens per forward pass when scoring (windows batched; logits of 2048 x 49k in bf16: 200 MB)


def window_batches(shape, subset: list[int] | None = None):
    """Lists of window indices, about BATCH_TOKENS tokens each (one forward pass per list: fewer, larger matmuls)."""
    rows = list(range(shape[0])) if subset is None else list(subset)
    size = max(1, BATCH_TOKENS // shape[1])
    for k in range(0, len(rows), size):
        yield rows[k: k + size]


@dataclass
class FitnessSpec:
    """Everything needed to score genomes; picklable, so a Ray worker rebuilds the same evaluator."""

    model: nn.Module  # the dense model
    names: list[str]  # target of each genome item
    choices: list[list[int | None]]  # rank of each level of each item (None: dense)
    windows: torch.Tensor  # the last stage's fitness windows (n x seq_len)
    reference: Reference
    stage_windows: list[int]  # windows scored per stage (the last: all of them)
    seed: int
    bank: Factors  # every target's factors at its largest rank (bank.py)
    dtype: str = "auto"  # what candidates are scored in (search_dtype)

    def ranks(self, genome: Genome) -> dict[str, int | None]:
        return {n: c[j] for n, c, j in zip(self.names, self.choices, genome.levels)}

    def stage_subset(self, stage: int, generation: int) -> list[int]:
        n = self.windows.shape[0]
        if stage >= len(self.stage_windows) - 1:
            return list(range(n))
        rng = np.random.default_rng([self.seed, generation, stage, 1])
        return sorted(int(i) for i in rng.choice(n, self.stage_windows[stage], replace=False))


class Evaluator:
    """Scores genomes in this process; `close()` gives the model its original modules back."""

    def __init__(self, spec: FitnessSpec, device: str | None = None):
        self.spec = spec
        model = spec.model if device is None else spec.model.to(device)
        self.dtype = search_dtype(spec.dtype, model)
        # another dtype scores a copy (the dense model's weights must stay exact for the final choice)
        self.model = model if self.dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(self.dtype)
        self._stack = contextlib.ExitStack()
        self.modules = self._stack.enter_context(sliced(self.model, spec.bank))

    def __call__(self, genomes: list[Genome], stage: int, generation: int) -> list[float]:
        windows = self.spec.stage_subset(stage, generation)
        scores = []
        for genome in genomes:
            set_ranks(self.modules, self.spec.ranks(genome))
            scores.append(model_fitness(self.model, self.spec.windows, self.spec.reference, windows))
        return scores

    def close(self) -> None:
        self._stack.close()


@torch.no_grad()
def model_fitness(model: nn.Module, windows: torch.Tensor, reference: Reference, subset: list[int] | None = None) -> float:
    """Mean per-token KL from the dense model over `subset` of the fitness windows (all by default);
    also how a materialised model is scored, comparably with the search's scores."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in window_batches(windows.shape, subset):
        logits = model(input_ids=windows[batch].to(device), use_cache=False).logits
        for w, row in zip(batch, logits):
            kl = reference.kl(w, row)
            total, count = total + float(kl.double().sum()), count + kl.numel()
    return total / count


def search_dtype(name: str, model: nn.Module) -> torch.dtype:
    """The dtype candidates are scored in: `name`, or for "auto" bfloat16 when the model is float32
    and its device has fast bfloat16 matmuls, else the model's own dtype."""
    own = next(model.parameters()).dtype
    if name != "auto":
        return getattr(torch, name)
    if own != torch.float32:
        return own
    device = next(model.parameters()).device
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        try:
            fast = device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            fast = False
    return torch.bfloat16 if fast else own
