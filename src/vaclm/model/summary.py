"""What `vaclm info` reports: sizes, kept fraction and ranks of a (compressed) model."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..allocate.uniform import kept_fraction
from .arch import get_submodule, spec_for, target_names
from .lowrank import LowRankLinear
from .surgery import dense_weight


def summarize(model, folder: Path | None = None) -> dict:
    spec = spec_for(model.config.model_type)
    shapes, ranks = {}, {}
    for name in (n for block in target_names(model, spec) for n in block):
        module = get_submodule(model, name)
        if isinstance(module, LowRankLinear):
            shapes[name], ranks[name] = (module.out_features, module.in_features), module.rank
        else:
            shapes[name], ranks[name] = tuple(dense_weight(module)[0].shape), None
    by_type: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        if rank is not None:
            by_type.setdefault(name.split(".", len(spec.blocks.split(".")) + 1)[-1], []).append(rank)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "model_type": model.config.model_type,
        "parameters": params,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "decoder_linear_dense": sum(o * i for o, i in shapes.values()),
        "kept_fraction": kept_fraction(shapes, ranks),
        "factorised": sum(r is not None for r in ranks.values()),
        "targets": len(ranks),
        "ranks": {t: {"min": min(r), "median": statistics.median(r), "max": max(r), "count": len(r)}
                  for t, r in sorted(by_type.items())},
    }
    if folder is not None and Path(folder).is_dir():
        info["folder_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return info
