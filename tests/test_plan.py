"""`vaclm plan`: estimates from a config alone, the JSON contract, and the check before compressing."""

import json

import pytest
import torch

from vaclm.config import CompressConfig
from vaclm.model.statistics import gradient_stats
from vaclm.model.surgery import Targets
from vaclm.plan.estimate import plan_compression
from vaclm.plan.memory import backward_bytes
from vaclm.plan.shapes import model_shape, shape_of
from vaclm.plan.throughput import Throughput

from conftest import run_cli, tiny_model, token_batch
from test_cli_errors import assert_one_line_error

# a fixed device, so that estimates are deterministic in tests
RATES = Throughput("cpu", matmul_flops=1e11, matmul64_flops=2e10, svd_seconds=0.01, svd_size=512)


def config_only_folder(tmp_path, config):
    folder = tmp_path / "config-only"
    config.save_pretrained(folder)  # config.json and nothing else: no weights to read
    return folder


def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)


def test_shape_from_config_only_matches_the_real_model(tmp_path):
    model = tiny_model("qwen2")
    shape = model_shape(str(config_only_folder(tmp_path, model.config)))
    assert shape.targets == Targets.of(model).shapes
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert (shape.blocks, shape.hidden, shape.vocab) == (3, 64, 256)


def test_planned_accumulators_are_what_gradient_stats_holds():
    model = tiny_model("llama")
    shape = shape_of(model)
    targets = Targets.of(model)
    stats = gradient_stats(model, targets.modules, token_batch(2, 16), "cpu", cov=True, fisher=False, progress=False)
    held = sum(t.numel() * t.element_size() for s in stats.values() for t in (s.sq_sum, s.cov))
    plan = plan_compression(shape, CompressConfig(), RATES, "cpu", base_bytes=0, model="tiny")
    grads = next(s for s in plan.stages if s.name == "gradient statistics")
    weights = shape.parameters * 4
    assert grads.peak_host_bytes == weights + held + backward_bytes(shape, 512, 4)


def test_8b_on_one_80gb_gpu_is_planned_in_groups_without_a_gpu(tmp_path):
    folder = config_only_folder(tmp_path, llama3_8b_config())
    proc = run_cli("plan", str(folder), "--keep", "0.8", "--device", "cuda", "--memory-budget", "80GB", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"peak_host_bytes", "peak_device_bytes", "seconds", "fits"} <= set(plan)
    assert plan["peak_device_bytes"] <= 80e9
    # bfloat16 weights (8.0B parameters) are on the GPU for the gradient walk, and the
    # accumulators (about 118 GB in float64) do not fit beside them: several walks
    assert plan["gradient_groups"] >= 2
    assert plan["peak_device_bytes"] > 8.0e9 * 2
    if not torch.cuda.is_available():
        assert plan["seconds"] is None  # no GPU here to measure: memory only, no invented times


def test_plan_json_contract_on_cpu(tmp_path):
    folder = config_only_folder(tmp_path, tiny_model("llama").config)
    proc = run_cli("plan", str(folder), "--keep", "0.6", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["fits"] is True and plan["seconds"] > 0 and plan["peak_device_bytes"] == 0
    assert [s["name"] for s in plan["stages"]] == ["load", "gradient statistics", "allocation", "sequential pass", "save"]
    assert "fits: peak host" in proc.stderr


def test_a_small_budget_groups_the_layers_within_it():
    shape = shape_of(tiny_model("llama"))
    base = plan_compression(shape, CompressConfig(), RATES, "cpu", base_bytes=0)
    weights, backward = shape.parameters * 4, backward_bytes(shape, 512, 4)
    accumulators = base.stages[1].peak_host_bytes - weights - backward
    budget = weights + backward + accumulators // 2
    tight = plan_compression(shape, CompressConfig(memory_budget=budget), RATES, "cpu", base_bytes=0)
    assert base.gradient_groups == 1 and tight.gradient_groups >= 3
    assert tight.stages[1].peak_host_bytes <= budget
    assert tight.stages[1].seconds > base.stages[1].seconds  # one walk over the data per group


def test_gpu_plan_without_gpu_and_without_budget_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: its memory is read")
    folder = config_only_folder(tmp_path, tiny_model("llama").config)
    assert_one_line_error(run_cli("plan", str(folder), "--device", "cuda"), "--memory-budget")


def test_compress_stops_before_loading_when_it_cannot_fit(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    proc = run_cli("compress", str(tmp_path / "m"), "--calib", "wikitext2", "--memory-budget", "1MB",
                   "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "does not fit", "vaclm plan")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
