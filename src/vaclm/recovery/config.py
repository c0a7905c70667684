"""HealConfig: frozen, validated, versioned settings of a distillation healing run.

Validation happens on construction, so a bad learning rate fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import VaclmError
from ..options import option, unpack_versioned

HEAL_CONFIG_VERSION = 2
# removed, and dropped from version-1 reports: the hidden-state loss and trained norms measured no
# better than the defaults (docs/results.md, healing pilots); train_bias was never measured, and the
# Llama-family models benchmarked have no biases to train
REMOVED_IN_V2 = ("hidden_weight", "hidden_layers", "train_norms", "train_bias")


@dataclass(frozen=True)
class HealConfig:
    """How to distil a dense teacher back into a compressed student's factors.

    Defaults are tuned for a tiny CPU budget (about 150k tokens of text): a short warm-up, then
    a cosine decay over a few dozen optimizer steps (README, bench/heal.py).
    """

    tokens: int = option(150_000, "training tokens, taken as ceil(TOKENS / seq-len) windows of the text")
    seq_len: int = option(512, "tokens per training window")
    batch_size: int = option(1, "sequences per forward pass")
    grad_accum: int = option(4, "forward passes per optimizer step")
    epochs: int = option(1, "passes over the training windows")
    lr: float = option(3e-4, "peak AdamW learning rate")
    warmup: float = option(0.05, "fraction of the optimizer steps with a linear warm-up")
    min_lr_ratio: float = option(0.1, "the cosine decays to lr x this")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    temperature: float = option(1.0, "KL(teacher || student) of softmax(logits / T), times T^2")
    # it also fits the student to the training text's domain, which the teacher is not
    ce_weight: float = option(0.0, "add the student's next-token cross-entropy on the training text, times this, "
                                   "to the KL (0: pure distillation)")
    # API only: on a compressed model it measured no better than the defaults; what it is for is
    # vaclm.heal on a dense model (which `vaclm heal` refuses), the same-recipe fine-tune that
    # separates recovery from adaptation to the training text (docs/results.md)
    train_dense: bool = option(False, "also train the decoder matrices kept dense (on a dense model: fine-tune it by "
                                      "the same recipe)", cli=False)
    # whitened methods leave `down` tiny and `up` huge, and one AdamW learning rate then diverges
    # on one and stalls on the other
    balance: bool = option(True, "rebalance each factor pair before training (same product, better conditioned)")
    val_tokens: int = option(8192, "held-out validation tokens for early stopping (0: no validation)")
    eval_every: int = option(0, "optimizer steps between validations (0: about 8 per run)")
    patience: int = option(3, "validations without improvement before stopping")
    checkpoint_every: int = option(20, "optimizer steps between checkpoints")
    kl_chunk: int = option(256, "tokens whose full-vocabulary logits exist at once (bounds memory)", cli=False)
    gradient_checkpointing: bool = option(False, "recompute block activations (less memory, slower)")
    seed: int = option(0, "seed of the training windows' order")

    def __post_init__(self):
        positive = ("tokens", "seq_len", "batch_size", "grad_accum", "epochs", "patience", "checkpoint_every", "kl_chunk")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise VaclmError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("val_tokens", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise VaclmError(f"{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise VaclmError(f"seq-len must be >= 2, got {self.seq_len}")
        if not (0 < self.lr < 1):
            raise VaclmError(f"lr must be in (0, 1), got {self.lr} (e.g. --lr 3e-4)")
        if not (0 <= self.warmup < 1):
            raise VaclmError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise VaclmError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.temperature > 0):
            raise VaclmError(f"temperature must be > 0, got {self.temperature}")
        for name in ("weight_decay", "max_grad_norm", "ce_weight"):
            if not (getattr(self, name) >= 0):
                raise VaclmError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {"type": "HealConfig", "version": HEAL_CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "HealConfig":
        data, version = unpack_versioned(data, "HealConfig", HEAL_CONFIG_VERSION)
        if version < 2:
            for name in REMOVED_IN_V2:
                data.pop(name, None)
        return cls(**data)
