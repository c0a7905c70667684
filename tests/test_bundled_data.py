"""The bundled WikiText-2 text: the keyword reads the package's own files, per role, with no network."""

import hashlib
import zipfile

import pytest

from vaclm.data import text
from vaclm.data.text import bundled_path, load_text
from vaclm.errors import VaclmError

SHA256 = {  # of the original wikitext-2-raw-v1.zip members (bundled/wikitext-2-raw/SOURCE.md)
    "wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}


@pytest.mark.parametrize("role, name, first", [("calibration", "wiki.valid.raw", " = Homarus gammarus = "),
                                               ("evaluation", "wiki.test.raw", " = Robert Boulter = ")])
def test_keyword_reads_the_bundled_split_of_its_role(role, name, first, monkeypatch):
    path = bundled_path("wikitext2", role)
    assert path.name == name and path.parent.name == "wikitext-2-raw"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name]
    assert (path.parent / "LICENSE").is_file() and (path.parent / "SOURCE.md").is_file()
    monkeypatch.setattr(text, "_load_dataset_text", lambda *a: pytest.fail("wikitext2 must not go to the hub"))
    loaded = load_text("wikitext2", role=role)
    assert loaded == path.read_text(encoding="utf-8") and loaded.splitlines()[1] == first


def test_calibration_and_evaluation_are_different_text():
    assert load_text("wikitext2", "calibration")[:2000] != load_text("wikitext2", "evaluation")[:2000]


def test_a_missing_bundled_file_says_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "BUNDLED_DIR", tmp_path)  # an install that lost its data files
    with pytest.raises(VaclmError, match=r"bundled file .*wiki\.test\.raw is missing from the vaclm install; "
                                         r"reinstall vaclm or pass a text file"):
        load_text("wikitext2", role="evaluation")


def test_an_unknown_role_is_refused():
    with pytest.raises(VaclmError, match="unknown text role 'fitness'; use one of calibration, evaluation"):
        bundled_path("wikitext2", "fitness")


@pytest.mark.parametrize("source, hint", [("wikitext3", "; did you mean 'wikitext2'?"), ("no-such-corpus", "")])
def test_an_unknown_name_lists_the_valid_keywords(source, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VaclmError) as err:
        load_text(source)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"text source '{source}' not found")
    assert "wikitext2 (bundled), c4 (from the hub)" in message and message.endswith(hint or "(from the hub)")


def test_a_local_file_named_like_a_keyword_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wikitext2").write_text("my own text")
    assert load_text("wikitext2") == "my own text"


def test_the_wheel_ships_the_data_and_the_loader_hook(tmp_path):
    """A non-editable wheel holds the bundled text with its license, and vaclm-hook.pth with its module."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    src = tmp_path / "src"
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(tmp_path), "-w", str(tmp_path / "dist"), "--no-deps",
                           "--no-build-isolation", "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("vaclm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = "vaclm/data/bundled/wikitext-2-raw/"
    assert {bundled + n for n in ("wiki.valid.raw", "wiki.test.raw", "LICENSE", "SOURCE.md")} <= names
    assert {"vaclm-hook.pth", "_vaclm_hook.py"} <= names
    assert zipfile.ZipFile(wheel).read("vaclm-hook.pth") == b"import _vaclm_hook\n"
