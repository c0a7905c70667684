"""A run killed with SIGKILL and resumed gives a bitwise-identical saved model."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import vaclm
from vaclm.config import CompressConfig
from vaclm.io.checkpoint import Checkpoint
from conftest import tiny_model, token_batch

mode, out, partial = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "slow":  # give the parent time to kill us between blocks
    original = Checkpoint.save_block
    def slow_save(self, *a, **k):
        original(self, *a, **k)
        time.sleep(0.4)
    Checkpoint.save_block = slow_save
model = tiny_model("llama", num_hidden_layers=8)
config = CompressConfig(keep=0.5, method={method!r}, allocation={allocation!r}, order="middle-out",
                        calib_samples=8, calib_seq_len=32)
kwargs = dict(checkpoint_dir=partial, resume=mode == "resume") if mode != "plain" else {{}}
result = vaclm.compress(model, config, token_batch(8, 32), progress=False, **kwargs)
vaclm.save(model, out, result=result)
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method,allocation", [("svd-llm", "uniform"), ("gfwsvd", "knapsack")])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, method, allocation):
    script = CHILD.format(tests=str(TESTS), method=method, allocation=allocation)
    run = lambda *a: subprocess.run([sys.executable, "-c", script, *a], capture_output=True, text=True)

    plain = run("plain", str(tmp_path / "ref"), str(tmp_path / "unused"))
    assert plain.returncode == 0, plain.stderr[-3000:]

    partial = tmp_path / "out.partial"
    child = subprocess.Popen([sys.executable, "-c", script, "slow", str(tmp_path / "out"), str(partial)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded machine is slow
    while time.time() < deadline:
        state = partial / "state.json"
        if state.exists() and len(json.loads(state.read_text())["completed"]) >= 3:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    done = json.loads((partial / "state.json").read_text())["completed"]
    assert 3 <= len(done) < 8 and not (tmp_path / "out").exists()

    resumed = run("resume", str(tmp_path / "out"), str(partial))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha(tmp_path / "out" / "model.safetensors") == sha(tmp_path / "ref" / "model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "ref" / "config.json").read_text())


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    from vaclm.errors import VaclmError
    from vaclm.io.checkpoint import Checkpoint

    Checkpoint(tmp_path / "p", "run-a", resume=False)
    with pytest.raises(VaclmError, match="other settings"):
        Checkpoint(tmp_path / "p", "run-b", resume=True)
    with pytest.raises(VaclmError, match="pass --resume"):
        Checkpoint(tmp_path / "p", "run-a", resume=False)
    assert (tmp_path / "p" / "state.json").exists()
