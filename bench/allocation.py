"""Uniform against knapsack allocation, each block order, with and without sequential re-capture.

    .venv/bin/python bench/allocation.py                 # keep 0.8 and 0.6
    .venv/bin/python bench/allocation.py --keeps 0.6 --methods gfwsvd

Same protocol as bench/methods.py (calibration 32 x 512 of wiki.valid.raw, test PPL 16 x 1024,
a fresh process per run, shared gradient statistics). Writes bench/results/allocation.{json,md}.
"""

from __future__ import annotations

import argparse
import json

from common import compress_and_eval, run_worker, write_results

SETTINGS = [
    {"allocation": "uniform", "order": "front-to-back", "sequential": True},
    {"allocation": "uniform", "order": "front-to-back", "sequential": False},
    {"allocation": "knapsack", "order": "front-to-back", "sequential": True},
    {"allocation": "knapsack", "order": "front-to-back", "sequential": False},
    {"allocation": "knapsack", "order": "middle-out", "sequential": True},
    {"allocation": "knapsack", "order": "back-to-front", "sequential": True},
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs="+")
    p.add_argument("--methods", nargs="+", default=["gfwsvd"])
    p.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--settings", nargs="+", type=int, default=list(range(len(SETTINGS))),
                   help="indices into SETTINGS")
    args = p.parse_args()
    if args.worker:
        method, keep, settings = args.worker
        print(json.dumps(compress_and_eval(method, float(keep), **json.loads(settings))))
        return
    rows = []
    for method in args.methods:
        for keep in args.keeps:
            for i in args.settings:
                rows.append(run_worker(__file__, [method, str(keep), json.dumps(SETTINGS[i])]))
                print(rows[-1], flush=True)
    lines = ["| method | keep | allocation | order | sequential | kept fraction | PPL | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep']} | {r['allocation']} | {r['order']} | "
                     f"{'yes' if r['sequential'] else 'no (one-shot)'} | {r['kept_fraction']:.4f} | {r['ppl']:.2f} | "
                     f"{r['compress_seconds']:.0f} |")
    write_results("allocation", rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
