"""The GPU check: one command, one JSON and one Markdown report (issue 19; docs/gpu.md).

    scripts/gpu_check.sh                       # on a CUDA machine: at most --budget seconds (480)
    scripts/gpu_check.sh --tiny                # anywhere: toy sizes
    .venv/bin/python bench/gpu_check.py --device cpu --shape 8b --parts b --pipeline-blocks 1 --budget 7200

Parts (each in its own worker process with a hard time cap, so a hang or an out-of-memory kill
costs that part only; what a killed worker measured so far is kept):
  a. CUDA code paths on tiny models against the CPU: int8 torch._int_mm, the offloaded
     BlockRunner, the tiny pipeline end to end, one bfloat16 healing step, the search's dtype.
  b. the default pipeline (gfwsvd + knapsack, keep 0.8, 32 x 512 synthetic tokens) on a
     Llama-3-8B-shaped random model in bfloat16, on 1 and 2 of its blocks, extrapolated to 32.
  c. prefill 2048 and decode (batch 1 and 16) of a keep-0.6 factorised 8B-shaped model against
     the dense one in bfloat16, eager and torch.compile, ranks aligned to 8, 64 and 128.
Without CUDA (or with --tiny) every part runs at toy size and the CUDA-against-CPU comparisons
are made between CPU paths (reported as such). Writes OUT/gpu_check.json and OUT/gpu_check.md
(OUT: --out, $VACLM_GPU_CHECK_OUT, default bench/results/gpu_check/).
"""

from __future__ import annotations

import time

BEGIN = time.time()  # the budget counts from here, imports included

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO / "src"), str(HERE)):  # the working tree's vaclm, installed or not
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; never wait on a network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpucheck.common import Deadline, environment, log, write_json  # noqa: E402

PARTS = ("a", "b", "c")
# share of the budget each part may use; the rest is start-up and reporting
SHARES = {"a": 0.15, "b": 0.45, "c": 0.4}
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check"


def settings(args) -> dict:
    """Everything the workers need, with the toy sizes when the shape is tiny."""
    from vaclm.config import CompressConfig

    tiny = args.shape == "tiny"
    default_align = CompressConfig().rank_align  # measured first: the acceptance is about the default
    aligns = [8, 16] if tiny else [8, 64, 128]
    aligns = [default_align] + [a for a in aligns if a != default_align]
    return {
        "device": args.device, "shape": args.shape, "tiny": tiny,
        "pipeline": {"blocks": args.pipeline_blocks or ([1, 2]), "dtype": args.pipeline_dtype or
                     ("float32" if tiny else "bfloat16"), "samples": 8 if tiny else 32, "seq_len": 64 if tiny else 512,
                     "keep": 0.8, "probe_samples": 2 if tiny else 4,
                     # the acceptance's GPU memory limit: its grouping is extrapolated next to the default's
                     "gpu_limit": None if args.device == "cpu" else int(60e9)},
        "speed": {"keep": 0.6, "aligns": aligns, "prefill": 32 if tiny else 2048,
                  "batches": [1, 2] if tiny else [1, 16], "prompt": 4 if tiny else 16,
                  "new_tokens": 2 if tiny else 32, "reps": 1 if tiny else 3,
                  "dtype": "float32" if (tiny and args.device == "cpu") else "bfloat16",
                  "compile_backend": args.compile_backend or ("eager" if tiny else "inductor"),
                  "compile_mode": args.compile_mode},
    }


# workers ---------------------------------------------------------------------------------------

def run_worker(part: str, spec: dict) -> None:
    """In the worker process: one part (or one block count of part b), results to spec['out']."""
    import torch

    threads = torch.get_num_threads()
    if spec["device"] == "cpu" and spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        _run_part(part, spec)
    finally:
        torch.set_num_threads(threads)  # in-process runs leave the caller's setting alone


def _run_part(part: str, spec: dict) -> None:
    deadline = Deadline(spec["cap"])
    out = Path(spec["out"])
    if part == "a":
        from gpucheck.cuda_paths import run_checks

        run_checks(spec["device"], out, deadline)
    elif part == "b":
        from gpucheck.pipeline import run_pipeline

        p = spec["pipeline"]
        run_pipeline(spec["shape"], spec["blocks"], spec["device"], p["dtype"], p["samples"], p["seq_len"], p["keep"],
                     p["probe_samples"], out, gpu_limit=p.get("gpu_limit"))
    elif part == "c":
        from gpucheck.speed import run_speed

        run_speed(spec["shape"], spec["device"], spec["speed"], out, deadline)


def launch(part: str, spec: dict, cap: float, out_file: Path, in_process: bool) -> dict:
    """Run one worker under a hard cap; returns {status, seconds, data (what it wrote), log_tail}."""
    spec = {**spec, "cap": cap, "out": str(out_file)}
    out_file.unlink(missing_ok=True)
    start = time.time()
    status, tail = "done", ""
    if in_process:
        try:
            run_worker(part, spec)
        except Exception:  # noqa: BLE001  (reported, the other parts still run)
            import traceback

            status, tail = "error", traceback.format_exc()[-3000:]
    else:
        log_file = out_file.with_suffix(".log")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
        with open(log_file, "w") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", part,
                                     "--spec", json.dumps(spec)], stderr=err, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=cap + 5)
                status = "done" if code == 0 else f"error (exit {code})"
            except subprocess.TimeoutExpired:
                status = f"time cap ({cap:.0f} s) hit: killed"
                _kill(proc)
        tail = log_file.read_text(errors="replace")[-3000:] if status != "done" else ""
    data = json.loads(out_file.read_text()) if out_file.exists() else None
    return {"status": status, "seconds": time.time() - start, "data": data, "log_tail": tail}


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


# the parts -------------------------------------------------------------------------------------

def part_a(spec, cap, out, in_process) -> dict:
    log(f"part a: CUDA code paths against the CPU (cap {cap:.0f} s)")
    run = launch("a", spec, cap, out / "part_a.json", in_process)
    checks = (run["data"] or {}).get("checks", [])
    return {"status": run["status"], "seconds": run["seconds"], "checks": checks, "log_tail": run["log_tail"],
            "notes": (run["data"] or {}).get("notes", [])}


def part_b(spec, cap, out, in_process) -> dict:
    from gpucheck.pipeline import extrapolate

    deadline = Deadline(cap)
    blocks = spec["pipeline"]["blocks"]
    log(f"part b: the default pipeline on {blocks} block(s) of the {spec['shape']} shape (cap {cap:.0f} s)")
    runs, notes, last = [], [], None
    for k in blocks:
        if last is not None:
            need = last["seconds"] * k / last["blocks"] * 1.2
            if not deadline.allows(need):
                notes.append(f"{k} blocks skipped: {deadline.left():.0f} s left, about {need:.0f} s needed "
                             f"(from the {last['blocks']}-block run)")
                log("part b: " + notes[-1])
                continue
        if deadline.left() < 5:
            notes.append(f"{k} blocks skipped: the part's time cap is spent")
            continue
        run = launch("b", {**spec, "blocks": k}, deadline.left(), out / f"part_b_{k}.json", in_process)
        data = run["data"] or {"blocks": k, "status": "no result"}
        if run["status"] != "done":
            data["status"] = run["status"]
            data["log_tail"] = run["log_tail"]
            notes.append(f"{k} blocks: {run['status']}")
        runs.append(data)
        if data.get("status") == "done":
            last = {"blocks": k, "seconds": run["seconds"]}
        else:
            break  # more blocks would fail the same way
    complete = runs and not notes and all(r.get("status") == "done" for r in runs)
    status = "done" if complete else "partial" if runs else "not run"
    return {"status": status, "seconds": cap - deadline.left(), "runs": runs, "extrapolation": extrapolate(runs),
            "notes": notes}


def part_c(spec, cap, out, in_process) -> dict:
    log(f"part c: speed of keep {spec['speed']['keep']} factorised against dense (cap {cap:.0f} s)")
    run = launch("c", spec, cap, out / "part_c.json", in_process)
    data = run["data"] or {}
    return {"status": run["status"], "seconds": run["seconds"], **data, "log_tail": run["log_tail"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The GPU check of issue 19 (docs/gpu.md).")
    p.add_argument("--out", default=os.environ.get("VACLM_GPU_CHECK_OUT", str(DEFAULT_OUT)),
                   help="folder of gpu_check.json / .md (default: $VACLM_GPU_CHECK_OUT or bench/results/gpu_check)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the default when CUDA is not available)")
    p.add_argument("--shape", choices=("8b", "tiny"), help="model shape (default: 8b with CUDA, else tiny)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--parts", default="a,b,c", help="which parts, e.g. a,c")
    p.add_argument("--pipeline-blocks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="block counts part b measures (default 1,2)")
    p.add_argument("--pipeline-dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; eager when tiny)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the workers")
    p.add_argument("--in-process", action="store_true", help="run the parts in this process (no hard time caps)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args.worker, json.loads(args.spec))
        return 0

    import torch

    begin = BEGIN
    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        print("gpu_check: --device cuda asked for but CUDA is not available; use --device cpu or --tiny", file=sys.stderr)
        return 2
    if args.tiny:
        args.shape = "tiny"
    args.shape = args.shape or ("8b" if args.device == "cuda" else "tiny")
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        print(f"gpu_check: --parts takes a comma list of {', '.join(PARTS)}, got {args.parts!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = settings(args)
    # toy sizes run fastest on one thread (and a shared CPU then hurts them least)
    spec["threads"] = args.threads or (1 if args.shape == "tiny" and args.device == "cpu" else None)
    if args.compile_mode is None:
        spec["speed"]["compile_mode"] = "reduce-overhead" if args.device == "cuda" else None

    report = {"version": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "shape": args.shape, "budget_seconds": args.budget, "environment": environment(),
              "settings": spec, "parts": {}}
    log(f"device {args.device}, shape {args.shape}, parts {','.join(parts)}, budget {args.budget:.0f} s -> {out}")
    deadline = Deadline(args.budget - 15 - (time.time() - begin))  # keep time for the report
    runners = {"a": part_a, "b": part_b, "c": part_c}
    for i, part in enumerate(parts):
        rest = parts[i:]
        cap = deadline.left() * SHARES[part] / sum(SHARES[x] for x in rest)
        if cap < 10:
            report["parts"][part] = {"status": "skipped: the check's time budget is spent"}
            continue
        report["parts"][part] = runners[part](spec, cap, out, args.in_process)
        report["wall_seconds"] = time.time() - begin
        finish(report, out)  # a report after every part: an outer kill still leaves one
    report["wall_seconds"] = time.time() - begin
    finish(report, out)
    log(f"done in {report['wall_seconds']:.0f} s: {out / 'gpu_check.md'}")
    print((out / "gpu_check.md").read_text())
    return 0


def finish(report: dict, out: Path) -> None:
    from gpucheck.report import criteria, render

    report["criteria"] = criteria(report)
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(render(report))


if __name__ == "__main__":
    sys.exit(main())
