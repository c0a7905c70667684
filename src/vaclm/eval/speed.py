"""Measured speed of a model against a baseline, as a generation engine runs them.

Prefill: one sequence of L tokens filling the KV cache, logits of the last position only (what
generation needs).
Decode: a short prompt, then `new_tokens` greedy steps with the KV cache; only the steps are timed.
Both models run in the same process under the same conditions: warm-up first, then repetitions
that alternate between the two (and swap which goes first every repetition, so slow drift from
other jobs on the machine hits both alike); medians are reported. On CPU the same ratios are also
computed from the process's CPU seconds (`cpu_time_speedups`), which other jobs disturb less.
With `compile`, each model's decode step runs through torch.compile (inductor) with a static KV
cache, as transformers' `generate` runs it with `cache_implementation="static"`; the prompt's
prefill stays eager (as in `generate`), and the compile happens in the untimed warm-up.
Peak memory: the weights' bytes, and the rise above them during the timed runs (CUDA: max
allocated; CPU: resident memory, the kernel's high-water mark reset before each run through
/proc/self/clear_refs): activations and KV cache.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import VaclmError
from ..resources import reset_peak_rss, rss_bytes
from ..options import int_list, option


@dataclass(frozen=True)
class BenchSettings:
    prefill_lens: tuple[int, ...] = option((512, 2048), "prefill lengths at batch 1, e.g. 512,2048", parse=int_list)
    decode_batches: tuple[int, ...] = option((1, 8), "decode batch sizes, e.g. 1,8", parse=int_list)
    prompt_len: int = option(16, "prompt tokens before the timed decode steps", cli=False)
    new_tokens: int = option(128, "decode steps timed per run")
    reps: int = option(5, "timed repetitions per measurement (median)")
    seed: int = option(0, "seed of the random prompts", cli=False)
    int8_baseline: bool = option(False, "also measure the dense baseline and this model with int8 weights in every "
                                        "decoder linear and the lm_head, through the same int8 kernel (CPU: PyTorch's "
                                        "prepacked int8 GEMM), and the ratio between those two")
    compile: bool = option(False, "decode steps through torch.compile (inductor) with a static KV cache, as "
                                  "transformers' generate with cache_implementation='static'; compile time is spent "
                                  "in the untimed warm-up (warmup_seconds), prefill stays eager")

    def check(self) -> None:
        if self.reps < 1 or self.new_tokens < 1 or self.prompt_len < 1:
            raise VaclmError("--reps, --new-tokens and the prompt length must be at least 1")
        if not self.prefill_lens or not self.decode_batches or min(self.prefill_lens + self.decode_batches) < 1:
            raise VaclmError("prefill lengths and decode batch sizes must be positive")


def last_logits(model, input_ids: torch.Tensor, **kwargs):
    """The model output with logits for the last position only (`logits_to_keep=1` where supported)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=input_ids, logits_to_keep=1, **kwargs)
    out = model(input_ids=input_ids, **kwargs)
    out.logits = out.logits[:, -1:]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall seconds, and the process's CPU seconds (all threads): on a shared CPU the second is
    what the work itself cost, the first also holds the time other jobs took the cores."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return False


def prefill_seconds(model, ids: torch.Tensor) -> Timer:
    with Timer(ids.device) as timer:
        last_logits(model, ids, use_cache=True)  # as generation does: the KV cache is written too
    return timer


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, step=None) -> Timer:
    """Prefill the prompt (untimed), then time `new_tokens` single-token steps with the KV cache.
    `step`: a compiled decode step (compiled_step()): then the cache is a static one, as it needs."""
    name = cache_argument(model)
    cache = {name: static_cache(model, prompt.shape[1] + new_tokens)} if step is not None else {}
    out = last_logits(model, prompt, use_cache=True, **cache)
    past, token = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    step = step or model
    with Timer(prompt.device) as timer:
        for _ in range(new_tokens):
            out = step(input_ids=token, use_cache=True, **{name: past})
            past, token = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return timer


def static_cache(model, max_len: int):
    """A preallocated KV cache: a compiled step sees the same shapes every token (no recompiles)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def compiled_step(model):
    """The model's __call__ through torch.compile (inductor, static shapes): what transformers'
    generate compiles for decode (get_compiled_call), without CUDA graphs."""
    if not getattr(model, "_can_compile_fullgraph", False):
        raise VaclmError(f"--compile: transformers does not support compiling {type(model).__name__} with a static "
                         "cache; run without --compile")
    return torch.compile(model.__call__, dynamic=False)


def cache_argument(model) -> str:
    """`cache` in transformers releases that renamed it (they warn on `past_key_values`), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    cache = getattr(out, "cache", None)  # read `past_key_values` only where `cache` is not there: it warns
    return cache if cache is not None else out.past_key_values


class PeakMemory:
    """Peak bytes above the starting point while the block runs (CUDA: allocated; CPU: RSS)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = rss_bytes("VmRSS")
            self.cpu_peak_ok = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.rise = self.peak - self.base
        elif self.cpu_peak_ok:
            self.rise = max(0, rss_bytes("VmHWM") - self.base)
        else:
            self.rise = max(0, rss_bytes("VmRSS") - self.base)
        return False


def weight_bytes(model) -> int:
    # parameters() lists a tied weight (embedding and lm_head) once
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _inputs(settings: BenchSettings, vocab: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    prefill = {n: torch.randint(0, vocab, (1, n), generator=g).to(device) for n in settings.prefill_lens}
    prompts = {b: torch.randint(0, vocab, (b, settings.prompt_len), generator=g).to(device) for b in settings.decode_batches}
    return {"prefill": prefill, "decode": prompts}


def weights_read_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the input
    embedding table, of which a lookup reads one row (unless the lm_head multiplies by the same tensor)."""
    embedding = model.get_input_embeddings()
    skip = {id(t) for t in embedding.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        skip -= {id(t) for t in head.parameters()}  # tied: the lm_head reads the whole table
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def configurations(model, baseline=None, int8: bool = False) -> dict:
    """name -> model to measure: "model" and "baseline" as given; with `int8`, "model_int8" and
    "baseline_int8": copies with int8 weights in every decoder linear and the lm_head (int8_weights),
    the same treatment for both."""
    import copy

    from ..model.int8_dense import int8_weights

    models = {"model": model}
    if baseline is not None:
        models["baseline"] = baseline
    if int8:
        for name in list(models):
            models[f"{name}_int8"] = copy.deepcopy(models[name])
            int8_weights(models[f"{name}_int8"], lm_head=True)
    return models


# ratio keys: (model, against, prefix, suffix)
PAIRS = (("model", "baseline", "", ""), ("model_int8", "baseline", "int8_", ""),
         ("model_int8", "baseline_int8", "", "_vs_int8"))


@torch.inference_mode()
def benchmark(model, baseline=None, settings: BenchSettings | None = None, names: tuple[str, str] = ("model", "baseline"),
              progress: bool = True) -> dict:
    """Speed of `model` (and `baseline`, interleaved). Ratios are model over baseline: > 1 is faster.
    With settings.int8_baseline, both also run with int8 weights (see configurations())."""
    settings = settings or BenchSettings()
    settings.check()
    if settings.int8_baseline and baseline is None:
        raise VaclmError("--int8-baseline needs --baseline (the dense model to quantise the same way)")
    models = configurations(model, baseline, settings.int8_baseline)
    if names != ("model", "baseline"):
        models = {names[0] if k == "model" else names[1] if k == "baseline" else k: m for k, m in models.items()}
    return benchmark_models(models, settings, progress, pairs=[(names[0], names[1], "", "")] + list(PAIRS[1:]))


@torch.inference_mode()
def benchmark_models(models: dict, settings: BenchSettings, progress: bool = True, pairs=PAIRS,
                     compiled: set[str] | None = None) -> dict:
    """Every model in `models` measured in one interleaved run; `pairs` (model, against, prefix,
    suffix) name the speedups reported where both are present. `compiled`: the names whose decode
    steps run compiled (default: all with settings.compile, none without); the same model object
    may appear twice, eager and compiled."""
    settings.check()
    device = next(next(iter(models.values())).parameters()).device
    if any(next(m.parameters()).device != device for m in models.values()):
        raise VaclmError("model and baseline must sit on the same device")
    vocab = min(m.config.vocab_size for m in models.values())
    inputs = _inputs(settings, vocab, device)
    jobs = [("prefill", n) for n in settings.prefill_lens] + [("decode", b) for b in settings.decode_batches]

    compiled = set(models) if compiled is None and settings.compile else set(compiled or ())
    steps = {name: compiled_step(models[name]) for name in compiled}

    def run(name, kind, size):
        if kind == "prefill":
            return prefill_seconds(models[name], inputs["prefill"][size])
        return decode_seconds(models[name], inputs["decode"][size], settings.new_tokens, steps.get(name))

    for m in models.values():
        m.eval()
    times = {name: {job: [] for job in jobs} for name in models}
    cpu = {name: {job: [] for job in jobs} for name in models}
    rise = {name: 0 for name in models}
    warmup = {name: {} for name in models}
    load_start = _load_average()
    total = len(jobs) * len(models) * (settings.reps + 1)
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="run")
    for job in jobs:
        for rep in range(settings.reps + 1):  # repetition 0 is the warm-up (and packs int8 weights), not recorded
            order = _rotated(list(models), rep)
            for name in order:
                with PeakMemory(device) as mem:
                    timer = run(name, *job)
                if not rep:  # with compile, the first decode warm-up of each batch size compiles
                    warmup[name][f"{job[0]}_{job[1]}"] = timer.wall
                if rep:  # the warm-up also pages in memory-mapped weights: not the run's own memory
                    rise[name] = max(rise[name], mem.rise)
                    times[name][job].append(timer.wall)
                    cpu[name][job].append(timer.cpu)
                bar.update()
    bar.close()

    first = next(iter(models.values()))
    result = {"device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "dtype": str(next(first.parameters()).dtype).replace("torch.", ""), **asdict(settings),
              "load_average": [load_start, _load_average()], "configurations": list(models)}
    if device.type == "cpu":
        result["process_peak_rss_bytes"] = rss_bytes("VmHWM")
    for name, m in models.items():
        t = times[name]
        result[name] = {
            "parameters": sum(p.numel() for p in m.parameters()),
            "weight_bytes": weight_bytes(m),
            "weights_read_per_token": weights_read_per_token(m),
            "peak_memory_rise_bytes": rise[name],
            "memory_measure": "cuda max allocated" if device.type == "cuda" else "RSS high-water mark",
            "compiled": name in compiled,
            "warmup_seconds": warmup[name],
            "prefill_tokens_per_s": {str(n): n / statistics.median(t[("prefill", n)]) for n in settings.prefill_lens},
            "decode_tokens_per_s": {str(b): b * settings.new_tokens / statistics.median(t[("decode", b)])
                                    for b in settings.decode_batches},
            "prefill_seconds": {str(n): t[("prefill", n)] for n in settings.prefill_lens},
            "decode_seconds": {str(b): t[("decode", b)] for b in settings.decode_batches},
            "prefill_cpu_seconds": {str(n): cpu[name][("prefill", n)] for n in settings.prefill_lens},
            "decode_cpu_seconds": {str(b): cpu[name][("decode", b)] for b in settings.decode_batches},
        }
    cpu_ratios, bounds = {}, {}
    for a, b, prefix, suffix in pairs:
        if a in models and b in models:
            result.update(speedups(result[a], result[b], settings, prefix, suffix))
            # decode at batch 1 streams the weights: the ratio of bytes read bounds its speedup
            bounds[f"{prefix}decode_speedup{suffix}"] = result[b]["weights_read_per_token"] / result[a]["weights_read_per_token"]
            if device.type == "cpu":  # the same ratios from CPU seconds: steadier when other jobs share the cores
                cpu_ratios.update(speedups(_per_second(result[a], settings), _per_second(result[b], settings), settings,
                                           prefix, suffix))
    if bounds:
        result["bytes_read_bounds"] = bounds
    if cpu_ratios:
        result["cpu_time_speedups"] = cpu_ratios
    return result


def _rotated(names: list[str], rep: int) -> list[str]:
    """The order rotates every repetition, so each model goes first as often and slow drift from
    other jobs on the machine hits all of them alike."""
    k = rep % len(names)
    return names[k:] + names[:k]


def _per_second(raw: dict, settings: BenchSettings) -> dict:
    """Tokens per CPU second, in the layout speedups() reads."""
    med = lambda xs: statistics.median(xs)
    return {"prefill_tokens_per_s": {str(n): n / med(raw["prefill_cpu_seconds"][str(n)]) for n in settings.prefill_lens},
            "decode_tokens_per_s": {str(b): b * settings.new_tokens / med(raw["decode_cpu_seconds"][str(b)])
                                    for b in settings.decode_batches}}


def speedups(model: dict, base: dict, settings: BenchSettings, prefix: str = "", suffix: str = "") -> dict:
    """prefill_speedup (first length), prefill_speedup_L (others), decode_speedup (first batch),
    decode_speedup_bB (others); each key as {prefix}key{suffix}."""
    out = {}
    for i, n in enumerate(settings.prefill_lens):
        key = "prefill_speedup" if i == 0 else f"prefill_speedup_{n}"
        out[prefix + key + suffix] = model["prefill_tokens_per_s"][str(n)] / base["prefill_tokens_per_s"][str(n)]
    for i, b in enumerate(settings.decode_batches):
        key = "decode_speedup" if i == 0 else f"decode_speedup_b{b}"
        out[prefix + key + suffix] = model["decode_tokens_per_s"][str(b)] / base["decode_tokens_per_s"][str(b)]
    return out


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
