"""The elastic additions to a saved folder (`vaclm compress --elastic`), in the sub-folder `elastic/`.

The folder itself is an ordinary vaclm folder at the run's keep (the top size). `elastic/order.json`
holds the global order of rank steps (allocate/nested.py) and, for reading, the kept fraction and
number of steps at a grid of sizes; `elastic/spare.safetensors` holds `name.up.weight` (out x r)
and `name.down.weight` (r x in) (int8 folders: also their `_scale`s) of every matrix that is dense
at the top size, at the largest rank a smaller size gives it; float32 spares are stored in float16
(half the bytes of the folder's largest part; resizing casts them back, docs/elastic.md). A sub-folder, because vLLM and
transformers read every top-level *.safetensors file of a folder without an index as weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..allocate.nested import NestedOrder
from ..errors import VaclmError

ELASTIC_DIR = "elastic"
ORDER_FILE = "order.json"
SPARE_FILE = "spare.safetensors"
ELASTIC_VERSION = 1
GRID_STEP = 0.05  # the kept fractions order.json lists for reading (any keep in range loads)


def is_elastic(folder: Path) -> bool:
    return (Path(folder) / ELASTIC_DIR / ORDER_FILE).is_file()


def grid(order: NestedOrder) -> list[dict]:
    """Sizes from the top down by GRID_STEP: the steps each takes and the fraction it keeps."""
    keeps = [order.keep] + [float(k) for k in np.arange(round(order.keep / GRID_STEP) * GRID_STEP - 1e-9, 0, -GRID_STEP)
                            if order.min_keep <= k < order.keep - 1e-9]
    rows = []
    for keep in keeps:
        n = order.steps_for(round(keep, 6))
        rows.append({"keep": round(keep, 6), "steps": n, "kept_fraction": order.costs[n] / order.dense_cost})
    return rows


def write_elastic(folder: Path, order: NestedOrder, spare: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  int8: bool) -> None:
    """Write elastic/ into a folder being saved; `spare`: float (up, down) at the ranks order.spare_ranks() gives."""
    from safetensors.torch import save_file

    from ..linalg.balance import unit_up_columns
    from ..model.int8_lowrank import quantize_rows

    want = order.spare_ranks()
    if set(spare) != set(want) or any(spare[n][1].shape[0] != r for n, r in want.items()):
        raise VaclmError("the spare factors do not match the elastic order; re-run `vaclm compress --elastic`")
    tensors = {}
    for name, (up, down) in spare.items():
        if int8:  # as the top size's factors are quantised (Int8LowRankLinear.from_lowrank); keeps the nesting
            up, down = unit_up_columns(up, down)
        for factor, t in (("up", up), ("down", down)):
            key = f"{name}.{factor}.weight"
            if int8:
                tensors[key], tensors[f"{key}_scale"] = quantize_rows(t)
            else:
                tensors[key] = compact(t.detach())
    target = Path(folder) / ELASTIC_DIR
    target.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(target / SPARE_FILE),
              metadata={"format": "pt"})
    data = {"format": "vaclm-elastic", "version": ELASTIC_VERSION, "int8": int8, "min_keep": order.min_keep,
            "top_kept_fraction": order.top_kept, "spare_ranks": want, "grid": grid(order), "order": order.to_dict()}
    (target / ORDER_FILE).write_text(json.dumps(data, separators=(",", ":")) + "\n")


def compact(t: torch.Tensor) -> torch.Tensor:
    """A float32 spare factor in float16 where its values fit: spares at near-dense ranks would make the
    folder 1.66x its top-size model in float32 (demo); float16 rounding (2^-11 relative) is far below the
    truncation error of any rank they are used at."""
    if t.dtype == torch.float32 and t.numel() and float(t.abs().max()) < torch.finfo(torch.float16).max / 2:
        return t.to(torch.float16)
    return t


def read_order(folder: Path) -> NestedOrder:
    """The folder's order; one-line errors for a folder without one or a damaged one."""
    path = Path(folder) / ELASTIC_DIR / ORDER_FILE
    if not path.is_file():
        raise VaclmError(f"{folder} is not an elastic vaclm folder (no {ELASTIC_DIR}/{ORDER_FILE}); make one with "
                         "`vaclm compress ... --elastic`")
    try:
        data = json.loads(path.read_text())
        if data.get("version") != ELASTIC_VERSION:
            raise VaclmError(f"{path}: elastic format version {data.get('version')!r} is not supported (this vaclm "
                             f"reads {ELASTIC_VERSION}); upgrade vaclm")
        return NestedOrder.from_dict(data["order"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise VaclmError(f"{path} is damaged ({type(exc).__name__}: {exc}); re-run `vaclm compress --elastic`") from exc


def ranks_for_keep(folder: Path, keep: float, top_ranks: dict[str, int]
                   ) -> tuple[NestedOrder, int, dict[str, int | None]]:
    """(order, steps, every target's rank at `keep`), checked against the folder's own top-size ranks."""
    order = read_order(folder)
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not order.min_keep <= keep <= order.keep + 1e-12:
        raise VaclmError(f"keep {keep} is outside what {folder} holds: {order.min_keep:.4f} to {order.keep:g} "
                         "(its top size); choose a keep in that range, or compress again with a larger --keep")
    top = {n: r for n, r in order.ranks_after(order.top).items() if r is not None}
    if top != dict(top_ranks):
        raise VaclmError(f"{folder}/{ELASTIC_DIR}/{ORDER_FILE} does not match the ranks in config.json; the folder "
                         "was modified after saving, re-run `vaclm compress --elastic`")
    steps = order.steps_for(keep)
    return order, steps, order.ranks_after(steps)
