"""`vaclm export --gguf`: a pruned tiny Llama written as GGUF and read back with the gguf reader;
bad inputs; and (slow, needs llama-cpp-python) the file run by the real llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model, token_batch

WIDTHS = (96, 40, 24)  # per layer: the full width, and two pruned ones


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # 255 byte symbols and one merge: llama.cpp refuses a BPE vocabulary without merges
    symbols = [c for c in sorted(pre_tokenizers.ByteLevel.alphabet()) if c != "~"][:255] + ["Ġt"]
    alphabet = symbols[:255]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(symbols)}, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def pruned_llama(widths=WIDTHS):
    """The tiny Llama with layer i's MLP cut to its first widths[i] neurons (down refitted plainly)."""
    from vaclm.model.pruned import gated_mlps, narrow_mlp

    model = tiny_model("llama")
    for mlp, width in zip(gated_mlps(model), widths):
        if width < model.config.intermediate_size:
            kept = torch.arange(width)
            narrow_mlp(model, mlp, kept, model.get_submodule(mlp.down).weight[:, kept].detach())
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import vaclm
    from vaclm.io.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    model = pruned_llama()
    vaclm.save(model, root / "pruned", byte_tokenizer())
    return model, export_gguf(str(root / "pruned"), root / "pruned.gguf"), root


def _field(reader, key):
    field = reader.fields[key]
    values = [field.parts[i].tolist() for i in field.data]
    return [v[0] if len(v) == 1 else v for v in values]


def test_round_trip_shapes_and_per_layer_arrays(exported):
    import gguf

    model, path, _ = exported
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deci"  # llama.cpp's per-layer Llama
    assert _field(reader, "deci.feed_forward_length") == list(WIDTHS)
    # uniform counts are scalars, which llama.cpp reads for every layer (get_key_or_arr)
    assert _field(reader, "deci.attention.head_count") == [4]
    assert _field(reader, "deci.attention.head_count_kv") == [2]
    assert _field(reader, "deci.block_count") == [3]
    tensors = {t.name: t for t in reader.tensors}
    for i, width in enumerate(WIDTHS):
        # GGUF lists dimensions innermost first: (in, out)
        assert list(tensors[f"blk.{i}.ffn_gate.weight"].shape) == [64, width]
        assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [width, 64]
        down = np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data, dtype=np.float32).reshape(64, width)
        expected = model.model.layers[i].mlp.down_proj.weight.detach().numpy()
        assert np.allclose(down, expected, atol=1e-3)  # float16
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 256


def test_q_rows_are_in_llama_cpps_rotary_order(exported):
    import gguf

    model, path, _ = exported
    from vaclm.io.gguf_export import permute_rows

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    q = np.asarray(tensors["blk.1.attn_q.weight"].data, dtype=np.float32).reshape(64, 64)
    hf = model.model.layers[1].self_attn.q_proj.weight.detach()
    assert np.allclose(q, permute_rows(hf, 4).numpy(), atol=1e-3)
    assert not np.allclose(q, hf.numpy(), atol=1e-3)


def test_uniform_widths_are_written_as_llama(tmp_path):
    import gguf
    import vaclm
    from vaclm.io.gguf_export import export_gguf

    vaclm.save(pruned_llama((48, 48, 48)), tmp_path / "m", byte_tokenizer())
    reader = gguf.GGUFReader(export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert _field(reader, "llama.feed_forward_length") == [48]


def test_refusals_name_the_problem_and_write_nothing(tmp_path, capsys):
    import vaclm
    from vaclm.cli import main
    from vaclm.config import CompressConfig

    factorised = tiny_model("llama")
    vaclm.compress(factorised, CompressConfig(keep=0.5, method="svd", allocation="uniform"), token_batch(2, 16),
                   progress=False)
    vaclm.save(factorised, tmp_path / "lowrank", byte_tokenizer())
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    for folder, words in (("lowrank", "factorised (low-rank) matrices"), ("gpt2", "no GGUF mapping for model type 'gpt2'")):
        code = main(["export", str(tmp_path / folder), "--gguf", str(tmp_path / f"{folder}.gguf")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0]
        assert not list(tmp_path.glob(f"*{folder}.gguf*"))


@pytest.mark.slow
def test_llama_cpp_runs_the_pruned_file_like_transformers(exported):
    """The real llama.cpp (llama-cpp-python) gives the same next-token log-probabilities, and its
    own Q8_0 quantisation of the file loads and runs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, path, root = exported
    ids = token_batch(1, 32, seed=5)[0].tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    ours = torch.log_softmax(torch.tensor(np.asarray(llm.scores[: len(ids)])), -1)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert (ours - ref).abs().max() < 0.05  # float16 weights
    q8 = root / "pruned-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(q8).encode(), params) == 0
    quantised = llama_cpp.Llama(str(q8), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    quantised.eval(ids)
    assert np.isfinite(np.asarray(quantised.scores[: len(ids)])).all()
