"""`--allocation evolve`: the knapsack solution refined by an evolutionary search, then materialised.

1. Gradient statistics (as compress_model), the knapsack ranks (the start), the factor bank:
   one-shot factors of every matrix at its largest candidate rank (search/bank.py).
2. Dense reference distributions on the fitness windows, a backend (this process or Ray
   workers), the engine. The search state is saved in the checkpoint folder after every
   generation (search-state.json), so `--resume` continues the search where it stopped; the bank
   and the reference are rebuilt (deterministic), the knapsack start is read back.
3. The result is materialised and chosen on held-out selection windows (fitness windows the
   search never scored): the winner with one-shot factors straight from the bank, the winner by
   a sequential compression in the configured order (every order with `search_order`), and the
   knapsack start as a knapsack run would build it. Candidates are scored by one-shot factors
   because a sequential run per candidate costs minutes. Choosing on the search's own windows
   would favour whatever the search fitted to them: on the demo model at keep 0.6 the one-shot
   winner scored 3% below the start there and came out 2.6% worse in test perplexity than the
   sequential start. So the selection windows decide, and a search that only fitted its windows
   returns the knapsack start. Only the winner is materialised, so order is searched on it alone.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
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
    windows, selection = fitness[: per_stage[-1]], fitness[per_stage[-1]: 2 * per_stage[-1]]
    if selection.shape[0] == 0:
        warnings.warn("no fitness windows are left beyond the search's: the result is chosen on the windows the "
                      "search fitted (biased towards the winner); give more fitness text", stacklevel=2)
        selection = windows
    grads = _gradients(model, targets, method, calib, device, progress, gradients, checkpoint, config)

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
                       gradients=grads if exponents else {}, top=max_ranks(shapes, config.rank_align),
                       dtype=search.dtype)
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
    start_bank = bank  # the knapsack start's factors (its exponent)
    if exponents and evo.parent.genes[0] != base:
        bank = bank_from_weights(targets.modules, build_method(final.method, final.options), grads, spec.top,
                                 device, progress)
    contenders = [("one-shot", ranks, replace(final, sequential=False), bank)]
    if final.sequential:
        contenders += [(order, ranks, replace(final, order=order), None)
                       for order in (ORDERS if search.search_order else (final.order,))]
    contenders.append(("knapsack start", start_ranks, config, None if config.sequential else start_bank))
    selection_reference = reference if selection is windows else Reference.compute(model.to(device), selection,
                                                                                 search.kl_top_k, progress=False)
    model.to("cpu")
    chosen, scores, errors = _materialise(model, contenders, calib, selection, selection_reference, grads, device,
                                          progress)
    _, ranks, final, _ = next(c for c in contenders if c[0] == chosen)
    if chosen == "knapsack start":
        exponent = config.options.fisher_exponent if exponents else None
    start_kept = kept_fraction(shapes, start_ranks)
    result = EvolveResult(config=final, ranks=dict(ranks), shapes=shapes, errors=errors,
                          allocation={n: {"rank": ranks[n], "cost": lowrank_cost(shapes[n], ranks[n]),
                                          "knapsack_rank": start_ranks[n]} for n in names})
    result.search = {
        "title": f"{config.method}, keep {config.keep:.3f}: KL on {windows.numel()} fitness tokens",
        "generations": evo.generation, "search_seconds": evo.elapsed, "workers": getattr(backend, "workers", 1),
        "dtype": getattr(backend, "dtype", search.dtype),  # Ray workers resolve "auto" on their own devices
        "start_fitness": evo.history[0]["fitness"], "final_fitness": evo.parent_fitness,
        "start_kept_fraction": start_kept, "kept_fraction": result.kept_fraction,
        "fitness_windows": list(windows.shape), "stage_windows": per_stage, "exponent": exponent,
        "selection_windows": list(selection.shape), "materialised": scores, "chosen": chosen,
        "history": evo.history, "start_ranks": start_ranks,
    }
    result.seconds = time.time() - begin
    return result


def _materialise(model, contenders, calib, selection, reference, grads, device, progress):
    """Build every contender (label, ranks, config, bank or None for a sequential run) on a copy of
    `model`, score it by KL on the held-out `selection` windows, and compress `model` in place as
    the best one. Returns (chosen label, {label: KL}, truncation errors of the chosen run)."""
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
            errors = compress_model(candidate, config, calib, ranks=ranks, device=device, progress=progress,
                                    gradients=grads).errors
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
