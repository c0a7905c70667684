"""Every method at several budgets on the demo model: test-split PPL, compression time, peak memory.

    .venv/bin/python bench/methods.py                      # all methods, keep 0.9 0.8 0.6
    .venv/bin/python bench/methods.py --methods svd svd-llm --keeps 0.8

Calibration: 32 x 512 tokens of wiki.valid.raw; evaluation: 16 x 1024 tokens of wiki.test.raw.
Each run is a fresh process (peak memory is its own). Gradient statistics depend only on the model
and calibration, so fwsvd/gfwsvd runs share one cached copy (bench/.cache); the run that computed
it reports the time. Writes bench/results/methods.{json,md} and methods_ppl.png.
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, compress_and_eval, method_label, run_worker, write_results

ALL_METHODS = ["svd", "asvd", "fwsvd", "svd-llm", "gfwsvd"]


def worker(method: str, keep: float, extra: list[str]) -> dict:
    return compress_and_eval(method, keep, **(json.loads(extra[0]) if extra else {}))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
        pts = sorted((r["kept_fraction"], r["ppl"]) for r in rows if r["method"] == method and not r["options"])
        ax.plot(*zip(*pts), marker="o", label=method)
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="gray", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of decoder linear parameters")
    ax.set_ylabel("WikiText-2 test PPL (16 x 1024)")
    ax.set_title("SmolLM2-135M, uniform ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "methods_ppl.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs="+")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.6])
    p.add_argument("--name", default="methods")
    p.add_argument("--merge", action="store_true", help="replace matching rows of the existing results, keep the rest")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    args = p.parse_args()
    if args.worker:
        method, keep, *extra = args.worker
        print(json.dumps(worker(method, float(keep), extra)))
        return
    rows = [] if args.no_dense else [run_worker(__file__, ["dense", "1.0"])]
    runs = [(m, k, {}) for m in args.methods for k in args.keeps]
    if "fwsvd" in args.methods:  # VAC's exponent against FWSVD's (rows-only rows: an option since removed)
        runs += [("fwsvd", 0.8, {"options": {"fisher_exponent": 0.5}})]
    for method, keep, extra in runs:
        rows.append(run_worker(__file__, [method, str(keep), json.dumps(extra)]))
        print(rows[-1], flush=True)
    if args.merge and (RESULTS / f"{args.name}.json").exists():
        key = lambda r: (r["method"], r["keep"], json.dumps(r.get("options", {}), sort_keys=True))
        new = {key(r) for r in rows}
        old = [r for r in json.loads((RESULTS / f"{args.name}.json").read_text()) if key(r) not in new]
        rows = old + rows
    lines = ["| method | keep | kept fraction | PPL | compress s | peak RSS GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {method_label(r)} | {r['keep']} | {r['kept_fraction']:.4f} | {r['ppl']:.2f} | "
                     f"{r['compress_seconds']:.0f} | {r['peak_rss_gb']:.2f} |")
    grad = [r["gradient_seconds_shared"] for r in rows if r.get("gradient_seconds_shared")]
    if grad:
        lines.append(f"\nGradient statistics (covariance and Fisher, 32 x 512 tokens), computed once and shared: "
                     f"{grad[0]:.0f} s; not included in the compress column.")
    write_results(args.name, rows, "\n".join(lines) + "\n")
    plot(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
