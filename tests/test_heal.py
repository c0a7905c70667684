"""Healing by distillation: the loss goes down, only factors move, resume is exact, early stopping
works, bad input is refused in one line, and the healed folder reloads in a fresh process."""

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vaclm
from vaclm import HealConfig
from vaclm.errors import VaclmError

from conftest import VOCAB, WIKI_VALID, svd_llm_config, tiny_model, token_batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair():
    """(dense teacher, its compressed copy with noise on the factors: the perturbation to repair)."""
    from vaclm.model.lowrank import LowRankLinear

    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    vaclm.compress(student, svd_llm_config(keep=0.8, calib_samples=4, calib_seq_len=32), token_batch(4, 32),
                   progress=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, LowRankLinear):
                m.up.weight.add_(torch.randn(m.up.weight.shape, generator=g) * 0.03)
    return teacher, student


def stream(n: int = 8000, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def factor_names(model) -> set[str]:
    return {n for n in model.state_dict() if n.endswith((".down.weight", ".up.weight"))}


FAST = dict(tokens=16 * 32, seq_len=32, batch_size=2, grad_accum=1, val_tokens=128, lr=3e-3, warmup=0.1)


def test_healing_lowers_validation_kl_and_changes_only_factors(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    teacher_before = {n: t.clone() for n, t in teacher.state_dict().items()}
    config = HealConfig(**{**FAST, "tokens": 200 * 32, "batch_size": 8, "eval_every": 5, "patience": 10})
    result = vaclm.heal(student, teacher, stream(20000), config, progress=False)

    assert result.completed and not result.stopped_early and result.steps == result.total_steps == 25
    first, best = result.val[0]["kl"], min(v["kl"] for v in result.val)
    assert best < 0.8 * first, result.val  # measured: 0.26 -> 0.17
    assert result.best_step > 0 and result.tokens == 200 * 32 and result.tokens_per_second > 0
    losses = [r["loss"] for r in result.losses]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    after = student.state_dict()
    factors = factor_names(student)
    assert factors and all(not torch.equal(before[n], after[n]) for n in factors)
    frozen = [n for n in before if n not in factors]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bitwise
    assert all(torch.equal(teacher_before[n], t) for n, t in teacher.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_chunked_kl_equals_full_autograd():
    from vaclm.recovery.distill import chunked_kl, kl_sum, next_token_labels

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    hs, ht = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 7, 16)
    ids = torch.randint(0, 50, (2, 7))
    for temperature in (1.0, 2.0):
        full = kl_sum(head_s(hs), head_t(ht), temperature)
        (expected,) = torch.autograd.grad(full * 0.25, hs)
        total, grad, nll = chunked_kl(hs, ht, head_s, head_t, temperature, chunk=3, grad_scale=0.25,
                                      labels=next_token_labels(ids))
        assert math.isclose(total, full.item(), rel_tol=1e-5)
        torch.testing.assert_close(grad, expected)
        ce = F.cross_entropy(head_s(hs)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="sum")
        assert math.isclose(nll, ce.item(), rel_tol=1e-5)
    p = torch.softmax(head_t(ht), -1)  # KL by its definition
    direct = (p * (p.log() - torch.log_softmax(head_s(hs), -1))).sum()
    assert math.isclose(kl_sum(head_s(hs), head_t(ht), 1.0).item(), direct.item(), rel_tol=1e-5)


def test_balanced_factors_keep_the_product_and_share_the_scale():
    from vaclm.linalg.balance import balanced_factors

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 8, generator=g) * 100, torch.randn(8, 30, generator=g) / 1000  # as gfwsvd leaves them
    new_up, new_down = balanced_factors(up, down)
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-5, atol=1e-7)
    assert math.isclose(new_up.norm().item(), new_down.norm().item(), rel_tol=1e-4)  # both sum(sqrt(s))


def test_stop_then_resume_equals_uninterrupted_run(pair, tmp_path):
    teacher, compressed = pair
    config = HealConfig(**{**FAST, "eval_every": 3, "checkpoint_every": 2, "patience": 10})
    ref_model = copy.deepcopy(compressed)
    ref = vaclm.heal(ref_model, teacher, stream(), config, progress=False, checkpoint_dir=tmp_path / "ref")

    stopped = copy.deepcopy(compressed)
    part = vaclm.heal(stopped, teacher, stream(), config, progress=False, checkpoint_dir=tmp_path / "run", stop_after=5)
    assert not part.completed and part.steps == 5 < ref.total_steps
    with pytest.raises(VaclmError, match="pass --resume"):
        vaclm.heal(copy.deepcopy(compressed), teacher, stream(), config, progress=False, checkpoint_dir=tmp_path / "run")
    other = HealConfig(**{**FAST, "eval_every": 3, "checkpoint_every": 2, "patience": 10, "lr": 1e-3})
    with pytest.raises(VaclmError, match="other settings"):
        vaclm.heal(copy.deepcopy(compressed), teacher, stream(), other, progress=False, checkpoint_dir=tmp_path / "run",
                   resume=True)

    resumed_model = copy.deepcopy(compressed)  # a fresh process would start from the saved folder
    resumed = vaclm.heal(resumed_model, teacher, stream(), config, progress=False, checkpoint_dir=tmp_path / "run",
                         resume=True)
    assert resumed.completed and resumed.resumed_from == 5  # stopping writes a checkpoint at that step
    assert resumed.losses == ref.losses and resumed.val == ref.val and resumed.best_step == ref.best_step
    ref_sd, res_sd = ref_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(ref_sd[n], res_sd[n]) for n in ref_sd)


def test_early_stopping_restores_the_best_parameters(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    config = HealConfig(**{**FAST, "lr": 0.5, "warmup": 0.0, "eval_every": 1, "patience": 2, "max_grad_norm": 0.0,
                             "balance": False})  # balancing rescales factor pairs before step 0
    result = vaclm.heal(student, teacher, stream(), config, progress=False)
    assert result.stopped_early and result.steps == 2 < result.total_steps
    assert result.best_step == 0 and result.val[1]["kl"] > result.val[0]["kl"]
    assert all(torch.equal(before[n], t) for n, t in student.state_dict().items())


def test_bad_input_is_refused(pair, tmp_path):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    with pytest.raises(VaclmError, match="vocabulary of 300 tokens and the student 256"):
        vaclm.heal(student, tiny_model("llama", vocab_size=300), stream(), HealConfig(**FAST), progress=False)
    with pytest.raises(VaclmError, match="too few for 16 training \\+ 4 validation windows"):
        vaclm.heal(student, teacher, stream(500), HealConfig(**FAST), progress=False)
    with pytest.raises(VaclmError, match="no factorised layers"):
        vaclm.heal(copy.deepcopy(teacher), teacher, stream(), HealConfig(**FAST), progress=False)
    with pytest.raises(VaclmError, match="different tokenizer"):
        vaclm.heal(student, teacher, stream(), HealConfig(**FAST), tokenizer=byte_tokenizer(),
                   teacher_tokenizer=byte_tokenizer(reverse=True), progress=False)
    for bad, match in ((dict(lr=0.0), "lr must be in"), (dict(temperature=0.0), "temperature must be > 0"),
                       (dict(tokens=0), "tokens must be an integer >= 1"), (dict(warmup=1.0), "warmup")):
        with pytest.raises(VaclmError, match=match):
            HealConfig(**bad)


def test_config_round_trips_and_reads_reports_with_removed_options():
    config = HealConfig(lr=1e-3, ce_weight=1.0, train_dense=True)
    assert HealConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # a version-1 heal_report.json: the hidden-state loss and trained norms/biases were removed
    old = {**config.to_dict(), "version": 1, "hidden_weight": 0.5, "hidden_layers": [2, 4], "train_norms": True,
           "train_bias": False}
    assert HealConfig.from_dict(old) == config
    with pytest.raises(VaclmError, match="newer than this vaclm"):
        HealConfig.from_dict({**config.to_dict(), "version": 99})


def byte_tokenizer(reverse: bool = False):
    """A 256-token byte-level tokenizer built in-process (reverse: same tokens, other ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet[::-1] if reverse else alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


FRESH = """
import sys, torch, vaclm
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.arange(40).remainder(256).view(2, 20)
with torch.no_grad():
    save_file({"logits": model(input_ids=ids).logits.contiguous()}, sys.argv[2])
"""


def test_cli_heal_saves_a_folder_that_reloads_in_a_fresh_process(pair, tmp_path, capsys):
    from vaclm.cli import main

    teacher, _ = pair
    tokenizer = byte_tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student = copy.deepcopy(teacher)
    result = vaclm.compress(student, svd_llm_config(keep=0.4, calib_samples=4, calib_seq_len=32), token_batch(4, 32),
                            progress=False)
    vaclm.save(student, tmp_path / "student", tokenizer, result=result)
    (tmp_path / "text.txt").write_text(WIKI_VALID.read_text(encoding="utf-8")[:12000], encoding="utf-8")

    out = tmp_path / "healed"
    args = ["heal", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--calib",
            str(tmp_path / "text.txt"), "--tokens", "2048", "--seq-len", "64", "--batch-size", "4", "--grad-accum", "1",
            "--val-tokens", "512", "--lr", "3e-3", "--temperature", "2", "--out", str(out), "--json", "--quiet"]
    assert main(args) == 0  # in-process: the same code path as the command, without a second interpreter start
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["tokens"] == 2048 and summary["best_val"]["kl"] > 0
    assert not (tmp_path / "healed.partial").exists()

    report = json.loads((out / "heal_report.json").read_text())
    assert report["config"]["temperature"] == 2.0 and report["completed"] and len(report["losses"]) == 8
    assert report["val"][0]["step"] == 0 and report["best_step"] == summary["best_step"]
    assert report["source"] == str(tmp_path / "student") and report["teacher"] == str(tmp_path / "teacher")
    assert (out / "vaclm_report.json").exists() and (out / "allocation.json").exists()
    ranks = lambda folder: json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]
    assert ranks(out) == ranks(tmp_path / "student")

    logits = tmp_path / "logits.safetensors"
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(out), str(logits)], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    healed, _ = vaclm.load(str(out))
    ids = torch.arange(40).remainder(256).view(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(load_file(logits)["logits"], healed(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(healed(input_ids=ids).logits, student(input_ids=ids).logits)

    def one_line_error(argv, *fragments):
        assert main(argv) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("vaclm: error:")]
        assert len(lines) == 1 and all(f in lines[0] for f in fragments), lines

    one_line_error(args, "already exists", "--overwrite")  # refused before any work
    dense = ["heal", str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher"), "--calib",
             str(tmp_path / "text.txt"), "--out", str(tmp_path / "x")]
    one_line_error(dense, "is not a vaclm folder")
    short = ["heal", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--calib",
             str(tmp_path / "text.txt"), "--tokens", "100000", "--out", str(tmp_path / "x")]
    one_line_error(short, "too few for", "lower --tokens")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_dense_model_with_train_dense_is_fine_tuned_by_the_same_recipe(pair):
    teacher, _ = pair
    student = copy.deepcopy(teacher)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = vaclm.heal(student, teacher, stream(), HealConfig(**FAST, train_dense=True, ce_weight=1.0), progress=False)
    after = dict(student.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert any("mlp" in n for n in changed) and any("self_attn" in n for n in changed)
    assert not any("embed" in n or "norm" in n for n in changed)  # only the decoder matrices train
    assert result.steps > 0 and all(math.isfinite(r["loss"]) for r in result.losses)


def test_train_dense_also_updates_matrices_kept_dense(pair):
    from vaclm.model.arch import set_submodule
    from vaclm.model.lowrank import LowRankLinear
    from vaclm.recovery.params import dense_target_names

    teacher, compressed = pair
    name = "model.layers.0.mlp.down_proj"

    def with_one_dense_matrix():  # as if the allocator had kept this matrix dense
        student = copy.deepcopy(compressed)
        factored = student.get_submodule(name)
        assert isinstance(factored, LowRankLinear)
        dense = torch.nn.Linear(factored.in_features, factored.out_features, bias=False)
        with torch.no_grad():
            dense.weight.copy_(factored.dense_weight())
        set_submodule(student, name, dense)
        return student

    student = with_one_dense_matrix()
    assert dense_target_names(student) == [name]
    before = student.get_submodule(name).weight.detach().clone()
    frozen = {n: p.clone() for n, p in student.named_parameters() if "embed" in n or "norm" in n}
    config = HealConfig(**{**FAST, "tokens": 200 * 32, "batch_size": 8, "eval_every": 5, "patience": 10})
    result = vaclm.heal(student, teacher, stream(20000), dataclasses.replace(config, train_dense=True), progress=False)
    assert result.best_step > 0 and min(v["kl"] for v in result.val) < result.val[0]["kl"]
    assert not torch.equal(before, student.get_submodule(name).weight)
    params = dict(student.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in frozen.items())
    default = with_one_dense_matrix()
    vaclm.heal(default, teacher, stream(20000), config, progress=False)
    assert torch.equal(before, default.get_submodule(name).weight)  # without the flag it stays frozen


def test_cross_entropy_term_is_trained_and_drives_early_stopping(pair):
    teacher, compressed = pair
    config = HealConfig(**{**FAST, "tokens": 64 * 32, "batch_size": 8, "eval_every": 2, "patience": 10})
    with_ce, without = copy.deepcopy(compressed), copy.deepcopy(compressed)
    result = vaclm.heal(with_ce, teacher, stream(), dataclasses.replace(config, ce_weight=0.5), progress=False)
    vaclm.heal(without, teacher, stream(), config, progress=False)
    assert all(r["ce"] > 0 and math.isclose(r["loss"], r["kl"] + 0.5 * r["ce"], rel_tol=1e-9) for r in result.losses)
    assert all(math.isclose(v["objective"], v["kl"] + 0.5 * math.log(v["ppl"]), rel_tol=1e-9) for v in result.val)
    best = min(result.val, key=lambda v: v["objective"])
    assert result.best_step == best["step"]
    moved = [n for n, p in with_ce.named_parameters() if not torch.equal(p, dict(without.named_parameters())[n])]
    assert moved and all(n.endswith((".up.weight", ".down.weight")) for n in moved)
    with pytest.raises(VaclmError, match="ce-weight must be >= 0"):
        HealConfig(ce_weight=-1.0)
