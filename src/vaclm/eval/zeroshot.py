"""Zero-shot accuracy scored by lm-evaluation-harness itself, on PIQA and WinoGrande read from local files.

For each local task vaclm writes a task YAML that `include`s lm-eval's own config (prompt, choices,
target, metrics: lm_eval/tasks/piqa/piqa.yaml; lm_eval/tasks/winogrande/default.yaml with its
preprocess_winogrande.py) and overrides only where the documents come from: a `custom_dataset`
reading the local files (vaclm.data.zeroshot.local_dataset), so nothing touches the hub. lm-eval's
HFLM wraps the in-memory model and `simple_evaluate` scores it, one task at a time. A task name vaclm
has no local files for goes to lm-eval as it is (its own config and hub dataset).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from ..data.zeroshot import LOCAL_TASKS, parse_tasks, read_documents, resolve_data_dir
from ..errors import VaclmError

HARNESS_MISSING = "zero-shot tasks need lm-evaluation-harness: pip install 'vaclm[harness]'"
LM_EVAL_CONFIGS = {"piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml"}  # under lm_eval/tasks/
TASK_YAML = """\
include: {config}
task: {task}
dataset_path: {data_dir}
dataset_name: null
custom_dataset: !function vaclm_local_data.local_dataset
dataset_kwargs: {{task: {task}, data_dir: {data_dir}}}
training_split: null
validation_split: validation
test_split: null
"""


def check_tasks(tasks: str | list[str], data_dir=None) -> list[str]:
    """The task names; lm-eval present and every local task's files readable (before any model loads)."""
    names = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    if find_spec("lm_eval") is None:
        raise VaclmError(HARNESS_MISSING)
    for name in names:
        if name in LOCAL_TASKS:
            read_documents(name, data_dir)
    return names


def write_task_yamls(folder: Path, names: list[str], data_dir) -> None:
    """lm-eval task configs for the local tasks among `names`, in `folder` (a TaskManager include_path)."""
    import json

    import lm_eval.tasks

    configs = Path(lm_eval.tasks.__file__).parent
    # lm-eval 0.4.9 (the extra's floor) resolves `!function` only in a module file next to the YAML
    (folder / "vaclm_local_data.py").write_text("from vaclm.data.zeroshot import local_dataset  # noqa: F401\n")
    for name in names:
        if name in LOCAL_TASKS:
            root = resolve_data_dir(data_dir)
            text = TASK_YAML.format(config=json.dumps(str(configs / LM_EVAL_CONFIGS[name])), task=name,
                                    data_dir=json.dumps(str(root)))  # a JSON string is a YAML string
            (folder / f"{name}.yaml").write_text(text, encoding="utf-8")


def evaluate_tasks(model, tokenizer, tasks: str | list[str], data_dir=None, limit: int | None = None,
                   batch_size: int = 16, progress: bool = True, log_samples: bool = False) -> dict:
    """{task: {examples, of (the full set's size), acc, acc_stderr, [acc_norm, acc_norm_stderr], seconds}},
    with lm-eval's per-example records under "samples" when `log_samples`."""
    names = check_tasks(tasks, data_dir)
    if limit is not None and limit < 1:
        raise VaclmError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise VaclmError(f"--batch-size must be at least 1, got {batch_size}")
    if tokenizer is None:
        raise VaclmError("zero-shot evaluation needs the model's tokenizer; save one next to the model")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local_only = all(name in LOCAL_TASKS for name in names)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vaclm-tasks-") as folder, _quiet(progress), _offline(local_only):
        write_task_yamls(Path(folder), names, data_dir)
        manager = TaskManager(include_path=folder, include_defaults=not local_only)
        unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
        if unknown:  # before any scoring
            raise VaclmError(f"unknown task {', '.join(unknown)}: neither local (piqa, winogrande) nor an lm-eval task "
                             "(`lm-eval ls tasks` lists them)")
        # lm-eval sets a pad token on the tokenizer it is given: give it a copy
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        for name in names:
            start = time.time()
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=0, limit=limit,
                                              log_samples=log_samples, random_seed=None, numpy_random_seed=None,
                                              torch_random_seed=None)  # leave the caller's random state alone
            except VaclmError:
                raise
            except Exception as exc:  # hub unreachable, a broken task config, ...: lm-eval raises many types
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise VaclmError(f"lm-evaluation-harness failed on task {name} ({type(exc).__name__}: {first})") from exc
            results[name] = _summary(out, name, time.time() - start, log_samples)
    return results


def _summary(out: dict, name: str, seconds: float, log_samples: bool) -> dict:
    counts = out.get("n-samples", {}).get(name)
    summary = {"examples": counts["effective"], "of": counts["original"]} if counts else {}
    for key, value in out["results"].get(name, {}).items():
        metric, _, filter_name = key.partition(",")  # lm-eval's keys: "acc,none", "acc_stderr,none", ...
        if filter_name:
            # a standard error is "N/A" below two examples
            summary[metric if filter_name == "none" else key] = float(value) if isinstance(value, (int, float)) else float("nan")
    summary["seconds"] = round(seconds, 1)
    if log_samples:
        summary["samples"] = out["samples"][name]
    return summary


@contextlib.contextmanager
def _quiet(progress: bool):
    """lm-eval's log lines off (errors still raise); its progress bars too unless `progress`."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _offline(on: bool):
    """HF_DATASETS_OFFLINE for local tasks; `datasets` reads it once, at import, so its config follows too."""
    if not on:
        yield
        return
    import datasets.config

    saved = os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[0]
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved[1:]
