"""Checkpoints of a healing run: one safetensors file holding the trainable parameters, the best
parameters so far, the optimizer state and the RNG, with the rest of the state (step, scheduler,
loss history, data position) as JSON in its metadata. One file written to a temporary name and
renamed, so a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import VaclmError
from ..io.checkpoint import atomic_save

STATE_FILE = "heal_state.safetensors"
META_KEY = "vaclm_heal"


class HealCheckpoint:
    def __init__(self, folder: Path, run_id: str, resume: bool):
        self.folder = Path(folder)
        self.run_id = run_id
        self.path = self.folder / STATE_FILE
        if self.folder.exists() and not resume:
            raise VaclmError(f"an unfinished run left {self.folder}; pass --resume to continue it or delete the folder")
        if resume and self.path.exists():
            saved = self._read_meta().get("run_id")
            if saved != run_id:
                raise VaclmError(f"{self.folder} belongs to a healing run with other settings, models or data; "
                                 "resume with the same command, or delete the folder to start over")
        self.folder.mkdir(parents=True, exist_ok=True)

    def _read_meta(self) -> dict:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return json.loads(handle.metadata()[META_KEY])
        except Exception as exc:
            raise VaclmError(f"checkpoint {self.path} is unreadable ({type(exc).__name__}); delete {self.folder} "
                             "to start over") from exc

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, state) of the last checkpoint, or None when the run starts fresh."""
        if not self.path.exists():
            return None
        state = self._read_meta()
        with safe_open(str(self.path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return tensors, state

    def save(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        atomic_save(tensors, self.path, metadata={META_KEY: json.dumps({**state, "run_id": self.run_id})})

    def is_empty(self) -> bool:
        return not self.path.exists()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state dict as flat tensors `opt.<param index>.<key>` plus JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
