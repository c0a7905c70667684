"""Uniform against knapsack allocation, each block order, with and without sequential re-capture.

    .venv/bin/python bench/allocation.py                 # keep 0.8 and 0.6
    .venv/bin/python bench/allocation.py --keeps 0.6 --methods gfwsvd

Same protocol as bench/methods.py (calibration 32 x 512 of wiki.valid.raw, test PPL 16 x 1024,
a fresh process per run, shared gradient statistics). Writes bench/results/allocation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, compress_and_eval, method_label, run_worker, write_results

SETTINGS = [  # rows with dense_targets / within_block / resolve in allocation.json come from options since removed
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
    p.add_argument("--runs", nargs="+", default=None, help="explicit KEEP:SETTING pairs, e.g. 0.6:2 0.8:2")
    p.add_argument("--options", default="{}", help="method option overrides as JSON, e.g. '{\"cov_damping\": 0.01}'")
    p.add_argument("--merge", action="store_true", help="add to the existing results (replacing equal settings)")
    p.add_argument("--add", nargs="+", default=None, help="merge rows a worker printed (JSON files) into the results")
    args = p.parse_args()
    if args.worker:
        method, keep, settings = args.worker
        print(json.dumps(compress_and_eval(method, float(keep), **json.loads(settings))))
        return
    if args.add:  # rows of workers run by hand (e.g. with settings outside SETTINGS)
        rows = merge([json.loads(Path(f).read_text().strip().splitlines()[-1]) for f in args.add])
        write_results("allocation", rows, render(rows))
        print(render(rows))
        return
    pairs = [tuple(r.split(":")) for r in args.runs] if args.runs else \
        [(str(k), str(i)) for k in args.keeps for i in args.settings]
    rows = []
    for method in args.methods:
        for keep, i in pairs:
            rows.append(run_worker(__file__, [method, keep, json.dumps({**SETTINGS[int(i)], "options": json.loads(args.options)})]))
            print(rows[-1], flush=True)
            if args.merge:  # keep what is done even if a later run is interrupted
                rows = merge(rows)
                write_results("allocation", rows, render(rows))
    rows = merge(rows) if args.merge else rows
    write_results("allocation", rows, render(rows))
    print(render(rows))


def merge(rows: list[dict]) -> list[dict]:
    key = lambda r: json.dumps({**{k: r.get(k) for k in ("method", "keep", "allocation", "order", "sequential",
                                                          "within_block", "options")},
                                "dense_targets": dense_targets(r), "resolve": bool(r.get("resolve")),
                                "calib_samples": r.get("calib_samples", 32), "calib_seq_len": r.get("calib_seq_len", 512),
                                "fisher_labels": r.get("fisher_labels", "data"), "seed": r.get("seed", 0),
                                "depth_tilt": r.get("depth_tilt", 0.0)}, sort_keys=True)
    old = json.loads((RESULTS / "allocation.json").read_text()) if (RESULTS / "allocation.json").exists() else []
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    return list(merged.values())


def dense_targets(row: dict) -> bool:
    """Rows from before the option existed fitted each matrix to its own inputs."""
    return bool(row.get("dense_targets", False)) and row["sequential"] and row["method"] in ("svd-llm", "gfwsvd")


def render(rows: list[dict]) -> str:
    lines = ["| method | keep | calibration | allocation | order | sequential | fit target | re-solved per block | kept fraction | PPL | compress s | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (-r["keep"], r["allocation"] != "knapsack", not r["sequential"], r["order"] != "front-to-back",
                       bool(r.get("within_block")), dense_targets(r), bool(r.get("resolve")), r.get("calib_samples", 32),
                       r.get("fisher_labels", "data"), r.get("seed", 0), r.get("depth_tilt", 0.0))
    for r in sorted(rows, key=order):
        seq = ("within blocks too" if r.get("within_block") else "yes") if r["sequential"] else "no (one-shot)"
        target = "dense outputs" if dense_targets(r) else "own inputs"
        resolved = "yes" if r.get("resolve") else "no"
        calib = f"{r.get('calib_samples', 32)} x {r.get('calib_seq_len', 512)}" + (
            ", drawn labels" if r.get("fisher_labels", "data") == "model" else "") + (
            f", seed {r['seed']}" if r.get("seed", 0) else "")
        allocation = r["allocation"] + (f", depth tilt {r['depth_tilt']:g}" if r.get("depth_tilt") else "")
        lines.append(f"| {method_label(r)} | {r['keep']} | {calib} | {allocation} | {r['order']} | {seq} | {target} | {resolved} | "
                     f"{r['kept_fraction']:.4f} | {r['ppl']:.2f} | {r['compress_seconds']:.0f} | {r.get('measured', 'earlier')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
