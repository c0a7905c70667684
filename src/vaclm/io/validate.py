"""Check a saved vaclm folder against its own config before any weight is loaded.

A corrupt safetensors file, a missing tensor, a rank in config.json that does not match the
tensor shapes or a factor of the wrong dtype (float where int8 is declared, a scale of the wrong
length: a tampered folder) is one clear error instead of a silently re-initialised or cast layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VaclmError

# 1: factors and quantization_config only. 2: also the WEIGHTS_MARKER below. 3: also "pruned",
# {module: [out, in]} of MLP projections narrowed by --structure prune/mixed (written only then,
# so that an older vaclm refuses such a folder instead of failing on its shapes). All are read.
FORMAT_VERSION = 3
PRUNED_VERSION = 3

# Version 2 writes this as config.json's "transformers_weights" (the weights file transformers should
# read). Where vaclm's quantizer is registered it is removed before any file is looked up, and the
# standard model.safetensors loads; transformers without vaclm (4.57 and later) refuses it with an
# error ending in this text, instead of loading the model with its factorised layers left random.
WEIGHTS_MARKER = ("vaclm: this folder holds vaclm low-rank factors and loads only where vaclm is installed "
                  "(pip install vaclm); a plain transformers load would leave those layers random")


def is_weights_marker(value) -> bool:
    """A marker written by any vaclm version (the wording may change; the prefix does not)."""
    return isinstance(value, str) and value.startswith("vaclm:")


def read_vaclm_config(folder: Path) -> dict | None:
    """The folder's vaclm quantization_config, or None for a plain model folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VaclmError(f"{folder}/config.json is unreadable ({exc}); re-save or re-export the model") from exc
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "vaclm":
        return None
    return qc


def tensor_meta(files: list[Path]) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, safetensors dtype such as "I8", "F32", "BF16"), read from the headers only."""
    from safetensors import safe_open

    meta = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    meta[key] = (list(tensor.get_shape()), tensor.get_dtype())
        except Exception as exc:
            raise VaclmError(f"corrupt weights file {file} ({exc}); re-run the compression or restore the file") from exc
    return meta


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_tensors(qc: dict, meta: dict[str, tuple[list[int], str]], where: str) -> None:
    """Ranks against shapes, and the factors' dtypes (int8 with per-row scales, or float)."""
    check_ranks(qc, {key: shape for key, (shape, _) in meta.items()}, where)
    check_pruned(qc, {key: shape for key, (shape, _) in meta.items()}, where)
    int8 = qc.get("int8", False)
    if not isinstance(int8, bool):
        raise VaclmError(f"{where}: quantization_config 'int8' is {int8!r}, not true or false; the folder is damaged, re-save it")
    for module in qc["ranks"]:
        for factor in ("down", "up"):
            key = f"{module}.{factor}.weight"
            shape, dtype = meta[key]
            scale = meta.get(f"{key}_scale")
            if int8 and dtype != "I8":
                raise VaclmError(f"{where}: {key} is {dtype} but config.json says int8; the folder was modified "
                                 "after saving, re-export it with `vaclm export --int8`")
            if not int8 and dtype not in FLOAT_DTYPES:
                raise VaclmError(f"{where}: {key} is {dtype} but config.json says float factors; the folder was "
                                 "modified after saving, re-save it")
            if int8 and (scale is None or scale[0] != [shape[0]] or scale[1] not in FLOAT_DTYPES):
                found = "missing" if scale is None else f"{scale[1]} of shape {scale[0]}"
                raise VaclmError(f"{where}: {key}_scale should be a float vector of length {shape[0]} but is {found}; "
                                 "the folder was modified after saving, re-export it with `vaclm export --int8`")


def check_version(version, where: str) -> None:
    """Versions 1 and 2 lay the tensors out alike (2 adds the weights marker); newer ones are refused."""
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise VaclmError(f"{where}: vaclm format version {version!r} is not supported (this vaclm reads 1 to {FORMAT_VERSION}); upgrade vaclm")


def check_ranks(qc: dict, shapes: dict[str, list[int]], where: str) -> None:
    check_version(qc.get("version", 0), where)
    ranks = qc.get("ranks")
    if not isinstance(ranks, dict):
        raise VaclmError(f"{where}: quantization_config has no 'ranks' table; the folder is damaged, re-save it")
    for module, rank in ranks.items():
        down, up = shapes.get(f"{module}.down.weight"), shapes.get(f"{module}.up.weight")
        if down is None or up is None:
            raise VaclmError(f"{where}: factors of {module} are missing from the weights; the folder is damaged, re-save it")
        if not isinstance(rank, int) or down[0] != rank or up[1] != rank:
            raise VaclmError(
                f"{where}: {module} has rank {rank!r} in config.json but its tensors have rank {down[0]}/{up[1]}; "
                "the folder was modified after saving, re-save it"
            )


def check_pruned(qc: dict, shapes: dict[str, list[int]], where: str) -> None:
    """Every narrowed layer's weight has the shape config.json records."""
    pruned = qc.get("pruned", {})
    if not isinstance(pruned, dict):
        raise VaclmError(f"{where}: quantization_config 'pruned' is not a table; the folder is damaged, re-save it")
    for module, shape in pruned.items():
        found = shapes.get(f"{module}.weight")
        if found is None or list(found) != list(shape):
            raise VaclmError(f"{where}: {module} is pruned to {shape} in config.json but its weight is "
                             f"{'missing' if found is None else found}; the folder was modified after saving, re-save it")


def validate_folder(folder: Path) -> None:
    qc = read_vaclm_config(folder)
    if qc is None:
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VaclmError(f"{folder} holds no .safetensors weights; re-save the model")
    check_tensors(qc, tensor_meta(files), str(folder))
