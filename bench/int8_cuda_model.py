"""A tiny compressed model with int8 factors on CUDA (bf16) against the same folder on CPU (float32).

    python bench/int8_cuda_model.py      # needs a CUDA GPU; prints one JSON line
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import vaclm  # noqa: E402
from conftest import svd_llm_config, tiny_model, token_batch  # noqa: E402


def main() -> int:
    model = tiny_model("llama")
    vaclm.compress(model, svd_llm_config(keep=0.5, calib_samples=4, calib_seq_len=16), token_batch(4, 16),
                   progress=False)
    vaclm.quantize_int8(model)
    ids = token_batch(4, 64, seed=3)  # 256 tokens per matmul: the _int_mm path
    with tempfile.TemporaryDirectory() as tmp:
        vaclm.save(model, Path(tmp) / "m")
        cpu, _ = vaclm.load(str(Path(tmp) / "m"), dtype="float32", device="cpu")
        gpu, _ = vaclm.load(str(Path(tmp) / "m"), device="cuda")  # auto: bfloat16 on CUDA
        with torch.no_grad():
            ref = cpu(input_ids=ids).logits
            out = gpu(input_ids=ids.cuda()).logits.float().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(json.dumps({"gpu_dtype": str(next(gpu.parameters()).dtype), "rel_err_logits": round(rel, 5),
                      "argmax_agreement": round(agree, 4)}))
    return 0 if rel < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
