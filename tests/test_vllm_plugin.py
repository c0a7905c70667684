"""vLLM plugin (serve/vllm_layers.py): runs only where vLLM is installed (pip install 'vaclm[vllm]')."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from vaclm.errors import VaclmError  # noqa: E402
from vaclm.serve.vllm_layers import VaclmVllmConfig  # noqa: E402

HERE = Path(__file__).parent


def test_fused_vllm_linears_load_vaclm_tensors_and_match_the_dense_products():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(HERE / "vllm_layer_check.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {f"model.layers.0.{m}.{p}" for m in ("self_attn.qkv_proj", "mlp.gate_up_proj") for p in
                ("down.weight", "up.weight", "up.bias", "weight")} | {
        f"model.layers.0.{m}.{p}" for m in ("self_attn.o_proj", "mlp.down_proj") for p in ("down.weight", "up.weight", "up.bias")}
    assert set(report["loaded"]) == expected
    assert set(report["methods"].values()) == {"LowRankLinearMethod"}
    assert all(err < 1e-3 for err in report["errors"].values()), report["errors"]
    assert report["fused_up_split"]


def test_dense_only_layers_use_vllms_own_linear():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = VaclmVllmConfig.from_config({"ranks": {"model.layers.0.mlp.down_proj": None}, "int8": False})

    class FakeLinear(vllm.model_executor.layers.linear.LinearBase):
        def __init__(self):  # enough for get_quant_method, which only looks at the type
            pass

    assert isinstance(config.get_quant_method(FakeLinear(), "model.layers.0.mlp.down_proj"), UnquantizedLinearMethod)


@pytest.mark.parametrize("bad, message", [({"ranks": {}, "int8": True}, "int8"), ({"int8": False}, "ranks")])
def test_unservable_configs_are_refused_with_the_fix(bad, message):
    with pytest.raises(VaclmError, match=message):
        VaclmVllmConfig.from_config(bad)


def test_a_resized_elastic_folder_loads_into_vllms_fused_linears(tmp_path):
    """`vaclm resize` writes an ordinary vaclm folder: vLLM's fused layers load its layer 0 (factors
    sliced from the top size, spares of matrices dense there) and compute its products."""
    import vaclm
    from conftest import tiny_model, token_batch
    from test_elastic import CONFIG
    from vaclm.config import CompressConfig
    from vaclm.io.resize import resize_folder

    model = tiny_model("llama")
    result = vaclm.compress(model, CompressConfig(elastic=True, **CONFIG), token_batch(8, 32), progress=False)
    vaclm.save(model, tmp_path / "top", result=result)
    resize_folder(tmp_path / "top", 0.55, tmp_path / "small")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(HERE / "vllm_layer_check.py"), str(tmp_path / "small")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["loaded"] and all(err < 1e-3 for err in report["errors"].values()), report["errors"]
