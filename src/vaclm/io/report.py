"""allocation.json and a heatmap of the kept fraction per block and module type, next to the model."""

from __future__ import annotations

import json
import re
from pathlib import Path


def allocation_table(result) -> dict:
    table = {}
    for name, (out_f, in_f) in result.shapes.items():
        rank = result.ranks[name]
        cost = out_f * in_f if rank is None else rank * (out_f + in_f)
        width = getattr(result, "widths", {}).get(name.rpartition(".")[0])  # --structure prune/mixed
        if width is not None:
            cost = result.cost(name)
        table[name] = {"rank": rank, **({"width": width} if width is not None else {}),
                       "shape": [out_f, in_f], "cost": cost, "kept": cost / (out_f * in_f),
                       "estimated_loss": result.allocation.get(name, {}).get("estimated_loss"),
                       "truncation_error": result.errors.get(name)}
    return table


def write_allocation(folder: Path, result) -> None:
    table = allocation_table(result)
    summary = {"method": result.config.method, "allocation": result.config.allocation,
               "kept_fraction": result.kept_fraction, "modules": table}
    (folder / "allocation.json").write_text(json.dumps(summary, indent=1))
    plot_heatmap(table, folder / "allocation.png", f"{result.config.method}, {result.config.allocation}, "
                                                    f"kept {result.kept_fraction:.3f}")


def plot_heatmap(table: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays untouched
    import numpy as np

    parsed = [(int(m.group(1)), m.group(2), v["kept"]) for n, v in table.items()
              if (m := re.search(r"\.(\d+)\.(.+)$", n))]
    if not parsed:
        return
    blocks = max(b for b, _, _ in parsed) + 1
    kinds = list(dict.fromkeys(k for _, k, _ in parsed))
    grid = np.full((len(kinds), blocks), np.nan)
    for b, k, kept in parsed:
        grid[kinds.index(k), b] = kept
    fig = Figure(figsize=(max(6, blocks * 0.3), 1 + 0.4 * len(kinds)))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="kept fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
