"""When does vaclm's LowRankLinear (x -> up(down(x))) run faster than the dense linear on this CPU?

    .venv/bin/python bench/lowrank_speed.py            # 1 thread; writes bench/results/lowrank_speed.{json,md}

For each decoder matrix shape of the demo model (SmolLM2-135M: 576 hidden, 1536 MLP, 64-dim heads,
9 query / 3 key-value heads) and ranks giving 30%..100% of the dense parameter count, the time of
two nn.Linear against one, at 512 tokens (prefill), 8 tokens and 1 token (decode steps). Timing is
the calling thread's CPU time (time.thread_time) with one thread, median of --reps alternating
runs, so other jobs on the machine disturb it less than wall time. "break-even" is the parameter
ratio (rank*(out+in) / (out*in)) where a straight line fitted through the measured time ratios
reaches 1 (the fit smooths the noise of single points).
The decode rows run on weights that fit in cache; the "stream" row runs 30 layers of distinct
weights per step, as a real decode step streams the model from memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

from common import write_results
from vaclm.model.lowrank import LowRankLinear

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576), "down_proj": (576, 1536)}
FRACTIONS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def lowrank(out_f: int, in_f: int, rank: int) -> nn.Module:
    return LowRankLinear(in_f, out_f, rank, bias=False)


def paired_times(dense, factored, x, reps: int, inner: int = 1) -> tuple[float, float]:
    """Median seconds per call; `inner` calls per timing, so microsecond calls rise above the clock's noise."""
    def timed(fn):
        start = time.thread_time()
        for _ in range(inner):
            fn(x)
        return (time.thread_time() - start) / inner

    for _ in range(2):
        timed(dense), timed(factored)
    a, b = [], []
    for _ in range(reps):
        a.append(timed(dense))
        b.append(timed(factored))
    return statistics.median(a), statistics.median(b)


def break_even(points: list[tuple[float, float]]) -> float | None:
    """Parameter ratio where a least-squares line through (param ratio, time ratio) reaches 1."""
    slope, intercept = np.polyfit([p for p, _ in points], [t for _, t in points], 1)
    return float((1 - intercept) / slope) if slope > 0 else None


@torch.inference_mode()
def sweep(tokens: int, reps: int) -> list[dict]:
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        dense = nn.Linear(in_f, out_f, bias=False)
        x = torch.randn(1, tokens, in_f)
        points = []
        for frac in FRACTIONS:
            rank = max(8, round(frac * out_f * in_f / (out_f + in_f) / 8) * 8)
            t_dense, t_low = paired_times(dense, lowrank(out_f, in_f, rank), x, reps, inner=max(1, 256 // tokens))
            points.append((rank * (out_f + in_f) / (out_f * in_f), t_low / t_dense, rank, t_dense))
        rows.append({"shape": name, "out": out_f, "in": in_f, "tokens": tokens, "dense_ms": points[0][3] * 1e3,
                     "points": [{"param_ratio": round(p, 3), "rank": r, "time_ratio": round(t, 3)} for p, t, r, _ in points],
                     "break_even": break_even([(p, t) for p, t, _, _ in points])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.inference_mode()
def stream(reps: int, frac: float = 0.8, layers: int = 30) -> dict:
    """One decode step's linears over `layers` layers of distinct weights: memory-bound, as in a real model."""
    kinds = ["q_proj/o_proj", "k_proj/v_proj", "k_proj/v_proj", "q_proj/o_proj", "gate_proj/up_proj", "gate_proj/up_proj", "down_proj"]
    dense, low = [], []
    for _ in range(layers):
        for kind in kinds:
            out_f, in_f = SHAPES[kind]
            rank = round(frac * out_f * in_f / (out_f + in_f) / 8) * 8
            dense.append(nn.Linear(in_f, out_f, bias=False))
            low.append(lowrank(out_f, in_f, rank))
    xs = {576: torch.randn(1, 1, 576), 1536: torch.randn(1, 1, 1536)}
    run_dense = lambda _: [m(xs[m.in_features]) for m in dense]
    run_low = lambda _: [m(xs[m.in_features]) for m in low]
    t_dense, t_low = paired_times(run_dense, run_low, None, reps)
    params = lambda ms: sum(p.numel() for m in ms for p in m.parameters())
    return {"layers": layers, "param_ratio": round(params(low) / params(dense), 3), "dense_ms": t_dense * 1e3,
            "lowrank_ms": t_low * 1e3, "time_ratio": round(t_low / t_dense, 3)}


def render(result: dict) -> str:
    lines = [f"Factorised over dense linear time, {result['threads']} thread, CPU time medians of {result['reps']} runs.", "",
             "| shape (out x in) | tokens | dense ms | " + " | ".join(f"{f:.0%} params" for f in FRACTIONS) + " | break-even param ratio |",
             "|---|---|---|" + "---|" * len(FRACTIONS) + "---|"]
    for row in result["sweeps"]:
        cells = " | ".join(f"{p['time_ratio']:.2f}" for p in row["points"])
        be = f"{row['break_even']:.2f}" if row["break_even"] is not None else "none"
        lines.append(f"| {row['shape']} ({row['out']}x{row['in']}) | {row['tokens']} | {row['dense_ms']:.3f} | {cells} | {be} |")
    s = result["stream"]
    lines += ["", f"Decode step streaming {s['layers']} layers of distinct weights (1 token): params {s['param_ratio']:.2f} of "
                  f"dense, time {s['lowrank_ms']:.1f} ms against {s['dense_ms']:.1f} ms (ratio {s['time_ratio']:.2f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sweeps = [row for tokens in (512, 8, 1) for row in sweep(tokens, args.reps)]
    result = {"threads": args.threads, "reps": args.reps, "sweeps": sweeps, "stream": stream(args.reps)}
    write_results("lowrank_speed", [result], render(result))
    print(render(result))


if __name__ == "__main__":
    main()
