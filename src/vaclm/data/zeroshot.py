"""PIQA and WinoGrande from local files, as the documents lm-evaluation-harness's task configs read.

The official releases keep the labels in a separate file; each document gets its label in the field
lm-eval's config reads (piqa: `label`, 0/1; winogrande: `answer`, "1"/"2"), so lm-eval's own prompts
and metrics apply unchanged (eval/zeroshot.py). `local_dataset` is the `custom_dataset` of the task
YAMLs vaclm writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VaclmError

DATA_DIR_ENV = "VACLM_DATA_DIR"


@dataclass(frozen=True)
class LocalTask:
    documents: str  # jsonl, relative to the data folder
    labels: str  # one label per line
    fields: tuple[str, ...]  # what each document must hold
    label_field: str  # where lm-eval's config reads the answer
    label_type: type  # int for piqa's 0/1, str for winogrande's "1"/"2"
    label_values: tuple[str, ...]


LOCAL_TASKS = {
    "piqa": LocalTask("piqa/valid.jsonl", "piqa/valid-labels.lst", ("goal", "sol1", "sol2"), "label", int, ("0", "1")),
    "winogrande": LocalTask("winogrande/dev.jsonl", "winogrande/dev-labels.lst", ("sentence", "option1", "option2"),
                            "answer", str, ("1", "2")),
}


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names, in order, without repeats; piqa and winogrande in any case."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise VaclmError(f"no task in --tasks {text!r}; give e.g. piqa,winogrande (comma-separated)")
    return list(dict.fromkeys(n.lower() if n.lower() in LOCAL_TASKS else n for n in names))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $VACLM_DATA_DIR; the folder that holds piqa/ and winogrande/."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise VaclmError(f"zero-shot tasks read local files: pass --data-dir FOLDER (holding piqa/ and winogrande/) or set {DATA_DIR_ENV}")
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise VaclmError(f"zero-shot data folder not found: {path}; pass --data-dir FOLDER (or set {DATA_DIR_ENV}) holding piqa/ and winogrande/")
    return path


def read_documents(task: str, data_dir: str | os.PathLike | None) -> list[dict]:
    """Every document of `task` in file order (lm-eval's order), its label in lm-eval's field."""
    spec = LOCAL_TASKS[task]
    root = resolve_data_dir(data_dir)
    docs, labels = _read_lines(root / spec.documents), _read_lines(root / spec.labels)
    if len(docs) != len(labels):
        raise VaclmError(f"{root / spec.labels} has {len(labels)} labels for {len(docs)} examples in {root / spec.documents}; restore the files")
    out = []
    for i, (line, label) in enumerate(zip(docs, labels)):
        try:
            doc = json.loads(line)
            fields = {f: doc[f] for f in spec.fields}
            if not all(isinstance(v, str) for v in fields.values()):
                raise TypeError(f"{', '.join(spec.fields)} must be strings")
            if label.strip() not in spec.label_values:
                raise ValueError(f"label {label!r} is not one of {', '.join(spec.label_values)}")
            out.append({**fields, spec.label_field: spec.label_type(label.strip())})
        except (ValueError, KeyError, TypeError) as exc:
            raise VaclmError(f"{root / spec.documents} line {i + 1} is malformed ({type(exc).__name__}: {exc}); restore the file") from exc
    return out


def local_dataset(task: str, data_dir: str, **lm_eval_metadata):
    """lm-eval's `custom_dataset` hook: the documents as a DatasetDict with one "validation" split."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_documents(task, data_dir))})


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise VaclmError(f"zero-shot data file missing: {path}; pass --data-dir FOLDER (or set {DATA_DIR_ENV}) holding "
                         "piqa/ and winogrande/ (see the data folder's SOURCE.md)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
