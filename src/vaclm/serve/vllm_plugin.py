"""vLLM entry point (`vllm.general_plugins`): registers quantization method "vaclm".

vLLM calls `register()` in every process it starts (engine, workers), so `vllm serve FOLDER` and
`vllm.LLM(FOLDER)` read a vaclm folder's `quantization_config` and build its layers with
serve/vllm_layers.py. This module imports nothing from vLLM itself, so it is safe to import anywhere.
"""


def register() -> None:
    from . import vllm_layers  # noqa: F401  (registration happens at import)
