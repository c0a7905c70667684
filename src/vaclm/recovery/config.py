"""HealConfig: frozen, validated, versioned settings of a distillation healing run.

Validation happens on construction, so a bad learning rate fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import VaclmError

HEAL_CONFIG_VERSION = 1


@dataclass(frozen=True)
class HealConfig:
    """How to distil a dense teacher back into a compressed student's factors.

    Defaults are tuned for a tiny CPU budget (about 150k tokens of text): a short warm-up, then
    a cosine decay over a few dozen optimizer steps (README, bench/heal.py).
    """

    tokens: int = 150_000  # training tokens, taken as ceil(tokens / seq_len) windows of the calibration text
    seq_len: int = 512
    batch_size: int = 1  # sequences per forward pass
    grad_accum: int = 4  # forward passes per optimizer step
    epochs: int = 1
    lr: float = 3e-4
    warmup: float = 0.05  # fraction of the optimizer steps with a linear warm-up
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    temperature: float = 1.0  # KL(teacher || student) of softmax(logits / T), times T^2
    hidden_weight: float = 0.0  # weight of the normalised MSE between chosen hidden states (0: off)
    # weight of the student's next-token cross-entropy on the training text, added to the KL (0: pure
    # distillation). It also fits the student to the training text's domain, which the teacher is not.
    ce_weight: float = 0.0
    hidden_layers: tuple[int, ...] | None = None  # indices into hidden_states (0 = embeddings); None: every block output
    train_norms: bool = False  # also train the normalisation layers' weights
    train_bias: bool = False  # also train the biases the factorised layers carry
    train_dense: bool = False  # also train the decoder matrices the allocator kept dense (weights and biases)
    # rebalance each factor pair first (same product): whitened methods leave `down` tiny and `up`
    # huge, and one AdamW learning rate then diverges on one and stalls on the other
    balance: bool = True
    val_tokens: int = 8192  # held-out windows for validation and early stopping (0: none)
    eval_every: int = 0  # optimizer steps between validations; 0: about 8 per run
    patience: int = 3  # validations without improvement before stopping
    checkpoint_every: int = 20  # optimizer steps between checkpoints (when a checkpoint folder is given)
    kl_chunk: int = 256  # tokens whose full-vocabulary logits exist at once (bounds memory)
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass
    seed: int = 0

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
        for name in ("weight_decay", "max_grad_norm", "hidden_weight", "ce_weight"):
            if not (getattr(self, name) >= 0):
                raise VaclmError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.hidden_layers is not None:
            layers = tuple(self.hidden_layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
                raise VaclmError(f"hidden layers must be non-negative integers, got {self.hidden_layers!r}")
            object.__setattr__(self, "hidden_layers", layers)  # JSON gives a list; keep the dataclass hashable

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["hidden_layers"] = list(self.hidden_layers) if self.hidden_layers is not None else None
        return {"type": "HealConfig", "version": HEAL_CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "HealConfig":
        data = dict(data)
        if data.pop("type", "HealConfig") != "HealConfig":
            raise VaclmError("not a HealConfig dictionary")
        version = data.pop("version", HEAL_CONFIG_VERSION)
        if version > HEAL_CONFIG_VERSION:
            raise VaclmError(f"heal config version {version} is newer than this vaclm ({HEAL_CONFIG_VERSION}); upgrade vaclm")
        return cls(**data)
