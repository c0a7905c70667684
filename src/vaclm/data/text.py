"""Text sources: a file, a folder of .txt files, or a dataset name fetched with `datasets`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VaclmError

# name -> (dataset, config, split for calibration, split for evaluation, text field)
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "validation", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def load_text(source: str, role: str = "calibration") -> str:
    """All text of `source`; `role` picks a dataset's split (calibration or evaluation)."""
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    elif path.is_dir():
        files = sorted(path.rglob("*.txt")) + sorted(path.rglob("*.raw"))
        if not files:
            raise VaclmError(f"folder {source} holds no .txt or .raw files; give a text file or a dataset name")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif source in DATASETS:
        text = _load_dataset_text(source, role)
    else:
        raise VaclmError(f"text source not found: {source} (give a file, a folder of .txt files, or one of {', '.join(DATASETS)})")
    if not text.strip():
        raise VaclmError(f"text source {source} is empty; give a file with text in it")
    return text


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
