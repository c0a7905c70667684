import subprocess
import sys


def test_import_is_cheap_and_registers_quantizer():
    code = (
        "import sys, vaclm, torch\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "heavy = [m for m in sys.modules if m.startswith(('vaclm.pipeline', 'vaclm.methods', 'vaclm.model', 'gguf'))]\n"
        "assert not heavy, heavy\n"
        "assert 'vaclm' in AUTO_QUANTIZER_MAPPING\n"
        "assert not torch.cuda.is_initialized()\n"
        "import importlib; importlib.reload(vaclm.io.hf_quantizer)\n"  # registering twice must not raise
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_vllm_extra_is_bounded_to_the_tested_versions():
    """The vllm extra admits the versions the plugin was checked with, and no release after them."""
    import json
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    repo = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    spec = Requirement(extra[0]).specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"no upper bound in {extra[0]}"
    checked = json.loads((repo / "bench" / "results" / "vllm_check.json").read_text())["vllm"]
    assert checked in spec and "0.34.0" in spec  # bench/vllm_check.py's run and the layer test's version
    assert "1.0.0" not in spec
