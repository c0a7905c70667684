"""Measured speed of a model against a baseline, as a generation engine runs them.

Prefill: one sequence of L tokens filling the KV cache, logits of the last position only (what
generation needs).
Decode: a short prompt, then `new_tokens` greedy steps with the KV cache; only the steps are timed.
Both models run in the same process under the same conditions: warm-up first, then repetitions
that alternate between the two (and swap which goes first every repetition, so slow drift from
other jobs on the machine hits both alike); medians are reported. On CPU the same ratios are also
computed from the process's CPU seconds (`cpu_time_speedups`), which other jobs disturb less.
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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import VaclmError
from ..options import int_list, option


@dataclass(frozen=True)
class BenchSettings:
    prefill_lens: tuple[int, ...] = option((512, 2048), "prefill lengths at batch 1, e.g. 512,2048", parse=int_list)
    decode_batches: tuple[int, ...] = option((1, 8), "decode batch sizes, e.g. 1,8", parse=int_list)
    prompt_len: int = option(16, "prompt tokens before the timed decode steps", cli=False)
    new_tokens: int = option(128, "decode steps timed per run")
    reps: int = option(5, "timed repetitions per measurement (median)")
    seed: int = option(0, "seed of the random prompts", cli=False)

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


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> Timer:
    """Prefill the prompt (untimed), then time `new_tokens` single-token steps with the KV cache."""
    out = last_logits(model, prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    with Timer(prompt.device) as timer:
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return timer


class PeakMemory:
    """Peak bytes above the starting point while the block runs (CUDA: allocated; CPU: RSS)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_bytes("VmRSS")
            self.cpu_peak_ok = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.rise = self.peak - self.base
        elif self.cpu_peak_ok:
            self.rise = max(0, _rss_bytes("VmHWM") - self.base)
        else:
            self.rise = max(0, _rss_bytes("VmRSS") - self.base)
        return False


def _rss_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_rss_peak() -> bool:
    try:  # Linux: writing 5 resets the resident-set high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def weight_bytes(model) -> int:
    # parameters() lists a tied weight (embedding and lm_head) once
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _inputs(settings: BenchSettings, vocab: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    prefill = {n: torch.randint(0, vocab, (1, n), generator=g).to(device) for n in settings.prefill_lens}
    prompts = {b: torch.randint(0, vocab, (b, settings.prompt_len), generator=g).to(device) for b in settings.decode_batches}
    return {"prefill": prefill, "decode": prompts}


@torch.inference_mode()
def benchmark(model, baseline=None, settings: BenchSettings | None = None, names: tuple[str, str] = ("model", "baseline"),
              progress: bool = True) -> dict:
    """Speed of `model` (and `baseline`, interleaved). Ratios are model over baseline: > 1 is faster."""
    settings = settings or BenchSettings()
    settings.check()
    models = {names[0]: model} if baseline is None else {names[0]: model, names[1]: baseline}
    device = next(model.parameters()).device
    if baseline is not None and next(baseline.parameters()).device != device:
        raise VaclmError("model and baseline must sit on the same device")
    vocab = min(m.config.vocab_size for m in models.values())
    inputs = _inputs(settings, vocab, device)
    jobs = [("prefill", n) for n in settings.prefill_lens] + [("decode", b) for b in settings.decode_batches]

    def run(m, kind, size):
        if kind == "prefill":
            return prefill_seconds(m, inputs["prefill"][size])
        return decode_seconds(m, inputs["decode"][size], settings.new_tokens)

    for m in models.values():
        m.eval()
    times = {name: {job: [] for job in jobs} for name in models}
    cpu = {name: {job: [] for job in jobs} for name in models}
    rise = {name: 0 for name in models}
    load_start = _load_average()
    total = len(jobs) * len(models) * (settings.reps + 1)
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="run")
    for job in jobs:
        for rep in range(settings.reps + 1):  # repetition 0 is the warm-up, not recorded
            order = list(models) if rep % 2 == 0 else list(models)[::-1]
            for name in order:
                with PeakMemory(device) as mem:
                    timer = run(models[name], *job)
                if rep:  # the warm-up also pages in memory-mapped weights: not the run's own memory
                    rise[name] = max(rise[name], mem.rise)
                    times[name][job].append(timer.wall)
                    cpu[name][job].append(timer.cpu)
                bar.update()
    bar.close()

    result = {"device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), **asdict(settings),
              "load_average": [load_start, _load_average()]}
    for name, m in models.items():
        t = times[name]
        result[name] = {
            "parameters": sum(p.numel() for p in m.parameters()),
            "weight_bytes": weight_bytes(m),
            "peak_memory_rise_bytes": rise[name],
            "memory_measure": "cuda max allocated" if device.type == "cuda" else "RSS high-water mark",
            "prefill_tokens_per_s": {str(n): n / statistics.median(t[("prefill", n)]) for n in settings.prefill_lens},
            "decode_tokens_per_s": {str(b): b * settings.new_tokens / statistics.median(t[("decode", b)])
                                    for b in settings.decode_batches},
            "prefill_seconds": {str(n): t[("prefill", n)] for n in settings.prefill_lens},
            "decode_seconds": {str(b): t[("decode", b)] for b in settings.decode_batches},
            "prefill_cpu_seconds": {str(n): cpu[name][("prefill", n)] for n in settings.prefill_lens},
            "decode_cpu_seconds": {str(b): cpu[name][("decode", b)] for b in settings.decode_batches},
        }
    if baseline is not None:
        result.update(speedups(result[names[0]], result[names[1]], settings))
        if device.type == "cpu":  # the same ratios from CPU seconds: steadier when other jobs share the cores
            result["cpu_time_speedups"] = speedups(_per_second(result[names[0]], settings),
                                                   _per_second(result[names[1]], settings), settings)
    return result


def _per_second(raw: dict, settings: BenchSettings) -> dict:
    """Tokens per CPU second, in the layout speedups() reads."""
    med = lambda xs: statistics.median(xs)
    return {"prefill_tokens_per_s": {str(n): n / med(raw["prefill_cpu_seconds"][str(n)]) for n in settings.prefill_lens},
            "decode_tokens_per_s": {str(b): b * settings.new_tokens / med(raw["decode_cpu_seconds"][str(b)])
                                    for b in settings.decode_batches}}


def speedups(model: dict, base: dict, settings: BenchSettings) -> dict:
    """prefill_speedup (first length), prefill_speedup_L (others), decode_speedup (first batch), decode_speedup_bB."""
    out = {}
    for i, n in enumerate(settings.prefill_lens):
        key = "prefill_speedup" if i == 0 else f"prefill_speedup_{n}"
        out[key] = model["prefill_tokens_per_s"][str(n)] / base["prefill_tokens_per_s"][str(n)]
    for i, b in enumerate(settings.decode_batches):
        key = "decode_speedup" if i == 0 else f"decode_speedup_b{b}"
        out[key] = model["decode_tokens_per_s"][str(b)] / base["decode_tokens_per_s"][str(b)]
    return out


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
