"""Registers quant_method "vaclm" with transformers, so a saved folder loads with plain
`AutoModelForCausalLM.from_pretrained(folder)`: before the weights load, the listed modules become
LowRankLinear (Int8LowRankLinear when "int8" is set) of the saved ranks. No trust_remote_code, no pickle.

`import vaclm` registers it; so does vaclm-hook.pth (src/_vaclm_hook.py) in any process that imports
transformers' quantizers, so lm-eval, vLLM or a script that never imports vaclm load the folder too.
A version 2 folder also carries WEIGHTS_MARKER as config.json's "transformers_weights": the quantizer
removes it before transformers looks for the weights file, and without vaclm transformers refuses it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import transformers.quantizers.auto  # noqa: F401  (register() below uses it)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import VaclmError
from .validate import FORMAT_VERSION, check_tensors, is_weights_marker, tensor_meta

QUANT_METHOD = "vaclm"


class VaclmConfig(QuantizationConfigMixin):
    """config.json's quantization_config: {"quant_method": "vaclm", "version", "ranks", "int8"}."""

    def __init__(self, ranks: dict[str, int] | None = None, version: int = FORMAT_VERSION, int8: bool = False,
                 keep: float | None = None, pruned: dict[str, list[int]] | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.version = version
        self.ranks = dict(ranks or {})
        # format 3: MLP projections narrowed by pruning, {module: [out, in]}: smaller dense nn.Linear layers
        self.pruned = {k: list(v) for k, v in (pruned or {}).items()}
        self.int8 = int8  # validated with the tensors: a non-bool here is a damaged config
        # a loading option, never saved: an elastic folder (docs/elastic.md) loaded at this keep, as in
        # from_pretrained(folder, quantization_config=VaclmConfig(keep=0.7))
        self.keep = keep

    def to_dict(self) -> dict:
        data = {"quant_method": QUANT_METHOD, "version": self.version, "ranks": dict(self.ranks), "int8": self.int8}
        return {**data, "pruned": dict(self.pruned)} if self.pruned else data


def release_weights(config) -> None:
    """Drop the version 2 marker so transformers reads the standard weights file."""
    if is_weights_marker(getattr(config, "transformers_weights", None)):
        del config.transformers_weights


class VaclmQuantizer(HfQuantizer):
    requires_calibration = True  # a dense model cannot be "loaded compressed": run `vaclm compress`

    # transformers passes the model config to one of these between reading the quantization config and
    # looking for the weights file (update_tp_plan and update_ep_plan in 5.0 to 5.18, also
    # update_attn_implementation from 5.19): each takes the marker out, so the standard file is found.
    def update_tp_plan(self, config):
        release_weights(config)
        return getattr(super(), "update_tp_plan", lambda c: c)(config)

    def update_ep_plan(self, config):
        release_weights(config)
        return getattr(super(), "update_ep_plan", lambda c: c)(config)

    def update_attn_implementation(self, config):
        release_weights(config)
        return getattr(super(), "update_attn_implementation", lambda c: c)(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..model.arch import get_submodule, set_submodule
        from ..model.int8_lowrank import Int8LowRankLinear
        from ..model.lowrank import LowRankLinear
        from ..model.surgery import dense_weight

        files = [Path(f) for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        if not files:  # never load unchecked factors: a damaged folder would give random layers
            raise VaclmError("cannot check this vaclm folder: transformers passed no .safetensors checkpoint files to "
                             "the vaclm quantizer; load it with vaclm.load(folder) or upgrade transformers")
        check_tensors(self.quantization_config.to_dict(), tensor_meta(files), str(files[0].parent))
        self._elastic = None
        if self.quantization_config.keep is not None:  # checked before any weight is read
            from .resize import plan_resize

            _, top, ranks, _ = plan_resize(files[0].parent, self.quantization_config.keep)
            self._elastic = (files[0].parent, top, ranks)
        from ..model.pruned import empty_linear_like

        for name, shape in getattr(self.quantization_config, "pruned", {}).items():
            set_submodule(model, name, empty_linear_like(shape, get_submodule(model, name)))
        kind = Int8LowRankLinear if self.quantization_config.int8 else LowRankLinear
        for name, rank in self.quantization_config.ranks.items():
            weight, bias = dense_weight(get_submodule(model, name))
            out_f, in_f = weight.shape
            set_submodule(model, name, kind(in_f, out_f, rank, bias is not None, device=weight.device, dtype=weight.dtype))
            # the checked checkpoint holds every factor: the parent's own weight initialisation (e.g.
            # GPT-2's, which writes `c_proj.weight` when another key is missing) has nothing to do
            parent = get_submodule(model, name.rpartition(".")[0])
            if not any(True for _ in parent.parameters(recurse=False)) and not any(True for _ in parent.buffers(recurse=False)):
                parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """An elastic load: the top size's factors, loaded by transformers, cut to the asked keep."""
        if getattr(self, "_elastic", None) is not None:
            from .resize import resize_model

            folder, top, ranks = self._elastic
            resize_model(model, folder, top, ranks)
            # what the model now is: saving it writes an ordinary folder at this keep
            self.quantization_config.ranks = {n: r for n, r in ranks.items() if r is not None}
            self.quantization_config.keep = None
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True


def register() -> None:
    """Idempotent: importing vaclm twice (or reloading either module) must not raise."""
    auto = importlib.import_module("transformers.quantizers.auto")  # the current one: a reload makes new mappings

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(VaclmConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(VaclmQuantizer)
    merge = auto.AutoHfQuantizer.merge_quantization_configs
    if not getattr(merge, "vaclm_keep", False):
        auto.AutoHfQuantizer.merge_quantization_configs = classmethod(_keep_from_args(merge))


def _keep_from_args(merge):
    """transformers keeps a folder's own quantization_config over one passed to from_pretrained; for
    vaclm the passed one's `keep` (a loading option) is carried over, anything else defers to `merge`."""

    def merged(cls, from_folder, from_args):
        folder = from_folder.to_dict() if isinstance(from_folder, VaclmConfig) else from_folder
        if isinstance(from_args, VaclmConfig) and isinstance(folder, dict) and folder.get("quant_method") == QUANT_METHOD:
            config = VaclmConfig(**{k: v for k, v in folder.items() if k != "keep"})
            config.keep = from_args.keep
            return config
        return merge(from_folder, from_args)

    merged.vaclm_keep = True
    return merged


register()
