"""Atomic saving: everything is written into a temporary sibling folder, renamed on success."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import VaclmError


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work is done if the output folder exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise VaclmError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise VaclmError(f"output path {out} is a file; choose a folder path for --out")


class AtomicFolder:
    """`with AtomicFolder(out, overwrite) as tmp:` write into tmp; it becomes `out` only on success."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output(self.out, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _publish_permissions(self.tmp)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.old-"))
            os.replace(self.out, trash / "old")
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return False


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes a private 0700 folder; the result should have ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def lowrank_ranks(model) -> dict[str, int]:
    """Ranks of the factorised modules, float or int8."""
    from ..model.surgery import FACTORISED

    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FACTORISED)}


def int8_flag(model) -> bool:
    """True when the factors are int8; a model with both kinds cannot be described by one config."""
    from ..model.int8_lowrank import Int8LowRankLinear
    from ..model.lowrank import LowRankLinear

    kinds = {type(m) for m in model.modules() if isinstance(m, (LowRankLinear, Int8LowRankLinear))}
    if len(kinds) > 1:
        raise VaclmError("the model mixes float and int8 factors; quantise all of them (vaclm.quantize_int8) before saving")
    return kinds == {Int8LowRankLinear}


def _parents_of(model, kind) -> list:
    """The modules that hold a `kind` submodule directly."""
    return [m for m in model.modules() if any(isinstance(c, kind) for c in m.children())]


def save_model(model, out: Path, tokenizer=None, overwrite: bool = False, report: dict | None = None,
               write_extra=None) -> Path:
    """Save in the vaclm format (safetensors + quantization_config + weights marker) or, with no factors, plainly."""
    from ..model.pruned import pruned_shapes
    from .hf_quantizer import VaclmConfig
    from .validate import PRUNED_VERSION

    from ..model.int8_lowrank import Int8Linear, Int8LowRankLinear

    if any(isinstance(m, Int8Linear) for m in model.modules()) and not all(
            isinstance(p, Int8LowRankLinear) for p in _parents_of(model, Int8Linear)):
        raise VaclmError("the model has run-time int8 dense weights (model.int8_dense.int8_weights), which no folder "
                         "format holds; save the model before applying them")
    ranks = lowrank_ranks(model)
    pruned = pruned_shapes(model)  # MLP layers narrowed by --structure prune/mixed
    if ranks or pruned:
        model.config.quantization_config = VaclmConfig(ranks=ranks, int8=int8_flag(model), pruned=pruned,
                                                       **({"version": PRUNED_VERSION} if pruned else {"version": 2}))
    else:
        model.config.__dict__.pop("quantization_config", None)
    with AtomicFolder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if ranks or pruned:
            mark_weights(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "vaclm_report.json").write_text(json.dumps(report, indent=2))
        if write_extra is not None:
            write_extra(tmp)
    return Path(out)


def mark_weights(config_file: Path) -> None:
    """Format version 2: config.json names WEIGHTS_MARKER as its weights file, which transformers
    without vaclm refuses (vaclm's quantizer removes it first). save_pretrained never writes this key."""
    from .validate import WEIGHTS_MARKER

    config = json.loads(config_file.read_text())
    config["transformers_weights"] = WEIGHTS_MARKER
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
