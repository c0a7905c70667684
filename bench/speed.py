"""Measured speed of compressed demo models against the dense demo model (`vaclm bench` logic).

    .venv/bin/python bench/speed.py out/smollm2-keep0.8 out/smollm2-keep0.6 --threads 1
    .venv/bin/python bench/speed.py out/smollm2-keep0.6 --merge      # add a row, keep the others

Each folder runs in a fresh process that loads the dense demo model and the folder and measures
both interleaved (prefill 512 and 2048 tokens at batch 1, last-position logits; decode 128 tokens
at batch 1 and 8 with the KV cache; medians of --reps). Writes bench/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os

from common import RESULTS, run_worker, write_results


def worker(folder: str, threads: int, reps: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import vaclm
    from vaclm.eval.speed import BenchSettings, benchmark
    from vaclm.model.summary import summarize
    from pathlib import Path

    dense, _ = vaclm.load("demo")
    model, _ = vaclm.load(folder)
    res = benchmark(model, dense, BenchSettings(reps=reps, new_tokens=new_tokens), progress=False)
    info = summarize(model, Path(folder))
    return {"folder": folder, "kept_fraction": info["kept_fraction"], **res}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="*")
    p.add_argument("--worker", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--merge", action="store_true", help="keep existing rows of other folders")
    args = p.parse_args()
    if args.worker:
        folder, threads, reps, new_tokens = args.worker
        print(json.dumps(worker(folder, int(threads), int(reps), int(new_tokens))))
        return
    rows = json.loads((RESULTS / "speed.json").read_text()) if args.merge and (RESULTS / "speed.json").exists() else []
    for folder in args.folders:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the worker inherits it
        row = run_worker(__file__, [folder, str(args.threads), str(args.reps), str(args.new_tokens)])
        rows = [r for r in rows if (r["folder"], r["threads"]) != (folder, row["threads"])] + [row]
        write_results("speed", rows, render(rows))
        print(render([row]), flush=True)
    print(render(rows))


def render(rows: list[dict]) -> str:
    lines = ["Speedups are wall-time medians; in brackets the same ratio from CPU seconds (steadier on a shared machine).", "",
             "| model | kept fraction | threads | prefill 512 tok/s (dense) | prefill_speedup | prefill_speedup_2048 "
             "| decode b1 tok/s (dense) | decode_speedup | decode_speedup_b8 | weights MB (dense) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, d, c = r["model"], r["baseline"], r.get("cpu_time_speedups", {})
        sp = lambda key: f"{r[key]:.3f}" + (f" ({c[key]:.3f})" if key in c else "")
        lines.append(
            f"| {r['folder']} | {r['kept_fraction']:.4f} | {r['threads']} "
            f"| {m['prefill_tokens_per_s']['512']:.0f} ({d['prefill_tokens_per_s']['512']:.0f}) "
            f"| {sp('prefill_speedup')} | {sp('prefill_speedup_2048')} "
            f"| {m['decode_tokens_per_s']['1']:.1f} ({d['decode_tokens_per_s']['1']:.1f}) "
            f"| {sp('decode_speedup')} | {sp('decode_speedup_b8')} "
            f"| {m['weight_bytes'] / 1e6:.0f} ({d['weight_bytes'] / 1e6:.0f}) "
            f"| {r['load_average'][0]}–{r['load_average'][1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
