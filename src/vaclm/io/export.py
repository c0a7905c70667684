"""Exports: dense (multiply factors back, for runtimes that know nothing of vaclm) and int8
(quantise the factors of a float vaclm folder)."""

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
    from .loading import load_model
    from .save import check_output, lowrank_ranks, save_model

    check_output(Path(out), overwrite)
    model, tokenizer = load_model(source, dtype=dtype)
    if not lowrank_ranks(model):
        raise VaclmError(f"{source} has no factorised layers; there is nothing to export densely")
    to_dense(model)
    return save_model(model, Path(out), tokenizer, overwrite=overwrite)


def export_int8(source: str, out: Path, overwrite: bool = False, dtype: str = "auto") -> Path:
    """A vaclm folder with float factors -> the same ranks with int8 factors and per-row scales."""
    from .loading import load_model
    from ..model.surgery import quantize_factors
    from .save import check_output, int8_flag, lowrank_ranks, save_model

    check_output(Path(out), overwrite)
    model, tokenizer = load_model(source, dtype=dtype)
    if not lowrank_ranks(model):
        raise VaclmError(f"{source} has no factorised layers; compress it first (vaclm compress ... --int8)")
    if int8_flag(model):
        raise VaclmError(f"{source} already holds int8 factors; export it --dense, or copy it as it is")
    quantize_factors(model)
    return save_model(model, Path(out), tokenizer, overwrite=overwrite, write_extra=lambda tmp: _copy_reports(source, tmp))


def _copy_reports(source: str, folder: Path) -> None:
    """The compression report and allocation table still describe the ranks; keep them with the model."""
    import json
    import shutil

    for name in ("allocation.json", "allocation.png"):
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, folder / name)
    if (Path(source) / "vaclm_report.json").is_file():
        report = json.loads((Path(source) / "vaclm_report.json").read_text())
        report["int8_export"] = {"from": str(source)}  # quantised afterwards; the config is the compression's
        (folder / "vaclm_report.json").write_text(json.dumps(report, indent=2))
