"""INT8 factors on CUDA: the torch._int_mm path against bf16 factors and the dequantising fallback.

    python bench/int8_cuda.py            # needs a CUDA GPU; prints one JSON line per case

For each (out, in, rank, tokens) a bf16 LowRankLinear with random factors is quantised; we time
its forward, the Int8LowRankLinear forward (per-token int8 activations, torch._int_mm), and the
same int8 module forced onto the dequantising path, and report the int8 output's relative error.
"""

from __future__ import annotations

import json
import sys

import torch

from vaclm.model import int8_lowrank
from vaclm.model.int8_lowrank import Int8LowRankLinear
from vaclm.model.lowrank import LowRankLinear

CASES = [  # (name, out, in, rank, tokens)
    ("smollm2 mlp up, rank 336", 1536, 576, 336, 4096),
    ("llama-7b mlp up, rank 2048", 11008, 4096, 2048, 4096),
    ("llama-7b attn q, rank 1024", 4096, 4096, 1024, 4096),
    ("llama-7b attn q, rank 1024, 16 tokens", 4096, 4096, 1024, 16),
    ("llama-7b attn q, rank 1024, 32 tokens", 4096, 4096, 1024, 32),
]


def timed(fn, x, reps: int = 50) -> float:
    for _ in range(5):
        fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for name, out_f, in_f, rank, tokens in CASES:
        float_module = LowRankLinear(in_f, out_f, rank, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            float_module.down.weight.normal_(0, in_f ** -0.5)
            float_module.up.weight.normal_(0, rank ** -0.5)
        int8_module = Int8LowRankLinear.from_lowrank(float_module)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            ref = x.float() @ float_module.dense_weight().float().T
            y = int8_module(x)
            t_float, t_int8 = timed(float_module, x), timed(int8_module, x)
            int_mm_ok = int8_lowrank._int_mm_ok
            int8_lowrank._int_mm_ok = lambda *a: False
            try:
                y_dq = int8_module(x)
                t_dequant = timed(int8_module, x)
            finally:
                int8_lowrank._int_mm_ok = int_mm_ok
        err = lambda a: round(((a.float() - ref).norm() / ref.norm()).item(), 5)
        print(json.dumps({"case": name, "bf16_ms": round(t_float, 4), "int8_int_mm_ms": round(t_int8, 4),
                          "int8_dequant_ms": round(t_dequant, 4), "rel_err_bf16": err(float_module(x)),
                          "rel_err_int_mm": err(y), "rel_err_dequant": err(y_dq)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
