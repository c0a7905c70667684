"""Part c: prefill and decode speed of a keep-0.6 factorised 8B-shaped model against the dense one.

The factorised models have uniform keep-0.6 ranks (allocate/uniform.py) rounded to each
alignment, swapped in by the pipeline's own surgery (model/surgery.py), with random factor
values: a matmul's time does not depend on the values it multiplies, only on the shapes, so a
random model times the same as a compressed one of the same ranks. Every model is measured side
by side in one process: each repetition runs all of them in a rotating order, and the speedup is
the ratio of medians (> 1: faster than dense).

Eager: exactly `vaclm bench`'s measurements (vaclm.eval.speed: prefill with the KV cache written
and last-position logits; greedy decode steps with the dynamic KV cache). torch.compile: the
model's forward compiled with static shapes, a static KV cache (as transformers' compiled
generation uses), by default mode reduce-overhead (CUDA graphs) on CUDA; compile time is
reported apart and never timed.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
import traceback

import torch

from .common import Deadline, llama_config, log, random_model, sync, write_json


def factorised_model(config, dtype, device: str, keep: float, align: int, seed: int):
    """A random model whose targets are LowRankLinear at uniform `keep` ranks aligned to `align`."""
    from vaclm.allocate.uniform import kept_fraction, uniform_ranks
    from vaclm.model.surgery import Targets, replace_with_lowrank

    model = random_model(config, dtype, device, seed)
    shapes = Targets.of(model).shapes  # not the Targets: it would keep every dense module alive
    ranks = uniform_ranks(shapes, keep, align)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, rank in ranks.items():
        if rank is None:
            continue
        out_f, in_f = shapes[name]
        up = torch.randn(out_f, rank, device=device, dtype=dtype, generator=g) / math.sqrt(rank)
        down = torch.randn(rank, in_f, device=device, dtype=dtype, generator=g) / math.sqrt(in_f)
        replace_with_lowrank(model, name, up, down)
    return model.eval(), {"align": align, "kept_fraction": kept_fraction(shapes, ranks),
                          "factorised": sum(r is not None for r in ranks.values()), "targets": len(ranks)}


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Eager:
    """`vaclm bench`'s own measurements (dynamic KV cache)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids) -> float:
        from vaclm.eval.speed import prefill_seconds

        return prefill_seconds(self.model, ids).wall

    def decode(self, prompt, steps) -> float:
        from vaclm.eval.speed import decode_seconds

        return decode_seconds(self.model, prompt, steps).wall


class Compiled:
    """The forward under torch.compile with a static KV cache per shape (reused, reset per run)."""

    def __init__(self, model, backend: str, mode: str | None):
        self.model = model
        self.forward = torch.compile(model.forward, backend=backend, mode=mode, dynamic=False)
        self.caches = {}
        self.graphs = mode is not None and "overhead" in mode
        # transformers 5.x renames past_key_values to cache (the old name warns from 5.2x on)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def _cache(self, key, length: int):
        from transformers import StaticCache

        if key not in self.caches:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self.caches[key]
        cache.reset()
        return cache

    def _step(self, **kwargs):
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.forward(**kwargs)

    def prefill(self, ids) -> float:
        dev, n = ids.device, ids.shape[1]
        pos = torch.arange(n, device=dev)
        key = ("prefill", tuple(ids.shape))
        if key not in self.caches:  # allocate the cache eagerly, outside the compiled graph
            self.model(input_ids=ids, **{self.cache_arg: self._cache(key, n)}, cache_position=pos, use_cache=True,
                       logits_to_keep=1)
        cache = self._cache(key, n)
        sync(dev)
        start = time.perf_counter()
        self._step(input_ids=ids, **{self.cache_arg: cache}, cache_position=pos, use_cache=True, logits_to_keep=1)
        sync(dev)
        return time.perf_counter() - start

    def decode(self, prompt, steps) -> float:
        dev, (b, p) = prompt.device, prompt.shape
        cache = self._cache(("decode", b, p + steps), p + steps)  # one static shape per batch and length
        with torch.inference_mode():  # the prompt eagerly (untimed): it also allocates the cache
            out = self.model(input_ids=prompt, **{self.cache_arg: cache}, cache_position=torch.arange(p, device=dev),
                             use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        positions = [torch.tensor([p + i], device=dev) for i in range(steps)]
        sync(dev)
        start = time.perf_counter()
        for pos in positions:
            out = self._step(input_ids=token, **{self.cache_arg: cache}, cache_position=pos, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        return time.perf_counter() - start


def _jobs(cfg: dict) -> list[tuple[str, str, int]]:
    return [("prefill", f"prefill_{cfg['prefill']}", cfg["prefill"])] + \
        [("decode", f"decode_b{b}", b) for b in cfg["batches"]]


def _inputs(cfg: dict, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {f"prefill_{cfg['prefill']}": torch.randint(0, vocab, (1, cfg["prefill"]), generator=g).to(device)}
    for b in cfg["batches"]:
        out[f"decode_b{b}"] = torch.randint(0, vocab, (b, cfg["prompt"]), generator=g).to(device)
    return out


@torch.inference_mode()
def _time_job(runners: dict, kind: str, x, cfg: dict, warmups: int) -> dict[str, list[float]]:
    """Seconds of every runner on one job: `warmups` untimed rounds, then cfg['reps'] rounds, each
    running all runners in an order that rotates every round."""
    labels = list(runners)
    times = {label: [] for label in labels}
    for rep in range(warmups + cfg["reps"]):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            r = runners[label]
            t = r.prefill(x) if kind == "prefill" else r.decode(x, cfg["new_tokens"])
            if rep >= warmups:
                times[label].append(t)
    return times


def _summary(times: dict[str, list[float]], kind: str, size: int, cfg: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = size if kind == "prefill" else size * cfg["new_tokens"]
    return {"seconds": times, "median_seconds": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "speedup": {k: med["dense"] / v for k, v in med.items() if k != "dense"}}


def run_speed(shape: str, device: str, cfg: dict, out_path, deadline: Deadline) -> dict:
    dtype = getattr(torch, cfg["dtype"])
    config = llama_config(shape)
    result = {"shape": shape, "device": device, "dtype": cfg["dtype"], "settings": cfg, "models": {},
              "modes": {}, "notes": []}
    save = lambda: write_json(out_path, result)

    log(f"part c: building dense and keep-{cfg['keep']} models ({shape} shape, {cfg['dtype']}) on {device}")
    start = time.perf_counter()
    models = {"dense": random_model(config, dtype, device, seed=0)}
    result["models"]["dense"] = {"kept_fraction": 1.0, "weight_bytes": _bytes(models["dense"])}
    for align in cfg["aligns"]:
        label = f"keep{cfg['keep']}_align{align}"
        models[label], info = factorised_model(config, dtype, device, cfg["keep"], align, seed=align)
        result["models"][label] = {**info, "weight_bytes": _bytes(models[label])}
    result["build_seconds"] = time.perf_counter() - start
    if torch.device(device).type == "cuda":
        result["gpu_memory_after_build_bytes"] = torch.cuda.memory_allocated()
    save()
    inputs = _inputs(cfg, config.vocab_size, device)
    jobs = _jobs(cfg)

    # eager: every job, all models side by side
    eager = result["modes"]["eager"] = {"jobs": {}, "skipped": []}
    runners = {k: Eager(m) for k, m in models.items()}
    for kind, key, size in jobs:
        if not deadline.allows(5):
            eager["skipped"].append(f"{key}: the part's time cap is spent")
            continue
        log(f"part c: eager {key}")
        eager["jobs"][key] = _summary(_time_job(runners, kind, inputs[key], cfg, warmups=1), kind, size, cfg)
        log(f"part c: eager {key} speedups " + ", ".join(f"{k} {v:.2f}x" for k, v in eager["jobs"][key]["speedup"].items()))
        save()

    # torch.compile: one job at a time; a model whose compile would not fit the time left is skipped
    backend, mode = cfg.get("compile_backend") or "inductor", cfg.get("compile_mode")
    comp = result["modes"]["compiled"] = {"backend": backend, "mode": mode, "jobs": {}, "compile_seconds": {},
                                          "skipped": []}
    if backend == "none":
        comp["skipped"].append("--compile-backend none")
        save()
        return result
    _raise_recompile_limits()
    compiled = {k: Compiled(m, backend, mode) for k, m in models.items()}
    by_key = {key: (kind, size) for kind, key, size in jobs}
    default = f"keep{cfg['keep']}_align{cfg['aligns'][0]}"
    others = [k for k in compiled if k not in ("dense", default)]
    # what the acceptance needs first (prefill and decode at batch 1, dense against the default
    # alignment), then the other alignments, then the larger decode batches
    first = [key for _, key, _ in jobs[:2]]
    phases = [(key, ["dense", default]) for key in first] + [(key, others) for key in first if others] + \
        [(key, ["dense", default, *others]) for _, key, _ in jobs[2:]]
    state = {"slowest": 0.0, "ready": {key: {} for key in by_key}}
    for key, labels in phases:
        kind, size = by_key[key]
        if not _compile(compiled, labels, key, kind, inputs[key], cfg["new_tokens"], comp, state, deadline):
            save()
            return result
        ready = state["ready"][key]
        if "dense" not in ready or len(ready) < 2 or not deadline.allows(5):
            comp["skipped"].append(f"{key} ({', '.join(labels)}): not timed (dense and a factorised model must be "
                                   "compiled, and time left)")
            save()
            continue
        log(f"part c: compiled {key}: timing {', '.join(ready)}")
        comp["jobs"][key] = _summary(_time_job(ready, kind, inputs[key], cfg, warmups=1), kind, size, cfg)
        log(f"part c: compiled {key} speedups " + ", ".join(f"{k} {v:.2f}x" for k, v in comp["jobs"][key]["speedup"].items()))
        comp["dynamo"] = _dynamo_counters()
        save()
    return result


def _compile(compiled: dict, labels: list[str], key: str, kind: str, x, steps: int, comp: dict, state: dict,
             deadline: Deadline) -> bool:
    """Compile (and warm) `labels` for one job; False when torch.compile itself fails."""
    for label in labels:
        if label in state["ready"][key]:
            continue
        need = 1.3 * state["slowest"] + 5
        if not deadline.allows(need):
            comp["skipped"].append(f"{key} {label}: {deadline.left():.0f} s left, a compile took "
                                   f"{state['slowest']:.0f} s")
            continue
        runner = compiled[label]
        log(f"part c: compiling {label} for {key} (backend {comp['backend']}, mode {comp['mode']})")
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for _ in range(2 if runner.graphs else 1):  # compile, then record the CUDA graph
                    runner.prefill(x) if kind == "prefill" else runner.decode(x, steps)
        except Exception as exc:  # noqa: BLE001  (no compiler, triton missing, a graph break error...)
            comp["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            comp["traceback"] = traceback.format_exc()[-2000:]
            log(f"part c: torch.compile failed: {comp['error']}")
            return False
        seconds = time.perf_counter() - start
        state["slowest"] = max(state["slowest"], seconds)
        comp["compile_seconds"].setdefault(label, {})[key] = seconds
        state["ready"][key][label] = runner
    return True


def _dynamo_counters() -> dict:
    """Graphs compiled and graph breaks so far: a break means part of the forward ran eagerly."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": [str(k)[:200] for k in list(counters["graph_break"])[:5]]}


def _raise_recompile_limits() -> None:
    """Every (model, shape) is its own static graph of the same forward: more than dynamo's
    default 8 per function, and falling back to eager silently would time the wrong thing."""
    import torch._dynamo.config as dc

    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                        ("accumulated_recompile_limit", 512)):
        if hasattr(dc, name):
            setattr(dc, name, value)
