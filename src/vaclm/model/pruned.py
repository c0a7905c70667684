"""The gated MLPs of a model as prunable units, and the surgery that narrows one.

A gated MLP (Llama family: down(act(gate x) * up x)) pruned to width w keeps w rows of gate_proj
and up_proj and the matching w columns of down_proj: three smaller dense nn.Linear layers, an
ordinary architecture with per-layer widths. A pruned layer is recognised by its shape alone:
`pruned_shapes` compares every MLP weight with the width in the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import VaclmError
from .arch import get_submodule, set_submodule, spec_for

GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
PRUNABLE_FAMILIES = ("llama-like",)


@dataclass(frozen=True)
class GatedMLP:
    prefix: str  # e.g. "model.layers.3.mlp"
    block: int

    @property
    def gate(self) -> str:
        return f"{self.prefix}.gate_proj"

    @property
    def up(self) -> str:
        return f"{self.prefix}.up_proj"

    @property
    def down(self) -> str:
        return f"{self.prefix}.down_proj"

    @property
    def names(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down


def gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """One GatedMLP per decoder block; a one-line error for architectures without gate/up/down."""
    spec = spec_for(model.config.model_type)
    if spec.family not in PRUNABLE_FAMILIES or not {GATE, UP, DOWN} <= set(spec.targets):
        raise VaclmError(f"--structure prune/mixed needs a gated MLP with separate gate_proj/up_proj/down_proj "
                         f"(Llama family); {model.config.model_type} has none: use --structure lowrank")
    blocks = get_submodule(model, spec.blocks)
    return [GatedMLP(f"{spec.blocks}.{i}.mlp", i) for i in range(len(blocks))]


def full_width(config) -> int:
    return int(config.intermediate_size)


def pruned_shapes(model: nn.Module) -> dict[str, list[int]]:
    """{module: [out, in]} of every MLP projection narrower than the config's intermediate size."""
    try:
        spec = spec_for(model.config.model_type)
    except VaclmError:
        return {}
    if spec.family not in PRUNABLE_FAMILIES:
        return {}
    width = full_width(model.config)
    shapes = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.endswith((".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")):
            inner = module.weight.shape[1] if name.endswith("down_proj") else module.weight.shape[0]
            if inner != width:
                shapes[name] = list(module.weight.shape)
    return shapes


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def narrow_mlp(model: nn.Module, mlp: GatedMLP, kept: torch.Tensor, down_weight: torch.Tensor) -> None:
    """In place: keep neurons `kept` (sorted indices) of `mlp`, with `down_weight` (out x len(kept))."""
    gate, up, down = (get_submodule(model, n) for n in mlp.names)
    for name, layer in ((mlp.gate, gate), (mlp.up, up)):
        rows = kept.to(layer.weight.device)
        set_submodule(model, name, _linear(layer.weight[rows], None if layer.bias is None else layer.bias[rows]))
    set_submodule(model, mlp.down, _linear(down_weight.to(down.weight), down.bias))


def empty_linear_like(shape: list[int], like: nn.Module) -> nn.Linear:
    """An nn.Linear of weight shape [out, in] on `like`'s device and dtype (for loading saved weights)."""
    weight = like.weight
    return nn.Linear(shape[1], shape[0], bias=like.bias is not None, device=weight.device, dtype=weight.dtype)
