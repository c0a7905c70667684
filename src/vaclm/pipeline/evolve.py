"""`--allocation evolve`: the knapsack solution refined by an evolutionary search, then materialised.

1. Gradient statistics (as the sequential pass), the knapsack ranks (the start), the factor bank:
   one-shot factors of every matrix at its largest candidate rank (search/bank.py).
2. Dense reference distributions on the fitness windows, a backend (this process or Ray
   workers), the engine. The search state is saved in the checkpoint folder after every
   generation (search-state.json), so `--resume` continues the search where it stopped; the bank
   and the reference are rebuilt (deterministic), the knapsack start is read back.
3. The result is materialised and chosen on held-out selection windows (fitness windows the
   search never scored): the winner with one-shot factors straight from the bank, the winner by
   a sequential compression in the configured order (every order with `search_order`), and the
   knapsack start as a knapsack run would build it. Candidates are scored by one-shot factors
   because a sequential run per candidate costs minutes. The search's own windows would favour
   whatever it fitted to them (docs/results.md), so held-out windows decide, and a search that
   only fitted its windows returns the knapsack start. Only the winner is materialised, so order
   is searched on it alone.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from ..allocate.candidates import rank_grid
from ..allocate.uniform import kept_fraction
from ..config import ORDERS, CompressConfig
from ..errors import VaclmError
from ..io.checkpoint import atomic_write_json
from ..model.arch import get_submodule, set_submodule
from ..model.surgery import replace_with_lowrank
from ..search.backends import make_backend
from ..search.bank import build_bank
from ..search.engine import Evolution, Genome, Settings, Space
from ..search.fitness import FitnessSpec, Reference, model_fitness
from .allocation import Allocation, Given, cost_model, register
from .knapsack import knapsack_ranks
from .run import CompressionResult, Run, check_finite
from .sequential import compress_with_ranks

STATE_FILE = "search-state.json"


@dataclass
class EvolveResult(CompressionResult):
    search: dict = field(default_factory=dict)  # history and choices; written as search.json

    def to_dict(self) -> dict:
        summary = {k: v for k, v in self.search.items() if k not in ("history", "start_ranks")}
        return {**super().to_dict(), "search": summary}


@register("evolve")
class Evolve(Allocation):
    uses_fitness = True

    def run(self, run: Run) -> "EvolveResult":
        return evolve_model(run)


def split_fitness(fitness: torch.Tensor | None, config: CompressConfig) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(windows each stage scores, the search's windows, the held-out selection windows)."""
    if fitness is None:
        raise VaclmError("--allocation evolve needs fitness windows held out from calibration")
    per_stage = [-(-t // fitness.shape[1]) for t in config.search.fitness_tokens]
    n = per_stage[-1]
    if fitness.shape[0] < n:
        raise VaclmError(f"fitness data holds {fitness.shape[0]} windows, the last stage needs {n}; "
                         "give more fitness text or fewer --fitness-tokens")
    windows, selection = fitness[:n], fitness[n: 2 * n]
    if selection.shape[0] == 0:
        warnings.warn("no fitness windows are left beyond the search's: the result is chosen on the windows the "
                      "search fitted (biased towards the winner); give more fitness text", stacklevel=3)
        selection = windows
    return per_stage, windows, selection


def evolve_model(run: Run) -> EvolveResult:
    begin = time.time()
    model, config, targets, device, progress = run.model, run.config, run.targets, run.device, run.progress
    search, shapes = config.search, targets.shapes
    check_finite(model)
    per_stage, windows, selection = split_fitness(run.fitness, config)
    grads = run.gradients()

    names = [n for block in targets.per_block for n in block]
    choices = [rank_grid(shapes[n], config.rank_align) + [None] for n in names]
    cost = cost_model(model, config)  # the knapsack start's unit: bytes with --int8 --target-size
    budget = config.keep * sum(cost.dense(s) for s in shapes.values())
    try:
        space = Space([[cost.cost(shapes[n], r) for r in c] for n, c in zip(names, choices)], budget)
    except ValueError as exc:
        raise VaclmError(f"keep {config.keep:.4f} is below what the smallest ranks allow ({exc}); raise --keep") from exc

    state_path = run.checkpoint.folder / STATE_FILE if run.checkpoint else None
    saved = json.loads(state_path.read_text()) if state_path and state_path.exists() else None
    if saved is None:
        start_ranks = knapsack_ranks(model, targets, run.method, run.calib, grads, config, device, progress)[0]
    else:
        start_ranks = saved["start_ranks"]
    start = Genome(tuple(c.index(start_ranks[n]) for n, c in zip(names, choices)))

    bank = build_bank(model, targets, run.method, run.calib, grads, config.rank_align, config.batch_size, device,
                      progress)
    model.to(device)
    reference = Reference.compute(model, windows, search.kl_top_k, progress)
    spec = FitnessSpec(model, names, choices, windows, reference, per_stage, config.seed, bank, search.dtype)
    settings = Settings(search.offspring, search.survivors, search.max_moves)
    backend = make_backend(spec, run.workers, device)

    def save_state(evo: Evolution) -> None:
        if state_path is not None:
            atomic_write_json(state_path, {"start_ranks": start_ranks, "engine": evo.state_dict()})

    try:
        if saved is not None:
            evo = Evolution.from_state(space, backend, settings, saved["engine"])
        else:
            evo = Evolution.start(space, backend, settings, config.seed, start)
            save_state(evo)
        evo.run(search.generations, search.time_limit, on_generation=save_state, progress=progress)
    finally:
        backend.close()
    selection_reference = reference if selection is windows else Reference.compute(model, selection, search.kl_top_k,
                                                                                 progress=False)
    model.to("cpu")

    contenders = _contenders(config, spec.ranks(evo.parent), start_ranks, bank)
    chosen, scores, errors = _materialise(model, contenders, run.calib, selection, selection_reference, grads,
                                          device, progress)
    _, ranks, final, _ = next(c for c in contenders if c[0] == chosen)
    result = EvolveResult(config=final, ranks=dict(ranks), shapes=shapes, errors=errors,
                          allocation={n: {"rank": ranks[n], "cost": cost.cost(shapes[n], ranks[n]),
                                          "knapsack_rank": start_ranks[n]} for n in names})
    result.search = {
        "title": f"{config.method}, keep {config.keep:.3f}: KL on {windows.numel()} fitness tokens",
        "generations": evo.generation, "search_seconds": evo.elapsed, "workers": backend.workers,
        "dtype": getattr(backend, "dtype", search.dtype),  # Ray workers resolve "auto" on their own devices
        "start_fitness": evo.history[0]["fitness"], "final_fitness": evo.parent_fitness,
        "start_kept_fraction": kept_fraction(shapes, start_ranks), "kept_fraction": result.kept_fraction,
        "fitness_windows": list(windows.shape), "stage_windows": per_stage,
        "selection_windows": list(selection.shape), "materialised": scores, "chosen": chosen,
        "history": evo.history, "start_ranks": start_ranks,
    }
    result.seconds = time.time() - begin
    return result


def _contenders(config: CompressConfig, ranks: dict, start_ranks: dict, bank) -> list[tuple]:
    """(label, ranks, config, bank or None for a sequential run) of every model the result is chosen from."""
    found = [("one-shot", ranks, replace(config, sequential=False), bank)]
    if config.sequential:
        found += [(order, ranks, replace(config, order=order), None)
                  for order in (ORDERS if config.search.search_order else (config.order,))]
    return found + [("knapsack start", start_ranks, config, None if config.sequential else bank)]


def _materialise(model, contenders, calib, selection, reference, grads, device, progress):
    """Build every contender on a copy of `model`, score it by KL on the held-out `selection` windows,
    and compress `model` in place as the best one. Returns (chosen label, {label: KL}, truncation
    errors of the chosen run)."""
    scores, best, best_model, best_errors, built = {}, None, None, {}, []
    for label, ranks, config, bank in contenders:
        same = next((l for l, r, c in built if r == ranks and c == config), None)
        if same is not None:  # e.g. the start, when the search never moved: nothing new to build
            scores[label] = scores[same]
            continue
        built.append((label, ranks, config))
        candidate = copy.deepcopy(model)
        errors = {}
        if bank is None:
            errors = compress_with_ranks(Run(candidate, config, calib, device=device, progress=progress,
                                             given_gradients=grads), Given(ranks)).errors
        else:
            for name, rank in ranks.items():
                if rank is not None:
                    up_t, down = bank[name]
                    replace_with_lowrank(candidate, name, up_t[:rank].T, down[:rank])
        scores[label] = model_fitness(candidate.to(device), selection, reference)
        candidate.to("cpu")
        if best is None or scores[label] < scores[best]:
            best, best_model, best_errors = label, candidate, errors
    for name in contenders[0][1]:  # every contender lists every target
        set_submodule(model, name, get_submodule(best_model, name))
    return best, scores, best_errors
