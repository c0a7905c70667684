"""Are the knapsack's loss estimates priced right across module types and depth?

    .venv/bin/python bench/loss_weights.py --keep 0.8 --mode types            # each type x0.5 / x2
    .venv/bin/python bench/loss_weights.py --keep 0.6 --mode depth --tilts -1 -0.5 0.5 1 1.5
    .venv/bin/python bench/loss_weights.py --keep 0.6 --mode measured          # weights from measured KL
    .venv/bin/python bench/loss_weights.py --render                           # tables only

One-shot gfwsvd models (factor bank of the dense model, calibration 32 x 1024 of wiki.valid.raw):
the knapsack is solved again with some estimates multiplied by a weight (one module type by 0.5
or 2, or block i by exp(tilt * i / (blocks - 1)), as --depth-tilt does), under the same budget, and each model is
scored by KL from the dense model on 4 x 1024 held-out validation windows (not calibration: what
a tuner may choose on) and by test PPL (here a window predicts its 1024 next tokens, so the
figures sit a little off vaclm eval's). Mode "measured" takes the weights from the model instead:
each matrix compressed alone at its knapsack rank (all others dense), or each block alone, scored
by KL on 2 x 1024 other validation windows; a matrix's weight is its measured KL over its estimate,
divided by the median of that ratio (the square root of it too, a milder correction). Writes
bench/results/loss_weights.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from common import RESULTS, WIKI_TEST, WIKI_VALID, demo_gradients, write_results

SEQ, SAMPLES, FIT_TOKENS, TEST_WINDOWS, MEASURE_TOKENS = 1024, 32, 4096, 16, 2048


def candidates(mode: str, per_block: list[list[str]], tilts: list[float]):
    """(label, {matrix: weight on its loss estimates}); absent matrices weigh 1."""
    from vaclm.pipeline.knapsack import depth_weights

    yield "base", {}
    if mode == "types":
        for ty in sorted({n.split(".")[-1] for block in per_block for n in block}):
            for lam in (0.5, 2.0):
                yield f"{ty} x{lam:g}", {n: lam for block in per_block for n in block if n.endswith(ty)}
    for a in tilts:
        yield f"depth tilt {a:+g}", depth_weights(per_block, a)


def measured(model, modules, plan, ranks, per_block, windows, reference):
    """Weights from the KL of each matrix (and each block) compressed alone at its knapsack rank."""
    from vaclm.search.bank import set_ranks
    from vaclm.search.fitness import model_fitness

    estimate = lambda n: float(plan.options[n].losses[plan.options[n].ranks.index(ranks[n])])

    def alone(compressed: dict) -> float:  # KL with only these matrices compressed
        set_ranks(modules, compressed)
        return model_fitness(model, windows, reference)

    single = {n: alone({n: r}) / max(estimate(n), 1e-30) for n, r in ranks.items() if r is not None}
    block = [alone({n: ranks[n] for n in names}) / max(sum(estimate(n) for n in names if n in single), 1e-30)
             for names in per_block]
    median, block_median = float(np.median(list(single.values()))), float(np.median(block))
    ratio = {n: single.get(n, median) / median for n in ranks}
    yield "measured per matrix", ratio
    yield "measured per matrix, sqrt", {n: v ** 0.5 for n, v in ratio.items()}
    yield "measured per block", {n: block[i] / block_median for i, names in enumerate(per_block) for n in names}


def run(keep: float, mode: str, tilts: list[float]) -> list[dict]:
    import vaclm
    import vaclm.api as api
    from vaclm.config import CompressConfig
    from vaclm.data.roles import fitness_split
    from vaclm.methods import build_method
    from vaclm.model.surgery import Targets
    from vaclm.pipeline.knapsack import knapsack_ranks
    from vaclm.search.bank import build_bank, set_ranks, sliced
    from vaclm.search.fitness import Reference, model_fitness, search_dtype
    from vaclm.allocate.uniform import kept_fraction

    model, tok = vaclm.load("demo")
    config = CompressConfig(keep=keep, method="gfwsvd", allocation="knapsack", calib_samples=SAMPLES, calib_seq_len=SEQ)
    grads, _ = demo_gradients(model, tok, config)
    calib, fit = fitness_split(api.token_stream(str(WIKI_VALID), tok, "calibration"), SAMPLES, SEQ, 0, FIT_TOKENS,
                               extra_tokens=MEASURE_TOKENS)
    fit, probe = fit[: FIT_TOKENS // SEQ], fit[FIT_TOKENS // SEQ:]  # held-out scoring / measuring the weights
    targets = Targets.of(model)
    method = build_method("gfwsvd", config.options)
    _, _, plan = knapsack_ranks(model, targets, method, calib, grads, config, "cpu", False)
    bank = build_bank(model, targets, method, calib, grads, config.rank_align, config.batch_size, "cpu", False)
    test = api.token_stream(str(WIKI_TEST), tok, "evaluation")[: TEST_WINDOWS * SEQ + 1]
    reference = Reference.compute(model, fit, 1024, False)

    def test_ppl(m) -> float:
        nll = 0.0
        with torch.no_grad():
            for w in range(TEST_WINDOWS):
                ids = test[w * SEQ: (w + 1) * SEQ + 1][None]
                logits = m(input_ids=ids[:, :-1], use_cache=False).logits.float()
                nll += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        return float(np.exp(nll / (TEST_WINDOWS * SEQ)))

    rows, weightings = [], list(candidates(mode, targets.per_block, tilts))
    if mode == "measured":  # measured on a copy in the dtype the search scores in
        fast = copy.deepcopy(model).to(search_dtype("auto", model))
        with sliced(fast, bank) as modules:
            weightings += list(measured(fast, modules, plan, plan.solve(), targets.per_block, probe,
                                        Reference.compute(model, probe, 1024, False)))
    with sliced(model, bank) as modules:
        for label, weights in weightings:
            start = time.time()
            plan.weights = weights
            ranks = plan.solve()
            set_ranks(modules, ranks)
            rows.append({"keep": keep, "weights": label, "kept_fraction": kept_fraction(targets.shapes, ranks),
                         "heldout_kl": model_fitness(model, fit, reference), "test_ppl": test_ppl(model),
                         "seconds": time.time() - start, "measured": time.strftime("%Y-%m-%d")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| keep | weights | kept fraction | held-out KL | test PPL (one-shot) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keep']} | {r['weights']} | {r['kept_fraction']:.4f} | {r['heldout_kl']:.4f} | {r['test_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--mode", choices=("types", "depth", "measured"), default="depth")
    p.add_argument("--tilts", nargs="*", type=float, default=[-1.0, 1.0])
    p.add_argument("--render", action="store_true", help="only re-render the table from the JSON")
    args = p.parse_args()
    path = RESULTS / "loss_weights.json"
    old = json.loads(path.read_text()) if path.exists() else []
    new = [] if args.render else run(args.keep, args.mode, args.tilts)
    key = lambda r: (r["keep"], r["weights"])
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    tilt = lambda w: float(w.split()[-1]) if w.startswith("depth tilt") else 0.0
    rows = sorted(merged.values(), key=lambda r: (-r["keep"], r["weights"] != "base",
                                                  not r["weights"].startswith("depth"), tilt(r["weights"]), r["weights"]))
    write_results("loss_weights", rows, render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
