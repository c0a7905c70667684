"""INT8 factors: quantisation error, module output, saved format, tampering, byte budget, exports, CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import vaclm
from vaclm.allocate.costs import PARAMETERS, int8_bytes
from vaclm.config import CompressConfig
from vaclm.errors import VaclmError
from vaclm.model.int8_lowrank import Int8Linear, Int8LowRankLinear, dequantize_rows, int8_matmul, quantize_rows
from vaclm.io.loading import load_model
from vaclm.model.lowrank import LowRankLinear

from conftest import WIKI_VALID, VOCAB, svd_llm_config, tiny_model, token_batch


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def compressed(family, keep=0.5, int8=False):
    model = tiny_model(family)
    config = svd_llm_config(keep=keep, int8=int8, calib_samples=4, calib_seq_len=16)
    return model, vaclm.compress(model, config, token_batch(4, 16), progress=False)


def test_quantize_rows_rounds_to_nearest_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.tensor([1e-4, 1e-2, 1.0, 30.0, 1.0, 1.0])[:, None]
    w[4] = 0.0  # an all-zero row: scale 0, no division by zero
    w[5, 7] = -5.0  # one outlier sets its row's scale
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == w.dtype and scale.shape == (6,)
    assert q.abs().max() <= 127 and (q == -128).sum() == 0
    assert scale[4] == 0 and (q[4] == 0).all() and torch.isfinite(scale).all()
    assert (q.abs().amax(dim=1)[[0, 1, 2, 3, 5]] == 127).all()  # each row's largest entry maps to +-127
    assert q[5, 7] == -127
    error = (dequantize_rows(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_int8_module_output_matches_float_module_for_any_batch_shape(monkeypatch):
    """The dequantising reference (the CPU int8 kernel's own test is tests/test_int8_kernel.py)."""
    monkeypatch.setattr(Int8Linear, "cpu_kernel", False)
    torch.manual_seed(0)
    float_module = LowRankLinear(48, 40, 16, bias=True)
    with torch.no_grad():
        for p in float_module.parameters():
            p.normal_(0, 0.1)
    int8_module = Int8LowRankLinear.from_lowrank(float_module)
    assert int8_module.down.weight.dtype == torch.int8 and int8_module.up.weight.dtype == torch.int8
    torch.testing.assert_close(int8_module.up.bias, float_module.up.bias)
    for shape in [(48,), (1, 48), (3, 48), (2, 5, 48), (2, 3, 4, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            y, ref = int8_module(x), float_module(x)
        assert y.shape == ref.shape and rel_err(y, ref) < 0.02, shape
    # the dequantising forward equals the dense product of the dequantised factors
    x = torch.randn(7, 48)
    with torch.no_grad():
        dense = x @ int8_module.dense_weight().T + int8_module.up.bias
        torch.testing.assert_close(int8_module(x), dense, atol=1e-5, rtol=1e-5)


def test_int8_matmul_with_quantised_activations_is_close():
    """The CUDA path's arithmetic (per-token int8 activations, int32 accumulation); torch._int_mm runs on CPU too."""
    torch.manual_seed(1)
    x, w = torch.randn(32, 64), torch.randn(24, 64) * 0.1
    q, scale = quantize_rows(w)
    try:
        y = int8_matmul(x, q, scale)
    except RuntimeError as exc:  # a CPU build without the kernel
        pytest.skip(f"torch._int_mm unavailable on CPU: {exc}")
    assert y.dtype == x.dtype and rel_err(y, x @ w.T) < 0.02


def test_int_mm_branch_wiring_on_cpu(monkeypatch):
    """The CUDA branch's shape rules, reshapes and bias, run on CPU by lifting its CUDA-only guard."""
    import vaclm.model.int8_lowrank as mod

    calls = []
    monkeypatch.setattr(Int8Linear, "cpu_kernel", False)  # else CPU inference takes the prepacked int8 GEMM first
    monkeypatch.setattr(mod, "_int_mm_ok", mod._int_mm_shapes_ok)
    monkeypatch.setattr(mod, "int8_matmul", lambda *a: calls.append(tuple(a[0].shape)) or int8_matmul(*a))
    torch.manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(64, 128) * 0.05, torch.randn(64))
    with torch.no_grad():
        try:
            layer(torch.randn(20, 128))
        except RuntimeError as exc:  # a CPU build without the kernel
            pytest.skip(f"torch._int_mm unavailable on CPU: {exc}")
        for shape in [(2, 20, 128), (4, 128), (3, 7, 128)]:  # 40 and 21 tokens take the int8 matmul, 4 do not
            x = torch.randn(*shape)
            y = layer(x)
            assert y.shape == (*shape[:-1], 64)
            assert rel_err(y, x @ layer.dequantized().T + layer.bias) < 0.02
    x = torch.randn(40, 128, requires_grad=True)
    layer(x).sum().backward()  # a gradient is wanted: the differentiable dequantising path
    assert x.grad is not None and x.grad.shape == x.shape
    assert calls == [(20, 128), (40, 128), (21, 128)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_close_to_reference_in_float32_and_bfloat16():
    torch.manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(64, 128, device="cuda") * 0.05, torch.randn(64, device="cuda"))
    for dtype in (torch.float32, torch.bfloat16):
        layer.to(dtype=dtype)
        for tokens in (40, 4):  # M > 16 takes _int_mm, M <= 16 dequantises
            x = torch.randn(2, tokens // 2, 128, device="cuda", dtype=dtype)
            with torch.no_grad():
                y = layer(x)
            ref = x.float() @ layer.dequantized(torch.float32).T + layer.bias.float()
            assert y.dtype == dtype and rel_err(y.float(), ref) < 0.02


FRESH = """
import sys, torch, vaclm
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
for folder, out in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.arange(40).remainder(256).view(2, 20)
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, out)
"""

_FOLDERS = {}


def int8_folder_of(family, tmp_path_factory):
    """(int8 folder, float folder, logits) of a compressed tiny model, built once per family."""
    if family not in _FOLDERS:
        model, result = compressed(family)
        float_folder = tmp_path_factory.mktemp("float") / "model"
        vaclm.save(model, float_folder, result=result)
        vaclm.quantize_int8(model)
        folder = tmp_path_factory.mktemp("int8") / "model"
        vaclm.save(model, folder, result=result)
        _FOLDERS[family] = folder, float_folder, logits(model, torch.arange(40).remainder(VOCAB).view(2, 20))
    return _FOLDERS[family]


@pytest.fixture
def int8_folder(tmp_path_factory):
    return int8_folder_of("qwen2", tmp_path_factory)  # q/k/v biases travel with the up factor


def cli(capsys, *args):
    """`vaclm ARGS` in this process (a subprocess costs seconds of imports): (exit code, stdout, stderr)."""
    from vaclm.cli import main

    try:
        code = main([*args, "--quiet"])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # gpt2: Conv1D modules
def test_int8_folder_format(family, tmp_path_factory):
    folder, float_folder, _ = int8_folder_of(family, tmp_path_factory)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["int8"] is True and qc["quant_method"] == "vaclm"
    tensors = load_file(folder / "model.safetensors")
    module = next(m for m in qc["ranks"] if f"{m}.up.bias" in tensors)
    assert tensors[f"{module}.down.weight"].dtype == torch.int8 and tensors[f"{module}.up.weight"].dtype == torch.int8
    assert tensors[f"{module}.down.weight_scale"].shape == (qc["ranks"][module],)
    assert tensors[f"{module}.up.weight_scale"].shape == tensors[f"{module}.up.weight"].shape[:1]
    assert tensors[f"{module}.up.bias"].dtype == torch.float32
    factor = lambda ts: sum(t.numel() * t.element_size() for k, t in ts.items() if ".down." in k or ".up.weight" in k)
    assert factor(tensors) < 0.35 * factor(load_file(float_folder / "model.safetensors"))  # fp32 -> 1 byte + scales


def test_fresh_process_from_pretrained_gives_identical_logits(tmp_path_factory, tmp_path):
    jobs = {family: int8_folder_of(family, tmp_path_factory) for family in ("qwen2", "gpt2")}
    args = [str(a) for family, (folder, _, _) in jobs.items() for a in (folder, tmp_path / f"{family}.safetensors")]
    proc = subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True)  # one process, both
    assert proc.returncode == 0, proc.stderr[-2000:]
    for family, (_, _, expected) in jobs.items():
        torch.testing.assert_close(load_file(tmp_path / f"{family}.safetensors")["logits"], expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_quantised_model_logits_close_to_float(family, tmp_path_factory):
    _, float_folder, int8_logits = int8_folder_of(family, tmp_path_factory)
    model, _ = load_model(float_folder)
    float_logits = logits(model, torch.arange(40).remainder(VOCAB).view(2, 20))
    assert 0 < rel_err(int8_logits, float_logits) < 0.05
    vaclm.quantize_int8(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    ranks = json.loads((float_folder / "config.json").read_text())["quantization_config"]["ranks"]
    assert sum(isinstance(m, Int8LowRankLinear) for m in model.modules()) == len(ranks) > 0
    with pytest.raises(VaclmError, match="no float factors"):
        vaclm.quantize_int8(model)


def tamper(folder, tmp_path, edit_tensors=None, edit_config=None):
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    if edit_tensors:
        tensors = load_file(copy / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((copy / "config.json").read_text())
        edit_config(config["quantization_config"])
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


TAMPERING = {
    "float where int8": (lambda t: t.update({(k := _first(t, ".up.weight")): t[k].float()}), None,
                         r"is F32 but config.json says int8"),
    "short scale": (lambda t: t.update({(k := _first(t, ".down.weight_scale")): t[k][:-1].clone()}), None,
                    r"weight_scale should be a float vector of length"),
    "missing scale": (lambda t: t.pop(_first(t, ".up.weight_scale")), None, r"weight_scale should be .* but is missing"),
    "int8 flag off": (None, lambda qc: qc.update(int8=False), r"is I8 but config.json says float factors"),
    "int8 flag not a bool": (None, lambda qc: qc.update(int8="yes"), r"'int8' is 'yes', not true or false"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_int8_folder_is_refused(int8_folder, tmp_path, case):
    edit_tensors, edit_config, message = TAMPERING[case]
    folder = tamper(int8_folder[0], tmp_path, edit_tensors, edit_config)
    with pytest.raises(VaclmError, match=message):
        load_model(folder)
    with pytest.raises(VaclmError, match=message):  # plain transformers loading refuses too
        AutoModelForCausalLM.from_pretrained(folder)


def test_tampered_int8_folder_is_one_line_cli_error(int8_folder, tmp_path, capsys):
    folder = tamper(int8_folder[0], tmp_path, TAMPERING["short scale"][0])
    code, _, err = cli(capsys, "info", str(folder))
    errors = [line for line in err.splitlines() if line.startswith("vaclm: error:")]
    assert code == 2 and len(errors) == 1 and "weight_scale" in errors[0], err[-2000:]


def test_cost_model_counts_the_bytes_an_int8_module_stores():
    module = Int8LowRankLinear.from_lowrank(LowRankLinear(96, 64, 24, bias=True))
    cost = int8_bytes(element=4)
    assert cost.cost((64, 96), 24) == module.factor_bytes() == 24 * (64 + 96) + 4 * (24 + 64)
    assert cost.cost((64, 96), None) == 64 * 96 * 4
    assert PARAMETERS.cost((64, 96), 24) == 24 * (64 + 96)


@pytest.mark.parametrize("allocation", ["uniform", "knapsack"])
def test_target_size_with_int8_counts_factors_at_one_byte(allocation):
    model = tiny_model("llama")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = int(dense_bytes * 0.6)
    config = CompressConfig(method="svd-llm", allocation=allocation, target_bytes=target, int8=True,
                            calib_samples=4, calib_seq_len=16)
    result = vaclm.compress(model, config, token_batch(4, 16), progress=False)
    assert any(isinstance(m, Int8LowRankLinear) for m in model.modules())
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stored <= target
    # result.config.keep is the target's share of the dense decoder linears: what float factors would keep.
    # At one byte per factor element the same bytes buy far more rank (or more dense matrices).
    assert result.kept_fraction > result.config.keep + 0.2
    if allocation == "knapsack":  # the knapsack spends the byte budget; uniform stops at the largest saving rank
        assert stored > 0.97 * target


def test_export_int8_then_dense_and_cli_flags(int8_folder, tmp_path, capsys, monkeypatch):
    _, float_folder, _ = int8_folder
    int8_out, dense_out = tmp_path / "int8", tmp_path / "dense"
    code, _, err = cli(capsys, "export", str(float_folder), "--int8", "--out", str(int8_out))
    assert code == 0, err[-2000:]
    assert json.loads((int8_out / "config.json").read_text())["quantization_config"]["int8"] is True
    report = json.loads((int8_out / "vaclm_report.json").read_text())
    assert report["int8_export"]["from"] == str(float_folder) and (int8_out / "allocation.json").exists()
    info = json.loads(cli(capsys, "info", str(int8_out), "--json")[1].strip().splitlines()[-1])
    float_info = json.loads(cli(capsys, "info", str(float_folder), "--json")[1].strip().splitlines()[-1])
    assert info["int8"] is True and float_info["int8"] is False
    assert info["factor_bytes"] < 0.35 * float_info["factor_bytes"] and info["folder_bytes"] < float_info["folder_bytes"]

    code, _, err = cli(capsys, "export", str(int8_out), "--dense", "--out", str(dense_out))
    assert code == 0, err[-2000:]
    plain = AutoModelForCausalLM.from_pretrained(dense_out)
    assert getattr(plain.config, "quantization_config", None) is None
    ids = token_batch(2, 20, seed=7)
    with monkeypatch.context() as patch:  # the dequantised product exactly: the CPU kernel computes in bfloat16
        patch.setattr(Int8Linear, "cpu_kernel", False)
        torch.testing.assert_close(logits(plain, ids), logits(load_model(int8_out)[0], ids), atol=1e-4, rtol=1e-4)

    code, _, err = cli(capsys, "export", str(int8_out), "--int8", "--out", str(tmp_path / "again"))
    assert code == 2 and "already holds int8 factors" in err and not (tmp_path / "again").exists()
    code, _, err = cli(capsys, "export", str(int8_out), "--int8", "--dense", "--out", str(tmp_path / "both"))
    assert code == 2 and "not allowed with" in err
    code, _, err = cli(capsys, "export", str(int8_out), "--out", str(tmp_path / "neither"))
    assert code == 2 and "one of the arguments --dense --int8" in err  # (and --gguf, where built)


def byte_tokenizer():
    """A 256-token byte-level tokenizer, so a tiny model folder can go through `vaclm compress`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_cli_compress_int8(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(WIKI_VALID.read_text()[:20_000])
    out = tmp_path / "out"
    code, _, err = cli(capsys, "compress", str(tmp_path / "tiny"), "--keep", "0.5", "--method", "svd-llm",
                       "--allocation", "uniform", "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4",
                       "--calib-seq-len", "16", "--int8", "--out", str(out))
    assert code == 0, err[-3000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["int8"] is True
    assert json.loads((out / "vaclm_report.json").read_text())["config"]["int8"] is True
    model, _ = load_model(out)
    assert sum(isinstance(m, Int8LowRankLinear) for m in model.modules()) == 21
