"""Dense export: multiply factors back for runtimes that know nothing of vaclm."""

from __future__ import annotations

from pathlib import Path

from ..errors import VaclmError


def to_dense(model) -> None:
    """In place: every LowRankLinear becomes the module type its architecture expects."""
    from ..model.arch import spec_for
    from ..model.surgery import replace_with_dense
    from .save import lowrank_ranks

    spec = spec_for(model.config.model_type)
    for name in lowrank_ranks(model):
        replace_with_dense(model, name, conv1d=spec.conv1d)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.config.__dict__.pop("_is_quantized", None)


def export_dense(source: str, out: Path, overwrite: bool = False, dtype: str = "auto") -> Path:
    from ..model.loading import load_model
    from .save import check_output, lowrank_ranks, save_model

    check_output(Path(out), overwrite)
    model, tokenizer = load_model(source, dtype=dtype)
    if not lowrank_ranks(model):
        raise VaclmError(f"{source} has no factorised layers; there is nothing to export densely")
    to_dense(model)
    return save_model(model, Path(out), tokenizer, overwrite=overwrite)
