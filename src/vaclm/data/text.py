"""Text sources: a file, a folder of .txt files, a text bundled with vaclm, or a dataset fetched with `datasets`."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from ..errors import VaclmError

ROLES = ("calibration", "evaluation")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
# name -> {role: file under BUNDLED_DIR}; shipped as package data, read without network (see its SOURCE.md)
BUNDLED = {
    "wikitext2": {"calibration": "wikitext-2-raw/wiki.valid.raw", "evaluation": "wikitext-2-raw/wiki.test.raw"},
}
# name -> (dataset, config, split for calibration, split for evaluation, text field): fetched from the hub
DATASETS = {
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
KEYWORDS = (*BUNDLED, *DATASETS)


def bundled_path(name: str, role: str = "calibration") -> Path:
    """The bundled file behind keyword `name` for `role` (calibration or evaluation).

    wikitext2: WikiText-2 raw, wiki.valid.raw for calibration and wiki.test.raw for evaluation.
    """
    if name not in BUNDLED:
        raise VaclmError(f"no bundled text named {name!r}; bundled texts: {', '.join(BUNDLED)}")
    if role not in BUNDLED[name]:
        raise VaclmError(f"unknown text role {role!r}; use one of {', '.join(ROLES)}")
    path = BUNDLED_DIR / BUNDLED[name][role]
    if not path.is_file():
        raise VaclmError(f"bundled file {path} is missing from the vaclm install; reinstall vaclm or pass a text file")
    return path


def load_text(source: str, role: str = "calibration") -> str:
    """All text of `source`; `role` picks a keyword's split (calibration or evaluation)."""
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    elif path.is_dir():
        files = sorted(path.rglob("*.txt")) + sorted(path.rglob("*.raw"))
        if not files:
            raise VaclmError(f"folder {source} holds no .txt or .raw files; give a text file or a dataset name")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif source in BUNDLED:
        text = bundled_path(source, role).read_text(encoding="utf-8", errors="replace")
    elif source in DATASETS:
        text = _load_dataset_text(source, role)
    else:
        raise VaclmError(_unknown_source(source))
    if not text.strip():
        raise VaclmError(f"text source {source} is empty; give a file with text in it")
    return text


def _unknown_source(source: str) -> str:
    close = difflib.get_close_matches(source.lower(), KEYWORDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    names = [f"{name} (bundled)" for name in BUNDLED] + [f"{name} (from the hub)" for name in DATASETS]
    return f"text source {source!r} not found: not a file or folder, nor one of {', '.join(names)}{hint}"


def _load_dataset_text(name: str, role: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise VaclmError(f"dataset {name!r} needs the datasets package: pip install 'vaclm[data]', or pass a text file") from exc
    repo, config, calib_split, eval_split, field = DATASETS[name]
    split = calib_split if role == "calibration" else eval_split
    try:
        if name == "c4":  # the papers' protocol: one shard of each split, not the 300 GB corpus
            ds = datasets.load_dataset(repo, data_files={split: _C4_FILES[split]}, split=split)
            ds = ds.select(range(min(len(ds), 3000 if split == "train" else 1100)))
        else:
            ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:
        raise VaclmError(f"could not fetch dataset {name!r} ({type(exc).__name__}); pass a local text file instead") from exc
    return "\n\n".join(ds[field])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D stream of token ids (no special tokens between documents)."""
    if tokenizer is None:
        raise VaclmError("this model folder has no tokenizer; save one next to it or pass token ids")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` non-overlapping windows of `seq_len` tokens drawn with `seed`.

    Returns (chosen windows, all other windows). The remainder is what a later stage may use as
    held-out text (fitness, validation) without touching the calibration samples.
    """
    n_windows = ids.numel() // seq_len
    if n_windows < samples:
        raise VaclmError(
            f"calibration text has {ids.numel()} tokens, too few for {samples} x {seq_len}; "
            "give more text or lower --calib-samples / --calib-seq-len"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    return windows[order[:samples]].clone(), windows[order[samples:]].clone()


def check_text_source(source: str, role: str = "calibration") -> None:
    """Fail with one line on a text source that cannot be read, before a model is loaded.
    Local files, folders and the bundled keywords are read (cheap); hub datasets are fetched later."""
    if source in DATASETS and not Path(source).expanduser().exists():
        return
    load_text(source, role)
