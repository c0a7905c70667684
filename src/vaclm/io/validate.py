"""Check a saved vaclm folder against its own config before any weight is loaded.

A corrupt safetensors file, a missing tensor or a rank in config.json that does not match the
tensor shapes (a tampered folder) is one clear error instead of a silently re-initialised layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VaclmError

FORMAT_VERSION = 1


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


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = list(handle.get_slice(key).get_shape())
        except Exception as exc:
            raise VaclmError(f"corrupt weights file {file} ({exc}); re-run the compression or restore the file") from exc
    return shapes


def check_ranks(qc: dict, shapes: dict[str, list[int]], where: str) -> None:
    version = qc.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise VaclmError(f"{where}: vaclm format version {version!r} is not supported (this vaclm reads <= {FORMAT_VERSION}); upgrade vaclm")
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


def validate_folder(folder: Path) -> None:
    qc = read_vaclm_config(folder)
    if qc is None:
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VaclmError(f"{folder} holds no .safetensors weights; re-save the model")
    check_ranks(qc, tensor_shapes(files), str(folder))
