"""The evolutionary search against its knapsack start on the demo model.

    .venv/bin/python bench/evolve.py --keep 0.6 --time-limit 1800
    .venv/bin/python bench/evolve.py --keep 0.8 --time-limit 1800 --merge

Protocol as bench/allocation.py: gfwsvd, calibration 32 x 512 of wiki.valid.raw, shared gradient
statistics, a fresh process per run. Fitness: windows of wiki.valid.raw that are not calibration
windows. wiki.test.raw is passed to compress as the evaluation text, so any overlap with the
calibration or fitness data would be refused. The knapsack start is materialised as a knapsack
run would be (sequential, front-to-back); both models are scored on the first 16 x 1024 windows of
wiki.test.raw. The result is chosen among the winner (one-shot, sequential) and the knapsack start
by KL on held-out fitness windows the search never scored (rows before that change were chosen on
the search's own windows: "selection" says which). `--time-limit` bounds the generations only: the
knapsack walk, the factor bank, the dense logits and the materialisation come on top. Writes
bench/results/evolve.{json,md} and the search curve evolve_keep<K>_t<last-stage tokens>.png.
"""

from __future__ import annotations

import argparse
import json


def worker(args) -> dict:
    import copy
    import time
    from dataclasses import replace

    import torch

    import vaclm
    from common import WIKI_TEST, WIKI_VALID, RESULTS, demo_gradients, peak_rss_bytes
    from vaclm.config import CompressConfig, SearchOptions
    from vaclm.search.backends import parse_workers
    from vaclm.search.history import plot_search

    torch.set_num_threads(args.threads)
    model, tokenizer = vaclm.load("demo")
    dense = copy.deepcopy(model)
    search = SearchOptions(generations=args.generations, time_limit=args.time_limit, offspring=args.offspring,
                           survivors=tuple(args.survivors), fitness_tokens=tuple(args.fitness_tokens),
                           search_order=args.search_order)
    config = CompressConfig(keep=args.keep, method="gfwsvd", allocation="evolve", search=search)
    grads, _ = demo_gradients(model, tokenizer, config)
    start = time.time()
    result = vaclm.compress(model, config, str(WIKI_VALID), tokenizer=tokenizer, gradients=grads,
                            eval_text=str(WIKI_TEST), workers=parse_workers(args.workers), progress=not args.quiet)
    seconds = time.time() - start
    ppl = lambda m: vaclm.evaluate(m, str(WIKI_TEST), tokenizer, seq_len=1024, max_windows=16, progress=False)["ppl"]
    s = result.search
    knapsack = vaclm.compress(dense, replace(config, allocation="knapsack"), str(WIKI_VALID), tokenizer=tokenizer,
                              ranks=s["start_ranks"], gradients=grads, progress=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    curve = RESULTS / f"evolve_keep{args.keep}_t{args.fitness_tokens[-1]}.png"
    plot_search(s["history"], curve, f"gfwsvd keep {args.keep}: " + s["title"].split(": ", 1)[1])
    return {
        "keep": args.keep, "time_limit": args.time_limit, "generations": s["generations"],
        "search_seconds": round(s["search_seconds"], 1), "total_seconds": round(seconds, 1), "threads": args.threads,
        "workers": s["workers"], "search_dtype": s["dtype"], "offspring": args.offspring, "survivors": args.survivors,
        "fitness_tokens": args.fitness_tokens, "knapsack_kept_fraction": knapsack.kept_fraction,
        "evolved_kept_fraction": result.kept_fraction, "knapsack_fitness": s["start_fitness"],
        "evolved_fitness": s["final_fitness"], "materialised": s["materialised"], "chosen": s["chosen"],
        "selection": f"{s['selection_windows'][0]} held-out windows of {s['selection_windows'][1]}",
        "knapsack_ppl": ppl(dense), "evolved_ppl": ppl(model), "curve": curve.name,
        "history": [{k: h[k] for k in ("generation", "fitness", "seconds")} for h in s["history"]],
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def render(rows: list[dict]) -> str:
    lines = ["| keep | time limit s | generations | kept (knapsack -> evolved) | fitness KL (knapsack -> evolved) | "
             "test PPL knapsack | test PPL evolved | change | fitness tokens per stage (scored in) | chosen | chosen on |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = r["evolved_ppl"] / r["knapsack_ppl"] - 1
        lines.append(f"| {r['keep']} | {r['time_limit']} | {r['generations']} | {r['knapsack_kept_fraction']:.4f} -> "
                     f"{r['evolved_kept_fraction']:.4f} | {r['knapsack_fitness']:.4f} -> {r['evolved_fitness']:.4f} | "
                     f"{r['knapsack_ppl']:.2f} | {r['evolved_ppl']:.2f} | {change:+.1%} | "
                     f"{' / '.join(map(str, r['fitness_tokens']))} ({r.get('search_dtype') or 'float32'}) | {r['chosen']} | "
                     f"{r.get('selection', 'the search windows')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--time-limit", type=float, default=1800)
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--survivors", type=int, nargs="+", default=[2, 1])
    p.add_argument("--fitness-tokens", type=int, nargs="+", default=[2048, 8192],
                   help="per stage (the library default; docs/results.md compares smaller ones)")
    p.add_argument("--search-order", action="store_true")
    p.add_argument("--workers", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", action="store_true", help="add to the existing results (replacing the same keep)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import sys

    from common import merge_rows, run_worker, write_results

    row = run_worker(__file__, [a for a in sys.argv[1:] if a != "--merge"] + ["--quiet"])
    key = lambda r: (r["keep"], tuple(r["fitness_tokens"]), r.get("selection"))
    rows = merge_rows("evolve", [row], key) if args.merge else [row]  # replacing the same keep and settings
    rows.sort(key=lambda r: (-r["keep"], r["fitness_tokens"][-1]))
    write_results("evolve", rows, render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
