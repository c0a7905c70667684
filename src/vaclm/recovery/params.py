"""Which parameters healing trains: the low-rank factors (and optionally the decoder matrices kept
dense); the rest is frozen, so neither gradients nor optimizer state are kept for it."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import VaclmError
from ..linalg.balance import balanced_factors
from ..model.arch import spec_for, target_names
from ..model.lowrank import LowRankLinear


def trainable_parameters(model: nn.Module, train_dense: bool) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything healing updates, in a fixed order (the optimizer's order)."""
    chosen: dict[str, nn.Parameter] = {}
    dense_targets = set(dense_target_names(model)) if train_dense else set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            chosen[f"{name}.down.weight"] = module.down.weight
            chosen[f"{name}.up.weight"] = module.up.weight
        elif name in dense_targets:
            for pname, p in module.named_parameters(recurse=False):
                chosen[f"{name}.{pname}"] = p
    # a dense model with --train-dense is the same recipe as a fine-tune: the reference that shows
    # how much of a healed model's gain is adaptation to the training text rather than recovery
    if not chosen:
        raise VaclmError("the model has no factorised layers to heal; compress it first with `vaclm compress` "
                         "(or set train_dense to fine-tune the dense matrices with the same recipe)")
    return chosen


def dense_target_names(model: nn.Module) -> list[str]:
    """Decoder matrices the architecture would factorise but the allocator kept dense."""
    spec = spec_for(model.config.model_type)
    return [n for block in target_names(model, spec) for n in block
            if not isinstance(model.get_submodule(n), LowRankLinear)]


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, bool]:
    """Set requires_grad on exactly `trainable`; returns the previous flags for `restore_flags`."""
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return previous


def restore_flags(model: nn.Module, previous: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(previous.get(name, True))


@torch.no_grad()
def balance_factors(model: nn.Module) -> None:
    """Rebalance every LowRankLinear in place (same product; see linalg/balance.py)."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            up, down = balanced_factors(module.up.weight, module.down.weight)
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
