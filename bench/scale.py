"""How the pipeline's cost grows with the model, against `vaclm plan`'s estimates.

Random-initialised Llama-shaped models built from configs of growing width (the demo model's,
Llama-3.2-1B's, Llama-3.2-3B's), cut to a few decoder blocks so that each runs in minutes on a
laptop CPU, with synthetic calibration tokens. Every size runs the default pipeline (gfwsvd +
knapsack, keep 0.8) in a fresh process: time and peak RSS of every stage (vaclm's own stage log),
next to the plan's estimate for the same shape, config and machine. The 1B shape runs again with
a small --memory-budget, which splits the gradient statistics into groups.

    .venv/bin/python bench/scale.py            # writes docs/scale_sweep.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, run_worker  # noqa: E402

# Llama-family shapes (hidden, MLP, heads, KV heads, vocab, tied embeddings, blocks of the real model)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, tie_word_embeddings=True, full_blocks=30),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, tie_word_embeddings=True, full_blocks=16),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                         vocab_size=128256, tie_word_embeddings=True, full_blocks=28),
}
RUNS = [  # (shape, blocks, memory budget or None)
    ("smollm2-135m", 2, None), ("smollm2-135m", 4, None),
    ("llama-3.2-1b", 1, None), ("llama-3.2-1b", 1, "4GB"), ("llama-3.2-3b", 1, None),
    ("llama-3.2-1b", 2, None),
]
SAMPLES, SEQ_LEN = 4, 256  # synthetic calibration: the same for every size


def build(shape: str, blocks: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k != "full_blocks"}
    config = LlamaConfig(**spec, num_hidden_layers=blocks, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def worker(shape: str, blocks: int, budget: str | None) -> dict:
    import vaclm
    from vaclm.config import CompressConfig
    from vaclm.options import parse_size
    from vaclm.plan.estimate import plan_compression
    from vaclm.plan.shapes import shape_of
    from vaclm.plan.throughput import measure
    from vaclm.resources import StageLog, rss_bytes

    torch.set_num_threads(2)
    config = CompressConfig(keep=0.8, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
                            memory_budget=parse_size(budget) if budget else None)
    model = build(shape, blocks)
    model_shape = shape_of(model)
    base = rss_bytes() - model_shape.parameters * 4  # what the process holds besides the weights
    throughput = measure("cpu", torch.float32, width=model_shape.hidden)
    plan = plan_compression(model_shape, config, throughput, "cpu", base_bytes=base)
    calib = torch.randint(0, model.config.vocab_size, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    result = vaclm.compress(model, config, calib, progress=False)
    log = StageLog("cpu")
    with tempfile.TemporaryDirectory() as tmp, log.stage("save"):
        vaclm.save(model, Path(tmp) / "out", result=result)
    measured = {**result.stages, **log.to_dict()}
    planned = {s.name: s for s in plan.stages}
    return {
        "shape": shape, "blocks": blocks, "full_blocks": SHAPES[shape]["full_blocks"], "memory_budget": budget,
        "parameters": model_shape.parameters, "block_parameters": model_shape.target_parameters // blocks,
        "calibration": f"{SAMPLES} x {SEQ_LEN}", "seconds": time.perf_counter() - start,
        "stages": {name: {**m, "planned_seconds": planned[name].seconds,
                          "planned_peak_host_bytes": planned[name].peak_host_bytes}
                   for name, m in measured.items() if name in planned},
        "gradient_groups_planned": plan.gradient_groups, "throughput": throughput.to_dict(), "base_bytes": base,
    }


def replan(row: dict) -> dict:
    """The row's planned figures from the current plan code, with the throughput its run measured."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vaclm.config import CompressConfig
    from vaclm.options import parse_size
    from vaclm.plan.estimate import plan_compression
    from vaclm.plan.shapes import shape_of
    from vaclm.plan.throughput import Throughput

    spec = {k: v for k, v in SHAPES[row["shape"]].items() if k != "full_blocks"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**spec, num_hidden_layers=row["blocks"]))
    shape = shape_of(model)
    config = CompressConfig(keep=0.8, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
                            memory_budget=parse_size(row["memory_budget"]) if row["memory_budget"] else None)
    base = row.get("base_bytes")
    if base is None:  # rows written before base_bytes was kept: the plan's save peak is base + weights after
        after = shape.parameters * 4 - int((shape.target_parameters - config.keep * shape.target_parameters) * 4)
        base = row["stages"]["save"]["planned_peak_host_bytes"] - after
    plan = plan_compression(shape, config, Throughput(**row["throughput"]), "cpu", base_bytes=base)
    for stage in plan.stages:
        if stage.name in row["stages"]:
            row["stages"][stage.name].update(planned_seconds=stage.seconds, planned_peak_host_bytes=stage.peak_host_bytes)
    row["gradient_groups_planned"] = plan.gradient_groups
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Pipeline cost against model size, and `vaclm plan`'s estimates",
        "",
        "Random-initialised Llama-shaped models cut to a few blocks, float32 on 2 CPU threads, "
        f"{SAMPLES} x {SEQ_LEN} synthetic calibration tokens, gfwsvd + knapsack at keep 0.8. Measured: vaclm's "
        "stage log (wall seconds, peak RSS of the process during the stage). Planned: `vaclm plan`'s estimate for "
        "the same shape and config, from its micro-benchmark in the same process.",
        "",
        "    .venv/bin/python bench/scale.py",
        "",
        "| shape | blocks | budget | stage | seconds | planned | s per block | peak RSS | planned RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name, s in r["stages"].items():
            lines.append(f"| {r['shape']} | {r['blocks']} | {r['memory_budget'] or '-'} | {name} | "
                         f"{s['seconds']:.1f} | {s['planned_seconds']:.1f} | {s['seconds'] / r['blocks']:.2f} | "
                         f"{s['peak_host_bytes'] / 2**30:.2f} GiB | {s['planned_peak_host_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for stage, color in (("gradient statistics", "C0"), ("allocation", "C1"), ("sequential pass", "C2")):
        xs = [r["block_parameters"] for r in rows if not r["memory_budget"]]
        ax.scatter(xs, [r["stages"][stage]["seconds"] / r["blocks"] for r in rows if not r["memory_budget"]],
                   color=color, label=f"{stage} (measured)")
        ax.scatter(xs, [r["stages"][stage]["planned_seconds"] / r["blocks"] for r in rows if not r["memory_budget"]],
                   color=color, marker="x", label=f"{stage} (planned)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear parameters per block")
    ax.set_ylabel("seconds per block")
    ax.set_title(f"cost per block, {SAMPLES} x {SEQ_LEN} calibration tokens, 2 CPU threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "BLOCKS", "BUDGET"), help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help="comma-separated shapes to run (default: all); rows of other "
                                                     "runs already in the .json stay")
    parser.add_argument("--replan", action="store_true", help="recompute the planned figures of the rows in the "
                                                                   ".json (after a change to the plan), run nothing")
    parser.add_argument("--out", default=str(REPO / "docs" / "scale_sweep"), help="path prefix of the .json/.md/.png")
    args = parser.parse_args()
    if args.replan:  # the plan's figures again from the measured throughput, nothing run
        out = Path(args.out)
        rows = [replan(r) for r in json.loads(out.with_suffix(".json").read_text())]
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        out.with_suffix(".md").write_text(markdown(rows))
        plot(rows, out.with_suffix(".png"))
        return
    if args.worker:
        shape, blocks, budget = args.worker
        print(json.dumps(worker(shape, int(blocks), None if budget == "-" else budget)))
        return
    only = set(args.only.split(",")) if args.only else set(SHAPES)
    out = Path(args.out)
    key = lambda r: (r["shape"], r["blocks"], r["memory_budget"])  # noqa: E731
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    for shape, blocks, budget in RUNS:
        if shape not in only:
            continue
        row = run_worker(Path(__file__), [shape, str(blocks), budget or "-"])
        print(f"{shape} x{blocks} budget {budget}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
        # written after every run, replacing an earlier row of the same run: a long sweep can stop
        rows = [r for r in rows if key(r) != key(row)] + [row]
        rows.sort(key=lambda r: (r["parameters"], r["blocks"], r["memory_budget"] or ""))
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        out.with_suffix(".md").write_text(markdown(rows))
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
