"""vaclm's low-rank linears as a vLLM quantization method (tested with vLLM 0.32 (CPU) and 0.34).

vLLM fuses q/k/v into one QKVParallelLinear and gate/up into one MergedColumnParallelLinear, and
its loader renames `...q_proj.down.weight` to `...qkv_proj.down.weight` with shard id "q". So a
fused layer holds one shard per original matrix, each low-rank (its own rank) or dense:

    down.weight  (sum of the ranks, in)     the low-rank shards' downs, stacked
    up.weight    (their outputs, sum ranks) their ups, block-diagonal while loading
    up.bias      (their outputs,)           zeros unless the checkpoint has a bias
    weight       (dense outputs, in)        the shards the allocator kept dense

Every parameter has a shard-aware weight loader. Tensor parallelism: column-parallel layers split
the outputs (rows of up and of dense weights; down is replicated), row-parallel layers split the
inputs (columns of down and of dense weights; up is replicated, its bias added on rank 0 only)
and vLLM all-reduces the output as usual, since up @ sum_k(down_k x_k) = sum_k up @ down_k x_k.
After loading, a fused layer's block-diagonal up is split into one contiguous up per shard, so
the matmuls cost what the factors cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..errors import VaclmError
from ..io.validate import check_version


@register_quantization_config("vaclm")
class VaclmVllmConfig(QuantizationConfig):
    """config.json's {"quant_method": "vaclm", "version", "ranks": {module: rank or null}, "int8"}."""

    def __init__(self, ranks: dict[str, int | None]):
        super().__init__()  # packed_modules_mapping: filled by the model (qkv_proj -> q/k/v_proj)
        self.ranks = {name: rank for name, rank in ranks.items() if rank}

    def get_name(self) -> str:
        return "vaclm"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain matmuls: any GPU, and CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VaclmVllmConfig":
        # the weights marker of version 2 is for transformers only: vLLM finds the *.safetensors itself
        check_version(config.get("version", 1), "vaclm quantization_config")
        if config.get("int8"):
            raise VaclmError("vLLM serves vaclm folders with float factors; int8 factors are not supported there: "
                             "serve the folder from before `vaclm export --int8`")
        if config.get("pruned"):  # vLLM builds every MLP at config.json's intermediate_size
            raise VaclmError("vLLM cannot serve MLPs pruned to per-layer widths (--structure prune/mixed); serve the "
                             "folder with transformers, or `vaclm export --gguf` a pure-pruning one for llama.cpp")
        ranks = config.get("ranks")
        if not isinstance(ranks, dict):
            raise VaclmError("quantization_config has no 'ranks' table; the folder is damaged, save it again with vaclm")
        return cls(ranks)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head stay as they are
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf, [leaf])
        ranks = [self.ranks.get(f"{parent}.{s}" if parent else s) for s in shards]
        if all(r is None for r in ranks):
            return UnquantizedLinearMethod()
        return LowRankLinearMethod(ranks)


def shard_ids(layer: nn.Module, count: int) -> tuple:
    """The shard ids vLLM's loader passes (0.34 has layer.shard_ids; 0.32 does not)."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(count))
    return (None,)


class LowRankLinearMethod(LinearMethodBase):
    """One fused (or plain) vLLM linear whose shards are low-rank (rank) or dense (None)."""

    def __init__(self, ranks: list[int | None]):
        self.ranks = ranks

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        extra_weight_attrs.pop("weight_loader", None)  # each parameter gets its own, below
        if len(output_partition_sizes) != len(self.ranks):
            raise VaclmError(f"{layer.prefix}: {len(output_partition_sizes)} shards but {len(self.ranks)} ranks; "
                             "the folder's ranks do not match this architecture")
        ids = shard_ids(layer, len(output_partition_sizes))
        # shard id -> (kind, row offset in its parameter, outputs, rank offset, rank)
        shards, lowrank_out, dense_out, rank_sum = {}, 0, 0, 0
        for sid, out, rank in zip(ids, output_partition_sizes, self.ranks):
            if rank is None:
                shards[sid] = ("dense", dense_out, out, 0, 0)
                dense_out += out
            else:
                shards[sid] = ("lowrank", lowrank_out, out, rank_sum, rank)
                lowrank_out, rank_sum = lowrank_out + out, rank_sum + rank
        layer.vaclm_shards = [shards[sid] for sid in ids]
        row_parallel = isinstance(layer, RowParallelLinear)
        tp_rank = layer.tp_rank
        kv_replicas = getattr(layer, "num_kv_head_replicas", 1)

        def source_rank(sid):  # k/v heads are replicated when there are fewer of them than ranks
            return tp_rank // kv_replicas if isinstance(layer, QKVParallelLinear) and sid in ("k", "v") else tp_rank

        def split_inputs(w):
            if row_parallel and w.shape[1] != input_size_per_partition:
                w = w.narrow(1, tp_rank * input_size_per_partition, input_size_per_partition)
            return w

        def split_outputs(w, sid, out):
            if not row_parallel and w.shape[0] != out:
                w = w.narrow(0, source_rank(sid) * out, out)
            return w

        def shard(sid, kind):
            if sid not in shards or shards[sid][0] != kind:
                other = "a dense weight" if kind == "dense" else "factors"
                raise VaclmError(f"{layer.prefix}: the checkpoint has {other} for shard {sid!r}, which its ranks "
                                 "say is not; the folder is damaged or tampered with, save it again with vaclm")
            return shards[sid]

        def load_down(param, w, shard_id=None):
            _, _, _, offset, rank = shard(shard_id, "lowrank")
            param.data.narrow(0, offset, rank).copy_(split_inputs(w))

        def load_up(param, w, shard_id=None):
            _, row, out, offset, rank = shard(shard_id, "lowrank")
            param.data.narrow(0, row, out).narrow(1, offset, rank).copy_(split_outputs(w, shard_id, out))

        def load_up_bias(param, w, shard_id=None):
            _, row, out, _, _ = shard(shard_id, "lowrank")
            if not (row_parallel and tp_rank > 0):  # a row-parallel bias is added once, before the all-reduce
                param.data.narrow(0, row, out).copy_(split_outputs(w, shard_id, out))

        def load_dense(param, w, shard_id=None):
            _, row, out, _, _ = shard(shard_id, "dense")
            param.data.narrow(0, row, out).copy_(split_outputs(split_inputs(w), shard_id, out))

        def parameter(shape, loader):
            p = Parameter(torch.zeros(*shape, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": loader, **extra_weight_attrs})
            return p

        layer.down, layer.up = nn.Module(), nn.Module()
        layer.down.register_parameter("weight", parameter((rank_sum, input_size_per_partition), load_down))
        layer.up.register_parameter("weight", parameter((lowrank_out, rank_sum), load_up))
        layer.up.register_parameter("bias", parameter((lowrank_out,), load_up_bias))
        if dense_out:
            layer.register_parameter("weight", parameter((dense_out, input_size_per_partition), load_dense))

    def process_weights_after_loading(self, layer) -> None:
        """Split a fused layer's block-diagonal up into one contiguous factor per low-rank shard:
        layer.vaclm_parts, in output order, holds ("dense", row, out) or ("lowrank", offset, rank, up, bias)."""
        up, bias = layer.up.weight.data, layer.up.bias.data
        layer.vaclm_parts = [
            (kind, row, out) if kind == "dense" else
            (kind, offset, rank, up[row:row + out, offset:offset + rank].contiguous(), bias[row:row + out].contiguous())
            for kind, row, out, offset, rank in layer.vaclm_shards]
        if sum(kind == "lowrank" for kind, *_ in layer.vaclm_shards) > 1:
            del layer.up  # its blocks now live in vaclm_parts (a single shard's up is already contiguous)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        inner = F.linear(x, layer.down.weight)  # all low-rank shards' downs in one matmul
        dense = F.linear(x, layer.weight) if hasattr(layer, "weight") else None
        parts = [dense.narrow(-1, part[1], part[2]) if part[0] == "dense" else
                 F.linear(inner.narrow(-1, part[1], part[2]), part[3], part[4]) for part in layer.vaclm_parts]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if bias is None else y + bias
