"""Zero-shot multiple-choice tasks read from local files, phrased as lm-evaluation-harness phrases them.

Each example becomes one (context, continuation) pair per choice; the model's log-likelihood of
each continuation picks the answer. Templates follow lm-eval's task configs:
- piqa (lm_eval/tasks/piqa/piqa.yaml): context "Question: {goal}\\nAnswer:", continuation " {sol}";
  acc_norm divides by len(sol) in characters (lm-eval's `completion_len`).
- winogrande (lm_eval/tasks/winogrande/preprocess_winogrande.py, "partial evaluation"): context is
  the sentence up to the blank with the option put in, continuation " " + the rest after the blank
  (stripped), the same for both options.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VaclmError

DATA_DIR_ENV = "VACLM_DATA_DIR"


@dataclass(frozen=True)
class Example:
    contexts: tuple[str, ...]  # one per choice
    continuations: tuple[str, ...]  # one per choice
    gold: int
    norm_lengths: tuple[float, ...]  # acc_norm divides each choice's log-likelihood by these


@dataclass(frozen=True)
class Task:
    name: str
    documents: str  # jsonl, relative to the data folder
    labels: str  # one label per line
    metrics: tuple[str, ...]


TASKS = {
    "piqa": Task("piqa", "piqa/valid.jsonl", "piqa/valid-labels.lst", ("acc", "acc_norm")),
    "winogrande": Task("winogrande", "winogrande/dev.jsonl", "winogrande/dev-labels.lst", ("acc",)),
}


def parse_tasks(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise VaclmError(f"unknown task {', '.join(unknown) or repr(text)}; choose from {', '.join(TASKS)} (comma-separated)")
    return list(dict.fromkeys(names))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $VACLM_DATA_DIR; the folder that holds piqa/ and winogrande/."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise VaclmError(f"zero-shot tasks read local files: pass --data-dir FOLDER (holding piqa/ and winogrande/) or set {DATA_DIR_ENV}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise VaclmError(f"zero-shot data folder not found: {path}; pass --data-dir FOLDER holding piqa/ and winogrande/")
    return path


def load_examples(task: str, data_dir: str | os.PathLike | None, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of `task` (all when None), as lm-eval orders them: file order."""
    spec = TASKS[task]
    root = resolve_data_dir(data_dir)
    docs, labels = _read_lines(root / spec.documents), _read_lines(root / spec.labels)
    if len(docs) != len(labels):
        raise VaclmError(f"{root / spec.labels} has {len(labels)} labels for {len(docs)} examples in {root / spec.documents}; restore the files")
    if limit is not None:
        if limit < 1:
            raise VaclmError(f"--limit must be at least 1, got {limit}")
        docs, labels = docs[:limit], labels[:limit]
    build = _piqa if task == "piqa" else _winogrande
    examples = []
    for i, (line, label) in enumerate(zip(docs, labels)):
        try:
            examples.append(build(json.loads(line), label))
        except (ValueError, KeyError, TypeError) as exc:
            raise VaclmError(f"{root / spec.documents} line {i + 1} is malformed ({type(exc).__name__}: {exc}); restore the file") from exc
    return examples


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise VaclmError(f"zero-shot data file missing: {path}; check --data-dir (see the data folder's SOURCE.md)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa(doc: dict, label: str) -> Example:
    gold = int(label)
    if gold not in (0, 1):
        raise ValueError(f"label {label!r} is not 0 or 1")
    context = f"Question: {doc['goal']}\nAnswer:"
    sols = (doc["sol1"], doc["sol2"])
    return Example((context, context), tuple(f" {s}" for s in sols), gold, tuple(float(len(s)) for s in sols))


def _winogrande(doc: dict, label: str) -> Example:
    gold = {"1": 0, "2": 1}[label.strip()]
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (doc["option1"], doc["option2"]))
    continuation = " " + sentence[blank + 1 :].strip()
    return Example(contexts, (continuation, continuation), gold, tuple(float(len(c)) for c in contexts))
