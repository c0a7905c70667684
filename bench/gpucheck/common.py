"""Shared by the GPU check's parts: model shapes, random models built where they run, synthetic
tokens, timers, memory peaks and partial results that survive a killed worker."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from vaclm.resources import reset_peak_rss, rss_bytes, total_host_bytes

REPO = Path(__file__).resolve().parents[2]

# Llama-3-8B's published config; only the shapes matter (weights are random)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
# the same proportions at toy size (CI, and any machine without CUDA)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {"8b": LLAMA3_8B, "tiny": TINY}


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    kwargs = dict(SHAPES[shape])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    # std 1.28 / sqrt(hidden): Llama's 0.02 at hidden 4096, the same logit spread at toy size, so
    # the softmax is far from uniform and every statistic the pipeline takes is non-degenerate
    kwargs["initializer_range"] = 1.28 / math.sqrt(kwargs["hidden_size"])
    return LlamaConfig(**kwargs)


def random_model(config, dtype: torch.dtype, device: str, seed: int = 0):
    """A randomly initialised LlamaForCausalLM created directly on `device` (no host copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synthetic_ids(samples: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Uniformly random token ids (samples x seq_len): a loss, hence gradients, without a tokenizer."""
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64 on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# memory ----------------------------------------------------------------------------------------

def host_rss() -> int:
    return rss_bytes("VmRSS")


def host_peak() -> int:
    """Resident-memory high-water mark of this process (since the last reset_host_peak)."""
    return rss_bytes("VmHWM")


reset_host_peak = reset_peak_rss


machine_ram = total_host_bytes


class StageRecorder:
    """Seconds and memory peaks per named stage; stages nest, and an outer stage is charged only
    for the time outside its inner ones (so the stages add up to the total)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.stages: dict[str, dict] = {}
        self.stack: list[str] = []
        self._t0 = 0.0
        self.host_peak_resettable = True
        self.on_pop = None  # called after every stage ends (e.g. to write partial results)

    def _open(self):
        sync("cuda" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.host_peak_resettable = reset_host_peak() and self.host_peak_resettable
        self._t0 = time.perf_counter()

    def _close(self, name: str):
        sync("cuda" if self.cuda else "cpu")
        s = self.stages.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_host_bytes": 0,
                                          **({"peak_gpu_bytes": 0, "peak_gpu_reserved_bytes": 0} if self.cuda else {})})
        s["seconds"] += time.perf_counter() - self._t0
        s["peak_host_bytes"] = max(s["peak_host_bytes"], host_peak())
        if self.cuda:
            s["peak_gpu_bytes"] = max(s["peak_gpu_bytes"], torch.cuda.max_memory_allocated())
            s["peak_gpu_reserved_bytes"] = max(s["peak_gpu_reserved_bytes"], torch.cuda.max_memory_reserved())

    def push(self, name: str):
        if self.stack:
            self._close(self.stack[-1])
        self.stack.append(name)
        self._open()

    def pop(self):
        name = self.stack.pop()
        self._close(name)
        self.stages[name]["calls"] += 1
        if self.stack:
            self._open()
        if self.on_pop is not None:
            self.on_pop()

    @contextmanager
    def stage(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, module, attr: str, name: str) -> bool:
        """Time every call of module.attr as stage `name`; False when the attribute is gone."""
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            return False

        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        setattr(module, attr, timed)
        return True

    def result(self) -> dict:
        return {k: v for k, v in self.stages.items() if v is not None}


# partial results -------------------------------------------------------------------------------

def write_json(path: Path, data) -> None:
    """Atomic: a reader (or a worker killed mid-write) never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class Deadline:
    """Soft time cap of a part: steps check `left()` before starting and skip with a note."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment() -> dict:
    """What the report needs to say about the machine."""
    import platform
    import shutil

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "host_ram_bytes": machine_ram(),
           "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")}
    for pkg in ("transformers", "safetensors", "triton", "gguf"):
        try:
            import importlib.metadata as md

            env[pkg] = md.version(pkg)
        except Exception:
            env[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env
