"""Run by tests/test_vllm_plugin.py in a fresh process (vLLM's parallel state is process-global).

Builds vLLM's own fused Llama linears (QKVParallelLinear, MergedColumnParallelLinear,
RowParallelLinear) with vaclm's quantization method, loads checkpoint tensors named as vaclm saves
them through vLLM's Llama weight mapper, and prints the largest error against the dense products
as JSON. Shards mix low-rank (with bias) and dense, as the knapsack leaves them. With a folder
argument (a vaclm folder of the tiny test Llama, e.g. a resized elastic one), its layer 0 tensors and
ranks are loaded instead of random ones.
"""

import sys

import json
import tempfile

import torch
from torch import nn
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader

from vaclm.serve.vllm_layers import LowRankLinearMethod, VaclmVllmConfig

H, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
PREFIX = "model.layers.0"
RANKS = {"self_attn.q_proj": 8, "self_attn.k_proj": None, "self_attn.v_proj": 5, "self_attn.o_proj": 7,
         "mlp.gate_proj": None, "mlp.up_proj": 12, "mlp.down_proj": 10}
SHAPES = {"q_proj": (HEADS * HEAD_DIM, H), "k_proj": (KV_HEADS * HEAD_DIM, H), "v_proj": (KV_HEADS * HEAD_DIM, H),
          "o_proj": (H, HEADS * HEAD_DIM), "gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}


def folder_layer(folder: str) -> tuple[dict, dict]:
    """(ranks, tensors) of layer 0 of a saved vaclm folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    ranks = config["quantization_config"]["ranks"]
    tensors = {k: v for k, v in load_file(str(Path(folder) / "model.safetensors")).items() if k.startswith(PREFIX + ".")}
    return {n: ranks.get(f"{PREFIX}.{n}") for n in RANKS}, tensors


def main(folder: str | None = None) -> None:
    torch.manual_seed(0)
    ranks, saved = folder_layer(folder) if folder else (RANKS, None)
    context = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
    context.__enter__()
    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"file://{tempfile.mktemp()}", backend="gloo")
    initialize_model_parallel(1, 1)
    config = VaclmVllmConfig.from_config({"quant_method": "vaclm", "version": 1, "int8": False,
                                          "ranks": {f"{PREFIX}.{n}": r for n, r in ranks.items()}})
    config.packed_modules_mapping.update({"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                          "gate_up_proj": ["gate_proj", "up_proj"]})
    kw = dict(bias=False, quant_config=config, params_dtype=torch.float32)
    top = nn.Module()
    top.model = nn.Module()
    layer = nn.Module()
    top.model.layers = nn.ModuleList([layer])
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    attn, mlp = layer.self_attn, layer.mlp
    attn.qkv_proj = QKVParallelLinear(H, HEAD_DIM, HEADS, KV_HEADS, prefix=f"{PREFIX}.self_attn.qkv_proj", **kw)
    attn.o_proj = RowParallelLinear(HEADS * HEAD_DIM, H, prefix=f"{PREFIX}.self_attn.o_proj", **kw)
    mlp.gate_up_proj = MergedColumnParallelLinear(H, [INTER, INTER], prefix=f"{PREFIX}.mlp.gate_up_proj", **kw)
    mlp.down_proj = RowParallelLinear(INTER, H, prefix=f"{PREFIX}.mlp.down_proj", **kw)

    checkpoint, dense = {}, {}
    for name, rank in ranks.items():
        out_f, in_f = SHAPES[name.rsplit(".", 1)[1]]
        full = f"{PREFIX}.{name}"
        if saved is not None:
            part = {k[len(full) + 1:]: v for k, v in saved.items() if k.startswith(full + ".")}
            checkpoint.update({f"{full}.{k}": v for k, v in part.items()})
            w = part["weight"] if rank is None else part["up.weight"] @ part["down.weight"]
            b = part.get("bias" if rank is None else "up.bias", torch.zeros(out_f))
            dense[name] = (w, b)
        elif rank is None:
            checkpoint[f"{full}.weight"] = w = torch.randn(out_f, in_f)
            dense[name] = (w, torch.zeros(out_f))
        else:
            down, up, bias = torch.randn(rank, in_f), torch.randn(out_f, rank), torch.randn(out_f)
            checkpoint.update({f"{full}.down.weight": down, f"{full}.up.weight": up, f"{full}.up.bias": bias})
            dense[name] = (up @ down, bias)
    loaded = AutoWeightsLoader(top).load_weights(iter(checkpoint.items()), mapper=LlamaModel.hf_to_vllm_mapper)
    methods = {}
    for name, module in top.named_modules():
        if hasattr(module, "quant_method"):
            methods[name] = type(module.quant_method).__name__
            module.quant_method.process_weights_after_loading(module)

    def ref(name, x):
        w, b = dense[name]
        return x @ w.T + b

    x, x_attn, x_mlp = torch.randn(5, H), torch.randn(5, HEADS * HEAD_DIM), torch.randn(5, INTER)
    errors = {
        "qkv_proj": (attn.qkv_proj(x)[0] - torch.cat([ref(f"self_attn.{p}", x) for p in ("q_proj", "k_proj", "v_proj")], -1)),
        "o_proj": attn.o_proj(x_attn)[0] - ref("self_attn.o_proj", x_attn),
        "gate_up_proj": mlp.gate_up_proj(x)[0] - torch.cat([ref("mlp.gate_proj", x), ref("mlp.up_proj", x)], -1),
        "down_proj": mlp.down_proj(x_mlp)[0] - ref("mlp.down_proj", x_mlp),
    }
    print(json.dumps({"loaded": sorted(loaded), "methods": methods,
                      "errors": {k: float(v.abs().max()) for k, v in errors.items()},
                      "fused_up_split": not hasattr(attn.qkv_proj, "up"),
                      "lowrank_method": LowRankLinearMethod.__name__}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
