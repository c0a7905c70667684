"""CPU speed of compressed demo models, float and int8, against the dense model, float and int8.

    .venv/bin/python bench/int8_speed.py                  # out/keep{0.9,0.8,0.7,0.6,0.5} (vaclm compress demo --keep K), 1 and 2 threads
    .venv/bin/python bench/int8_speed.py --folders out/keep0.6 --threads 1,2 --merge
    .venv/bin/python bench/int8_speed.py --ppl --folders out/keep0.6   # PPL, 16 x 1024 test tokens
    .venv/bin/python bench/int8_speed.py --compile --folders out/keep0.6 --threads 1   # eager and compiled decode

Each (folder, threads) runs in a fresh process that measures four configurations in one
interleaved run (vaclm.eval.speed.benchmark with int8_baseline): the dense demo model, the dense
model with int8 weights in every decoder linear and the lm_head, the folder's model as saved, and
the same with int8 weights (its factors, its dense targets and the lm_head: the same treatment).
Writes bench/results/int8_speed.{json,md} and docs/int8_speed.png (decode and prefill tokens per
second against the kept fraction). --ppl instead evaluates the folder float and with int8 weights on the
evaluation protocol and writes bench/results/int8_ppl.{json,md}. --compile measures the four
configurations eager and with compiled decode steps (vaclm bench --compile), eight in one
interleaved run, and writes bench/results/int8_compile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import REPO, RESULTS, merge_rows, run_worker, write_results

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
CONFIGS = ("baseline", "baseline_int8", "model", "model_int8")
LABELS = {"baseline": "dense float32", "baseline_int8": "dense int8", "model": "compressed float32",
          "model_int8": "compressed int8"}


def worker(folder: str, threads: int, reps: int, new_tokens: int, ppl: bool, compile_: bool = False,
           prefill_lens: str = "512,2048", decode_batches: str = "1,8") -> dict:
    import torch

    torch.set_num_threads(threads)
    import vaclm
    from vaclm.model.summary import summarize

    model, tokenizer = vaclm.load(folder)
    info = summarize(model, Path(folder))
    row = {"folder": folder, "kept_fraction": info["kept_fraction"], "int8_folder": info["int8"]}
    if ppl:
        import copy

        from vaclm.model.int8_dense import int8_weights

        quantised = copy.deepcopy(model)
        int8_weights(quantised, lm_head=True)
        for name, m in (("model", model), ("model_int8", quantised)):
            row[name] = vaclm.evaluate(m, "wikitext2", tokenizer, seq_len=1024, max_windows=16, progress=False)["ppl"]
        return row
    from vaclm.eval.speed import PAIRS, BenchSettings, benchmark, benchmark_models, configurations

    dense, _ = vaclm.load("demo")
    settings = BenchSettings(reps=reps, new_tokens=new_tokens, int8_baseline=True,
                             prefill_lens=tuple(int(n) for n in prefill_lens.split(",")),
                             decode_batches=tuple(int(b) for b in decode_batches.split(",")))
    if not compile_:
        return {**row, **benchmark(model, dense, settings, progress=False)}
    # the same four models, each also under a second name whose decode steps run compiled
    models = configurations(model, dense, int8=True)
    models.update({f"{name}_compiled": m for name, m in list(models.items())})
    pairs = list(PAIRS) + [(f"{a}_compiled", f"{b}_compiled", f"compiled_{p}", s) for a, b, p, s in PAIRS] + [
        (f"{name}_compiled", name, f"{name}_compiled_vs_eager_", "") for name in CONFIGS]
    return {**row, **benchmark_models(models, settings, progress=False, pairs=pairs,
                                      compiled={n for n in models if n.endswith("_compiled")})}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folders", nargs="*", default=[f"out/keep{k}" for k in KEEPS])
    p.add_argument("--worker", nargs="+")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl", action="store_true", help="perplexity (16 x 1024 test tokens) float and int8, no timing")
    p.add_argument("--merge", action="store_true", help="keep existing rows of other folders / thread counts")
    p.add_argument("--compile", action="store_true", help="eager and compiled decode (vaclm bench --compile), "
                                                          "eight configurations in one run: bench/results/int8_compile.*")
    p.add_argument("--prefill-lens", default="512,2048")
    p.add_argument("--decode-batches", default="1,8")
    args = p.parse_args()
    if args.worker:
        folder, threads, reps, new_tokens, ppl, compile_, lens, batches = args.worker
        print(json.dumps(worker(folder, int(threads), int(reps), int(new_tokens), ppl == "1", compile_ == "1", lens,
                                batches)))
        return
    folders = [f for f in args.folders if Path(f).is_dir()]
    for f in sorted(set(args.folders) - set(folders)):
        print(f"skipped (not there): {f}", flush=True)
    if args.ppl:
        rows = []
        for folder in folders:
            rows.append(run_worker(Path(__file__), [folder, "1", "0", "0", "1", "0", "1", "1"]))
            rows = merge_rows("int8_ppl", rows, lambda r: r["folder"]) if args.merge else rows
            write_results("int8_ppl", rows, render_ppl(rows))
            print(json.dumps(rows[-1]), flush=True)
        return
    name, show = ("int8_compile", render_compile) if args.compile else ("int8_speed", render)
    rows = json.loads((RESULTS / f"{name}.json").read_text()) if args.merge and (RESULTS / f"{name}.json").exists() else []
    for threads in [int(t) for t in args.threads.split(",")]:
        for folder in folders:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # the worker inherits it
            row = run_worker(Path(__file__), [folder, str(threads), str(args.reps), str(args.new_tokens), "0",
                                              "1" if args.compile else "0", args.prefill_lens, args.decode_batches])
            rows = [r for r in rows if (r["folder"], r["threads"]) != (folder, threads)] + [row]
            write_results(name, rows, show(rows))
            print(show([row]), flush=True)
    if not args.compile:
        plot(rows, REPO / "docs" / "int8_speed.png")
    print(show(rows))


def render(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (r["threads"], -r["kept_fraction"]))
    lines = ["One interleaved run per row (the four configurations take turns); tokens/s are wall-time medians. Each "
             "speedup is given as CPU-time ratio / wall-time ratio: on a shared machine the process's CPU seconds are "
             "what the work cost, wall time also holds the time other jobs took the cores. [bound]: the ratio of "
             "weight bytes read per decode step.", "",
             "| folder | kept | threads | decode b1 tok/s: dense f32 / dense int8 / compressed f32 / compressed int8 "
             "| decode b1, f32 factors vs dense f32 | decode b1, int8 vs dense f32 | decode b1, int8 vs dense int8 "
             "| decode b8: f32 / int8 vs dense f32 | prefill 512: f32 / int8 vs dense f32 | prefill 2048: f32 / int8 vs dense f32 "
             "| MB read per token (same order as tok/s) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, c = r["bytes_read_bounds"], r.get("cpu_time_speedups", {})
        sp = lambda key: "–" if key not in r else (f"{c[key]:.2f} / " if key in c else "") + f"{r[key]:.2f}"  # noqa: E731
        tok = " / ".join(f"{r[k]['decode_tokens_per_s']['1']:.1f}" for k in CONFIGS)
        mb = " / ".join(f"{r[k]['weights_read_per_token'] / 1e6:.0f}" for k in CONFIGS)
        lines.append(
            f"| {Path(r['folder']).name} | {r['kept_fraction']:.3f} | {r['threads']} | {tok} "
            f"| {sp('decode_speedup')} [{b['decode_speedup']:.2f}] | {sp('int8_decode_speedup')} [{b['int8_decode_speedup']:.2f}] "
            f"| {sp('decode_speedup_vs_int8')} [{b['decode_speedup_vs_int8']:.2f}] "
            f"| {sp('decode_speedup_b8')}; {sp('int8_decode_speedup_b8')} "
            f"| {sp('prefill_speedup')}; {sp('int8_prefill_speedup')} "
            f"| {sp('prefill_speedup_2048')}; {sp('int8_prefill_speedup_2048')} | {mb} "
            f"| {r['load_average'][0]}–{r['load_average'][1]} |")
    return "\n".join(lines) + "\n"


def render_compile(rows: list[dict]) -> str:
    """Decode at batch 1, eager and compiled, from one interleaved run of eight configurations."""
    lines = ["Decode, batch 1, one interleaved run of eight configurations per row (the four eager and the four with "
             "compiled decode steps). tok/s: wall-time medians; ratios: CPU-time / wall-time; compile: seconds of the "
             "first (untimed) decode run, the compile included.", "",
             "| folder | kept | threads | configuration | eager tok/s | compiled tok/s | compiled vs eager "
             "| eager vs dense f32 | compiled vs dense f32 compiled | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["threads"], -r["kept_fraction"])):
        c = r.get("cpu_time_speedups", {})
        sp = lambda key: (f"{c[key]:.2f} / " if key in c else "") + f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
        b = str(r["decode_batches"][0])
        for name in CONFIGS:
            vs = {"baseline": "", "baseline_int8": "int8_", "model": "", "model_int8": "int8_"}[name]
            eager = "-" if name == "baseline" else sp(f"{vs}decode_speedup")
            comp = "-" if name == "baseline" else sp(f"compiled_{vs}decode_speedup")
            if name == "baseline_int8":
                eager = comp = "-"
            lines.append(
                f"| {Path(r['folder']).name} | {r['kept_fraction']:.3f} | {r['threads']} | {LABELS[name]} "
                f"| {r[name]['decode_tokens_per_s'][b]:.1f} | {r[name + '_compiled']['decode_tokens_per_s'][b]:.1f} "
                f"| {sp(f'{name}_compiled_vs_eager_decode_speedup')} | {eager} | {comp} "
                f"| {r[name + '_compiled']['warmup_seconds'][f'decode_{b}']:.0f} |")
        lines.append(f"| | | | compressed int8 vs dense int8 | | | | {sp('decode_speedup_vs_int8')} "
                     f"| {sp('compiled_decode_speedup_vs_int8')} (vs dense int8 compiled) | |")
    return "\n".join(lines) + "\n"


def render_ppl(rows: list[dict]) -> str:
    lines = ["| folder | kept | PPL float factors | PPL int8 weights (factors, dense targets, lm_head) | change |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["kept_fraction"]):
        lines.append(f"| {Path(r['folder']).name} | {r['kept_fraction']:.3f} | {r['model']:.3f} | {r['model_int8']:.3f} "
                     f"| {100 * (r['model_int8'] / r['model'] - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


def tokens_per_second(row: dict, config: str, kind: str, key: str) -> float:
    """Tokens per wall second (median run). Not per CPU second: with OpenMP's default wait policy an
    idle thread spins, so CPU seconds count the second thread whether it works or not."""
    return row[config][f"{kind}_tokens_per_s"][key]


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(2, len(threads), figsize=(5.5 * len(threads), 7.5), squeeze=False)
    for col, t in enumerate(threads):
        sel = sorted((r for r in rows if r["threads"] == t), key=lambda r: r["kept_fraction"])
        keep = [r["kept_fraction"] for r in sel]
        for row, (kind, key, title) in enumerate((("decode", "1", "decode, batch 1"), ("prefill", "512", "prefill, 512 tokens"))):
            ax = axes[row][col]
            for c, style in (("model", "o-"), ("model_int8", "s-")):
                ax.plot(keep, [tokens_per_second(r, c, kind, key) for r in sel], style, label=LABELS[c])
            for c, style in (("baseline", "--"), ("baseline_int8", ":")):  # measured in every row: their median
                values = sorted(tokens_per_second(r, c, kind, key) for r in sel)
                ax.axhline(values[len(values) // 2], linestyle=style, color="grey" if c == "baseline" else "black",
                           label=LABELS[c])
            ax.set(title=f"{title}, {t} thread{'s' if t > 1 else ''}", xlabel="kept fraction of decoder weights",
                   ylabel="tokens per second")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, CPU: compressed vs dense,\nfloat32 and int8 weights")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
