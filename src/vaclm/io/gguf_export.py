"""`vaclm export FOLDER --gguf OUT.gguf`: a dense or pruned Llama-family model as a GGUF file that
an unmodified llama.cpp loads, runs and quantises (llama-quantize) with its own tools.

llama.cpp's "llama" architecture builds every layer with the first layer's MLP width, so a model
whose pruned MLPs differ in width is written as its "deci" architecture (the Llama graph with
per-layer `feed_forward_length` / `head_count` arrays, made for NVIDIA's pruned Llama-Nemotron
models); a model of uniform widths is written as "llama". Tensors follow llama.cpp's own converter
(convert_hf_to_gguf.py, LlamaModel/DeciModel): q and k rows permuted for its rotary layout,
matrices in float16, norms in float32, the BPE tokenizer with its pre-tokenizer recognised by the
same token hash the converter uses. Low-rank (factorised) folders are refused: llama.cpp has no
factorised layer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..errors import VaclmError

GGUF_MODEL_TYPES = ("llama",)

# llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre: the text it tokenises and the hashes of
# the token ids of the Llama-family BPE pre-tokenizers (a tokenizer not listed gets "default",
# with which llama.cpp tokenises text slightly differently; token ids given directly are unaffected)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
}


def check_exportable(folder: Path) -> dict:
    """config.json of a folder llama.cpp can run; one-line errors for anything else."""
    from .validate import read_vaclm_config

    if not (Path(folder) / "config.json").is_file():
        raise VaclmError(f"{folder} is not a model folder (no config.json); give the folder `vaclm compress` wrote")
    qc = read_vaclm_config(Path(folder))
    if qc is not None and qc.get("ranks"):
        raise VaclmError(f"{folder} holds factorised (low-rank) matrices, which llama.cpp cannot run; compress with "
                         "--structure prune for a GGUF, or `vaclm export --dense` for an ordinary checkpoint")
    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        raise VaclmError(f"no GGUF mapping for model type {model_type!r} (known: {', '.join(GGUF_MODEL_TYPES)}); "
                         "serve this folder with transformers or vLLM instead")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", "llama3", "linear"):
        raise VaclmError(f"GGUF export does not know rope scaling {kind!r}; serve this folder with transformers or vLLM")
    return config


def export_gguf(source: str, out: Path, overwrite: bool = False) -> Path:
    """Write `source` (a dense or pruned Llama folder) to `out` atomically; returns `out`."""
    from .loading import load_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise VaclmError(f"{out} already exists; choose another path or pass --overwrite")
    if out.suffix != ".gguf":
        raise VaclmError(f"{out} does not end in .gguf; name the output file OUT.gguf")
    if Path(source).is_dir():
        check_exportable(Path(source))
    model, tokenizer = load_model(source, dtype="float32")
    from .save import lowrank_ranks

    if lowrank_ranks(model):
        raise VaclmError(f"{source} holds factorised (low-rank) matrices, which llama.cpp cannot run; compress with "
                         "--structure prune for a GGUF, or `vaclm export --dense` for an ordinary checkpoint")
    if model.config.model_type not in GGUF_MODEL_TYPES:
        raise VaclmError(f"no GGUF mapping for model type {model.config.model_type!r} (known: "
                         f"{', '.join(GGUF_MODEL_TYPES)}); serve this model with transformers or vLLM instead")
    if tokenizer is None:
        raise VaclmError(f"{source} has no tokenizer; a GGUF carries one: save the model with its tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(handle)
    try:
        write_gguf(model, tokenizer, Path(tmp), name=Path(str(source)).name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result should not be
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def layer_shapes(model) -> tuple[list[int], list[int], list[int], int]:
    """Per layer: MLP width, query heads, KV heads; and the head size."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths, heads, kv_heads = [], [], []
    for layer in model.model.layers:
        widths.append(layer.mlp.gate_proj.weight.shape[0])
        heads.append(layer.self_attn.q_proj.weight.shape[0] // head_dim)
        kv_heads.append(layer.self_attn.k_proj.weight.shape[0] // head_dim)
    return widths, heads, kv_heads, head_dim


def _uniform(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model, tokenizer, path: Path, name: str = "vaclm") -> None:
    import gguf

    config = model.config
    widths, heads, kv_heads, head_dim = layer_shapes(model)
    per_layer = len(set(widths)) > 1 or len(set(heads)) > 1 or len(set(kv_heads)) > 1
    arch = gguf.MODEL_ARCH.DECI if per_layer else gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    blocks = len(widths)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(_uniform(widths))
    writer.add_head_count(_uniform(heads))
    writer.add_head_count_kv(_uniform(kv_heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    _add_tokenizer(writer, tokenizer, config)

    tensor_map = gguf.get_tensor_name_map(arch, blocks)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue
        data = tensor.detach().float()
        block = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
            data = permute_rows(data, heads[int(block)])
        elif key.endswith("k_proj.weight") or key.endswith("k_proj.bias"):
            data = permute_rows(data, kv_heads[int(block)])
        gguf_name = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise VaclmError(f"no GGUF name for tensor {key}; this model's layout is not a plain Llama")
        array = data.numpy()
        array = array.astype(np.float16) if array.ndim == 2 else array.astype(np.float32)
        writer.add_tensor(gguf_name, array)
    if rope["type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], _llama3_factors(rope, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise VaclmError(f"GGUF export does not know rope scaling {kind!r}; serve this model with transformers or vLLM")
    return {**params, "theta": float(theta), "type": kind}


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for Llama-3.1-style scaling (as its converter computes it)."""
    freqs = 1.0 / (rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def pre_tokenizer(tokenizer) -> str:
    return PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest(), "default")


def _add_tokenizer(writer, tokenizer, config) -> None:
    """A BPE tokenizer (tokenizer.json) as llama.cpp's converter writes it (_set_vocab_gpt2)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    bpe = state.get("model", {})
    if bpe.get("type") != "BPE":
        raise VaclmError("GGUF export writes byte-level BPE tokenizers (tokenizer.json) only; this model's is "
                         f"{bpe.get('type') or 'not a fast tokenizer'}: serve it with transformers or vLLM")
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
