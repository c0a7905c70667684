"""The Python API: compress(), save(), load(), evaluate(), zero_shot(), bench()."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .config import CompressConfig
from .errors import VaclmError


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: object | None


def load(source: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> Loaded:
    """Hub id, local folder, .gguf file, vaclm folder or "demo" -> (model, tokenizer) on `device`."""
    from .model.loading import load_model, resolve_device

    model, tokenizer = load_model(source, dtype=dtype, device=device)
    return Loaded(model.to(resolve_device(device)), tokenizer)


def calibration_ids(calib, tokenizer, config: CompressConfig) -> torch.Tensor:
    """`calib` as samples x seq_len token ids: a tensor passes through, text is tokenised and windowed."""
    from .data.text import calibration_windows, load_text, tokenize

    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise VaclmError("calibration ids must be a 2-D tensor (samples x seq_len) with seq_len >= 2")
        return ids
    ids = tokenize(tokenizer, load_text(str(calib), role="calibration"))
    return calibration_windows(ids, config.calib_samples, config.calib_seq_len, config.seed)[0]


def compress(model, config: CompressConfig | None = None, calib=None, *, tokenizer=None, ranks=None,
             device: str = "cpu", progress: bool = True, checkpoint_dir: str | Path | None = None,
             resume: bool = False, gradients: dict | None = None):
    """Compress `model` in place; returns a CompressionResult (ranks, errors, kept fraction).

    With `checkpoint_dir`, every finished block is saved there; `resume=True` continues a run
    that was killed, giving the same result as an uninterrupted one.
    """
    from .io.checkpoint import Checkpoint, fingerprint
    from .model.loading import resolve_device
    from .pipeline.compress import compress_model

    config = config or CompressConfig()
    if calib is None:
        raise VaclmError("compress needs calibration text: a file, a dataset name or a tensor of token ids")
    ids = calibration_ids(calib, tokenizer, config)
    checkpoint = None
    if checkpoint_dir is not None:
        model_id = f"{model.config.model_type}:{getattr(model.config, '_name_or_path', '')}:{model.num_parameters()}"
        checkpoint = Checkpoint(Path(checkpoint_dir), fingerprint(config.to_dict(), ids, model_id), resume)
    torch.manual_seed(config.seed)
    try:
        result = compress_model(model, config, ids, ranks=ranks, device=resolve_device(device), progress=progress,
                                checkpoint=checkpoint, gradients=gradients)
    except BaseException:
        if checkpoint is not None and checkpoint.is_empty():
            checkpoint.remove()  # nothing worth resuming: leave no trace of a run that failed at once
        raise
    if config.int8:
        quantize_int8(model)
    return result


def quantize_int8(model):
    """In place: the float factors become int8 with per-row scales (Int8LowRankLinear); returns model."""
    from .model.surgery import quantize_factors

    if not quantize_factors(model):
        raise VaclmError("the model has no float factors to quantise; compress it first (or it is already int8)")
    return model


def save(model, out: str | Path, tokenizer=None, result=None, overwrite: bool = False) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads after `import vaclm`."""
    from .io.report import write_allocation
    from .io.save import save_model

    return save_model(model, Path(out), tokenizer, overwrite=overwrite, report=result.to_dict() if result else None,
                      write_extra=(lambda folder: write_allocation(folder, result)) if result else None)


def evaluate(model, text, tokenizer=None, seq_len: int = 2048, max_windows: int | None = None,
             progress: bool = True) -> dict:
    """Perplexity of `model` on `text` (a file, a dataset name, or 1-D token ids)."""
    from .data.text import load_text, tokenize
    from .eval.perplexity import perplexity

    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, load_text(str(text), role="evaluation"))
    device = str(next(model.parameters()).device)
    return perplexity(model, ids.flatten(), seq_len=seq_len, max_windows=max_windows, device=device, progress=progress)


def zero_shot(model, tasks="piqa,winogrande", tokenizer=None, data_dir=None, limit: int | None = None,
              batch_size: int = 16, progress: bool = True) -> dict:
    """Zero-shot accuracy as lm-evaluation-harness scores it, from local files in `data_dir`
    (default $VACLM_DATA_DIR): {task: {acc, acc_stderr, [acc_norm, acc_norm_stderr], examples, ...}}."""
    from .eval.zeroshot import evaluate_tasks

    return evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                          progress=progress)


def bench(model, baseline=None, settings=None, progress: bool = True) -> dict:
    """Prefill and decode tokens/s and peak memory of `model` and `baseline` measured in one run,
    with their ratios (prefill_speedup, decode_speedup, ...: > 1 means `model` is faster)."""
    from .eval.speed import benchmark

    return benchmark(model, baseline, settings=settings, progress=progress)
