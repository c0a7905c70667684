"""Shared by the benchmark scripts: the demo model, the data, one run in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vaclm.data.text import bundled_path

REPO = Path(__file__).resolve().parents[1]
WIKI_VALID = bundled_path("wikitext2", "calibration")  # the copies vaclm ships: the CLI's defaults
WIKI_TEST = bundled_path("wikitext2", "evaluation")
RESULTS = REPO / "bench" / "results"


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_worker(script: Path, args: list[str]) -> dict:
    """Run `script --worker ARGS` in a fresh process (so peak memory is its own); last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, rows: list[dict], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)


def merge_rows(name: str, new: list[dict], key) -> list[dict]:
    """The rows of bench/results/NAME.json with those equal to a new row under `key` replaced by it."""
    path = RESULTS / f"{name}.json"
    keys = {key(r) for r in new}
    return [r for r in (json.loads(path.read_text()) if path.exists() else []) if key(r) not in keys] + new


def settings_label(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def method_label(row: dict) -> str:
    """The method and the method options a row overrode (none: the defaults of its `measured` day)."""
    return row["method"] + "".join(f" {k}={v:.3g}" if isinstance(v, float) else f" {k}={v}"
                                   for k, v in row.get("options", {}).items())


CACHE = REPO / "bench" / ".cache"


def demo_gradients(model, tokenizer, config):
    """Gradient statistics (covariance and Fisher) of the demo model on the calibration windows.

    They depend only on the model and the calibration text, so every run of a benchmark shares
    one file; the first run pays for it and records how long it took.
    """
    import time

    import vaclm.api as api
    from vaclm.io.checkpoint import load_gradients, save_all_gradients
    from vaclm.model.arch import get_submodule, spec_for, target_names
    from vaclm.model.statistics import gradient_stats

    labels = "" if config.fisher_labels == "data" else f"-{config.fisher_labels}"
    path = CACHE / f"grads-{config.calib_samples}x{config.calib_seq_len}-s{config.seed}{labels}"
    if (path / "gradients.json").exists():
        return load_gradients(path), None
    ids = api.calibration_ids(str(WIKI_VALID), tokenizer, config)
    spec = spec_for(model.config.model_type)
    modules = {n: get_submodule(model, n) for b in target_names(model, spec) for n in b}
    start = time.time()
    grads = gradient_stats(model, modules, ids, "cpu", cov=True, fisher=True, progress=False,
                           labels=config.fisher_labels, seed=config.seed)
    seconds = time.time() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    save_all_gradients(path, grads)
    return grads, seconds


def compress_and_eval(method: str, keep: float, **settings) -> dict:
    """One run on the demo model in this process: compress (unless dense), then test PPL 16 x 1024."""
    import time

    import torch

    import vaclm
    from vaclm.config import CompressConfig

    options = settings.pop("options", {})
    save = settings.pop("save", None)  # also write the compressed folder here (for heal / speed / zero-shot)
    model, tokenizer = vaclm.load("demo")
    row = {"method": method, "keep": keep, **settings, "options": options, "threads": torch.get_num_threads()}
    if method == "dense":
        row.update(kept_fraction=1.0, compress_seconds=0.0)
    else:
        config = CompressConfig(keep=keep, method=method, options=dict(options), **settings)
        # the settings a row did not name are the defaults of its day: record them, for the tables
        row.update({k: getattr(config, k) for k in ("allocation", "order", "sequential", "calib_samples", "calib_seq_len",
                                                    "depth_tilt")})
        grads, grad_seconds = None, None
        if method in ("fwsvd", "gfwsvd") or config.allocation == "knapsack":
            grads, grad_seconds = demo_gradients(model, tokenizer, config)
        start = time.time()
        result = vaclm.compress(model, config, str(WIKI_VALID), tokenizer=tokenizer, progress=False, gradients=grads)
        row.update(kept_fraction=result.kept_fraction, compress_seconds=time.time() - start,
                   gradient_seconds_shared=grad_seconds)
        if save:
            vaclm.save(model, save, tokenizer, result=result, overwrite=True)
    row["ppl"] = vaclm.evaluate(model, str(WIKI_TEST), tokenizer, seq_len=1024, max_windows=16, progress=False)["ppl"]
    row["measured"] = time.strftime("%Y-%m-%d")  # machines differ from day to day: times compare within a day
    row["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return row
