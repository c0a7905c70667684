"""Zero-shot scoring through lm-evaluation-harness on local files: lm-eval's prompts built from the files,
the in-memory model's exact log-likelihoods, metrics as reported, file and setup errors, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vaclm.errors import VaclmError

from conftest import run_cli, tiny_model

CORPUS = ["Question: How do I open a jar?\nAnswer: Twist the lid.", "The trophy did not fit in the suitcase because it was too big.",
          "Sarah was a much better surgeon than Maria so she always got the harder cases.", "foobar foo bar"] * 20
needs_lm_eval = pytest.mark.skipif(__import__("importlib.util").util.find_spec("lm_eval") is None,
                                   reason="lm-eval is installed by scripts/setup.sh (extra 'harness')")


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
                      "option2": "Maria", "answer": "1"}, "2")]  # the labels file wins over a stale answer field
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    (root / "winogrande").mkdir(parents=True, exist_ok=True)
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in piqa))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{l}\n" for _, l in piqa))
    (root / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in wino))
    (root / "winogrande" / "dev-labels.lst").write_text("".join(f"{l}\n" for _, l in wino))
    return root


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One unbatched forward over the whole text; the continuation is what follows the context's tokens."""
    ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


@needs_lm_eval
def test_lm_eval_scores_the_local_files(model, tokenizer, tmp_path, monkeypatch):
    import datasets

    from vaclm.eval.zeroshot import evaluate_tasks

    def no_hub(*args, **kwargs):
        raise AssertionError("a local task asked datasets.load_dataset (the hub)")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    rng = torch.random.get_rng_state()
    out = evaluate_tasks(model, tokenizer, "PIQA,winogrande", data_dir=write_data(tmp_path), batch_size=3,
                         progress=False, log_samples=True)
    assert torch.equal(torch.random.get_rng_state(), rng) and tokenizer.pad_token is None  # caller's state untouched
    assert list(out) == ["piqa", "winogrande"]
    piqa, wino = (sorted(out[t].pop("samples"), key=lambda s: s["doc_id"]) for t in ("piqa", "winogrande"))
    # lm-eval's own prompts (piqa.yaml; preprocess_winogrande.py's partial evaluation), labels from the labels files
    assert list(piqa[0]["arguments"]) == [("Question: Open a jar\nAnswer:", " Twist the lid."),
                                          ("Question: Open a jar\nAnswer:", " Hit it with a hammer, then pour.")]
    assert list(wino[0]["arguments"]) == [("The trophy did not fit in the suitcase because the trophy", " was too big."),
                                          ("The trophy did not fit in the suitcase because the suitcase", " was too big.")]
    assert [s["target"] for s in piqa] == [0, 1] and [s["doc"]["answer"] for s in wino] == ["1", "2"]
    # the scores are the in-memory model's log-likelihoods, and the metrics those lm-eval derives from them
    for task, samples in (("piqa", piqa), ("winogrande", wino)):
        for s in samples:
            expected = [direct_loglikelihood(model, tokenizer, *pair) for pair in s["arguments"]]
            assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(expected, abs=1e-4)
        metrics = ("acc", "acc_norm") if task == "piqa" else ("acc",)
        assert [k for k in out[task] if k != "seconds"] == ["examples", "of"] + [f"{m}{e}" for m in metrics for e in ("", "_stderr")]
        assert out[task]["examples"] == out[task]["of"] == 2
        for m in metrics:
            hits = [float(s[m]) for s in samples]
            assert out[task][m] == pytest.approx(sum(hits) / 2)
            assert out[task][f"{m}_stderr"] == pytest.approx(math.sqrt(sum((h - sum(hits) / 2) ** 2 for h in hits) / 2))


@needs_lm_eval
def test_other_names_go_to_lm_eval(model, tokenizer, tmp_path):
    """A name without local files is looked up among lm-eval's own tasks (~10 s: lm-eval indexes them all)."""
    from vaclm.eval.zeroshot import evaluate_tasks

    with pytest.raises(VaclmError, match="unknown task no_such_task: neither local"):
        evaluate_tasks(model, tokenizer, "piqa,no_such_task", data_dir=write_data(tmp_path), progress=False)


def test_task_yamls_include_lm_evals_configs(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    from vaclm.data.zeroshot import local_dataset
    from vaclm.eval.zeroshot import write_task_yamls

    data = write_data(tmp_path / "data")
    (tmp_path / "tasks").mkdir()
    write_task_yamls(tmp_path / "tasks", ["piqa", "winogrande", "hellaswag"], data)
    assert sorted(p.name for p in (tmp_path / "tasks").glob("*.yaml")) == ["piqa.yaml", "winogrande.yaml"]  # hellaswag: lm-eval's
    piqa = load_yaml(tmp_path / "tasks" / "piqa.yaml")
    assert piqa["doc_to_text"] == "Question: {{goal}}\nAnswer:" and piqa["custom_dataset"] is local_dataset
    wino = load_yaml(tmp_path / "tasks" / "winogrande.yaml")
    assert wino["doc_to_choice"].__module__.endswith("preprocess_winogrande")
    assert local_dataset(**wino["dataset_kwargs"], version=1.0)["validation"][1] == {
        "sentence": "Sarah was better than Maria so _ got the harder cases.", "option1": "Sarah", "option2": "Maria",
        "answer": "2"}


@pytest.mark.parametrize("case, message", [
    ("no-dir", "pass --data-dir FOLDER"),
    ("missing-dir", "zero-shot data folder not found"),
    ("missing-file", r"winogrande/dev-labels.lst; pass --data-dir FOLDER \(or set VACLM_DATA_DIR\)"),
    ("count", "has 1 labels for 2 examples"),
    ("bad-label", "line 1 is malformed"),
    ("bad-field", "line 1 is malformed .*KeyError"),
])
def test_data_errors(tmp_path, monkeypatch, case, message):
    from vaclm.data.zeroshot import read_documents

    monkeypatch.delenv("VACLM_DATA_DIR", raising=False)
    root = write_data(tmp_path / "data")
    data_dir = {"no-dir": None, "missing-dir": tmp_path / "nowhere"}.get(case, root)
    labels, docs = root / "winogrande" / "dev-labels.lst", root / "winogrande" / "dev.jsonl"
    if case == "missing-file":
        labels.unlink()
    elif case == "count":
        labels.write_text("1\n")
    elif case == "bad-label":
        labels.write_text("3\n1\n")
    elif case == "bad-field":
        docs.write_text('{"sentence": "_ x", "option1": "a"}\n' + docs.read_text().splitlines()[1] + "\n")
    with pytest.raises(VaclmError, match=message):
        read_documents("winogrande", data_dir)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    from vaclm.data.zeroshot import parse_tasks, read_documents

    monkeypatch.setenv("VACLM_DATA_DIR", str(write_data(tmp_path)))
    assert read_documents("piqa", None)[1] == {"goal": "dresser", "sol1": "replace drawer with bobby pin ",
                                               "sol2": "finish, woodgrain", "label": 1}
    assert parse_tasks("PIQA, winogrande,piqa,arc_easy") == ["piqa", "winogrande", "arc_easy"]
    with pytest.raises(VaclmError, match="no task"):
        parse_tasks(" , ")


@pytest.fixture(scope="module")
def saved_folder(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_lm_eval
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
    assert math.isnan(out["tasks"]["piqa"]["acc_stderr"])  # lm-eval's "N/A" below two examples
    assert "piqa: acc" in proc.stderr  # with --json, messages go to stderr


def test_cli_eval_errors(saved_folder, tmp_path, monkeypatch, capsys):
    import vaclm.eval.zeroshot as zs
    from vaclm import cli

    def error_of(*argv):
        assert cli.main(list(argv)) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("vaclm: error:")]
        assert len(lines) == 1
        return lines[0]

    assert "nothing to evaluate" in error_of("eval", str(saved_folder), "--ppl", "none")
    if zs.find_spec("lm_eval") is not None:
        message = error_of("eval", str(saved_folder), "--tasks", "piqa", "--data-dir", str(tmp_path), "--ppl", "none")
        assert "zero-shot data file missing" in message and "piqa/valid.jsonl" in message and "--data-dir" in message
    monkeypatch.setattr(zs, "find_spec", lambda name: None)
    assert "zero-shot tasks need lm-evaluation-harness: pip install 'vaclm[harness]'" in error_of(
        "eval", str(saved_folder), "--tasks", "piqa", "--ppl", "none")
