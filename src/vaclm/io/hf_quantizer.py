"""Registers quant_method "vaclm" with transformers, so a saved folder loads with plain
`AutoModelForCausalLM.from_pretrained(folder)` after `import vaclm`: before the weights load, the
listed modules become LowRankLinear (Int8LowRankLinear when "int8" is set) of the saved ranks.
No trust_remote_code, no pickle.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .validate import FORMAT_VERSION, check_tensors, tensor_meta

QUANT_METHOD = "vaclm"


class VaclmConfig(QuantizationConfigMixin):
    """config.json's quantization_config: {"quant_method": "vaclm", "version", "ranks", "int8"}."""

    def __init__(self, ranks: dict[str, int] | None = None, version: int = FORMAT_VERSION, int8: bool = False, **kwargs):
        self.quant_method = QUANT_METHOD
        self.version = version
        self.ranks = dict(ranks or {})
        self.int8 = int8  # validated with the tensors: a non-bool here is a damaged config

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "version": self.version, "ranks": dict(self.ranks), "int8": self.int8}


class VaclmQuantizer(HfQuantizer):
    requires_calibration = True  # a dense model cannot be "loaded compressed": run `vaclm compress`

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..model.arch import get_submodule, set_submodule
        from ..model.int8_lowrank import Int8LowRankLinear
        from ..model.lowrank import LowRankLinear
        from ..model.surgery import dense_weight

        if checkpoint_files:
            files = [Path(f) for f in checkpoint_files if str(f).endswith(".safetensors")]
            check_tensors(self.quantization_config.to_dict(), tensor_meta(files), str(Path(files[0]).parent))
        kind = Int8LowRankLinear if self.quantization_config.int8 else LowRankLinear
        for name, rank in self.quantization_config.ranks.items():
            weight, bias = dense_weight(get_submodule(model, name))
            out_f, in_f = weight.shape
            set_submodule(model, name, kind(in_f, out_f, rank, bias is not None, device=weight.device, dtype=weight.dtype))
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True


def register() -> None:
    """Idempotent: importing vaclm twice (or reloading) must not raise."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(VaclmConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(VaclmQuantizer)


register()
