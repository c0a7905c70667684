"""The saved folder: safetensors only, loads in a fresh process, refuses tampering and corruption."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import vaclm
from vaclm.errors import VaclmError
from vaclm.io.loading import load_model

from conftest import token_batch, tiny_model, svd_llm_config

FRESH = """
import sys, torch, vaclm
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.arange(40).remainder(256).view(2, 20)
with torch.no_grad():
    save_file({"logits": model(input_ids=ids).logits.contiguous()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = tiny_model("qwen2")  # q/k/v biases travel with the up factor
    result = vaclm.compress(model, svd_llm_config(keep=0.5, calib_samples=4, calib_seq_len=16), token_batch(4, 16),
                            progress=False)
    vaclm.save(model, folder, result=result)
    ids = torch.arange(40).remainder(256).view(2, 20)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    return folder, expected, result


def test_folder_contents_and_config(saved):
    folder, _, result = saved
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "vaclm" and qc["version"] == 2
    assert config["transformers_weights"].startswith("vaclm:")  # transformers without vaclm refuses the folder
    assert qc["ranks"] == {k: v for k, v in result.ranks.items() if v is not None}
    tensors = load_file(folder / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.up.bias" in tensors
    report = json.loads((folder / "vaclm_report.json").read_text())
    assert report["config"]["method"] == "svd-llm"


def test_fresh_process_from_pretrained_gives_identical_logits(saved, tmp_path):
    folder, expected, _ = saved
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(load_file(out)["logits"], expected, atol=1e-5, rtol=1e-5)


def _copy(folder, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_tampered_rank_in_config_is_refused(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    name = next(iter(config["quantization_config"]["ranks"]))
    config["quantization_config"]["ranks"][name] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VaclmError, match="rank .* in config.json but its tensors"):
        load_model(folder)
    from transformers import AutoModelForCausalLM

    with pytest.raises(VaclmError, match="modified after saving"):  # plain transformers loading refuses too
        AutoModelForCausalLM.from_pretrained(folder)


def test_tampered_tensor_shape_is_refused(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.down.weight"
    tensors[key] = tensors[key][:-8].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VaclmError, match="down_proj"):
        load_model(folder)


def test_corrupt_weights_file_is_refused(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VaclmError, match="corrupt weights file"):
        load_model(folder)


def test_quantizer_refuses_to_load_unchecked_factors():
    """Without the checkpoint files the tensor check cannot run: loading stops instead of skipping it."""
    import pytest

    from conftest import tiny_model
    from vaclm.errors import VaclmError
    from vaclm.io.hf_quantizer import VaclmConfig, VaclmQuantizer

    quantizer = VaclmQuantizer(VaclmConfig(ranks={"model.layers.0.mlp.up_proj": 8}))
    for files in (None, [], ["pytorch_model.bin"]):
        with pytest.raises(VaclmError, match="no .safetensors checkpoint files"):
            quantizer._process_model_before_weight_loading(tiny_model("llama"), checkpoint_files=files)
