"""Per-block checkpoints of a compression run, so a killed run resumes where it stopped.

Layout of the checkpoint folder (`<out>.partial` by default):
    state.json            fingerprint of the run, ranks, allocation table, completed blocks
    gradients.safetensors gradient statistics (recomputing them costs minutes)
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


def save_gradients(path: Path, stats: dict[str, GradientStats]) -> None:
    """Gradient statistics as safetensors; shapes and counts in the metadata."""
    tensors = {f"{n}.{f}": getattr(s, f) for n, s in stats.items() for f in _FIELDS if getattr(s, f) is not None}
    meta = {n: [s.out_dim, s.in_dim, s.tokens, s.samples, s.fisher_scale] for n, s in stats.items()}
    atomic_save(tensors, path, metadata={"vaclm_gradients": json.dumps(meta)})


def load_gradients(path: Path) -> dict[str, GradientStats]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["vaclm_gradients"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    stats = {}
    for name, (out_dim, in_dim, tokens, samples, fisher_scale) in meta.items():
        s = GradientStats(out_dim, in_dim, cov=f"{name}.cov" in tensors, fisher=f"{name}.fisher_rows" in tensors)
        for field in _FIELDS:
            if f"{name}.{field}" in tensors:
                setattr(s, field, tensors[f"{name}.{field}"])
        s.tokens, s.samples, s.fisher_scale = tokens, samples, fisher_scale
        stats[name] = s
    return stats


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
    def gradients(self) -> dict[str, GradientStats] | None:
        path = self.folder / "gradients.safetensors"
        return load_gradients(path) if path.exists() else None

    def save_gradients(self, stats: dict[str, GradientStats]) -> None:
        save_gradients(self.folder / "gradients.safetensors", stats)

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
        return not self.state["completed"] and not (self.folder / "gradients.safetensors").exists()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
