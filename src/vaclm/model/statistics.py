"""Collect the statistics the methods need, with hooks on the target linear layers."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..linalg.stats import GradientStats, InputStats
from .surgery import dense_weight


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], make_hook):
    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _InputAccumulators:
    """One InputStats per module, shared by modules fed the very same tensor (q/k/v, gate/up):
    theirs is the same Gram."""

    def __init__(self):
        self.stats: dict[str, InputStats] = {}
        self.followers: set[str] = set()  # modules whose accumulator belongs to another module
        self.this_batch: list[tuple[torch.Tensor, InputStats]] = []

    def start_batch(self) -> None:
        self.this_batch.clear()

    def hook(self, name: str):
        def record(module, args, output):
            x = args[0]
            if name not in self.stats:
                shared = next((s for t, s in self.this_batch if t is x), None)
                if shared is not None:
                    self.stats[name] = shared
                    self.followers.add(name)
            if name not in self.followers:
                if name not in self.stats:
                    self.stats[name] = InputStats(x.shape[-1], device=x.device)
                self.stats[name].add_batch(x)
                self.this_batch.append((x, self.stats[name]))

        return record


def input_stats(runner, block: int, batches: list[torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, InputStats]:
    """Input Gram and mean |x| of each module while the runner runs `block` on `batches`."""
    acc = _InputAccumulators()
    with _hooks(modules, acc.hook):
        runner.run_block(block, batches, before_batch=acc.start_batch)
    return acc.stats


def accumulator_bytes(shape: tuple[int, int], cov: bool, fisher: bool) -> int:
    out_f, in_f = shape
    return 8 * (out_f + (out_f * out_f if cov else 0) + (out_f + in_f if fisher else 0))


def gradient_groups(shapes: dict[str, tuple[int, int]], cov: bool, fisher: bool, budget: int) -> list[list[str]]:
    """Split modules into groups whose accumulators fit `budget` bytes; one backward walk per group."""
    groups, current, used = [], [], 0
    for name, shape in shapes.items():
        need = accumulator_bytes(shape, cov, fisher)
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    return groups + ([current] if current else [])


def gradient_stats(model: nn.Module, modules: dict[str, nn.Module], calib: torch.Tensor, device: str,
                   cov: bool, fisher: bool, progress: bool = True,
                   accumulator_budget: int = 16 * 2**30, labels: str = "data", seed: int = 0,
                   spill=None) -> dict[str, GradientStats]:
    """Backward passes of the LM loss, one calibration sequence at a time.

    `labels`: "data" scores the text's own next tokens (empirical Fisher); "model" scores tokens
    drawn from the model's next-token distribution at every position (true Fisher, seeded by
    `seed` so that a rerun gives the same statistics).

    No parameter gradient is formed: the embedding output is made to require grad, so autograd
    computes only activation gradients, and a tensor hook on each target's output hands
    (x, dL/dy) of that sequence to its accumulator. Memory: the model, one sequence's
    activations, and the accumulators, 8 * (out^2 + out + in) bytes per layer with everything
    (a 14336-wide MLP projection: 1.6 GB). When all layers' accumulators exceed `accumulator_budget`,
    the layers are split into groups and the calibration set is walked once per group.
    `spill(group_stats)`, when given, takes each finished group (e.g. to disk) instead of the
    returned dict holding it, so that host memory holds one group at a time.
    """
    shapes = {name: tuple(dense_weight(m)[0].shape) for name, m in modules.items()}
    groups = gradient_groups(shapes, cov, fisher, accumulator_budget)
    stats: dict[str, GradientStats] = {}
    for number, group in enumerate(groups, 1):
        part = {n: GradientStats(*shapes[n], cov=cov, fisher=fisher, device=device) for n in group}
        desc = "gradient statistics" + (f" ({number}/{len(groups)})" if len(groups) > 1 else "")
        _backward_walk(model, {n: modules[n] for n in group}, part, calib, device, desc, progress, labels, seed)
        positions = calib.shape[1]
        for name, s in part.items():
            s.fisher_scale = float(positions * (positions - 1 if labels == "data" else positions))
        if spill is not None:  # straight from the device, a file at a time (host memory stays small)
            spill(part)
            part.clear()  # let the device memory go before the next group's accumulators exist
            continue
        for s in part.values():
            for field in ("sq_sum", "cov", "fisher_rows", "fisher_cols"):
                if getattr(s, field) is not None:
                    setattr(s, field, getattr(s, field).cpu())
        stats.update(part)
    return stats


def _sampled_label_loss(model, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy against tokens drawn from the model's own predictions (drawn without grad)."""
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    with torch.no_grad():
        drawn = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return F.cross_entropy(logits, drawn)


def _backward_walk(model, modules, stats, calib, device, desc, progress, labels="data", seed=0) -> None:
    def make_hook(name):
        def hook(module, args, output):
            x = args[0].detach()
            output.register_hook(lambda g: stats[name].add_sample(x, g))

        return hook

    embed = model.get_input_embeddings()
    grad_on = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator(device).manual_seed(seed)
    try:
        with _hooks(modules, make_hook):
            for sample in tqdm(calib, desc=desc, disable=not progress, unit="seq"):
                ids = sample.unsqueeze(0).to(device)
                if labels == "model":
                    loss = _sampled_label_loss(model, ids, generator)
                else:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
    finally:
        grad_on.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
