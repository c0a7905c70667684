"""An elastic folder at a smaller keep: a folder (`vaclm resize`) or a loaded model (load(..., keep=)).

Every factor at keep K is a prefix of the top size's (io/elastic.py): `down` keeps its first r
rows, `up` its first r columns, biases stay. A matrix dense at the top size that K factorises
takes the prefix of its spare factors, and its bias moves to `up.bias`. int8 factors slice the
same way: `down`'s per-row scales are sliced with its rows, `up` keeps its scales (each the
maximum over the top rank's columns, so a slice is not bit-identical to quantising a rank-r
model afresh, only as precise or slightly coarser). The folder is written tensor by tensor with
safetensors' get_slice: no model, no data, only the needed slices are read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import VaclmError
from .elastic import ELASTIC_DIR, SPARE_FILE, ranks_for_keep
from .save import AtomicFolder
from .validate import check_tensors, read_vaclm_config, tensor_meta

INDEX = "model.safetensors.index.json"
# files of the source folder that describe the top size, rewritten (or dropped) for the new one
REWRITTEN = {"config.json", INDEX, "vaclm_report.json", "allocation.json", "allocation.png"}


def slice_factor(key: str, rank: int, sl):
    """The part of factor tensor `key` (read through `sl`, a safetensors slice or a tensor) that rank `rank` keeps."""
    key = f".{key}"
    if key.endswith(".down.weight") or key.endswith(".down.weight_scale"):
        return sl[:rank]
    if key.endswith(".up.weight"):
        return sl[:, :rank]
    return sl[:]


def weight_files(folder: Path) -> list[str]:
    index = folder / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not (folder / "model.safetensors").is_file():
        raise VaclmError(f"{folder} holds no model.safetensors; re-save the model")
    return ["model.safetensors"]


def plan_resize(folder: Path, keep: float) -> tuple[dict, dict[str, int | None], dict[str, int | None], int]:
    """(quantization_config, top ranks, ranks at keep, steps) of an elastic folder, checked."""
    if not Path(folder).is_dir():
        raise VaclmError(f"no such folder: {folder}; give the output of `vaclm compress ... --elastic`")
    qc = read_vaclm_config(folder)
    if qc is None:
        raise VaclmError(f"{folder} is not a vaclm folder (no vaclm quantization_config); resize the output of "
                         "`vaclm compress --elastic`")
    order, steps, ranks = ranks_for_keep(folder, keep, qc.get("ranks") or {})
    top = order.ranks_after(order.top)
    return qc, top, ranks, steps


def resize_folder(folder: str | Path, keep: float, out: str | Path, overwrite: bool = False) -> dict:
    """Write an ordinary vaclm folder at `keep` from elastic `folder`; returns a summary."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    qc, top, ranks, steps = plan_resize(folder, keep)
    files = weight_files(folder)
    check_tensors(qc, tensor_meta([folder / f for f in files]), str(folder))
    spare_path = folder / ELASTIC_DIR / SPARE_FILE
    grow = {n for n, r in ranks.items() if r is not None and top[n] is None}  # dense at the top, factorised here
    owners = {}  # key -> (name, part): which target a tensor belongs to
    for name in ranks:
        for part in ("down.weight", "down.weight_scale", "up.weight", "up.weight_scale", "up.bias", "weight", "bias"):
            owners[f"{name}.{part}"] = (name, part)
    weight_map, total = {}, 0
    with AtomicFolder(out, overwrite) as tmp:
        spare = safe_open(str(spare_path), framework="pt") if grow else None
        for file in files:
            tensors = {}
            with safe_open(str(folder / file), framework="pt") as handle:
                for key in handle.keys():
                    name, part = owners.get(key, (None, None))
                    if name in grow and part in ("weight", "bias"):
                        if part == "bias":
                            tensors[f"{name}.up.bias"] = handle.get_tensor(key)
                        else:  # the dense weight gives way to its spare factors, in the same file
                            dtype = handle.get_slice(key)[:1].dtype  # float spares are stored compact: cast back
                            for sk in (f"{name}.{p}" for p in ("down.weight", "down.weight_scale", "up.weight",
                                                              "up.weight_scale")):
                                if sk in spare.keys():
                                    t = slice_factor(sk, ranks[name], spare.get_slice(sk))
                                    tensors[sk] = t if t.dtype == torch.int8 else t.to(dtype)
                    elif name is not None and top[name] is not None:
                        tensors[key] = slice_factor(key, ranks[name], handle.get_slice(key))
                    else:
                        tensors[key] = handle.get_tensor(key)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if len(files) > 1 or (folder / INDEX).is_file():
            index = json.loads((folder / INDEX).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = total
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for item in folder.iterdir():  # tokenizer, generation config, chat template ...
            if item.name in REWRITTEN or item.name == ELASTIC_DIR or item.suffix == ".safetensors":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["ranks"] = {n: r for n, r in ranks.items() if r is not None}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        summary = summarize(folder, keep, ranks, steps)
        report_path = folder / "vaclm_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report["resized"] = summary
        (tmp / "vaclm_report.json").write_text(json.dumps(report, indent=2))
        write_allocation_table(tmp, ranks, folder)
    return {**summary, "out": str(out)}


def summarize(folder: Path, keep: float, ranks: dict[str, int | None], steps: int) -> dict:
    from .elastic import read_order

    shapes = read_order(folder).shapes
    dense = sum(o * i for o, i in shapes.values())
    cost = sum(o * i if r is None else r * (o + i) for (o, i), r in ((shapes[n], ranks[n]) for n in ranks))
    return {"from": str(folder), "keep": keep, "kept_fraction": cost / dense, "steps": steps,
            "factorised": sum(r is not None for r in ranks.values()), "targets": len(ranks)}


def write_allocation_table(folder: Path, ranks: dict[str, int | None], source: Path) -> None:
    from .elastic import read_order

    shapes = read_order(source).shapes
    table = {}
    for name, rank in ranks.items():
        out_f, in_f = shapes[name]
        cost = out_f * in_f if rank is None else rank * (out_f + in_f)
        table[name] = {"rank": rank, "shape": [out_f, in_f], "cost": cost, "kept": cost / (out_f * in_f)}
    dense = sum(o * i for o, i in shapes.values())
    summary = {"method": "elastic resize", "kept_fraction": sum(v["cost"] for v in table.values()) / dense,
               "modules": table}
    (folder / "allocation.json").write_text(json.dumps(summary, indent=1))


def resize_model(model, folder: Path, top: dict[str, int | None], ranks: dict[str, int | None]) -> None:
    """In place: a model loaded at the top size becomes the model at `ranks` (prefixes; spares read by slice)."""
    from safetensors import safe_open

    from ..model.arch import get_submodule, set_submodule
    from ..model.int8_lowrank import Int8LowRankLinear
    from ..model.lowrank import LowRankLinear
    from ..model.surgery import dense_weight

    grow = [n for n, r in ranks.items() if r is not None and top[n] is None]
    spare = safe_open(str(Path(folder) / ELASTIC_DIR / SPARE_FILE), framework="pt") if grow else None
    with torch.no_grad():
        for name, rank in ranks.items():
            if rank is None or rank == top[name]:
                continue
            old = get_submodule(model, name)
            if top[name] is not None:
                state = old.state_dict()
                get = state.__getitem__
                bias = old.up.bias
                in_f, out_f = old.in_features, old.out_features
                ref = old.up.weight_scale if isinstance(old, Int8LowRankLinear) else old.up.weight  # float dtype
            else:
                get = lambda key: spare.get_slice(f"{name}.{key}")  # noqa: E731
                ref, bias = dense_weight(old)
                out_f, in_f = ref.shape
            int8 = isinstance(old, Int8LowRankLinear) or (spare is not None and top[name] is None
                                                        and f"{name}.up.weight_scale" in spare.keys())
            kind = Int8LowRankLinear if int8 else LowRankLinear
            new = kind(in_f, out_f, rank, bias is not None, device=ref.device, dtype=ref.dtype)
            for key, tensor in new.state_dict().items():
                if key == "up.bias":
                    tensor.copy_(bias)
                else:
                    tensor.copy_(slice_factor(key, rank, get(key)))
            set_submodule(model, name, new)
