"""Bad input: one line on stderr naming the problem and the fix, a non-zero exit, nothing written."""


import pytest
import torch

import vaclm
from vaclm.errors import VaclmError

from conftest import run_cli, token_batch, tiny_model, svd_llm_config


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("vaclm: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_model_path(tmp_path):
    proc = run_cli("compress", str(tmp_path / "nope.gguf"), "--calib", "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "model not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_keep_out_of_range(tmp_path, keep):
    proc = run_cli("compress", "demo", "--keep", keep, "--calib", "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "keep must be in (0, 1]")


def test_output_exists_without_overwrite(tmp_path):
    (tmp_path / "o").mkdir()
    proc = run_cli("compress", "demo", "--calib", "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "already exists", "--overwrite")


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37)).save_pretrained(tmp_path / "bert")
    proc = run_cli("info", str(tmp_path / "bert"))
    assert proc.returncode == 2 and "vaclm: error:" in proc.stderr
    with pytest.raises(VaclmError, match="unsupported architecture 'bert'; supported model types: llama"):
        from vaclm.model.arch import spec_for

        spec_for("bert")


def test_nan_weights_refused_and_nothing_left_behind(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(VaclmError, match="model.layers.1.mlp.up_proj.weight contains NaN or Inf"):
        vaclm.compress(model, svd_llm_config(calib_samples=2, calib_seq_len=8), token_batch(2, 8), progress=False,
                       checkpoint_dir=tmp_path / "out.partial")
    assert not (tmp_path / "out.partial").exists()


def test_calibration_text_empty_or_too_short(tmp_path):
    from vaclm.data.text import calibration_windows, load_text

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(VaclmError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(VaclmError, match="too few for 32 x 512"):
        calibration_windows(torch.arange(1000), 32, 512, seed=0)


def test_calibration_windows_are_disjoint_and_seeded():
    from vaclm.data.text import calibration_windows

    ids = torch.arange(10_000)
    chosen, rest = calibration_windows(ids, 8, 100, seed=3)
    again, _ = calibration_windows(ids, 8, 100, seed=3)
    assert torch.equal(chosen, again)
    assert not set(chosen.flatten().tolist()) & set(rest.flatten().tolist())
    assert chosen.shape == (8, 100) and rest.shape == (92, 100)


def test_target_size_parsing():
    import argparse

    from vaclm.options import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("400MiB") == 400 * 2**20 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError, match="write it like 5GB"):
        parse_size("five gigs")


def test_version_flag():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vaclm {vaclm.__version__}"


def test_text_inputs_are_checked_before_the_model_loads(tmp_path):
    """A missing --calib file or an unknown keyword is reported, not the model that would fail to load
    after it (an unsupported architecture here)."""
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37)).save_pretrained(tmp_path / "bert")
    missing = run_cli("compress", str(tmp_path / "bert"), "--calib", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert_one_line_error(missing, "nope.txt")
    keyword = run_cli("compress", str(tmp_path / "bert"), "--calib", "wikitext3", "--out", str(tmp_path / "o"))
    assert_one_line_error(keyword, "wikitext3", "wikitext2")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_json_output_is_pure_json_on_stdout(tmp_path):
    import json

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    proc = run_cli("info", str(tmp_path / "tiny"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1  # the human lines went to stderr
    assert json.loads(proc.stdout)["model_type"] == "llama" and "llama:" in proc.stderr
