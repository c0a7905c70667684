"""vaclm: structured low-rank compression of Hugging Face causal LMs.

`import vaclm` registers the "vaclm" quantization method with transformers, so saved folders load
with plain `AutoModelForCausalLM.from_pretrained`. Nothing else heavy happens at import: the
pipeline, methods and loaders are imported on first use.
"""

from .config import CompressConfig, SearchOptions
from .errors import VaclmError
from .recovery.config import HealConfig
from .io import hf_quantizer as _hf_quantizer  # noqa: F401  (registers the quantizer)

__version__ = "0.1.0"
_API = ("compress", "heal", "save", "load", "evaluate", "quantize_int8", "zero_shot", "bench")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vaclm' has no attribute {name!r}")


__all__ = ["CompressConfig", "HealConfig", "SearchOptions", "VaclmError", *_API]
