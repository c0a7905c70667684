"""What `vaclm info` reports: sizes, kept fraction and ranks of a (compressed) model."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..allocate.uniform import kept_fraction
from .arch import get_submodule, spec_for, target_names
from .int8_lowrank import Int8LowRankLinear
from .pruned import full_width, pruned_shapes
from .surgery import FACTORISED, dense_weight


def summarize(model, folder: Path | None = None) -> dict:
    spec = spec_for(model.config.model_type)
    shapes, ranks = {}, {}
    for name in (n for block in target_names(model, spec) for n in block):
        module = get_submodule(model, name)
        if isinstance(module, FACTORISED):
            shapes[name], ranks[name] = (module.out_features, module.in_features), module.rank
        else:
            shapes[name], ranks[name] = tuple(dense_weight(module)[0].shape), None
    # pruned MLP layers (model/pruned.py) count against the dense shape of the config's width
    pruned = pruned_shapes(model)
    full = {n: _full_shape(n, s, model.config) if n in pruned else s for n, s in shapes.items()}
    by_type: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        if rank is not None:
            by_type.setdefault(name.split(".", len(spec.blocks.split(".")) + 1)[-1], []).append(rank)
    # int8 factors and their scales are buffers, not parameters: count them as the weights they are
    int8 = [m for m in model.modules() if isinstance(m, Int8LowRankLinear)]
    weights = list(model.parameters()) + [b for m in int8 for b in m.buffers()]
    factors = [t for m in model.modules() if isinstance(m, FACTORISED) for t in _factor_tensors(m)]
    info = {
        "model_type": model.config.model_type,
        "parameters": sum(t.numel() for t in weights),
        "parameter_bytes": sum(t.numel() * t.element_size() for t in weights),
        "int8": bool(int8),
        "factor_bytes": sum(t.numel() * t.element_size() for t in factors),  # down and up (+ int8 scales)
        "decoder_linear_dense": sum(o * i for o, i in full.values()),
        "kept_fraction": kept_fraction(shapes, ranks) if not pruned else sum(  # a pruned layer's shape is its cost
            o * i if ranks[n] is None else ranks[n] * (o + i) for n, (o, i) in shapes.items()) / sum(
            o * i for o, i in full.values()),
        "pruned_mlps": len({n.rpartition(".")[0] for n in pruned}),
        "factorised": sum(r is not None for r in ranks.values()),
        "targets": len(ranks),
        "ranks": {t: {"min": min(r), "median": statistics.median(r), "max": max(r), "count": len(r)}
                  for t, r in sorted(by_type.items())},
    }
    if folder is not None and Path(folder).is_dir():
        info["folder_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return info


def _full_shape(name: str, shape: tuple[int, int], config) -> tuple[int, int]:
    width = full_width(config)
    return (shape[0], width) if name.endswith("down_proj") else (width, shape[1])


def _factor_tensors(module) -> list:
    """down and up weights, and their scales when int8 (the bias is not a factor)."""
    if isinstance(module, Int8LowRankLinear):
        return [module.down.weight, module.down.weight_scale, module.up.weight, module.up.weight_scale]
    return [module.down.weight, module.up.weight]
