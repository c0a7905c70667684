"""Zero-shot accuracy on multiple-choice tasks (PIQA, WinoGrande) from local files.

Metrics as lm-evaluation-harness computes them: acc picks the choice with the highest summed
log-likelihood, acc_norm the highest log-likelihood per character of the choice; ties go to the
first choice (np.argmax). Standard errors are the sample standard error of the mean.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from ..data.zeroshot import TASKS, load_examples, parse_tasks
from .loglikelihood import loglikelihoods


def choose(lls, norm_lengths) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) for one example."""
    lls = np.asarray(lls, dtype=float)
    return int(np.argmax(lls)), int(np.argmax(lls / np.asarray(norm_lengths, dtype=float)))


def stderr(hits: list[float]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    return float(np.std(hits, ddof=1) / math.sqrt(n))


def evaluate_task(model, tokenizer, task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                  batch_size: int = 16, progress: bool = True) -> dict:
    examples = load_examples(task, data_dir)
    total = len(examples)
    if limit is not None:
        examples = load_examples(task, data_dir, limit)
    pairs = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    start = time.time()
    scores = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress, desc=task)
    hits = {"acc": [], "acc_norm": []}
    at = 0
    for ex in examples:
        lls = scores[at : at + len(ex.contexts)]
        at += len(ex.contexts)
        pred, pred_norm = choose(lls, ex.norm_lengths)
        hits["acc"].append(float(pred == ex.gold))
        hits["acc_norm"].append(float(pred_norm == ex.gold))
    out = {"examples": len(examples), "of": total}
    for metric in TASKS[task].metrics:
        out[metric] = float(np.mean(hits[metric]))
        out[f"{metric}_stderr"] = stderr(hits[metric])
    out["seconds"] = round(time.time() - start, 1)
    return out


def evaluate_tasks(model, tokenizer, tasks: str | list[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """{task: {examples, of (the full set's size), acc, acc_stderr, [acc_norm, acc_norm_stderr], seconds}}."""
    names = parse_tasks(tasks) if isinstance(tasks, str) else parse_tasks(",".join(tasks))
    for name in names:  # fail on a missing file before any slow scoring
        load_examples(name, data_dir, 1)
    return {name: evaluate_task(model, tokenizer, name, data_dir, limit, batch_size, progress) for name in names}
