"""Model names: a local-looking typo fails at once in one line (no hub retries); hub ids pass through."""

import time

import pytest

from vaclm.errors import VaclmError
from vaclm.io.loading import check_model_source, resolve_source


@pytest.fixture()
def here(tmp_path, monkeypatch):
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name, hint", [
    ("dmeo", "did you mean 'demo'?"),
    ("deom", "did you mean 'demo'?"),
    ("smollm2-dmeo", "did you mean 'smollm2-demo'?"),
    ("out/modle", "did you mean 'out/model'?"),  # out/ exists here: a local path, not a hub id
    ("out/missing", "give an existing folder, a .gguf file or a hub id"),
    ("./x", "give an existing folder"),
    ("../nowhere/model", "give an existing folder"),
    ("~/no-such-vaclm-model", "give an existing folder"),
    ("model.gguf", "give an existing folder"),
    ("a/b/c", "give an existing folder"),
])
def test_local_looking_typos_fail_at_once_in_one_line(here, name, hint):
    start = time.perf_counter()
    with pytest.raises(VaclmError) as err:
        check_model_source(name)
    assert time.perf_counter() - start < 1.0  # no network, no retries
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model not found: {name!r} (no such folder or file)")
    assert message.endswith(hint) or hint in message


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_are_not_checked_here(here, name):
    assert resolve_source(name) == name  # org/name, or a bare name far from "demo": the hub decides
    check_model_source(name)


def test_existing_sources(here):
    assert resolve_source("out/model") == "out/model"
    with pytest.raises(VaclmError, match="is a folder without config.json"):
        check_model_source("out")
    with pytest.raises(VaclmError, match="is a file but not a .gguf"):
        check_model_source("notes.txt")
    with pytest.raises(VaclmError, match="no model given"):
        check_model_source(" ")


def test_gguf_conversion_says_once_where_it_caches(tmp_path, monkeypatch, capsys):
    """The first use of a .gguf converts it; one stderr line says so, where, and that later runs reuse it."""
    import vaclm.io.loading as loading

    monkeypatch.setenv("VACLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(VaclmError, match="could not read"):
        loading.gguf_to_folder(gguf)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vaclm: converting tiny.gguf once to float32 weights in ")
    assert str(tmp_path / "cache" / "gguf") in err[0] and "later runs reuse them" in err[0]
