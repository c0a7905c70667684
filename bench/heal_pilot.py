"""Short healing pilots: validation KL after a few thousand tokens, one HealConfig per run, no test PPL.

    .venv/bin/python bench/heal_pilot.py out/smollm2-keep0.6 '{"lr": 1e-3}' --threads 1
    .venv/bin/python bench/heal_pilot.py --add pilot_a.json pilot_b.json     # merge rows run elsewhere

Each pilot trains on `--tokens` (default 24576: 12 steps of 4 x 512) of wiki.valid.raw and
validates on 4096 held-out tokens at the start and the end only, so two pilots fit in the time of
one full healing run's first sixth; they rank settings (learning rate, accumulation, loss terms)
before a full run is spent on one. Rows go into bench/results/heal_pilots.{json,md} (equal folder,
tokens and settings replace the old row). The rows with hidden_weight and train_norms are of
options since removed (no better than the defaults); they cannot be re-run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import WIKI_VALID, merge_rows, settings_label, write_results
from heal import row_key

BASE = {"val_tokens": 4096}


def run(folder: str, tokens: int, settings: dict) -> dict:
    import torch

    import vaclm

    student, tokenizer = vaclm.load(folder, dtype="float32")
    # eval_every past the last step: validation at the start and the end only
    config = vaclm.HealConfig(**{**BASE, "tokens": tokens, **settings, "eval_every": 10 ** 6})
    start = time.time()
    result = vaclm.heal(student, "demo", str(WIKI_VALID), config, tokenizer=tokenizer, progress=False)
    val = result.to_dict()["val"]
    return {"folder": str(folder), "tokens": tokens, "settings": settings, "threads": torch.get_num_threads(),
            "seconds": time.time() - start, "tokens_per_second": result.tokens_per_second, "steps": result.steps,
            "kl_start": val[0]["kl"], "kl_end": val[-1]["kl"], "val_ppl_end": val[-1]["ppl"]}


def render(rows: list[dict]) -> str:
    lines = ["| model | tokens | settings | steps | val KL start | val KL end | val PPL end | tokens/s | threads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = settings_label(r["settings"]) or "defaults"
        lines.append(f"| {Path(r['folder']).name} | {r['tokens']} | {settings} | {r['steps']} | {r['kl_start']:.3f} | "
                     f"{r['kl_end']:.3f} | {r['val_ppl_end']:.2f} | {r['tokens_per_second']:.1f} | {r['threads']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", nargs="?", help="a vaclm folder (output of vaclm compress)")
    p.add_argument("settings", nargs="?", default="{}", help="HealConfig fields as JSON, e.g. '{\"lr\": 1e-3}'")
    p.add_argument("--tokens", type=int, default=24576)
    p.add_argument("--threads", type=int, default=None, help="torch threads (two 1-thread pilots side by side "
                                                             "train faster in total than one 2-thread run)")
    p.add_argument("--add", nargs="+", default=None, help="rows (JSON files) to merge instead of running")
    args = p.parse_args()
    if args.add:
        new = [json.loads(Path(f).read_text()) for f in args.add]
    else:
        if not args.folder:
            p.error("give a folder to heal, or --add rows")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        settings = json.loads(args.settings)
        from vaclm.recovery.config import REMOVED_IN_V2

        if removed := sorted(set(settings) & set(REMOVED_IN_V2)):
            p.error(f"{', '.join(removed)}: removed from HealConfig after these pilots (docs/results.md)")
        new = [run(args.folder, args.tokens, settings)]
        print(json.dumps(new[0]), flush=True)
    rows = merge_rows("heal_pilots", new, row_key)
    write_results("heal_pilots", rows, render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
