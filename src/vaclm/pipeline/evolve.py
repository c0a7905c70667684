"""`--allocation evolve`: the knapsack solution refined by an evolutionary search, then materialised.

1. Gradient statistics (as compress_model), the knapsack ranks (the start), the factor bank:
   one-shot factors of every matrix at its largest candidate rank (search/bank.py).
2. Dense reference distributions on the fitness windows, a backend (this process or Ray
   workers), the engine. The search state is saved in the checkpoint folder after every
   generation (search-state.json), so `--resume` continues the search where it stopped; the bank
   and the reference are rebuilt (deterministic), the knapsack start is read back.
3. The winner is materialised: with one-shot factors straight from the bank, and, when the run
   is sequential, by a sequential compression in the configured order (every order with
   `search_order`). Candidates are scored by one-shot factors because a sequential run per
   candidate costs minutes; the materialisations are scored on the last-stage fitness windows
   and the lowest KL is kept. Only the winner is materialised, so order is searched on it alone.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace

import torch

from ..allocate.candidates import rank_grid
from ..allocate.uniform import kept_fraction, lowrank_cost
from ..config import ORDERS, CompressConfig
from ..errors import VaclmError
from ..io.checkpoint import Checkpoint, _atomic_write_json
from ..methods import build_method
from ..model.arch import get_submodule, set_submodule
from ..model.surgery import Targets, replace_with_lowrank
from ..search.backends import make_backend
from ..search.bank import bank_from_weights, build_bank, max_ranks
from ..search.engine import Evolution, Genome, Settings, Space
from ..search.fitness import FitnessSpec, Reference, model_fitness
from .allocation import keep_for_target_bytes, knapsack_ranks
from .compress import CompressionResult, _gradients, check_finite, compress_model

STATE_FILE = "search-state.json"


@dataclass
class EvolveResult(CompressionResult):
    search: dict = field(default_factory=dict)  # history and choices; written as search.json

    def to_dict(self) -> dict:
        summary = {k: v for k, v in self.search.items() if k not in ("history", "start_ranks")}
        return {**super().to_dict(), "search": summary}


def stage_windows(config: CompressConfig, seq_len: int) -> list[int]:
    return [-(-t // seq_len) for t in config.search.fitness_tokens]


def evolve_model(model, config: CompressConfig, calib: torch.Tensor, fitness: torch.Tensor, device: str = "cpu",
                 progress: bool = True, checkpoint: Checkpoint | None = None, gradients: dict | None = None,
                 workers: int | str | None = None) -> EvolveResult:
    begin = time.time()
    check_finite(model)
    targets = Targets.of(model)
    shapes = targets.shapes
    if config.target_bytes is not None:
        config = replace(config, keep=keep_for_target_bytes(model, shapes, config.target_bytes))
    search, method = config.search, build_method(config.method, config.options)
    per_stage = stage_windows(config, fitness.shape[1])
    if fitness.shape[0] < per_stage[-1]:
        raise VaclmError(f"fitness data holds {fitness.shape[0]} windows, the last stage needs {per_stage[-1]}; "
                         "give more fitness text or fewer --fitness-tokens")
    windows = fitness[: per_stage[-1]]
    grads = _gradients(model, targets, method, calib, device, progress, gradients, checkpoint)

    names = [n for block in targets.per_block for n in block]
    choices = [rank_grid(shapes[n], config.rank_align) + [None] for n in names]
    space_costs = [[lowrank_cost(shapes[n], r) for r in c] for n, c in zip(names, choices)]
    budget = config.keep * sum(o * i for o, i in shapes.values())
    exponents, base = [], 0
    if search.search_exponent:
        exponents = sorted(set(search.exponents) | {config.options.fisher_exponent})
        base = exponents.index(config.options.fisher_exponent)
    try:
        space = Space(space_costs, budget, [len(exponents)] if exponents else [])
    except ValueError as exc:
        raise VaclmError(f"keep {config.keep:.4f} is below what the smallest ranks allow ({exc}); raise --keep") from exc

    state_path = checkpoint.folder / STATE_FILE if checkpoint else None
    saved = json.loads(state_path.read_text()) if state_path and state_path.exists() else None
    if saved is None:
        start_ranks, _, _ = knapsack_ranks(model, targets, method, calib, grads, config, device, progress)
    else:
        start_ranks = saved["start_ranks"]
    start = Genome(tuple(c.index(start_ranks[n]) for n, c in zip(names, choices)), (base,) if exponents else ())

    bank = build_bank(model, targets, method, calib, grads, config.rank_align, config.batch_size, device, progress)
    model.to(device)
    reference = Reference.compute(model, windows, search.kl_top_k, progress)
    spec = FitnessSpec(model, names, choices, windows, reference, per_stage, config.seed, banks={base: bank},
                       exponents=exponents, method=config.method, options=config.options,
                       gradients=grads if exponents else {}, top=max_ranks(shapes, config.rank_align))
    settings = Settings(search.offspring, search.survivors, search.max_moves)
    backend = make_backend(spec, workers, device, progress)

    def save_state(evo: Evolution) -> None:
        if state_path is not None:
            _atomic_write_json(state_path, {"start_ranks": start_ranks, "engine": evo.state_dict()})

    try:
        if saved is not None:
            evo = Evolution.from_state(space, backend, settings, saved["engine"])
        else:
            evo = Evolution.start(space, backend, settings, config.seed, start)
            save_state(evo)
        evo.run(search.generations, search.time_limit, on_generation=save_state, progress=progress)
    finally:
        backend.close()
    model.to("cpu")

    ranks = spec.ranks(evo.parent)
    exponent = exponents[evo.parent.genes[0]] if exponents else None
    final = replace(config, options=replace(config.options, fisher_exponent=exponent)) if exponents else config
    if exponents and evo.parent.genes[0] != base:
        bank = bank_from_weights(targets.modules, build_method(final.method, final.options), grads, spec.top,
                                 device, progress)
    chosen, scores, errors = _materialise(model, final, calib, ranks, bank, evo.parent_fitness, windows, reference,
                                          grads, device, progress)
    final = replace(final, sequential=chosen != "one-shot", order=chosen if chosen in ORDERS else final.order)
    start_kept = kept_fraction(shapes, start_ranks)
    result = EvolveResult(config=final, ranks=dict(ranks), shapes=shapes, errors=errors,
                          allocation={n: {"rank": ranks[n], "cost": lowrank_cost(shapes[n], ranks[n]),
                                          "knapsack_rank": start_ranks[n]} for n in names})
    result.search = {
        "title": f"{config.method}, keep {config.keep:.3f}: KL on {windows.numel()} fitness tokens",
        "generations": evo.generation, "search_seconds": evo.elapsed, "workers": getattr(backend, "workers", 1),
        "start_fitness": evo.history[0]["fitness"], "final_fitness": evo.parent_fitness,
        "start_kept_fraction": start_kept, "kept_fraction": result.kept_fraction,
        "fitness_windows": list(windows.shape), "stage_windows": per_stage, "exponent": exponent,
        "materialised": scores, "chosen": chosen, "history": evo.history, "start_ranks": start_ranks,
    }
    result.seconds = time.time() - begin
    return result


def _materialise(model, config, calib, ranks, bank, search_fitness, windows, reference, grads, device, progress):
    """Compress `model` in place with the winning ranks: one-shot bank factors, or a sequential run
    per order when that scores a lower KL. Returns (chosen, {contender: KL}, truncation errors)."""
    scores = {"one-shot": search_fitness}
    best, best_model, best_errors = "one-shot", None, {}
    if config.sequential:
        for order in (ORDERS if config.search.search_order else (config.order,)):
            candidate = copy.deepcopy(model)
            result = compress_model(candidate, replace(config, order=order), calib, ranks=ranks, device=device,
                                    progress=progress, gradients=grads)
            scores[order] = model_fitness(candidate.to(device), windows, reference)
            candidate.to("cpu")
            if scores[order] < scores[best]:
                best, best_model, best_errors = order, candidate, result.errors
    for name, rank in ranks.items():
        if best_model is not None:
            set_submodule(model, name, get_submodule(best_model, name))
        elif rank is not None:
            up_t, down = bank[name]
            replace_with_lowrank(model, name, up_t[:rank].T, down[:rank])
    return best, scores, best_errors
