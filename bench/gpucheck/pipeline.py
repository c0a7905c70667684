"""Part b: the default pipeline (gfwsvd + knapsack, sequential) on a Llama-3-8B-shaped random
model with synthetic calibration tokens, on a subset of its blocks; time and peak memory per stage,
and the extrapolation to all 32 blocks.

Stages are timed by wrapping the pipeline's own functions (gradient statistics, the knapsack's
error-curve walk, input statistics, the sequential block walk), so what is timed is exactly the
code `vaclm compress` runs. A worker measures one block count; `extrapolate` combines two.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from .common import StageRecorder, llama_config, log, machine_ram, random_model, synthetic_ids, write_json

GRADIENTS = "gradient statistics"
ALLOCATION = "allocation: error curves + knapsack"
INPUTS = "input statistics (block walk with hooks)"
SEQUENTIAL = "sequential pass: factorise and swap"
BUILD = "build random model on device"
PROBE = "probe: forward+backward walk"


def _wrap_pipeline(rec: StageRecorder) -> dict[str, bool]:
    """Time the pipeline's stages where they are defined today; a stage whose function moved is
    reported as not found (the total is measured regardless)."""
    import vaclm.pipeline.knapsack as knapsack
    import vaclm.pipeline.run as run
    import vaclm.pipeline.sequential as sequential

    found = {GRADIENTS: rec.wrap(run, "gradient_stats", GRADIENTS),
             ALLOCATION: rec.wrap(knapsack, "knapsack_ranks", ALLOCATION),
             SEQUENTIAL: rec.wrap(sequential, "compress_with_ranks", SEQUENTIAL)}
    inputs = [rec.wrap(mod, "input_stats", INPUTS) for mod in (knapsack, sequential)]
    found[INPUTS] = all(inputs)
    return found


_SINK: dict = {}  # the run being measured: where the milestone wrappers write (set per run)


def _milestones(events: list, save) -> None:
    """Seconds since the compression started at which each stage ended and each block was
    factorised, saved as they happen: what a run killed by its time cap still tells."""
    import vaclm.pipeline.knapsack as knapsack
    import vaclm.pipeline.run as run
    import vaclm.pipeline.sequential as sequential

    _SINK.update(events=events, save=save, start=time.perf_counter())

    def mark(module, attr, label):
        fn = getattr(module, attr, None)
        if fn is None or getattr(fn, "_milestone", False):
            return  # gone (renamed), or wrapped by an earlier run in this process

        def marked(*args, **kwargs):
            out = fn(*args, **kwargs)
            _SINK["events"].append({"event": label, "seconds": round(time.perf_counter() - _SINK["start"], 2)})
            _SINK["save"]()
            return out

        marked._milestone = True
        setattr(module, attr, marked)

    mark(run, "gradient_stats", GRADIENTS + " done")
    mark(knapsack, "knapsack_ranks", "allocation done")
    mark(sequential, "_factorise_block", "block factorised")


def gradient_memory_plan(model, full_blocks: int, seq_len: int, method, device: str,
                         budgets: dict[str, int | None]) -> dict:
    """How the gradient statistics of the whole (`full_blocks`) model would be grouped: the
    accumulator bytes of one block, and for each memory budget the pipeline's own budget rule
    (vaclm.plan.memory) and grouping (vaclm.model.statistics) applied to the full model's shapes."""
    from vaclm.model import statistics as st
    from vaclm.model.surgery import Targets

    cov, fisher = method.needs_cov, method.needs_fisher
    targets = Targets.of(model)
    block_shapes = [targets.shapes[n] for n in targets.per_block[0]]
    per_block = sum(st.accumulator_bytes(s, cov, fisher) for s in block_shapes)
    out = {"accumulator_bytes_per_block": per_block, "budgets": {}}
    shapes = {f"{b}.{i}": s for b in range(full_blocks) for i, s in enumerate(block_shapes)}
    element = next(model.parameters()).element_size()
    for label, limit in budgets.items():
        try:
            budget = _accumulator_budget(model, full_blocks, seq_len, element, device, limit)
            groups = st.gradient_groups(shapes, cov, fisher, budget)
            out["budgets"][label] = {"memory_budget": limit, "accumulator_budget": budget, "groups": len(groups),
                                     "max_blocks_per_group": max(len(g) for g in groups) / len(block_shapes)}
        except Exception as exc:  # noqa: BLE001  (the pipeline's budget rule changed: say so, measure on)
            out["budgets"][label] = {"memory_budget": limit, "error": f"{type(exc).__name__}: {exc}"}
    return out


def _accumulator_budget(model, full_blocks, seq_len, element, device, limit) -> int:
    """The accumulator budget a run of the full model would get (Run.accumulator_budget's rule)."""
    import copy

    from vaclm.plan.memory import accumulator_budget
    from vaclm.plan.shapes import shape_of
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = full_blocks
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    return accumulator_budget(shape_of(full), seq_len, element, device, limit)


def _probe_walk(model, ids: torch.Tensor, device: str) -> float:
    """Seconds per calibration sequence of the gradient walk's forward+backward alone (no hooks,
    no accumulators): what every extra group of the gradient statistics costs again."""
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    times = []
    try:
        for k, sample in enumerate(ids):
            x = sample.unsqueeze(0).to(device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if k or len(ids) == 1:  # the first pass also pays one-off set-up (kernels, allocator)
                times.append(time.perf_counter() - start)
    finally:
        hook.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return statistics.median(times)


def run_pipeline(shape: str, blocks: int, device: str, dtype: str, samples: int, seq_len: int, keep: float,
                 probe_samples: int, out_path, gpu_limit: int | None = None) -> dict:
    """One measured run on a `blocks`-block model; partial results are in `out_path` throughout.
    `gpu_limit`: a memory budget (bytes) whose grouping is extrapolated next to the default's."""
    import vaclm
    from vaclm.config import CompressConfig
    from vaclm.methods import build_method

    config = llama_config(shape, layers=blocks)
    full_blocks = llama_config(shape).num_hidden_layers
    torch_dtype = getattr(torch, dtype)
    rec = StageRecorder(device)
    record = {"shape": shape, "blocks": blocks, "full_blocks": full_blocks, "device": device, "dtype": dtype,
              "calibration": [samples, seq_len], "keep": keep, "status": "running", "host_ram_bytes": machine_ram()}
    save = lambda: write_json(out_path, {**record, "stages": {**rec.result(), **record.get("pipeline_stages", {})}})
    rec.on_pop = save

    log(f"part b: building a {blocks}-block {shape}-shaped model ({dtype}) on {device}")
    with rec.stage(BUILD):
        model = random_model(config, torch_dtype, device)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    ids = synthetic_ids(samples, seq_len, config.vocab_size, seed=0)
    with torch.no_grad():
        loss = float(model(input_ids=ids[:1].to(device), labels=ids[:1].to(device), use_cache=False).loss)
    record["sanity"] = {"initial_loss": loss, "log_vocab": math.log(config.vocab_size)}
    cc = CompressConfig(keep=keep)  # the defaults: gfwsvd, knapsack, sequential front to back
    record["config"] = {k: getattr(cc, k, None) for k in ("method", "allocation", "order", "sequential", "rank_align",
                                                         "batch_size", "memory_budget")}
    method = build_method(cc.method, cc.options)
    budgets = {"default": None, **({f"{gpu_limit / 1e9:.0f} GB": gpu_limit} if gpu_limit else {})}
    try:
        record["gradient_memory"] = gradient_memory_plan(model, full_blocks, seq_len, method, device, budgets)
    except Exception as exc:  # noqa: BLE001  (the pipeline's memory API moved: measure anyway, say so)
        record["gradient_memory"] = {"error": f"{type(exc).__name__}: {exc}", "budgets": {}}
    with rec.stage(PROBE):
        record["probe_seconds_per_sample"] = _probe_walk(model, ids[:min(probe_samples, samples)], device)
    save()

    # the pipeline times its own stages (vaclm.resources.StageLog) where it can; else wrap them here
    from vaclm.pipeline.run import CompressionResult

    own_log = "stages" in {f.name for f in dataclasses.fields(CompressionResult)}
    record["stages_from"] = "pipeline (CompressionResult.stages)" if own_log else "wrapped by the check"
    if not own_log:
        record["stages_found"] = _wrap_pipeline(rec)
    record["milestones"] = []
    _milestones(record["milestones"], save)
    log(f"part b: compressing {blocks} block(s), keep {keep}, {samples} x {seq_len} synthetic tokens")
    start = time.perf_counter()
    rec.push("compress: other" if not own_log else "compress")
    try:
        result = vaclm.compress(model, cc, calib=ids, device=device, progress=False)
    finally:
        rec.pop()
    record["compress_seconds"] = time.perf_counter() - start
    stages = {**rec.result()}
    if own_log:
        inner = {name: {"seconds": s["seconds"], "calls": 1, "peak_host_bytes": s["peak_host_bytes"],
                        **({"peak_gpu_bytes": s["peak_device_bytes"]} if rec.cuda else {})}
                 for name, s in (getattr(result, "stages", None) or {}).items()}
        outer = stages.pop("compress")
        rec.stages.pop("compress", None)
        rest = outer["seconds"] - sum(s["seconds"] for s in inner.values())
        # set-up and checks outside the pipeline's named stages: their time only (no peak of their own)
        inner["compress: other"] = {"seconds": max(rest, 0.0), "calls": 1, "peak_host_bytes": None}
        record["pipeline_stages"] = inner
        stages.update(inner)
    ranks = [r for r in result.ranks.values() if r is not None]
    record["result"] = {"kept_fraction": result.kept_fraction, "factorised": len(ranks), "targets": len(result.ranks),
                        "rank_min": min(ranks, default=None), "rank_max": max(ranks, default=None),
                        "distinct_ranks": len(set(ranks)),
                        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
    record["peak_host_bytes"] = max(s["peak_host_bytes"] or 0 for s in stages.values())
    if rec.cuda:
        record["peak_gpu_bytes"] = max(s.get("peak_gpu_bytes") or 0 for s in stages.values())
    record["status"] = "done"
    save()
    log(f"part b: {blocks} block(s) done: compress {record['compress_seconds']:.1f} s, kept "
        f"{result.kept_fraction:.4f}, host peak {record['peak_host_bytes'] / 1e9:.1f} GB")
    return {**record, "stages": stages}


# extrapolation ---------------------------------------------------------------------------------

def _linear(points: dict[int, float], n: int) -> tuple[float, str]:
    """Value at n blocks: a line through two measured block counts, or (one count) proportional
    scaling, an upper bound when the cost has a non-negative fixed part."""
    ks = sorted(points)
    if len(ks) >= 2:
        k1, k2 = ks[0], ks[-1]
        slope = (points[k2] - points[k1]) / (k2 - k1)
        return points[k1] + (n - k1) * max(slope, 0.0), f"line through {k1} and {k2} blocks"
    k = ks[0]
    return points[k] * n / k, f"{n}/{k} x the {k}-block value (upper bound: one point)"


def extrapolate(runs: list[dict]) -> dict | None:
    """Time and memory of the whole model from runs on fewer blocks, for each memory budget.

    Time: every stage linearly in blocks, except the gradient statistics, which walk the whole
    model once per memory group: seconds = groups x (forward+backward of all blocks, probed) +
    blocks x (accumulator work per block, = measured stage time minus the probed walk).
    GPU memory: the gradient stage holds the whole model plus one group's accumulators, so its
    peak = measured peak + the other blocks' weights and activations (measured slope less one
    block's accumulators) + the accumulators of the rest of a full group; the block walks hold
    one block at a time (linear fit, expected flat). Host memory: linear in blocks.
    """
    done = [r for r in runs if r.get("status") == "done"]
    if not done:
        return None
    full = done[0]["full_blocks"]
    by_k = {r["blocks"]: r for r in done}
    ks = sorted(by_k)
    plan = done[0]["gradient_memory"]
    acc_block = plan.get("accumulator_bytes_per_block", 0)
    stage_names = sorted({s for r in done for s in r["stages"] if s not in (PROBE, BUILD)})
    linear = {}
    for name in stage_names:
        linear[name], method = _linear({k: by_k[k]["stages"].get(name, {}).get("seconds", 0.0) for k in ks}, full)
    walk_full, _ = _linear({k: by_k[k]["probe_seconds_per_sample"] * by_k[k]["calibration"][0] for k in ks}, full)
    acc = {k: max(by_k[k]["stages"].get(GRADIENTS, {}).get("seconds", 0.0)
                  - by_k[k]["probe_seconds_per_sample"] * by_k[k]["calibration"][0], 0.0) for k in ks}
    acc_full, _ = _linear(acc, full)
    host_full, _ = _linear({k: by_k[k]["peak_host_bytes"] for k in ks}, full)
    out = {"full_blocks": full, "measured_blocks": ks, "method": method,
           "build_seconds": _linear({k: by_k[k]["stages"].get(BUILD, {}).get("seconds", 0.0) for k in ks}, full)[0],
           "peak_host_bytes": host_full, "host_ram_bytes": done[0].get("host_ram_bytes"),
           "fits_host_ram": bool(done[0].get("host_ram_bytes")) and host_full <= done[0]["host_ram_bytes"],
           "budgets": {}}
    cuda = "peak_gpu_bytes" in done[0]
    if cuda:
        grad_peak = {k: by_k[k]["stages"].get(GRADIENTS, {}).get("peak_gpu_bytes", 0) for k in ks}
        k1 = ks[0]
        if len(ks) >= 2:
            other = max((grad_peak[ks[-1]] - grad_peak[k1]) / (ks[-1] - k1) - acc_block, 0.0)
        else:  # one point: its weights and activations per block, over-counting the fixed part
            other = max(grad_peak[k1] / k1 - acc_block, 0.0)
        walk_peak, _ = _linear({k: max((s.get("peak_gpu_bytes") or 0 for n, s in by_k[k]["stages"].items()
                                        if n not in (GRADIENTS, BUILD, PROBE)), default=0) for k in ks}, full)
    for label, b in plan["budgets"].items():
        if "groups" not in b:
            out["budgets"][label] = {"error": b.get("error", "no grouping")}
            continue
        groups = b["groups"]
        seconds = dict(linear)
        if GRADIENTS in seconds:
            seconds[GRADIENTS] = groups * walk_full + acc_full
        entry = {"memory_budget": b["memory_budget"], "gradient_groups": groups, "stage_seconds": seconds,
                 "pipeline_seconds": sum(seconds.values()),
                 "gradient_formula": f"{groups} group(s) x {walk_full:.1f} s walk + {acc_full:.1f} s accumulating"}
        if cuda:
            per_group = min(b["max_blocks_per_group"], full)
            grad_full = grad_peak[k1] + (full - k1) * other + (per_group - k1) * acc_block
            entry["peak_gpu_bytes_by_stage"] = {GRADIENTS: grad_full, "block walks": walk_peak}
            entry["peak_gpu_bytes"] = max(grad_full, walk_peak)
        out["budgets"][label] = entry
    return out
