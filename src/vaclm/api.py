"""The Python API: compress(), heal(), save(), load(), evaluate(), zero_shot(), bench()."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .config import CompressConfig
from .errors import VaclmError


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: object | None


def load(source: str, dtype: str | torch.dtype = "auto", device: str = "cpu", keep: float | None = None) -> Loaded:
    """Hub id, local folder, .gguf file, vaclm folder or "demo" -> (model, tokenizer) on `device`.

    `keep`: an elastic folder (`vaclm compress --elastic`) at that kept fraction, between its smallest
    ranks and its top size (docs/elastic.md); the same model `vaclm resize --keep` writes."""
    from .io.loading import load_model, resolve_device

    model, tokenizer = load_model(source, dtype=dtype, device=device, keep=keep)
    return Loaded(model.to(resolve_device(device)), tokenizer)


def calibration_ids(calib, tokenizer, config: CompressConfig) -> torch.Tensor:
    """`calib` as samples x seq_len token ids: a tensor passes through, text is tokenised and windowed."""
    from .data.text import calibration_windows

    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise VaclmError("calibration ids must be a 2-D tensor (samples x seq_len) with seq_len >= 2")
        return ids
    ids = token_stream(calib, tokenizer, "calibration")
    return calibration_windows(ids, config.calib_samples, config.calib_seq_len, config.seed)[0]


def model_identity(model) -> str:
    """What a checkpoint's fingerprint knows of the model it belongs to."""
    return f"{model.config.model_type}:{getattr(model.config, '_name_or_path', '')}:{model.num_parameters()}"


def token_stream(source, tokenizer, role: str) -> torch.Tensor:
    """1-D token ids of `source`: a tensor passes through, text (file, folder, keyword) is tokenised."""
    from .data.text import load_text, tokenize

    return source.long() if isinstance(source, torch.Tensor) else tokenize(tokenizer, load_text(str(source), role=role))


def data_roles(calib, fitness, eval_text, tokenizer, config: CompressConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration windows, fitness windows or None), with the three roles checked apart.

    Fitness data feeds only `--allocation evolve`: by default the windows of the calibration text
    that were not drawn for calibration; a separate `fitness` text or tensor must not overlap the
    calibration windows. `eval_text`, the text results will be reported on, is refused if it
    overlaps either.
    """
    from .data.roles import check_disjoint, fitness_split
    from .pipeline.compress import allocation_class

    evolve = allocation_class(config.allocation).uses_fitness
    if fitness is not None and not evolve:
        raise VaclmError("fitness data is used only by --allocation evolve; leave it out or choose that allocation")
    fitness_tokens = config.search.fitness_tokens[-1]
    split_fitness = evolve and fitness is None
    if split_fitness and isinstance(calib, torch.Tensor):
        raise VaclmError("with calibration token ids, pass fitness token ids too (held out from calibration)")
    if split_fitness:  # held-out windows of the same tiling: disjoint by position
        stream = token_stream(calib, tokenizer, "calibration")
        ids, fit = fitness_split(stream, config.calib_samples, config.calib_seq_len, config.seed, fitness_tokens,
                                 extra_tokens=fitness_tokens)  # as many again, held out to pick the result
    else:
        ids, fit = calibration_ids(calib, tokenizer, config), None
    if fitness is not None:
        fit = fitness.long() if isinstance(fitness, torch.Tensor) else token_stream(fitness, tokenizer, "calibration")
        if fit.dim() == 1:
            seq = config.calib_seq_len
            n = min(fit.numel() // seq, 2 * -(-fitness_tokens // seq))  # search + held-out selection
            fit = fit[: n * seq].view(n, seq)
        check_disjoint({"calibration": ids, "fitness": fit})
    if eval_text is not None:
        check_disjoint({"calibration": ids, "fitness": fit, "evaluation": token_stream(eval_text, tokenizer, "evaluation")})
    return ids, fit


def compress(model, config: CompressConfig | None = None, calib=None, *, tokenizer=None, ranks=None,
             device: str = "cpu", progress: bool = True, checkpoint_dir: str | Path | None = None,
             resume: bool = False, gradients: dict | None = None, fitness=None, eval_text=None,
             workers: int | str | None = None):
    """Compress `model` in place; returns a CompressionResult (ranks, errors, kept fraction).

    With `checkpoint_dir`, every finished block is saved there; `resume=True` continues a run
    that was killed, giving the same result as an uninterrupted one.
    The three data roles are separate arguments: `calib` (statistics), `fitness` (what
    `allocation="evolve"` scores candidates on; default: held-out windows of `calib`) and
    `eval_text` (optional: the text results will be reported on, refused if it overlaps the other
    two). `workers`: score the search's offspring on Ray workers (a number, or a cluster address).
    """
    from .io.checkpoint import Checkpoint, fingerprint
    from .io.loading import resolve_device
    from .pipeline.compress import allocation_class, compress_model

    config = config or CompressConfig()
    if calib is None:
        raise VaclmError("compress needs calibration text: a file, 'wikitext2' (bundled), a dataset name or a tensor "
                         "of token ids")
    if ranks is not None and allocation_class(config.allocation).uses_fitness:
        raise VaclmError("given ranks leave nothing to search; drop them or choose another allocation")
    ids, fit = data_roles(calib, fitness, eval_text, tokenizer, config)
    checkpoint = None
    if checkpoint_dir is not None:
        data = ids if fit is None else torch.cat([ids.flatten(), fit.flatten()])
        run_config = {**config.to_dict(), "memory_budget": None}  # a resumed run may use another budget
        checkpoint = Checkpoint(Path(checkpoint_dir), fingerprint(run_config, data, model_identity(model)), resume)
    torch.manual_seed(config.seed)
    try:
        result = compress_model(model, config, ids, ranks=ranks, fitness=fit, device=resolve_device(device),
                                progress=progress, checkpoint=checkpoint, gradients=gradients, workers=workers)
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
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads after `import vaclm`.

    `result` is a compression result (allocation report) or a heal result (heal_report.json).
    """
    from .io.report import write_allocation
    from .io.save import save_model
    from .recovery.heal import HealResult
    from .search.history import write_search

    def extra(folder):
        write_allocation(folder, result)
        if getattr(result, "elastic", None) is not None:  # --elastic: elastic/ (io/elastic.py)
            from .io.elastic import write_elastic
            from .io.save import int8_flag

            write_elastic(folder, result.elastic, result.spare, int8_flag(model))
        if getattr(result, "search", None):  # --allocation evolve: search.json and search.png
            write_search(folder, result.search)

    if isinstance(result, HealResult):
        return save_model(model, Path(out), tokenizer, overwrite=overwrite, write_extra=result.write_files)
    return save_model(model, Path(out), tokenizer, overwrite=overwrite, report=result.to_dict() if result else None,
                      write_extra=extra if result else None)


def load_for_healing(source, device: str = "cpu"):
    """A vaclm folder -> (model in float32 master weights, tokenizer, folder)."""
    from .io.validate import read_vaclm_config
    from .io.loading import resolve_source

    folder = Path(resolve_source(source))
    if not folder.is_dir() or read_vaclm_config(folder) is None:
        raise VaclmError(f"{source} is not a vaclm folder (no vaclm quantization_config); "
                         "heal the output of `vaclm compress`")
    model, tokenizer = load(str(folder), dtype="float32", device=device)
    return model, tokenizer, str(folder)


def heal(model, teacher, calib, config=None, *, tokenizer=None, teacher_tokenizer=None, device: str = "auto",
         teacher_dtype: str | torch.dtype = "auto", progress: bool = True, checkpoint_dir: str | Path | None = None,
         resume: bool = False, stop_after: int | None = None, source: str | None = None):
    """Heal a compressed model by distilling `teacher` into its factors; returns a HealResult.

    `model`: a vaclm folder or a model holding LowRankLinear layers (healed in place). `teacher`: a
    model, or anything `load` reads (the original model, or any model sharing the tokenizer).
    `calib`: a text file, folder or dataset name, or 1-D token ids; training and validation windows
    are disjoint. `teacher_dtype` "auto" is bfloat16 on CUDA (the student then trains under bf16
    autocast with float32 master weights) and float32 on CPU. With `checkpoint_dir` the state is
    saved every `config.checkpoint_every` steps and `resume=True` continues a stopped run;
    `stop_after` stops after that many optimizer steps (a resumable, unfinished result). `source`
    names the folder a model passed as a module came from (its reports are copied on save).
    """
    from .io.checkpoint import fingerprint
    from .io.loading import resolve_device, resolve_dtype
    from .recovery.checkpoint import HealCheckpoint
    from .recovery.config import HealConfig
    from .recovery.data import heal_windows
    from .recovery.heal import heal_model

    config = config or HealConfig()
    device = resolve_device(device)
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer, source = load_for_healing(model, "cpu")
        tokenizer = tokenizer or loaded_tokenizer
    compute_dtype = resolve_dtype(teacher_dtype, device)
    teacher_name = getattr(getattr(teacher, "config", None), "_name_or_path", "") or type(teacher).__name__
    if isinstance(teacher, (str, Path)):
        teacher_name = str(teacher)
        teacher, loaded_tokenizer = load(str(teacher), dtype=compute_dtype, device="cpu")
        teacher_tokenizer = teacher_tokenizer or loaded_tokenizer
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise VaclmError(f"the teacher {teacher_name} uses a different tokenizer than the student; "
                         "choose a teacher that shares the student's tokenizer (e.g. the model it was compressed from)")
    if calib is None:
        raise VaclmError("heal needs text: a file, a folder, a dataset name or a tensor of token ids")
    train, val = heal_windows(token_stream(calib, tokenizer, "calibration").flatten(), config)
    checkpoint = None
    if checkpoint_dir is not None:
        identity = f"{model_identity(model)}|{model_identity(teacher)}"
        run_id = fingerprint(config.to_dict(), torch.cat([train.flatten(), val.flatten()]), identity)
        checkpoint = HealCheckpoint(Path(checkpoint_dir), run_id, resume)
    torch.manual_seed(config.seed)
    try:
        return heal_model(model, teacher, train, val, config, device=device, compute_dtype=compute_dtype,
                          progress=progress, checkpoint=checkpoint, stop_after=stop_after, teacher_name=teacher_name,
                          source=source)
    except BaseException:
        if checkpoint is not None and checkpoint.is_empty():
            checkpoint.remove()  # nothing worth resuming
        raise


def evaluate(model, text, tokenizer=None, seq_len: int = 2048, max_windows: int | None = None,
             progress: bool = True) -> dict:
    """Perplexity of `model` on `text` (a file, a dataset name, or 1-D token ids)."""
    from .eval.perplexity import perplexity

    ids = token_stream(text, tokenizer, "evaluation")
    device = str(next(model.parameters()).device)
    return perplexity(model, ids.flatten(), seq_len=seq_len, max_windows=max_windows, device=device, progress=progress)


def zero_shot(model, tasks="piqa,winogrande", tokenizer=None, data_dir=None, limit: int | None = None,
              batch_size: int = 16, progress: bool = True) -> dict:
    """Zero-shot accuracy scored by lm-evaluation-harness (extra `harness`); piqa and winogrande from local
    files in `data_dir` (default $VACLM_DATA_DIR), other lm-eval task names from the hub:
    {task: {acc, acc_stderr, [acc_norm, acc_norm_stderr], examples, of, seconds}}."""
    from .eval.zeroshot import evaluate_tasks

    return evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                          progress=progress)


def bench(model, baseline=None, settings=None, progress: bool = True) -> dict:
    """Prefill and decode tokens/s and peak memory of `model` and `baseline` measured in one run,
    with their ratios (prefill_speedup, decode_speedup, ...: > 1 means `model` is faster). With
    settings.int8_baseline, both also run with int8 weights in every decoder linear and the lm_head
    (the same int8 kernel): int8_decode_speedup (int8 model over float baseline) and
    decode_speedup_vs_int8 (int8 model over int8 baseline), and the same for prefill."""
    from .eval.speed import benchmark

    return benchmark(model, baseline, settings=settings, progress=progress)
