"""The GPU check (bench/gpu_check.py) at toy size on the CPU: every part computes its numbers and
the report has the structure the GPU run will fill; the extrapolation against hand-computed values."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
from gpucheck.pipeline import BUILD, GRADIENTS, PROBE, extrapolate  # noqa: E402

PART_A = {"int8_matmul", "int8_lowrank_exact", "int8_lowrank_forward", "int8_uses_int_mm", "block_runner", "pipeline_ranks",
          "pipeline_logits", "heal_bf16_kl", "heal_bf16_grad", "search_fitness", "search_order"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--tiny", "--device", "cpu", "--in-process", "--compile-backend", "none",
                           "--budget", "600", "--out", str(out)]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    data["_markdown"] = (out / "gpu_check.md").read_text()
    return data


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_part_a_every_check_measures_a_number(report):
    checks = {c["name"]: c for c in report["parts"]["a"]["checks"]}
    assert PART_A <= set(checks)
    for name in PART_A:
        c = checks[name]
        assert c["status"] == "pass", c
        assert finite(c["value"]) and finite(c["tolerance"]) and c["cuda"] is False
    # the int8 forward differs from the float factors by its quantisation, neither 0 nor large
    assert 1e-4 < checks["int8_lowrank_forward"]["value"] < 0.03
    assert checks["heal_bf16_kl"]["kl_fp32"] > 0


def test_part_b_stages_and_extrapolation(report):
    b = report["parts"]["b"]
    assert b["status"] == "done" and [r["blocks"] for r in b["runs"]] == [1, 2]
    for run in b["runs"]:
        assert run["result"]["finite"] and 0.7 < run["result"]["kept_fraction"] <= 0.8 + 1e-9
        for stage in ("gradient statistics", "allocation", "sequential pass"):
            assert run["stages"][stage]["seconds"] > 0 and run["stages"][stage]["peak_host_bytes"] > 0
    ext = b["extrapolation"]["budgets"]["default"]
    assert b["extrapolation"]["full_blocks"] == 4 and ext["gradient_groups"] >= 1
    assert finite(ext["pipeline_seconds"]) and ext["pipeline_seconds"] > 0


def test_part_c_speedups_side_by_side(report):
    c = report["parts"]["c"]
    assert {m["align"] for k, m in c["models"].items() if k != "dense"} == {8, 16}
    for m in c["models"].values():
        assert 0.5 < m["kept_fraction"] <= 1.0
    jobs = c["modes"]["eager"]["jobs"]
    assert set(jobs) == {"prefill_32", "decode_b1", "decode_b2"}
    for job in jobs.values():
        assert len(job["speedup"]) == 2 and all(finite(v) and v > 0 for v in job["speedup"].values())
    assert c["modes"]["compiled"]["skipped"] == ["--compile-backend none"]


def test_criteria_not_judged_off_gpu(report):
    rows = report["criteria"]
    assert len(rows) >= 4 and all(r["passed"] is None for r in rows)
    assert "Not the acceptance run" in report["_markdown"] and "| criterion |" in report["_markdown"]


def test_compiled_runner_matches_eager():
    """The static-cache runner torch.compile is timed with computes what the eager model does
    (backend eager: dynamo's tracing without a compiler)."""
    from gpucheck.common import llama_config, random_model
    from gpucheck.speed import Compiled

    model = random_model(llama_config("tiny", layers=1), torch.float32, "cpu")
    runner = Compiled(model, "eager", None)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert runner.prefill(ids) > 0 and runner.decode(ids[:, :4], 2) > 0 and runner.decode(ids[:, :4], 3) > 0
        assert {k for k in runner.caches if k[0] == "decode"} == {("decode", 1, 6), ("decode", 1, 7)}
        cache = runner._cache(("prefill", (1, 16)), 16)
        got = runner.forward(input_ids=ids, **{runner.cache_arg: cache}, cache_position=torch.arange(16),
                             use_cache=True, logits_to_keep=1).logits
        want = model(input_ids=ids, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _run(k, grad, probe, alloc, seq, grad_peak):
    return {"status": "done", "blocks": k, "full_blocks": 32, "calibration": [32, 512], "probe_seconds_per_sample": probe,
            "peak_host_bytes": 10e9 * k, "peak_gpu_bytes": grad_peak, "host_ram_bytes": 128e9,
            "gradient_memory": {"accumulator_bytes_per_block": 3.7e9,
                                "budgets": {"default": {"memory_budget": None, "groups": 4, "max_blocks_per_group": 5}}},
            "stages": {BUILD: {"seconds": 1.0, "peak_host_bytes": 1}, PROBE: {"seconds": 1.0, "peak_host_bytes": 1},
                       GRADIENTS: {"seconds": grad, "peak_host_bytes": 1, "peak_gpu_bytes": grad_peak},
                       "allocation": {"seconds": alloc, "peak_host_bytes": 1, "peak_gpu_bytes": 2e9},
                       "sequential pass": {"seconds": seq, "peak_host_bytes": 1, "peak_gpu_bytes": 2e9}}}


def test_extrapolation_by_hand():
    ext = extrapolate([_run(1, 10.0, 0.1, 5.0, 7.0, 10e9), _run(2, 13.0, 0.15, 9.0, 13.0, 15e9)])
    e = ext["budgets"]["default"]
    # walk 3.2 s + 1.6 s/block; accumulation 6.8 s + 1.4 s/block; 4 groups walk the whole model
    assert e["stage_seconds"][GRADIENTS] == pytest.approx(4 * (3.2 + 31 * 1.6) + (6.8 + 31 * 1.4))
    assert e["stage_seconds"]["allocation"] == pytest.approx(5 + 31 * 4)
    assert e["pipeline_seconds"] == pytest.approx(4 * 52.8 + 50.2 + 129 + 193)
    # gradient stage: +1.3 GB per block of weights and activations, accumulators of a 5-block group
    assert e["peak_gpu_bytes"] == pytest.approx(10e9 + 31 * 1.3e9 + 4 * 3.7e9)
    assert ext["peak_host_bytes"] == pytest.approx(320e9) and ext["fits_host_ram"] is False


def test_no_top_level_gguf_import():
    """gguf is not installed on the GPU machine: nothing the check imports may need it at import time."""
    for path in (REPO / "src" / "vaclm").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "gguf" for n in names), path


def test_cuda_refused_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
