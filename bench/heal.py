"""Heal a compressed folder by distillation and measure test perplexity before and after.

    .venv/bin/python bench/heal.py out/keep0.6 --tokens 150000
    .venv/bin/python bench/heal.py out/keep0.8 --tokens 150000 --config '{"lr": 3e-4}' --save out/keep0.8-healed

Teacher `demo` (the dense SmolLM2-135M), training and validation windows from wiki.valid.raw
(disjoint), perplexity on the first 16 x 1024-token windows of wiki.test.raw. Rows are merged into
bench/results/heal.{json,md} (same folder, tokens and settings replace the old row), and the loss
curves of all rows are drawn into bench/results/heal_loss.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, WIKI_TEST, WIKI_VALID, merge_rows, peak_rss_bytes, settings_label, write_results


def run(folder: str, tokens: int, teacher: str, calib: str, windows: int, settings: dict, save: str | None,
        progress: bool) -> dict:
    import torch

    import vaclm

    student, tokenizer = vaclm.load(folder, dtype="float32")
    before = vaclm.evaluate(student, str(WIKI_TEST), tokenizer, seq_len=1024, max_windows=windows, progress=progress)
    config = vaclm.HealConfig(tokens=tokens, **settings)
    start = time.time()
    result = vaclm.heal(student, teacher, calib, config, tokenizer=tokenizer, progress=progress,
                        source=str(Path(folder).resolve()))
    heal_seconds = time.time() - start
    after = vaclm.evaluate(student, str(WIKI_TEST), tokenizer, seq_len=1024, max_windows=windows, progress=progress)
    if save:
        vaclm.save(student, save, tokenizer, result=result, overwrite=True)
    report = result.to_dict()
    return {"folder": str(folder), "tokens": tokens, "teacher": teacher, "settings": settings,
            "threads": torch.get_num_threads(), "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "eval_windows": f"{before['windows']} x {before['seq_len']}", "heal_seconds": heal_seconds,
            "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
            "steps": result.steps, "total_steps": result.total_steps, "best_step": result.best_step,
            "stopped_early": result.stopped_early, "val": report["val"],
            "losses": [{k: r[k] for k in ("step", "loss", "lr")} for r in report["losses"]],
            "peak_rss_gb": peak_rss_bytes() / 1e9}


def row_key(row: dict) -> tuple:
    """Rows of one folder, token count and settings replace each other (heal and heal_pilot)."""
    return Path(row["folder"]).name, row["tokens"], json.dumps(row["settings"], sort_keys=True)


def label(row: dict) -> str:
    extra = settings_label(row["settings"])
    return f"{Path(row['folder']).name} {row['tokens'] // 1000}k" + (f" {extra}" if extra else "")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        line, = ax_train.plot([r["step"] for r in row["losses"]], [r["loss"] for r in row["losses"]], label=label(row))
        ax_val.plot([v["step"] for v in row["val"]], [v["kl"] for v in row["val"]], marker="o", color=line.get_color(),
                    label=label(row))
    ax_train.set(xlabel="optimizer step", ylabel="training loss (KL to the teacher, nats/token)", yscale="log")
    ax_val.set(xlabel="optimizer step", ylabel="validation KL (held-out wiki.valid windows)", yscale="log")
    ax_train.legend(fontsize=7)
    fig.suptitle("Healing by distillation from the dense SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(RESULTS / "heal_loss.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", help="a vaclm folder (output of vaclm compress)")
    p.add_argument("--tokens", type=int, default=150_000)
    p.add_argument("--teacher", default="demo")
    p.add_argument("--calib", default=str(WIKI_VALID))
    p.add_argument("--windows", type=int, default=16, help="1024-token windows of wiki.test.raw for the perplexity")
    p.add_argument("--config", default="{}", help="other HealConfig fields as JSON, e.g. '{\"lr\": 3e-4}'")
    p.add_argument("--save", default=None, help="also save the healed folder here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--name", default="heal", help="results file stem")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    row = run(args.folder, args.tokens, args.teacher, args.calib, args.windows, json.loads(args.config), args.save,
              not args.quiet)
    print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "val")}), flush=True)

    rows = merge_rows(args.name, [row], row_key)
    lines = ["| model | tokens | settings | PPL before | PPL after | heal min | tokens/s | steps (best) | threads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = settings_label(r["settings"]) or "defaults"
        steps = f"{r['steps']}/{r['total_steps']} ({r['best_step']})" + (" early stop" if r["stopped_early"] else "")
        lines.append(f"| {Path(r['folder']).name} | {r['tokens']} | {settings} | {r['ppl_before']:.2f} | "
                     f"{r['ppl_after']:.2f} | {r['heal_seconds'] / 60:.1f} | {r['tokens_per_second']:.1f} | {steps} | "
                     f"{r['threads']} |")
    write_results(args.name, rows, "\n".join(lines) + "\n")
    plot(rows)


if __name__ == "__main__":
    main()
