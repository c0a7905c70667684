"""Per-block checkpoints of a compression run, so a killed run resumes where it stopped.

Layout of the checkpoint folder (`<out>.partial` by default):
    state.json            fingerprint of the run, ranks, allocation table, completed blocks
    gradients.json        index of the gradient statistics (recomputing them costs minutes) ...
    gradients-<k>.safetensors  ... in files of about 256 MiB
    block-<i>.safetensors factors of block i, written when block i is done
Every file is written to a temporary name and renamed, and state.json is updated only after the
block file is in place, so a kill at any moment leaves a consistent checkpoint. Resuming
re-applies the saved factors in the same order and recomputes the propagated inputs, which on
the same machine gives bitwise the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import VaclmError
from ..linalg.stats import GradientStats


def fingerprint(config_dict: dict, calib: torch.Tensor, model_id: str) -> str:
    h = hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode())
    h.update(calib.contiguous().numpy().tobytes())
    h.update(model_id.encode())
    return h.hexdigest()


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


_FIELDS = ("sq_sum", "cov", "fisher_rows", "fisher_cols")


GRADIENT_FILE_BYTES = 256 * 2**20


def save_gradients(folder: Path, stats: dict[str, GradientStats], first_file: int = 0) -> dict[str, str]:
    """Write gradient statistics as safetensors files of about 256 MiB; returns layer -> file.

    Small files bound the host memory a group on the GPU passes through on its way to disk (and
    older safetensors releases copy a whole file's tensors to bytes before writing it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    where, current, size, index = {}, {}, 0, first_file

    def flush():
        nonlocal current, size, index
        name = f"gradients-{index:04d}.safetensors"
        atomic_save({f"{n}.{f}": t for n, ts in current.items() for f, t in ts.items()}, folder / name)
        where.update({n: name for n in current})
        current, size, index = {}, 0, index + 1

    for name, s in stats.items():
        tensors = {f: getattr(s, f) for f in _FIELDS if getattr(s, f) is not None}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if current and size + nbytes > GRADIENT_FILE_BYTES:
            flush()
        current[name] = tensors
        size += nbytes
    if current:
        flush()
    return where


def write_gradient_index(folder: Path, stats_meta: dict[str, list], where: dict[str, str]) -> None:
    """Written last: the files it names are complete."""
    atomic_write_json(folder / "gradients.json", {"stats": stats_meta, "files": where})


def gradient_meta(s: GradientStats) -> list:
    return [s.out_dim, s.in_dim, s.tokens, s.samples, s.fisher_scale, [f for f in _FIELDS if getattr(s, f) is not None]]


def has_gradients(folder: Path) -> bool:
    return (folder / "gradients.json").exists()


class GradientFiles(Mapping):
    """Gradient statistics on disk, read one layer at a time when asked for (nothing is cached):
    the whole set, float64 covariances of every layer, may be far larger than memory (118 GB for
    an 8B model), while a block walk needs one layer's at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "gradients.json").read_text())
        self.meta, self.files = index["stats"], index["files"]

    def __getitem__(self, name: str) -> GradientStats:
        from safetensors import safe_open

        out_dim, in_dim, tokens, samples, fisher_scale, _ = self.meta[name]
        with safe_open(str(self.folder / self.files[name]), framework="pt") as handle:
            keys = set(handle.keys())
            s = GradientStats(out_dim, in_dim, cov=f"{name}.cov" in keys, fisher=f"{name}.fisher_rows" in keys,
                              device="meta")
            for field in _FIELDS:
                setattr(s, field, handle.get_tensor(f"{name}.{field}") if f"{name}.{field}" in keys else None)
        s.tokens, s.samples, s.fisher_scale = tokens, samples, fisher_scale
        return s

    def __iter__(self):
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.meta[name][:2])

    def has(self, field: str) -> bool:
        """Every layer holds `field` ("cov", "fisher_rows", ...)."""
        return all(field in m[5] for m in self.meta.values())


def load_gradients(folder: Path) -> dict[str, GradientStats]:
    """Every layer's statistics in memory."""
    files = GradientFiles(folder)
    return {name: files[name] for name in files}


def save_all_gradients(folder: Path, stats: dict[str, GradientStats]) -> None:
    write_gradient_index(folder, {n: gradient_meta(s) for n, s in stats.items()}, save_gradients(folder, stats))


class Checkpoint:
    def __init__(self, folder: Path, run_id: str, resume: bool):
        self.folder = Path(folder)
        state_file = self.folder / "state.json"
        if self.folder.exists() and not resume:
            raise VaclmError(f"an unfinished run left {self.folder}; pass --resume to continue it or delete the folder")
        if resume and state_file.exists():
            self.state = json.loads(state_file.read_text())
            if self.state.get("run_id") != run_id:
                raise VaclmError(f"{self.folder} belongs to a run with other settings or data; "
                                 "resume with the same command, or delete the folder to start over")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.state = {"run_id": run_id, "completed": [], "errors": {}}
            self._save_state()

    def _save_state(self) -> None:
        atomic_write_json(self.folder / "state.json", self.state)

    # ranks -------------------------------------------------------------------------------------
    def plan(self) -> tuple[dict, dict] | None:
        """Ranks and allocation table, as saved."""
        if "ranks" not in self.state:
            return None
        return self.state["ranks"], self.state.get("allocation", {})

    def save_plan(self, ranks: dict, allocation: dict) -> None:
        self.state["ranks"], self.state["allocation"] = ranks, allocation
        self._save_state()

    # gradient statistics -----------------------------------------------------------------------
    def gradients(self) -> GradientFiles | None:
        """The saved statistics, read from disk layer by layer as they are used."""
        return GradientFiles(self.folder) if has_gradients(self.folder) else None

    def gradient_writer(self):
        """`add(group)` writes one group of layers' statistics (and lets them go); `finish()` indexes them."""
        return _GradientWriter(self.folder)

    def save_gradients(self, stats: dict[str, GradientStats]) -> None:
        save_all_gradients(self.folder, stats)

    # blocks ------------------------------------------------------------------------------------
    @property
    def completed(self) -> set[int]:
        return set(self.state["completed"])

    def save_block(self, block: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], errors: dict) -> None:
        tensors = {}
        for name, (up, down) in factors.items():
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up, down
        atomic_save(tensors, self.folder / f"block-{block}.safetensors")
        self.state["completed"].append(block)
        self.state["errors"].update(errors)
        self._save_state()

    def load_block(self, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        tensors = load_file(str(self.folder / f"block-{block}.safetensors"))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        return {n: (tensors[f"{n}.up"], tensors[f"{n}.down"]) for n in names}

    def is_empty(self) -> bool:
        return not self.state["completed"] and not has_gradients(self.folder)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _GradientWriter:
    def __init__(self, folder: Path):
        self.folder, self.meta, self.where = folder, {}, {}

    def add(self, stats: dict[str, GradientStats]) -> None:
        self.where.update(save_gradients(self.folder, stats, first_file=len(set(self.where.values()))))
        self.meta.update({n: gradient_meta(s) for n, s in stats.items()})

    def finish(self) -> None:
        write_gradient_index(self.folder, self.meta, self.where)
