"""Zero-shot scoring: lm-eval's templates and token boundaries, exact log-likelihoods, metrics, errors, CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from vaclm.errors import VaclmError

from conftest import run_cli, tiny_model

CORPUS = ["Question: How do I open a jar?\nAnswer: Twist the lid.", "The trophy did not fit in the suitcase because it was too big.",
          "Sarah was a much better surgeon than Maria so she always got the harder cases.", "foobar foo bar"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in-process: merges make "encode whole, then split" matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def write_data(root, piqa=None, wino=None):
    piqa = piqa or [({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it with a hammer, then pour."}, 0),
                    ({"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain"}, 1)]
    wino = wino or [({"sentence": "The trophy did not fit in the suitcase because _ was too big.", "option1": "the trophy",
                      "option2": "the suitcase", "answer": "1"}, "1"),
                    ({"sentence": "Sarah was better than Maria so _ got the harder cases.", "option1": "Sarah",
                      "option2": "Maria", "answer": "1"}, "2")]
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    (root / "winogrande").mkdir(parents=True, exist_ok=True)
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in piqa))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{l}\n" for _, l in piqa))
    (root / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in wino))
    (root / "winogrande" / "dev-labels.lst").write_text("".join(f"{l}\n" for _, l in wino))
    return root


def direct_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """One unbatched forward over the concatenated tokens, summed by hand."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_templates_match_lm_eval(tmp_path):
    from vaclm.data.zeroshot import load_examples

    root = write_data(tmp_path)
    piqa = load_examples("piqa", root)
    assert piqa[0].contexts == ("Question: Open a jar\nAnswer:",) * 2
    assert piqa[0].continuations == (" Twist the lid.", " Hit it with a hammer, then pour.")
    assert piqa[0].gold == 0 and piqa[1].gold == 1
    assert piqa[1].norm_lengths == (float(len("replace drawer with bobby pin ")), float(len("finish, woodgrain")))
    wino = load_examples("winogrande", root)
    assert wino[0].contexts == ("The trophy did not fit in the suitcase because the trophy",
                                "The trophy did not fit in the suitcase because the suitcase")
    assert wino[0].continuations == (" was too big.",) * 2
    assert [w.gold for w in wino] == [0, 1]  # labels "1"/"2" -> 0/1, from the labels file
    assert len(load_examples("piqa", root, limit=1)) == 1


def test_encode_pair_splits_the_whole_encoding(tokenizer):
    from vaclm.eval.loglikelihood import encode_pair

    for ctx, cont in [("Question: How do I open a jar?\nAnswer:", " Twist the lid."), ("foo", "bar"), ("The trophy", " did")]:
        c, x = encode_pair(tokenizer, ctx, cont)
        assert c == tokenizer.encode(ctx) and c + x == tokenizer.encode(ctx + cont)
    # a trailing space of the context belongs to the continuation
    c, x = encode_pair(tokenizer, "Answer: ", "Twist")
    assert c == tokenizer.encode("Answer:") and c + x == tokenizer.encode("Answer: Twist")
    # "foobar" is one merged token here: the continuation is what remains after the context's tokens
    whole = tokenizer.encode("foobar")
    assert encode_pair(tokenizer, "foo", "bar")[1] == whole[len(tokenizer.encode("foo")) :]
    # an empty context is conditioned on the EOS token (no BOS in this tokenizer)
    assert encode_pair(tokenizer, "", " Twist")[0] == [tokenizer.eos_token_id]


def test_batched_scores_equal_a_direct_forward(model, tokenizer):
    from vaclm.eval.loglikelihood import encode_pair, loglikelihoods

    pairs = [("Question: How do I open a jar?\nAnswer:", " Twist the lid."), ("The trophy", " did not fit in the suitcase."),
             ("Sarah was a much better surgeon", " than Maria"), ("foo", "bar"), ("a", " b c d e f g h i j k")]
    expected = [direct_loglikelihood(model, *encode_pair(tokenizer, c, x)) for c, x in pairs]
    for batch_size in (1, 2, 5):  # padding and batch composition must not change the scores
        got = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, abs=1e-4)
    again = loglikelihoods(model, tokenizer, pairs, batch_size=2, progress=False)
    assert again == loglikelihoods(model, tokenizer, pairs, batch_size=2, progress=False)  # deterministic


def test_scores_match_lm_eval_harness(model, tokenizer):
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841  (optional extra `harness`)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from vaclm.eval.loglikelihood import loglikelihoods

    pairs = [("Question: How do I open a jar?\nAnswer:", " Twist the lid."), ("The trophy ", "did not fit"), ("foo", "bar")]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    theirs = [r[0] for r in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)]
    assert loglikelihoods(model, tokenizer, pairs, batch_size=2, progress=False) == pytest.approx(theirs, abs=1e-4)


def test_acc_and_acc_norm_selection():
    from vaclm.eval.zeroshot import choose

    assert choose([-10.0, -12.0], [5, 20]) == (0, 1)  # raw prefers the short one, per character the long one
    assert choose([-3.0, -1.0], [10, 10]) == (1, 1)
    assert choose([-2.0, -2.0], [4, 4]) == (0, 0)  # ties go to the first choice, as np.argmax


def test_metrics_from_crafted_scores(tmp_path, monkeypatch):
    import vaclm.eval.zeroshot as zs

    root = write_data(tmp_path)
    # piqa example 0 (gold 0): raw picks 0, per character picks 1; example 1 (gold 1): both pick 1
    crafted = {"piqa": [-10.0, -12.0, -9.0, -1.0], "winogrande": [-1.0, -2.0, -1.0, -2.0]}
    monkeypatch.setattr(zs, "loglikelihoods", lambda m, t, pairs, **k: crafted[k["desc"]][: len(pairs)])
    out = zs.evaluate_tasks(None, None, "piqa,winogrande", data_dir=root)
    assert out["piqa"]["acc"] == 1.0 and out["piqa"]["acc_norm"] == 0.5
    assert out["piqa"]["examples"] == out["piqa"]["of"] == 2
    assert out["winogrande"]["acc"] == 0.5 and "acc_norm" not in out["winogrande"]  # gold 0 then 1, both pick 0
    assert out["piqa"]["acc_norm_stderr"] == pytest.approx(0.5)


@pytest.mark.parametrize("case, message", [
    ("no-dir", "pass --data-dir FOLDER"),
    ("missing-dir", "zero-shot data folder not found"),
    ("missing-file", "winogrande/dev-labels.lst"),
    ("count", "has 1 labels for 2 examples"),
    ("bad-label", "line 1 is malformed"),
    ("task", "unknown task hellaswag"),
])
def test_loader_errors(tmp_path, monkeypatch, case, message):
    from vaclm.data.zeroshot import load_examples, parse_tasks

    monkeypatch.delenv("VACLM_DATA_DIR", raising=False)
    root = write_data(tmp_path / "data")
    task, data_dir = "winogrande", root
    if case == "no-dir":
        data_dir = None
    elif case == "missing-dir":
        data_dir = tmp_path / "nowhere"
    elif case == "missing-file":
        (root / "winogrande" / "dev-labels.lst").unlink()
    elif case == "count":
        (root / "winogrande" / "dev-labels.lst").write_text("1\n")
    elif case == "bad-label":
        (root / "winogrande" / "dev-labels.lst").write_text("3\n1\n")
    with pytest.raises(VaclmError, match=message):
        if case == "task":
            parse_tasks("piqa,hellaswag")
        load_examples(task, data_dir)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    from vaclm.data.zeroshot import load_examples

    monkeypatch.setenv("VACLM_DATA_DIR", str(write_data(tmp_path)))
    assert len(load_examples("piqa", None)) == 2


@pytest.fixture(scope="module")
def saved_folder(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_eval_tasks(saved_folder, tmp_path):
    root = write_data(tmp_path / "data")
    (tmp_path / "text.txt").write_text(" ".join(CORPUS))
    proc = run_cli("eval", str(saved_folder), "--tasks", "piqa,winogrande", "--data-dir", str(root), "--limit", "1",
                   "--ppl", str(tmp_path / "text.txt"), "--seq-len", "16", "--max-windows", "2", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["tasks"]) == {"piqa", "winogrande"} and out["ppl"] > 1 and out["windows"] == 2  # both at once
    assert out["tasks"]["piqa"]["examples"] == 1 and out["tasks"]["piqa"]["of"] == 2
    assert out["tasks"]["piqa"]["acc"] in (0.0, 1.0) and out["tasks"]["piqa"]["acc_norm"] in (0.0, 1.0)
    assert "piqa: acc" in proc.stdout


def test_cli_eval_errors(saved_folder, tmp_path, monkeypatch, capsys):
    from vaclm import cli

    def error_of(*argv):
        assert cli.main(list(argv)) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("vaclm: error:")]
        assert len(lines) == 1
        return lines[0]

    assert "give --ppl TEXT, --tasks piqa,winogrande, or both" in error_of("eval", str(saved_folder))
    message = error_of("eval", str(saved_folder), "--tasks", "piqa", "--data-dir", str(tmp_path))
    assert "zero-shot data file missing" in message and "piqa/valid.jsonl" in message
    import vaclm.eval.harness as harness

    monkeypatch.setattr(harness, "harness_available", lambda: False)
    assert "pip install lm-eval" in error_of("eval", str(saved_folder), "--tasks", "piqa", "--harness")
