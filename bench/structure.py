"""--structure prune / mixed against today's low-rank default on the demo model (docs/pruning.md).

    .venv/bin/python bench/structure.py run WORK prune:0.8 mixed:0.8 prune:0.6 mixed:0.6
    .venv/bin/python bench/structure.py report
    .venv/bin/python bench/structure.py llamacpp WORK WORK/prune-0.8   # needs the gguf-check extra

`run` compresses the demo model with the default calibration (32 x 512 WikiText-2 validation,
seed 0; every run takes the gradient statistics from one cached file, bench/common.py demo_gradients), saves each folder under
WORK (a scratch folder outside the repository: each is hundreds of MB), and records: test PPL (the protocol: first 16 x 1024 of WikiText-2 test), validation
PPL on 16 x 512 held-out validation windows (validation text not drawn for calibration: what
choices are made on), the kept fraction and the compression seconds. `report` writes the
rows (docs/pruning_results.json) as docs/pruning_results.md. `llamacpp` exports the pruned folder
and the dense demo model to GGUF, quantises both with llama.cpp (Q8_0, Q4_K_M), and measures PPL,
greedy text and speed through llama.cpp (docs/pruning_llama_cpp.json).
(The neuron criterion comparison in docs/pruning.md ran with a third field selecting MoDeGPT's ridge-
leverage order, removed since: it measured worse.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WIKI_TEST, WIKI_VALID, demo_gradients, peak_rss_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "pruning_results.json"
LLAMA_CPP = REPO / "docs" / "pruning_llama_cpp.json"


def validation_ids(tokenizer, config):
    """16 x 512 windows of the validation text that the calibration draw left out."""
    from vaclm.api import token_stream
    from vaclm.data.text import calibration_windows

    ids = token_stream(str(WIKI_VALID), tokenizer, "calibration")
    _, rest = calibration_windows(ids, config.calib_samples, config.calib_seq_len, config.seed)
    return rest[:16].flatten()


def test_windows(tokenizer):
    """The protocol's windows: the first 16 x 1024 tokens of WikiText-2 test."""
    import vaclm

    return vaclm.api.token_stream(str(WIKI_TEST), tokenizer, "evaluation")[: 16 * 1024].view(16, 1024)


def ppls(model, tokenizer, config) -> tuple[float, float]:
    """(validation PPL, test PPL): what choices are made on, and what is reported."""
    import vaclm

    val = vaclm.evaluate(model, validation_ids(tokenizer, config), seq_len=512, max_windows=16, progress=False)
    test = vaclm.evaluate(model, test_windows(tokenizer).flatten(), seq_len=1024, progress=False)
    return val["ppl"], test["ppl"]


def run_one(spec: str, work: Path) -> dict:
    import vaclm
    from vaclm.config import CompressConfig

    structure, keep = spec.split(":")
    model, tokenizer = vaclm.load("demo")
    config = CompressConfig(keep=float(keep), structure=structure)
    # the gradient statistics of the default calibration, computed once and cached (bench/common.py);
    # pruning alone needs only the down projections'
    grads, _ = demo_gradients(model, tokenizer, config)
    if structure == "prune":
        grads = {n: g for n, g in grads.items() if n.endswith("down_proj")}
    start = time.time()
    result = vaclm.compress(model, config, str(WIKI_VALID), tokenizer=tokenizer, progress=False, gradients=grads)
    seconds = time.time() - start
    folder = work / f"{structure}-{keep}"
    vaclm.save(model, folder, tokenizer, result=result, overwrite=True)
    val, test = ppls(model, tokenizer, config)
    return {"structure": structure, "keep": float(keep), "criterion": "fisher", "folder": folder.name,
            "kept_fraction": result.kept_fraction, "compress_seconds_shared_gradients": seconds,
            "pruned_mlps": len(result.widths), "factorised": sum(r is not None for r in result.ranks.values()),
            "val_ppl": val, "test_ppl": test, "peak_rss_gb": peak_rss_bytes() / 1e9,
            "measured": time.strftime("%Y-%m-%d %H:%M")}


def save_row(row: dict) -> None:
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = lambda r: (r["structure"], r["keep"], r.get("criterion"))  # noqa: E731
    rows = [r for r in rows if key(r) != key(row)] + [row]
    RESULTS.write_text(json.dumps(rows, indent=2))


def main(argv: list[str]) -> None:
    if argv[0] == "run":
        for spec in argv[2:]:
            row = run_one(spec, Path(argv[1]))
            print(json.dumps(row), flush=True)
            save_row(row)
    elif argv[0] == "report":
        write_report()
    elif argv[0] == "llamacpp":
        report = llama_cpp_check(Path(argv[1]), argv[2])
        LLAMA_CPP.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    elif argv[0] == "llamacpp-speed":  # the speed part again on the files `llamacpp` wrote (a quiet machine)
        import llama_cpp

        import vaclm

        work = Path(argv[1])
        report = json.loads(LLAMA_CPP.read_text())
        files = {tuple(k.split("-", 1)): work / v["file"] for k, v in report["files"].items()}
        _, tokenizer = vaclm.load("demo")
        ids = test_windows(tokenizer)
        report.update(llama_cpp_speed(llama_cpp, files, ids, report["threads"], repeats=int(argv[2]) if argv[2:] else 5))
        LLAMA_CPP.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("tokens_per_second", "speedup")}, indent=2))
    elif argv[0] == "speed":  # speed FOLDER...: every folder and the dense model in one interleaved run
        import torch

        import vaclm
        from vaclm.eval.speed import BenchSettings, benchmark_models

        torch.set_num_threads(2)
        models = {"dense": vaclm.load("demo")[0]}
        models.update({Path(f).name: vaclm.load(f)[0] for f in argv[1:]})
        settings = BenchSettings(prefill_lens=(512,), decode_batches=(1,), new_tokens=32, reps=3)
        pairs = [(name, "dense", f"{name}:", "") for name in models if name != "dense"]
        result = benchmark_models(models, settings, progress=False, pairs=pairs)
        rows = {name: {k: v for k, v in result.items() if k.startswith(f"{name}:")} for name in models if name != "dense"}
        out = {"threads": 2, "settings": "prefill 512, decode batch 1 (32 steps), 3 repetitions, wall-time medians",
               "load_average": result["load_average"], "speedups": rows,
               "tokens_per_second": {n: {"prefill_512": result[n]["prefill_tokens_per_s"]["512"],
                                         "decode_b1": result[n]["decode_tokens_per_s"]["1"]} for n in models}}
        (REPO / "docs" / "pruning_speed.json").write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
    elif argv[0] == "val":  # rows for existing folders (the low-rank defaults: `vaclm compress demo --keep K`)
        import vaclm
        from vaclm.config import CompressConfig

        for folder in argv[1:]:
            model, tokenizer = vaclm.load(folder)
            val, test = ppls(model, tokenizer, CompressConfig())
            report = json.loads((Path(folder) / "vaclm_report.json").read_text())
            row = {"structure": "lowrank", "keep": report["config"]["keep"], "criterion": "-", "folder": Path(folder).name,
                   "kept_fraction": report["kept_fraction"], "compress_seconds_shared_gradients": None,
                   "val_ppl": val, "test_ppl": test}
            print(json.dumps(row), flush=True)
            save_row(row)


def write_report() -> None:
    rows = json.loads(RESULTS.read_text())
    lines = ["| structure | keep | criterion | kept fraction | test PPL | validation PPL | compress s (shared gradients) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["keep"], r["structure"], r["criterion"])):
        seconds = r["compress_seconds_shared_gradients"]
        lines.append(f"| {r['structure']} | {r['keep']} | {r['criterion']} | {r['kept_fraction']:.4f} | "
                     f"{r['test_ppl']:.2f} | {r['val_ppl']:.2f} | {'–' if seconds is None else f'{seconds:.0f}'} |")
    (REPO / "docs" / "pruning_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


PROMPTS = ("The history of the city begins", "In mathematics, a prime number is", "The river flows through")


def llama_cpp_check(work: Path, pruned_folder: str, threads: int = 2, repeats: int = 5) -> dict:
    """The pruned folder and the dense demo model through the real llama.cpp (llama-cpp-python):
    PPL on the protocol's windows against transformers', greedy text, and speed side by side."""
    import numpy as np
    import llama_cpp
    import torch

    import vaclm
    from vaclm.io.gguf_export import export_gguf

    files = {}
    for label, source in (("dense", "demo"), ("pruned", pruned_folder)):
        f16 = work / f"{label}-f16.gguf"
        export_gguf(source, f16, overwrite=True)
        files[(label, "f16")] = f16
        for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            out = work / f"{label}-{name}.gguf"
            assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0, out
            files[(label, name)] = out
    model, tokenizer = vaclm.load(pruned_folder)
    ids = test_windows(tokenizer)
    report = {"threads": threads, "files": {f"{a}-{b}": {"file": p.name, "bytes": p.stat().st_size}
                                            for (a, b), p in files.items()}}
    report["transformers_ppl"] = {"pruned": vaclm.evaluate(model, ids.flatten(), seq_len=1024, progress=False)["ppl"]}
    dense, _ = vaclm.load("demo")
    report["transformers_ppl"]["dense"] = vaclm.evaluate(dense, ids.flatten(), seq_len=1024, progress=False)["ppl"]
    ppl = {}
    for key, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, verbose=False,
                              n_threads=threads)
        nll = 0.0
        for window in ids.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        ppl[f"{key[0]}-{key[1]}"] = float(np.exp(nll / (16 * 1023)))
        del llm
    report["llama_cpp_ppl"] = ppl
    # greedy continuations: transformers (float32) against llama.cpp (the float16 file)
    # logits_all: without it llama-cpp-python leaves `scores` zero (a greedy loop then emits token 0)
    llm = llama_cpp.Llama(str(files[("pruned", "f16")]), n_ctx=256, logits_all=True, verbose=False, n_threads=threads)
    greedy = []
    for prompt in PROMPTS:
        tokens = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([tokens]), max_new_tokens=32, do_sample=False)[0, len(tokens):].tolist()
        llm.reset()
        llm.eval(tokens)
        ours = []
        for _ in range(32):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ours.append(token)
            llm.eval([token])
        greedy.append({"prompt": prompt, "identical": hf == ours, "transformers": tokenizer.decode(hf),
                       "llama_cpp": tokenizer.decode(ours)})
    report["greedy"] = greedy
    del llm
    report.update(llama_cpp_speed(llama_cpp, files, ids, threads, repeats))
    return report


def llama_cpp_speed(llama_cpp, files: dict, ids, threads: int, repeats: int) -> dict:
    """Prompt processing of 512 tokens and generation of 64, every file in turn, `repeats` rounds:
    tokens/s medians and the pruned model's ratio to the dense one at each quantisation."""
    import statistics

    prompt = ids[0, :512].tolist()
    models = {f"{a}-{b}": llama_cpp.Llama(str(p), n_ctx=1024, n_batch=512, verbose=False, n_threads=threads)
              for (a, b), p in files.items() if b in ("f16", "q8_0")}
    times = {k: {"pp": [], "tg": []} for k in models}
    for _ in range(repeats):
        for key, llm in models.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            times[key]["pp"].append(len(prompt) / (time.perf_counter() - start))
            start = time.perf_counter()
            for k in range(64):  # the text's next tokens: which tokens are fed does not change the time
                llm.eval([int(ids[0, 512 + k])])
            times[key]["tg"].append(64 / (time.perf_counter() - start))
    tps = {k: {m: statistics.median(v[m]) for m in v} for k, v in times.items()}
    return {"tokens_per_second": tps, "repeats": repeats, "load_average": os.getloadavg()[0],
            "speedup": {q: {m: tps[f"pruned-{q}"][m] / tps[f"dense-{q}"][m] for m in ("pp", "tg")} for q in ("f16", "q8_0")}}


if __name__ == "__main__":
    main(sys.argv[1:])
