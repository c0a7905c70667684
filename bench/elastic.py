"""The elastic experiment: one `vaclm compress --elastic` run at the top keep, resized to smaller keeps,
against dedicated default runs at each keep. Writes docs/elastic.json, docs/elastic.md, docs/elastic.png.

    .venv/bin/python bench/elastic.py --work out/elastic --dedicated out/dedicated

Per variant (`sequential`: the default walk at the top size; `one-shot`: --no-sequential, every
statistic from the dense model) it runs, unless the folder is already there:
  vaclm compress demo --keep TOP --elastic [--no-sequential] --out WORK/elastic-VARIANT
      (through the API, sharing the gradient statistics between variants: WORK/gradients)
  vaclm resize WORK/elastic-VARIANT --keep K --out WORK/VARIANT-K       (timed, peak RSS)
  vaclm eval FOLDER --json                                              (16 x 1024 WikiText-2 test)
The dedicated runs are DEDICATED/keepK/ with their PPL in DEDICATED/keepK.eval.json (made with
`vaclm compress demo --keep K --out DEDICATED/keepK` and `vaclm eval ... --json`, run here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"sequential": [], "one-shot": ["--no-sequential"]}


def vaclm(*args: str, timed: bool = False) -> tuple[dict, dict]:
    """Run `python -m vaclm ARGS --json`: (its JSON, {"wall_s", "peak_rss_bytes"} when timed)."""
    command = [sys.executable, "-m", "vaclm", *args, "--json"]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    start = time.time()
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    wall = time.time() - start
    if run.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    extra = {"wall_s": wall}
    if timed:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
        extra["peak_rss_bytes"] = int(match.group(1)) * 1024 if match else None
        cpu = [float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", run.stderr)]
        extra["cpu_s"] = sum(cpu) if cpu else None  # less sensitive than wall time to a loaded machine
    return out, extra


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


EVALUATE = True  # --no-eval: only what is already cached (a partial table)


def ppl(folder: Path, cache: Path) -> float | None:
    """The protocol's PPL of `folder`, cached in `cache` (a vaclm eval --json result)."""
    if not cache.exists() and not EVALUATE:
        return None
    if not cache.exists():
        out, _ = vaclm("eval", str(folder), "--quiet")
        cache.write_text(json.dumps(out))
    return json.loads(cache.read_text())["ppl"]


def dedicated(root: Path, keep: float, reference: dict[float, float], run_missing: bool = True
              ) -> tuple[Path | None, float | None, str]:
    """(folder, PPL, where the PPL comes from) of the dedicated default run at `keep`."""
    folder = root / f"keep{keep:g}"
    if keep in reference and not (root / f"keep{keep:g}.eval.json").exists():
        return None, reference[keep], "given (--reference)"
    if not run_missing and not (root / f"keep{keep:g}.eval.json").exists():
        return None, None, "missing"
    while (root / f"keep{keep:g}.partial").exists() or (folder.exists() and not (root / f"keep{keep:g}.eval.json").exists()
                                                         and (root / f"keep{keep:g}.eval.log").exists()):
        time.sleep(30)  # another process is making it (and its eval)
    if not folder.exists():
        vaclm("compress", "demo", "--keep", f"{keep:g}", "--out", str(folder), "--quiet")
    return folder, ppl(folder, root / f"keep{keep:g}.eval.json"), "measured"


def compress_worker(variant: str, top: float, out: str, gradients: str) -> None:
    """`vaclm compress demo --keep TOP --elastic [--no-sequential] --out OUT` through the API, with the
    gradient statistics cached in GRADIENTS: they depend only on the model and the calibration
    windows, not on the variant (the API's `gradients=`), so the second variant skips half the work."""
    import vaclm
    from vaclm.api import calibration_ids
    from vaclm.config import CompressConfig
    from vaclm.io.checkpoint import load_gradients, save_all_gradients
    from vaclm.pipeline.run import Run

    model, tokenizer = vaclm.load("demo")
    config = CompressConfig(keep=top, elastic=True, sequential=variant == "sequential")
    cache = Path(gradients)
    if cache.exists():
        grads = load_gradients(cache)
    else:
        grads = Run(model, config, calibration_ids("wikitext2", tokenizer, config), progress=False).gradients()
        save_all_gradients(cache, grads)
    result = vaclm.compress(model, config, "wikitext2", tokenizer=tokenizer, gradients=grads, progress=False)
    vaclm.save(model, out, tokenizer, result=result)
    print(json.dumps({"out": out, "kept_fraction": result.kept_fraction, "seconds": result.seconds,
                      "gradients_cached": True}))


def run_variant(name: str, flags: list[str], top: float, keeps: list[float], work: Path) -> dict:
    elastic = work / f"elastic-{name}"
    log = work / f"elastic-{name}.compress.json"
    if not elastic.exists():
        command = ["/usr/bin/time", "-v", sys.executable, __file__, "--compress-worker", name, f"{top:g}", str(elastic),
                   str(work / "gradients")]
        start = time.time()
        run = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if run.returncode != 0:
            raise SystemExit(f"failed: {' '.join(command)}\n{run.stderr[-3000:]}")
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
        log.write_text(json.dumps({**json.loads(run.stdout.strip().splitlines()[-1]), "wall_s": time.time() - start,
                                   "peak_rss_bytes": int(match.group(1)) * 1024 if match else None}))
    compress = json.loads(log.read_text()) if log.exists() else {}
    rows = [{"keep": top, "ppl": ppl(elastic, work / f"elastic-{name}.eval.json"),
             "kept_fraction": compress.get("kept_fraction"), "resize_s": None, "resize_peak_rss_bytes": None}]
    for keep in keeps:
        out_folder = work / f"{name}-{keep:g}"
        resize, extra = vaclm("resize", str(elastic), "--keep", f"{keep:g}", "--out", str(out_folder), "--overwrite",
                              timed=True)
        rows.append({"keep": keep, "ppl": ppl(out_folder, work / f"{name}-{keep:g}.eval.json"),
                     "kept_fraction": resize["kept_fraction"], "resize_s": extra["wall_s"], "resize_cpu_s": extra["cpu_s"],
                     "resize_peak_rss_bytes": extra["peak_rss_bytes"], "folder_bytes": weight_bytes(out_folder)})
    order = json.loads((elastic / "elastic" / "order.json").read_text())
    return {"folder": str(elastic), "flags": flags, "compress": compress, "folder_bytes": folder_bytes(elastic),
            "dense_at_top": len(order["spare_ranks"]), "targets": len(order["order"]["shapes"]),
            "min_keep": order["min_keep"],
            "weight_bytes": weight_bytes(elastic), "spare_bytes": weight_bytes(elastic / "elastic"), "rows": rows}


def loads_like_resize(elastic: Path, resized: Path, keep: float) -> dict:
    """load(elastic, keep=K) against the resized folder loaded plainly: every tensor equal, bitwise."""
    import torch
    from transformers import AutoModelForCausalLM

    import vaclm  # noqa: F401  (registers the quantizer and its `keep` loading option)
    from vaclm.io.hf_quantizer import VaclmConfig

    # plain transformers: the folder's own quantization_config, with `keep` from the override
    a = AutoModelForCausalLM.from_pretrained(str(elastic), quantization_config=VaclmConfig(keep=keep))
    b = AutoModelForCausalLM.from_pretrained(str(resized))
    sa, sb = a.state_dict(), b.state_dict()
    return {"keep": keep, "same_keys": set(sa) == set(sb),
            "bitwise_equal": set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)}


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ded = sorted(result["dedicated"].items(), key=lambda kv: float(kv[0]))
    ax.plot([float(k) for k, _ in ded], [v["ppl"] for _, v in ded], "o-", label="dedicated default run per keep")
    for name, variant in result["variants"].items():
        rows = sorted((r for r in variant["rows"] if r["ppl"] is not None), key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in rows], [r["ppl"] for r in rows], "s--",
                label=f"one elastic run at {result['top']:g} ({name}), resized")
    ax.set_xlabel("keep (fraction of decoder linear parameters)")
    ax.set_ylabel("PPL, WikiText-2 test 16 x 1024")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


INTRO = """# Elastic compression: one run, any size

```bash
vaclm compress MODEL --keep 0.9 --elastic --out big        # one run at the largest size you want
vaclm resize big --keep 0.6 --out small                     # any smaller size: seconds, no data, no gradients
```
```python
model, tokenizer = vaclm.load("big", keep=0.6)             # the same model, without writing a folder
model = AutoModelForCausalLM.from_pretrained("big", quantization_config=VaclmConfig(keep=0.6))  # after import vaclm
```

**How.** Truncated SVD factors are nested: every method here factorises by "weight, truncate,
unweight" (methods/base.py), so the first r columns of `up` and rows of `down` are the rank-r
result (tests/test_elastic.py checks the prefix against a rank-r factorisation, bitwise, and its error
in the Kronecker-Fisher form). The knapsack prices every rank of every matrix in one unit (estimated
loss per parameter), so `--elastic` sorts the steps down of every matrix (dense -> largest saving
rank -> ... -> rank 8, one grid step each) by loss added per parameter freed, each step at the slope of
its matrix's lower convex hull (allocate/nested.py). The first n steps are the knapsack's Lagrangian
solution at their cost, and a smaller budget takes more steps of the same order: ranks only fall, so
every smaller model is a prefix of every matrix's factors. `--keep` is the top size: the run
compresses at the first steps that fit it (block by block, sequentially, as a default run) and keeps
the order. `vaclm resize` (and `load(..., keep=)`) takes the fewest steps from the top whose cost fits
K: the budget is met to within one rank-grid step (tests check it at several keeps).

**Sequential or one-shot.** An elastic run follows `--no-sequential` like any run. Sequential (the
default): every matrix is factorised on the statistics the compressed prefix produces at the top
size, and smaller sizes take prefixes of those factors (a dedicated run at a smaller keep would
see a more compressed prefix). One-shot: every statistic from the dense model, a bank that depends
on no size. Both were measured below against dedicated runs; the sequential prefixes were as good
or better at every size, the more so the smaller the keep, so `--elastic` keeps the default.

**Matrices dense at the top size.** A matrix the knapsack keeps dense at the top keep gets a rank
at smaller keeps. The elastic folder stores its dense weight (the top model needs it) and, in
`elastic/spare.safetensors`, its factors at the largest rank any smaller keep gives it, made in the
same sequential walk from the same statistics (the model itself stays dense). Resizing to a keep
where it is factorised takes the prefix of those spares and moves its bias to `up.bias`; where it is
still dense, the dense weight is copied. This, and nothing else, makes the folder larger than the
top-size default folder. Float32 spares are stored in float16 (cast back when resized): a matrix's
first step down from dense goes to its largest saving rank (e.g. 416 of a 1536 x 576 projection, whose
factors save parameters only below rank 418), so in float32 the spares were almost as large as the
dense weights they stand beside (demo at keep 0.9: 328 MB next to a 496 MB model, 1.66x); float16
rounding (2^-11 relative) is far below the truncation error of any rank a spare is used at, and the
resized models' PPL below shows what it changed.

**int8.** `vaclm compress --elastic --int8` stores int8 factors and int8 spares; a resize slices
`down`'s rows with their per-row scales and keeps `up`'s scales (each the maximum over the top rank's
columns), so a resized int8 model is as precise as, or slightly coarser than, quantising its float
factors afresh. `vaclm export --int8` of an elastic folder writes an ordinary (non-elastic) folder.

**What loads where.** The elastic folder is an ordinary vaclm folder at the top size (vLLM and
transformers read it as such; `elastic/` is a sub-folder they ignore). A resized folder is an
ordinary vaclm folder, tensors named and shaped as a `vaclm compress` folder, so transformers
(after `import vaclm`, or through the .pth hook) and the vLLM plugin load it like any other.
`vaclm resize` reads only the slices it keeps (safetensors `get_slice`) and writes shard by shard;
`from_pretrained(..., quantization_config=VaclmConfig(keep=K))` and `vaclm.load(..., keep=K)` let
transformers load the top-size tensors and then cut them (and read the spares' slices), so they
briefly hold the top-size model. A keep above the folder's top size or below its smallest ranks is
refused in one line (exit code 2 in the CLI), before anything is read or written.

"""


def markdown(result: dict, command: str) -> str:
    top = f"{result['top']:g}"
    lines = [INTRO, "## The experiment (demo model)", "", "Made by", "", "```bash", command, "```", "",
             "PPL on the first 16 x 1024 tokens of WikiText-2 raw test. Dedicated: `vaclm compress demo --keep K` "
             "(defaults), one run per keep. Elastic: one `vaclm compress demo --keep "
             f"{top} --elastic` run, then `vaclm resize --keep K` (no data). Gap: elastic PPL over dedicated, in %.", ""]
    names = list(result["variants"])
    head = "| keep | dedicated PPL | " + " | ".join(f"elastic ({n}) PPL | gap ({n})" for n in names) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(names))]
    keeps = sorted({r["keep"] for v in result["variants"].values() for r in v["rows"]}, reverse=True)
    for keep in keeps:
        ded = result["dedicated"].get(f"{keep:g}")
        mark = "" if not ded or ded.get("source", "measured") == "measured" else " *"
        cells = [f"{keep:g}", f"{ded['ppl']:.2f}{mark}" if ded else "–"]
        for n in names:
            row = next((r for r in result["variants"][n]["rows"] if r["keep"] == keep), None)
            have = row is not None and row["ppl"] is not None
            cells += [f"{row['ppl']:.2f}" if have else "–",
                      f"{100 * (row['ppl'] / ded['ppl'] - 1):+.1f}%" if have and ded else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(d.get("source", "measured") != "measured" for d in result["dedicated"].values()):
        lines += ["", "\\* dedicated PPL given with `--reference`: a default run's PPL on the same protocol measured "
                      "before (the README's results table), not run by this script."]
    ded = result["dedicated_top_weight_bytes"]
    lines += ["", "![PPL against keep](elastic.png)", "",
              "Weights on disk (every .safetensors file). The elastic folder's own top-size model is its "
              "model.safetensors: the same tensors a default folder at those ranks holds.", "",
              "| variant | elastic folder | its top-size model | spare factors | ratio to its top-size model "
              f"| default keep-{top} folder | ratio to it |", "|---|---|---|---|---|---|---|"]
    for n, v in result["variants"].items():
        own = v["weight_bytes"] - v["spare_bytes"]
        lines.append(f"| {n} | {v['weight_bytes'] / 1e6:.1f} MB | "
                     f"{own / 1e6:.1f} MB | {v['spare_bytes'] / 1e6:.1f} MB | {v['weight_bytes'] / own:.3f}x | "
                     + (f"{ded / 1e6:.1f} MB | {v['weight_bytes'] / ded:.3f}x |" if ded else "not measured | – |"))
    for n, v in result["variants"].items():
        if "dense_at_top" in v:
            lines += ["", f"{n}: {v['dense_at_top']} of {v['targets']} matrices are dense at keep {top} (a 576 x 1536 "
                          "projection only saves parameters below rank 418), so the spares (at the largest rank a "
                          "smaller keep gives each) are what makes the folder larger; the order reaches down to keep "
                          f"{v['min_keep']:.3f}."]
    lines += ["", "`vaclm resize` as a command (Python start and imports included), on a machine shared with other "
                  "jobs: wall seconds depend on the load, CPU seconds (user + system) less so.", "",
              "| variant | keep | kept fraction | resize wall s | resize CPU s | resize peak RSS | resized weights |",
              "|---|---|---|---|---|---|---|"]
    for n, v in result["variants"].items():
        for r in v["rows"]:
            if r["resize_s"] is not None:
                lines.append(f"| {n} | {r['keep']:g} | {r['kept_fraction']:.4f} | {r['resize_s']:.1f} | "
                             f"{r.get('resize_cpu_s') or float('nan'):.1f} | "
                             f"{r['resize_peak_rss_bytes'] / 1e6:.0f} MB | {r['folder_bytes'] / 1e6:.1f} MB |")
    for n, v in result["variants"].items():
        gaps = [(r["keep"], 100 * (r["ppl"] / result["dedicated"][f"{r['keep']:g}"]["ppl"] - 1)) for r in v["rows"]
                if f"{r['keep']:g}" in result["dedicated"] and r["ppl"] is not None]
        if gaps:
            worst = max(gaps, key=lambda g: g[1])
            within = [k for k, g in gaps if g <= 3.0]
            lines += ["", f"{n}: gap to the dedicated runs {', '.join(f'{g:+.1f}% at {k:g}' for k, g in gaps)}; "
                          f"within 3% at {', '.join(f'{k:g}' for k in within) or 'no size'}; largest {worst[1]:+.1f}% at "
                          f"{worst[0]:g}. Differences under about 2% are seed noise on this model."]
    if {"sequential", "one-shot"} <= set(result["variants"]):
        rows = {n: {r["keep"]: r["ppl"] for r in result["variants"][n]["rows"] if r["ppl"] is not None}
                for n in ("sequential", "one-shot")}
        both = sorted(set(rows["sequential"]) & set(rows["one-shot"]), reverse=True)
        lines += ["", "One-shot against sequential (PPL of the one-shot bank over the sequential run's prefixes): "
                  + ", ".join(f"{100 * (rows['one-shot'][k] / rows['sequential'][k] - 1):+.1f}% at {k:g}" for k in both)
                  + "."]
    if result.get("load_check"):
        c = result["load_check"]
        lines += ["", f"`vaclm.load(elastic, keep={c['keep']:g})` against the resized folder loaded with plain "
                      f"`from_pretrained`: same tensors {c['same_keys']}, bitwise equal {c['bitwise_equal']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--compress-worker"]:
        return compress_worker(*sys.argv[2:3], float(sys.argv[3]), *sys.argv[4:6])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=float, default=0.9)
    p.add_argument("--keeps", default="0.8,0.7,0.6,0.5")
    p.add_argument("--variants", default="sequential,one-shot")
    p.add_argument("--work", type=Path, default=REPO / "out" / "elastic")
    p.add_argument("--dedicated", type=Path, default=REPO / "out" / "dedicated")
    p.add_argument("--docs", type=Path, default=REPO / "docs")
    p.add_argument("--report-only", action="store_true", help="rewrite DOCS/elastic.md and .png from DOCS/elastic.json "
                                                               "and the PPLs cached in WORK since (runs nothing)")
    p.add_argument("--no-eval", action="store_true", help="report only the PPLs already measured (cached in WORK)")
    p.add_argument("--no-dedicated-runs", action="store_true", help="use only the dedicated results already there")
    p.add_argument("--reference", default="", help="KEEP=PPL,...: dedicated PPLs measured elsewhere, used where "
                                                    "DEDICATED/keepK.eval.json is missing (nothing is run for them)")
    args = p.parse_args()
    global EVALUATE
    EVALUATE = not args.no_eval
    if args.report_only:  # PPLs measured since the last run (cached in WORK): tables and plot again
        result = json.loads((args.docs / "elastic.json").read_text())
        for name, variant in result["variants"].items():
            for row in variant["rows"]:
                top_row = row["keep"] == result["top"] and row["resize_s"] is None
                cache = args.work / (f"elastic-{name}.eval.json" if top_row else f"{name}-{row['keep']:g}.eval.json")
                if row["ppl"] is None and cache.exists():
                    row["ppl"] = json.loads(cache.read_text())["ppl"]
        return write_docs(result, args)
    keeps = [float(k) for k in args.keeps.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.dedicated.mkdir(parents=True, exist_ok=True)
    result = {"top": args.top, "keeps": keeps, "dedicated": {}, "variants": {}}
    for name in args.variants.split(","):
        result["variants"][name] = run_variant(name, VARIANTS[name], args.top, keeps, args.work)
        (args.docs / "elastic.json").write_text(json.dumps(result, indent=1))  # partial results survive
    reference = {float(k): float(v) for k, v in (item.split("=") for item in args.reference.split(",") if item)}
    for keep in [args.top, *keeps]:
        folder, value, source = dedicated(args.dedicated, keep, reference, not args.no_dedicated_runs)
        if value is not None:
            result["dedicated"][f"{keep:g}"] = {"folder": str(folder) if folder else None, "ppl": value,
                                                 "source": source, "weight_bytes": weight_bytes(folder) if folder else None}
    result["dedicated_top_weight_bytes"] = result["dedicated"].get(f"{args.top:g}", {}).get("weight_bytes")
    first = next(iter(result["variants"]))
    mid = keeps[len(keeps) // 2]
    result["load_check"] = loads_like_resize(Path(result["variants"][first]["folder"]), args.work / f"{first}-{mid:g}", mid)
    write_docs(result, args)


def write_docs(result: dict, args) -> None:
    (args.docs / "elastic.json").write_text(json.dumps(result, indent=1))
    plot(result, args.docs / "elastic.png")
    command = result.setdefault("command", "python bench/elastic.py " + " ".join(sys.argv[1:]))
    (args.docs / "elastic.md").write_text(markdown(result, command))
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}))


if __name__ == "__main__":
    main()
