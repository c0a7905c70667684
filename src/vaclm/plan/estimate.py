"""`vaclm plan`: per stage of a compression, estimated peak memory and time, and whether it fits.

Memory comes from shapes (plan/memory.py); time is work divided by the rates a short
micro-benchmark of the device measured (plan/throughput.py), times efficiency factors measured
on whole runs (docs/scale.md). Both are estimates: the plan is for deciding whether and where to
run, not a promise to the second.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..config import CompressConfig
from ..methods import build_method
from ..resources import rss_bytes
from ..model.statistics import accumulator_bytes
from .memory import ACCUMULATOR_SHARE, backward_bytes, limits, mlp_width
from .shapes import ModelShape
from .throughput import Throughput

# fractions of the micro-benchmark's rates whole passes reach (measured: bench/scale.py)
FORWARD_EFFICIENCY = 0.5  # block forward passes on cached inputs
BACKWARD_EFFICIENCY = 0.7  # forward + backward of the whole model, one sequence at a time
LINALG_EFFICIENCY = 0.5  # Cholesky, triangular products and solves in float64
LOAD_BYTES_PER_SECOND = 0.5e9  # safetensors into memory (a local disk; a hub download comes first)
CONVERT_BYTES_PER_SECOND = 0.05e9  # a .gguf dequantised and rebuilt once (then cached)
SAVE_BYTES_PER_SECOND = 0.3e9


@dataclass
class Stage:
    name: str
    seconds: float | None  # None: no device here to measure the rates on
    peak_host_bytes: int
    peak_device_bytes: int = 0
    note: str = ""


@dataclass
class Plan:
    model: str
    device: str
    stages: list[Stage]
    host_limit: int
    device_limit: int
    gradient_groups: int
    throughput: Throughput | None
    dtype: str = "float32"
    advice: str = ""
    assumptions: list[str] = field(default_factory=list)

    @property
    def peak_host_bytes(self) -> int:
        return max(s.peak_host_bytes for s in self.stages)

    @property
    def peak_device_bytes(self) -> int:
        return max(s.peak_device_bytes for s in self.stages)

    @property
    def seconds(self) -> float | None:
        return None if self.throughput is None else sum(s.seconds for s in self.stages)

    @property
    def fits(self) -> bool:
        device_ok = self.device_limit == 0 or self.peak_device_bytes <= self.device_limit
        return self.peak_host_bytes <= self.host_limit and device_ok

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "fits": self.fits,
                "peak_host_bytes": self.peak_host_bytes, "peak_device_bytes": self.peak_device_bytes,
                "seconds": None if self.seconds is None else round(self.seconds, 1), "host_limit_bytes": self.host_limit,
                "device_limit_bytes": self.device_limit, "gradient_groups": self.gradient_groups,
                "advice": self.advice, "stages": [dataclasses.asdict(s) for s in self.stages],
                "throughput": self.throughput and self.throughput.to_dict(), "assumptions": self.assumptions}


def _linalg_seconds(shape: ModelShape, rate64: float, svd, vectors: bool, keep: float) -> float:
    """Whitening (two Cholesky factors), the weighted matrix and its SVD, for every target.
    Not modelled: a statistic with fewer calibration tokens than its width can make Cholesky fail
    and whitening fall back to eigh, ~27x its flops (seen on the 8192-wide statistics of a
    Llama-3.2-1B shape with 1024 tokens; the default 16,384 tokens are wider than 14,336)."""
    seconds = 0.0
    for out_f, in_f in shape.targets.values():
        flops = (out_f**3 + in_f**3) / 3 + 2 * (out_f**2 * in_f + out_f * in_f**2) / 2
        if vectors:  # unweighting the rank-r factors: two triangular solves
            rank = keep * out_f * in_f / (out_f + in_f)
            flops += (out_f**2 + in_f**2) * rank
        seconds += flops / (rate64 * LINALG_EFFICIENCY) + svd(out_f, in_f)
    return seconds


def plan_compression(shape: ModelShape, config: CompressConfig, throughput: Throughput | None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, model: str = "", base_bytes: int | None = None) -> Plan:
    """Estimates for compressing a model of `shape` with `config` on `device` in `dtype`."""
    method = build_method(config.method, config.options)
    cuda = str(device).startswith("cuda")
    element = torch.tensor([], dtype=dtype).element_size()
    base = rss_bytes() if base_bytes is None else base_bytes  # the interpreter, torch, transformers
    weights = shape.parameters * element
    kept_targets = config.keep * shape.target_parameters
    weights_after = weights - int((shape.target_parameters - kept_targets) * element)
    tokens = config.calib_samples * config.calib_seq_len
    # without a measured device the times are not estimated (None); memory still is
    mm, mm64 = (throughput.matmul_flops, throughput.matmul64_flops) if throughput else (float("nan"),) * 2
    svd_time = throughput.svd_time if throughput else (lambda *a: float("nan"))  # noqa: E731
    host_limit, device_limit = limits(device, config.memory_budget)
    on_device = (lambda b: b) if cuda else (lambda b: 0)
    on_host = (lambda b: 0) if cuda else (lambda b: b)

    stages = []
    load_s = weights / LOAD_BYTES_PER_SECOND + (weights / CONVERT_BYTES_PER_SECOND if shape.needs_conversion else 0)
    # safetensors maps the file: the weights count once; a .gguf's one-time conversion holds the
    # dequantised model, a clean copy and its state dict
    stages.append(Stage("load", load_s, base + (3 if shape.needs_conversion else 1) * weights, 0,
                        "includes the one-time .gguf conversion" if shape.needs_conversion else ""))

    # gradient statistics: the whole model on the device, accumulators in groups that fit
    grads_needed = method.needs_gradients or config.allocation in ("knapsack", "evolve")
    acc_total = sum(accumulator_bytes(s, method.needs_cov, method.needs_fisher) for s in shape.targets.values())
    groups = 0
    if grads_needed:
        backward = backward_bytes(shape, config.calib_seq_len, element)
        limit = device_limit if cuda else host_limit
        room = int(ACCUMULATOR_SHARE * (limit - weights - backward - (0 if cuda else base)))
        largest = max(accumulator_bytes(s, method.needs_cov, method.needs_fisher) for s in shape.targets.values())
        groups = max(1, math.ceil(acc_total / max(room, largest)))
        acc_peak = min(acc_total, max(room, largest))
        t = config.calib_seq_len
        linear_flops = 2 * t * (shape.target_parameters + shape.vocab * shape.hidden)
        attention_flops = 4 * shape.blocks * t * t * shape.attention_width
        per_sequence = 2 * (linear_flops + attention_flops)  # forward, then activation gradients
        cov_flops = sum(2 * o * o * t for o, _ in shape.targets.values()) if method.needs_cov else 0
        fisher_flops = sum(2 * o * i * t for o, i in shape.targets.values()) if method.needs_fisher else 0
        seconds = config.calib_samples * (groups * per_sequence / (mm * BACKWARD_EFFICIENCY)
                                          + (cov_flops + fisher_flops) / mm)
        # each group goes to the checkpoint on disk when done (on CUDA: a file at a time through the host)
        stages.append(Stage("gradient statistics", seconds,
                            base + on_host(weights + acc_peak + backward) + (largest if cuda else 0),
                            on_device(weights + acc_peak + backward),
                            f"{groups} group(s) of layers, one walk over the calibration each" if groups > 1 else ""))
    # the block walks read one layer's statistics at a time from the checkpoint
    kept_stats = largest if grads_needed else 0

    # block walks: cached hidden states of the calibration stream, one block's activations and
    # statistics, and one matrix's float64 linear algebra
    stream = tokens * shape.hidden * element
    block_activations = config.batch_size * config.calib_seq_len * (4 * shape.hidden + 3 * mlp_width(shape)) * element
    grams = 8 * sum(w * w for w in shape.input_widths)
    out_f, in_f = max(shape.targets.values(), key=lambda s: s[0] * s[1])
    linalg = 8 * (6 * out_f * in_f + 2 * (out_f**2 + in_f**2))
    walk_device = 2 * stream + block_activations + grams + linalg + weights // max(shape.blocks, 1)
    walk_host = base + weights + kept_stats + (2 * stream if cuda else walk_device)
    forward_flops = 2 * tokens * shape.target_parameters
    gram_flops = 2 * tokens * sum(w * w for w in shape.input_widths) * shape.blocks
    if config.allocation == "knapsack":
        seconds = (forward_flops / (mm * FORWARD_EFFICIENCY) + gram_flops / mm
                   + _linalg_seconds(shape, mm64, svd_time, False, config.keep))
        stages.append(Stage("allocation", seconds, walk_host, on_device(walk_device),
                            "error curve of every matrix (singular values)"))
    seconds = (config.keep * forward_flops / (mm * FORWARD_EFFICIENCY) + gram_flops / mm
               + _linalg_seconds(shape, mm64, svd_time, True, config.keep))
    stages.append(Stage("sequential pass", seconds, walk_host, on_device(walk_device),
                        "factorise block by block on the compressed prefix's outputs"))
    stages.append(Stage("save", weights_after / SAVE_BYTES_PER_SECOND, base + weights_after, 0))

    if throughput is None:
        for stage in stages:
            stage.seconds = None
    plan = Plan(model, str(device), stages, host_limit, device_limit, groups, throughput,
                dtype=str(dtype).replace("torch.", ""))
    plan.assumptions = [
        f"{config.calib_samples} x {config.calib_seq_len} calibration tokens, {config.method} + {config.allocation}, "
        f"keep {config.keep}, weights in {str(dtype).replace('torch.', '')}",
        "times are estimates from a micro-benchmark of this device; a busy machine is slower",
    ]
    return plan


def fitting_change(shape: ModelShape, config: CompressConfig, throughput: Throughput, device: str,
                   dtype: torch.dtype, base_bytes: int) -> str:
    """The first single change of flags under which the plan fits, as the words to type; '' if none."""
    trials = []
    if dtype == torch.float32:
        trials.append(("--dtype bfloat16", config, device, torch.bfloat16))
    if str(device).startswith("cuda"):  # a GPU's budget says nothing of the host
        trials.append(("--device cpu", dataclasses.replace(config, memory_budget=None), "cpu", torch.float32))
    for samples in (config.calib_samples // 2, config.calib_samples // 4):
        if samples >= 1:
            trials.append((f"--calib-samples {samples}", dataclasses.replace(config, calib_samples=samples), device, dtype))
    for seq_len in (config.calib_seq_len // 2,):
        if seq_len >= 128:
            trials.append((f"--calib-seq-len {seq_len}", dataclasses.replace(config, calib_seq_len=seq_len), device, dtype))
    for flags, trial_config, trial_device, trial_dtype in trials:
        try:
            trial = plan_compression(shape, trial_config, throughput, trial_device, trial_dtype, base_bytes=base_bytes)
        except Exception:  # e.g. --device cpu where the host is too small to even try
            continue
        if trial.fits:
            return flags
    return ""


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def verdict(plan: Plan) -> str:
    """One line: what the run needs against what there is, and the change that makes it fit."""
    need = f"host {gib(plan.peak_host_bytes)} of {gib(plan.host_limit)}"
    if plan.device_limit:
        need += f", GPU {gib(plan.peak_device_bytes)} of {gib(plan.device_limit)}"
    took = "time not estimated (no such device here to measure)" if plan.seconds is None else \
        f"about {plan.seconds / 60:.1f} min"
    if plan.fits:
        return f"fits: peak {need}; {took}"
    fix = f"; try {plan.advice}" if plan.advice else "; no single flag makes it fit: use a machine with more memory"
    return f"does not fit: peak {need}{fix} (or --memory-budget SIZE if more memory is really free)"
