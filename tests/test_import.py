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
