"""Part a: the code paths that run differently on CUDA, each against the CPU result on tiny models.

What differs on CUDA (grep cuda / is_cuda / device.type in src/vaclm):
- model/int8_lowrank.py: int8 factors multiply through torch._int_mm with per-token int8
  activations (CPU dequantises instead);
- model/blocks.py: BlockRunner keeps blocks on the CPU and moves one at a time to the GPU;
- the pipeline end to end on device="cuda" (gradient statistics, float64 linear algebra on the GPU);
- recovery/heal.py: healing trains under bfloat16 autocast against a bfloat16 teacher;
- search/fitness.py: the search scores candidates in bfloat16 when the GPU has fast bfloat16.
Without CUDA each comparison is made between CPU paths (bfloat16 autocast on the CPU against
float32 for healing and the search; the plain forward for the block runner), reported with
cuda=false; the int8 matmul runs torch._int_mm on the CPU. Every check records the measured
difference, its tolerance and why that tolerance.
"""

from __future__ import annotations

import copy
import time
import traceback

import torch

from .common import Deadline, llama_config, log, random_model, rel_err, synthetic_ids, write_json


def _check(name, what, compared, metric, value, tolerance, op="<=", cuda=False, **extra) -> dict:
    passed = value <= tolerance if op == "<=" else value >= tolerance
    return {"name": name, "what": what, "compared": compared, "metric": metric, "value": float(value),
            "tolerance": tolerance, "op": op, "passed": bool(passed), "status": "pass" if passed else "fail",
            "cuda": cuda, **extra}


def _tiny(layers: int = 2, seed: int = 0):
    return random_model(llama_config("tiny", layers=layers), torch.float32, "cpu", seed)


# int8 ------------------------------------------------------------------------------------------

def check_int8(dev: str) -> list[dict]:
    from vaclm.model.int8_lowrank import Int8LowRankLinear, int8_matmul, quantize_rows
    from vaclm.model.lowrank import LowRankLinear

    cuda = dev == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)  # 64 tokens: torch._int_mm needs M > 16, K and N multiples of 8
    w = torch.randn(96, 256, generator=g) / 16
    q, scale = quantize_rows(w)
    calls = {"n": 0}
    real = torch._int_mm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    torch._int_mm = counting
    try:
        y_cpu = int8_matmul(x, q, scale)
        y_dev = int8_matmul(x.to(dev), q.to(dev), scale.to(dev))
        # a factorised layer as inference runs it: float factors, their int8 copy on the device
        low = LowRankLinear(256, 192, 64, bias=True)
        with torch.no_grad():
            low.down.weight.normal_(0, 256 ** -0.5, generator=g)
            low.up.weight.normal_(0, 64 ** -0.5, generator=g)
            low.up.bias.normal_(0, 0.1, generator=g)
        int8 = Int8LowRankLinear.from_lowrank(low)
        xb = torch.randn(2, 32, 256, generator=g)
        with torch.inference_mode():
            ref = low(xb)
            # the arithmetic of the CUDA path, on the CPU: both factors through int8_matmul
            x2d = xb.reshape(-1, 256)
            h = int8_matmul(x2d, int8.down.weight, int8.down.weight_scale)
            emulated = (int8_matmul(h, int8.up.weight, int8.up.weight_scale) + int8.up.bias).reshape(ref.shape)
            on_cpu = int8(xb)  # the CPU module path (its own int8 kernel or dequantising)
            calls["n"] = 0
            on_dev = int8.to(dev)(xb.to(dev))
            dev_calls = calls["n"]
    finally:
        torch._int_mm = real
    where = "CUDA" if cuda else "CPU"
    return [
        _check("int8_matmul", "vaclm.model.int8_lowrank.int8_matmul (torch._int_mm, int32 accumulation)",
               f"{where} against the same call on the CPU", "relative Frobenius difference", rel_err(y_dev, y_cpu),
               1e-5, cuda=cuda, note="both are exact integer products; only the float scaling may round differently"),
        _check("int8_lowrank_exact", "Int8LowRankLinear forward (2 x 32 tokens, rank 64)",
               f"{where} module against its _int_mm arithmetic done on the CPU (int8_matmul per factor)",
               "relative Frobenius difference", rel_err(on_dev, emulated), 1e-3 if cuda else 0.03, cuda=cuda,
               note="CUDA: the same integer products (a re-quantised intermediate may round one step apart); CPU: "
                    "the CPU's own int8 kernel quantises differently, so only the quantisation bound applies"),
        _check("int8_lowrank_forward", "Int8LowRankLinear forward (2 x 32 tokens, rank 64)",
               f"{where} int8 path against the float factors (float32, CPU)", "relative Frobenius difference",
               rel_err(on_dev, ref), 0.03, cuda=cuda, cpu_module_error=rel_err(on_cpu, ref),
               int_mm_arithmetic_error=rel_err(emulated, ref), int_mm_calls=dev_calls,
               note="int8 weights and int8 activations: 1-2% is the quantisation itself (int_mm_arithmetic_error, "
                    "cpu_module_error: the same measured on the CPU)"),
        _check("int8_uses_int_mm", "the device's int8 forward goes through torch._int_mm", where,
               "torch._int_mm calls in one forward", dev_calls, 2 if cuda else 0, op=">=", cuda=cuda,
               note="2 = both factors; the CPU has its own kernel (0 calls expected)"),
    ]


# block runner ----------------------------------------------------------------------------------

def check_block_runner(dev: str) -> list[dict]:
    from vaclm.model.arch import spec_for
    from vaclm.model.blocks import BlockRunner

    cuda = dev == "cuda"
    model = _tiny(layers=3)
    ids = synthetic_ids(4, 32, model.config.vocab_size, seed=1)
    last = model.config.num_hidden_layers - 1
    spec = spec_for("llama")
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] is the input of block i (the last entry is after the final norm)
    cpu = BlockRunner(model, spec, ids, 2, "cpu")
    cpu_in = torch.cat(cpu.inputs_for(last))
    cpu_out = torch.cat(cpu.run_block(last, cpu.inputs_for(last)))
    forward_err = rel_err(cpu_in, hidden[last])
    if not cuda:
        return [_check("block_runner", "BlockRunner (model/blocks.py): cached block walk", "CPU runner against the "
                       "model's own forward (no CUDA: nothing to offload)", "relative difference of block inputs",
                       forward_err, 1e-5, cuda=False)]
    runner = BlockRunner(model, spec, ids, 2, "cuda")
    dev_in = torch.cat(runner.inputs_for(last))
    dev_out = torch.cat(runner.run_block(last, runner.inputs_for(last)))
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    stored = all(t.device.type == "cpu" for ts in runner.inputs.values() for t in ts)
    return [_check("block_runner_offload", "BlockRunner with device=cuda: blocks stay on the CPU, one at a time on "
                   "the GPU", "offloaded CUDA runner against the in-memory CPU runner (float32)",
                   "relative difference of the last block's inputs and outputs", max(rel_err(dev_in, cpu_in),
                                                                                     rel_err(dev_out, cpu_out)),
                   1e-4, cuda=True, cpu_runner_vs_forward=forward_err, blocks_back_on_cpu=on_cpu,
                   cached_inputs_on_cpu=stored, note="cuBLAS against MKL float32 rounding over 3 blocks"),
            _check("block_runner_placement", "after the walk every weight and cached input is back on the CPU",
                   "device of parameters and cached inputs", "all on the CPU (1 = yes)", float(on_cpu and stored),
                   1.0, op=">=", cuda=True)]


# the pipeline end to end -----------------------------------------------------------------------

def check_pipeline(dev: str) -> list[dict]:
    import vaclm
    from vaclm.config import CompressConfig

    cuda = dev == "cuda"
    base = _tiny(layers=2)
    ids = synthetic_ids(8, 64, base.config.vocab_size, seed=2)  # 512 tokens: twice the widest covariance
    probe = synthetic_ids(2, 64, base.config.vocab_size, seed=3)
    config = CompressConfig(keep=0.6)  # the defaults: gfwsvd, knapsack, sequential

    def run(device):
        model = copy.deepcopy(base)
        result = vaclm.compress(model, config, calib=ids, device=device, progress=False)
        with torch.no_grad():
            logits = model.to("cpu")(input_ids=probe, use_cache=False).logits
        return result.ranks, logits

    ranks_cpu, logits_cpu = run("cpu")
    ranks_dev, logits_dev = run(dev)
    same = sum(ranks_cpu[n] == ranks_dev[n] for n in ranks_cpu) / len(ranks_cpu)
    where = "device=cuda" if cuda else "a second CPU run (no CUDA)"
    return [_check("pipeline_ranks", "vaclm.compress (gfwsvd + knapsack, keep 0.6) on a 2-block tiny model",
                   f"{where} against device=cpu", "fraction of matrices given the same rank", same,
                   0.9 if cuda else 1.0, op=">=", cuda=cuda,
                   note="float32 statistics summed in another order can move a near-tie by one rank step"),
            # the same ranks leave only rounding between the two; a rank moved one step changes more
            _check("pipeline_logits", "the compressed model's logits on held-out tokens",
                   f"{where} against device=cpu", "relative Frobenius difference", rel_err(logits_dev, logits_cpu),
                   (1e-3 if same == 1 else 5e-2) if cuda else 1e-6, cuda=cuda,
                   note="tolerance 1e-3 when every rank agrees, 5e-2 when a near-tie moved one")]


# healing ---------------------------------------------------------------------------------------

def check_heal(dev: str) -> list[dict]:
    from vaclm.config import CompressConfig
    from vaclm.recovery.config import HealConfig
    from vaclm.recovery.heal import heal_model
    import vaclm

    cuda = dev == "cuda"
    teacher = _tiny(layers=2)
    student = copy.deepcopy(teacher)
    ids = synthetic_ids(8, 64, teacher.config.vocab_size, seed=4)
    vaclm.compress(student, CompressConfig(keep=0.5, method="svd-llm", allocation="uniform"), calib=ids,
                   progress=False)
    train = synthetic_ids(4, 64, teacher.config.vocab_size, seed=5)
    config = HealConfig(tokens=4 * 64, seq_len=64, batch_size=1, grad_accum=4, val_tokens=0, warmup=0.0)

    def one_step(device, dtype):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher).to(dtype)
        before = {n: p.detach().clone() for n, p in s.named_parameters()}
        result = heal_model(s, t, train, train[:0], config, device=device, compute_dtype=dtype, progress=False)
        params = dict(s.named_parameters())
        trained = [n for n in params if params[n].grad is not None]
        grad = torch.cat([params[n].grad.detach().float().flatten().cpu() for n in trained])
        delta = torch.cat([(params[n].detach().cpu() - before[n]).flatten() for n in trained])
        return result.losses[0], grad, delta

    ref_loss, ref_grad, ref_delta = one_step("cpu", torch.float32)
    loss, grad, delta = one_step(dev, torch.bfloat16)
    cos = float(torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0))
    kl_diff = abs(loss["kl"] - ref_loss["kl"]) / max(abs(ref_loss["kl"]), 1e-12)
    sign = float(((delta > 0) == (ref_delta > 0)).double().mean())
    where = "CUDA" if cuda else "CPU"
    common = dict(cuda=cuda, kl_fp32=ref_loss["kl"], kl_bf16=loss["kl"], grad_norm_fp32=ref_loss["grad_norm"],
                  grad_norm_bf16=loss["grad_norm"], update_sign_agreement=sign)
    return [_check("heal_bf16_kl", "one healing step (heal_model, 4 x 64 tokens): KL to the teacher",
                   f"{where} bfloat16 autocast + bfloat16 teacher against CPU float32", "relative difference of the KL",
                   kl_diff, 0.05, note="bfloat16 logits carry ~0.4% relative rounding", **common),
            _check("heal_bf16_grad", "the same step's gradient of every trained factor",
                   f"{where} bfloat16 autocast against CPU float32", "cosine similarity of the gradients", cos, 0.99,
                   op=">=", **common)]


# the search's dtype ----------------------------------------------------------------------------

def check_search_dtype(dev: str) -> list[dict]:
    from vaclm.allocate.candidates import rank_grid
    from vaclm.methods import build_method
    from vaclm.model.surgery import Targets
    from vaclm.search.bank import build_bank
    from vaclm.search.engine import Genome
    from vaclm.search.fitness import Evaluator, FitnessSpec, Reference, search_dtype

    cuda = dev == "cuda"
    model = _tiny(layers=2)
    targets = Targets.of(model)
    calib = synthetic_ids(4, 64, model.config.vocab_size, seed=6)
    windows = synthetic_ids(4, 64, model.config.vocab_size, seed=7)
    bank = build_bank(model, targets, build_method("svd"), calib, {}, 8, 4, "cpu", progress=False)
    names = [n for block in targets.per_block for n in block if n in bank]
    choices = [rank_grid(targets.shapes[n], 8) + [None] for n in names]
    reference = Reference.compute(model, windows, top_k=model.config.vocab_size, progress=False)
    # four allocations from small to large ranks: their KLs differ clearly, the order must survive
    genomes = [Genome(tuple(int(f * (len(c) - 2)) for c in choices)) for f in (0.1, 0.35, 0.6, 0.9)]

    def scores(device, dtype):
        spec = FitnessSpec(copy.deepcopy(model), names, choices, windows, reference, [len(windows)], 0, bank, dtype)
        ev = Evaluator(spec, device)
        try:
            return ev.dtype, ev(genomes, stage=0, generation=0)
        finally:
            ev.close()

    chosen = search_dtype("auto", copy.deepcopy(model).to(dev))
    ref_dtype, ref = scores("cpu", "float32")
    dtype, got = scores(dev, "auto")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, ref))
    same_order = sorted(range(len(ref)), key=ref.__getitem__) == sorted(range(len(got)), key=got.__getitem__)
    expected = torch.bfloat16 if (cuda and torch.cuda.is_bf16_supported()) else None
    where = "CUDA" if cuda else "CPU"
    out = [_check("search_fitness", "the search's candidate scores (KL to the dense model) in its automatic dtype",
                  f"{where} {str(dtype).replace('torch.', '')} against CPU float32", "largest relative difference of 4 "
                  "candidates' KL", worst, 0.05, cuda=cuda, dtype=str(dtype), kl_float32=ref, kl_auto=got,
                  same_order=same_order),
           _check("search_order", "the 4 candidates rank in the same order as in float32", where,
                  "same order (1 = yes)", float(same_order), 1.0, op=">=", cuda=cuda)]
    if expected is not None:
        out.append(_check("search_dtype", "search_dtype('auto') for a float32 model on the GPU", "CUDA",
                          "bfloat16 chosen (1 = yes)", float(chosen == expected), 1.0, op=">=", cuda=True,
                          chosen=str(chosen)))
    return out


CHECKS = (check_int8, check_block_runner, check_pipeline, check_heal, check_search_dtype)


def run_checks(device: str, out_path, deadline: Deadline) -> dict:
    dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    checks, notes = [], []
    if dev == "cpu":
        notes.append("no CUDA: every comparison is between CPU paths (cuda=false); the acceptance needs a GPU run")
    for fn in CHECKS:
        name = fn.__name__.removeprefix("check_")
        if not deadline.allows(3):
            checks.append({"name": name, "status": "skipped", "note": "the part's time cap is spent"})
            continue
        start = time.perf_counter()
        try:
            found = fn(dev)
        except Exception as exc:  # noqa: BLE001  (a broken path is a result: report it, run the others)
            found = [{"name": name, "status": "error", "passed": False, "cuda": dev == "cuda",
                      "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}]
        seconds = time.perf_counter() - start
        for c in found:
            c["seconds"] = round(seconds, 2)
            log(f"part a: {c['name']}: {c['status']}" + (f" ({c['metric']} {c['value']:.3g}, tolerance "
                                                        f"{c['op']} {c['tolerance']:g})" if "value" in c else
                                                        f" {c.get('error', '')}"))
        checks.extend(found)
        write_json(out_path, {"checks": checks, "notes": notes})
    write_json(out_path, {"checks": checks, "notes": notes})
    return {"checks": checks, "notes": notes}
