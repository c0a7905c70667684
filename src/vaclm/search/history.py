"""search.json (the whole search history) and search.png (fitness over generations) next to the model."""

from __future__ import annotations

import json
from pathlib import Path


def write_search(folder: Path, search: dict) -> None:
    (Path(folder) / "search.json").write_text(json.dumps(search, indent=1))
    plot_search(search["history"], Path(folder) / "search.png", search.get("title", "evolutionary search"))


def plot_search(history: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays untouched

    gens = [h["generation"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(gens, [h["fitness"] for h in history], marker=".")  # the parent after each generation
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness: KL to the dense model (nats/token)")
    ax.set_title(title, fontsize=9)
    if history and history[-1]["seconds"] > 0:  # wall time on a second axis
        top = ax.secondary_xaxis("top", functions=(_interp(gens, [h["seconds"] for h in history]),
                                                   _interp([h["seconds"] for h in history], gens)))
        top.set_xlabel("seconds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _interp(xs, ys):
    import numpy as np

    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs)
    return lambda v: np.interp(v, xs[order], ys[order])
