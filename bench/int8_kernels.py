"""Which int8 matmul is fastest on this CPU, per decoder matrix shape of the demo model?

    .venv/bin/python bench/int8_kernels.py            # 1 thread; writes bench/results/int8_kernels.{json,md}

Per shape, enough distinct weights to overflow the caches (as a decode step streams the model), x
of 1 token and 512 tokens; each candidate's time is the calling thread's CPU time (time.thread_time,
steadier than wall time on a shared machine), median of --reps alternating runs, as a ratio to
float32 F.linear (> 1: faster). Candidates: the int8 weight kernel aten._weight_int8pack_mm with
bfloat16 activations (what Int8Linear uses up to 16 tokens), one bfloat16 GEMM on the weight
converted per call (what it uses above), and the float32 dequantising reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import write_results
from vaclm.model.int8_lowrank import quantize_rows

SHAPES = {"down factor (rank 240)": (240, 576), "up factor (rank 240)": (576, 240), "up factor, MLP": (1536, 240),
          "down factor, MLP": (240, 1536), "down_proj": (576, 1536), "gate_proj/up_proj": (1536, 576),
          "q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "lm_head": (49152, 576)}


def median_times(fns: dict, reps: int) -> dict:
    res = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, f in fns.items():
            start = time.thread_time()
            f()
            if rep:
                res[k].append(time.thread_time() - start)
    return {k: statistics.median(v) for k, v in res.items()}


@torch.inference_mode()
def measure(tokens: int, reps: int, stream_bytes: float = 40e6) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(1, int(stream_bytes / (n * k * 4) / (8 if tokens > 16 else 1)))
        weights = [torch.randn(n, k) / k**0.5 for _ in range(copies)]
        quantised = [quantize_rows(w) for w in weights]
        scales_bf16 = [s.bfloat16() for _, s in quantised]
        x = torch.randn(tokens, k)
        xb = x.bfloat16()
        fns = {
            "float32": lambda: [F.linear(x, w) for w in weights],
            "int8pack_bf16": lambda: [torch.ops.aten._weight_int8pack_mm(xb, q, s) for (q, _), s in zip(quantised, scales_bf16)],
            "bf16_gemm": lambda: [F.linear(xb, q.to(torch.bfloat16)).mul_(s) for (q, _), s in zip(quantised, scales_bf16)],
            "dequantise_f32": lambda: [F.linear(x, q.float()).mul_(s) for q, s in quantised],
        }
        t = median_times(fns, reps)
        rows.append({"shape": name, "out": n, "in": k, "tokens": tokens, "float32_us": t["float32"] / copies * 1e6,
                     **{f"{c}_ratio": t["float32"] / t[c] for c in fns if c != "float32"}})
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], threads: int) -> str:
    lines = [f"Time ratio against float32 F.linear (> 1: faster), {threads} thread, CPU-time medians.", "",
             "| shape (out x in) | tokens | float32 us | int8pack, bf16 activations | bf16 GEMM on converted weight "
             "| dequantise to float32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['out']}x{r['in']}) | {r['tokens']} | {r['float32_us']:.0f} "
                     f"| {r['int8pack_bf16_ratio']:.2f} | {r['bf16_gemm_ratio']:.2f} | {r['dequantise_f32_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="1,512")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [r for t in args.tokens.split(",") for r in measure(int(t), args.reps)]
    write_results("int8_kernels", [{"threads": args.threads, "rows": rows}], render(rows, args.threads))
    print(render(rows, args.threads))


if __name__ == "__main__":
    main()
