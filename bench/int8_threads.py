"""One decode-shaped matmul (1 token) per weight shape of the demo model, at 1 and 2 threads, under
OpenMP's default wait policy and under OMP_WAIT_POLICY=PASSIVE: PyTorch's int8 weight kernel
(`aten._weight_int8pack_mm`, bfloat16 activations) and float32 `F.linear`. Microseconds per call
(wall, median of 5 rounds of 300 calls). Each policy runs in a fresh process (OpenMP reads it at
start-up). Writes bench/results/int8_threads.{json,md}.

    .venv/bin/python bench/int8_threads.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from common import write_results

SHAPES = [(240, 576), (576, 240), (1536, 240), (240, 1536), (576, 1536), (1536, 576), (49152, 576)]


def per_call_us(fn, calls: int = 300, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def worker() -> list[dict]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        q = torch.randint(-127, 127, (out_f, in_f), dtype=torch.int8)
        scale = torch.rand(out_f, dtype=torch.bfloat16)
        x, w, xf = torch.randn(1, in_f, dtype=torch.bfloat16), torch.randn(out_f, in_f), torch.randn(1, in_f)
        row = {"shape": [out_f, in_f]}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row[f"int8_{threads}"] = per_call_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale))
            row[f"float32_{threads}"] = per_call_us(lambda: F.linear(xf, w))
        rows.append(row)
    return rows


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(worker()))
        return
    result = {}
    for policy in ("default", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        run = subprocess.run([sys.executable, __file__, "--worker"], capture_output=True, text=True, env=env, check=True)
        result[policy] = json.loads(run.stdout.strip().splitlines()[-1])
    lines = ["| shape (out x in) | wait policy | int8 kernel, 1 thread | int8 kernel, 2 threads | float32, 1 thread | "
             "float32, 2 threads |", "|---|---|---|---|---|---|"]
    for i, shape in enumerate(SHAPES):
        for policy, rows in result.items():
            r = rows[i]
            lines.append(f"| {shape[0]}x{shape[1]} | {policy} | {r['int8_1']:.0f} us | {r['int8_2']:.0f} us | "
                         f"{r['float32_1']:.0f} us | {r['float32_2']:.0f} us |")
    write_results("int8_threads", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
