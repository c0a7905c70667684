"""Reading a target's dense weight and swapping modules in and out."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from dataclasses import dataclass

from .arch import ArchSpec, get_submodule, set_submodule, spec_for, target_names
from .int8_lowrank import Int8LowRankLinear
from .lowrank import LowRankLinear

FACTORISED = (LowRankLinear, Int8LowRankLinear)


@dataclass
class Targets:
    """The linear layers a model's compression touches, block by block, with their dense shapes."""

    spec: ArchSpec
    per_block: list[list[str]]
    modules: dict[str, nn.Module]
    shapes: dict[str, tuple[int, int]]  # (out, in)

    @classmethod
    def of(cls, model: nn.Module) -> "Targets":
        spec = spec_for(model.config.model_type)
        per_block = target_names(model, spec)
        modules = {n: get_submodule(model, n) for names in per_block for n in names}
        shapes = {n: tuple(dense_weight(m)[0].shape) for n, m in modules.items()}
        return cls(spec, per_block, modules, shapes)


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as out x in, bias) of an nn.Linear, a Conv1D or a (float or int8) LowRankLinear."""
    if isinstance(module, FACTORISED):
        return module.dense_weight(), module.up.bias
    if isinstance(module, Conv1D):
        return module.weight.T, module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    raise TypeError(f"cannot factorise a {type(module).__name__}")


def replace_with_lowrank(model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    old = get_submodule(model, name)
    weight, bias = dense_weight(old)
    out_f, in_f = weight.shape
    new = LowRankLinear(in_f, out_f, down.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(down.to(weight))
        new.up.weight.copy_(up.to(weight))
        if bias is not None:
            new.up.bias.copy_(bias)
    set_submodule(model, name, new)
    return new


def quantize_factors(model: nn.Module) -> dict[str, int]:
    """In place: every float LowRankLinear becomes an Int8LowRankLinear; returns their ranks."""
    names = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    with torch.no_grad():
        for name in names:
            set_submodule(model, name, Int8LowRankLinear.from_lowrank(get_submodule(model, name)))
    return names


def replace_with_dense(model: nn.Module, name: str, conv1d: bool) -> nn.Module:
    """Multiply a (float or int8) LowRankLinear back into the module type the architecture expects."""
    old = get_submodule(model, name)
    weight, bias = dense_weight(old)
    out_f, in_f = weight.shape
    with torch.no_grad():
        if conv1d:
            new = Conv1D(out_f, in_f).to(device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight.T)
            new.bias.copy_(bias if bias is not None else torch.zeros_like(new.bias))
        else:
            new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
    set_submodule(model, name, new)
    return new
