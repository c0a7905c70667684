"""The headline result as a regression test: the demo model compressed with the defaults at keep 0.8.

README: SmolLM2-135M-Instruct, defaults (gfwsvd + knapsack, 32 x 512 calibration tokens of the
WikiText-2 validation split), PPL 31.61 on the first 16 x 1024 tokens of WikiText-2 test (dense
22.75). A change that makes the default pipeline worse by more than ~3% fails here. Slow (10+
minutes on 2 cores): run with `pytest -m slow tests/test_headline.py`.
"""

import os

import pytest

from conftest import WIKI_TEST, WIKI_VALID

KEEP = 0.8
PPL_BOUND = 32.5  # measured 31.61 (README); a different calibration seed alone moves it ~2%


def text_source(role: str, monkeypatch):
    """The "wikitext2" keyword where vaclm resolves it without a download (a copy bundled with the
    package), else the shared raw files, else skip."""
    from vaclm.data.text import load_text
    from vaclm.errors import VaclmError

    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # fail fast rather than wait on the network
        monkeypatch.setenv(flag, os.environ.get(flag, "1"))
    try:
        load_text("wikitext2", role=role)
        return "wikitext2"
    except VaclmError:
        pass
    path = WIKI_VALID if role == "calibration" else WIKI_TEST
    if path.is_file():
        return str(path)
    pytest.skip(f"no WikiText-2 {role} text: neither bundled nor at {path}")


@pytest.mark.slow
def test_defaults_at_keep_08_reach_the_readme_perplexity(monkeypatch):
    import vaclm
    from vaclm.api import compress, evaluate
    from vaclm.config import CompressConfig
    from vaclm.errors import VaclmError

    calib, test = text_source("calibration", monkeypatch), text_source("evaluation", monkeypatch)
    try:
        model, tokenizer = vaclm.load("demo")
    except VaclmError as exc:
        pytest.skip(str(exc))

    dense = evaluate(model, test, tokenizer, seq_len=1024, max_windows=16, progress=False)
    assert dense["windows"] == 16
    assert dense["ppl"] == pytest.approx(22.75, rel=0.02)  # README's dense number: the same text and windows

    result = compress(model, CompressConfig(keep=KEEP), calib, tokenizer=tokenizer, progress=False)
    assert result.kept_fraction == pytest.approx(KEEP, abs=0.005)
    compressed = evaluate(model, test, tokenizer, seq_len=1024, max_windows=16, progress=False)
    assert compressed["windows"] == 16
    assert dense["ppl"] < compressed["ppl"] <= PPL_BOUND, compressed
