"""A vaclm folder in processes that never `import vaclm`: it loads right where vaclm is installed
(vaclm-hook.pth registers the quantizer when transformers' quantizers are imported), and it fails
loudly, naming vaclm, where vaclm is absent (format version 2's weights marker), never random."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model

IDS = torch.arange(40).remainder(256).view(2, 20)

LOGITS = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
ids = torch.arange(40).remainder(256).view(2, 20)
for folder, out in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, out)
print("registered by:", "hook" if "vaclm.io.hf_quantizer" in sys.modules else "nothing")
"""

# "vaclm is not installed": no hook at start-up and no vaclm package ("hook-broken": the hook is there but
# vaclm cannot be imported, as in a damaged install)
NO_VACLM = """
import sys, _vaclm_hook
class NoVaclm:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "vaclm" or name.startswith("vaclm."):
            raise ModuleNotFoundError(f"No module named {name!r}")
if sys.argv[2] == "not-installed":
    _vaclm_hook.uninstall()
sys.meta_path.insert(0, NoVaclm)
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("LOADED")
"""


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def factorised_llama():
    """A tiny llama whose q, o and down projections are rank-16 truncated SVDs (no pipeline needed)."""
    from vaclm.model.surgery import dense_weight, replace_with_lowrank

    model = tiny_model("llama")
    for name, module in list(model.named_modules()):
        if name.endswith(("q_proj", "o_proj", "down_proj")):
            u, s, vh = torch.linalg.svd(dense_weight(module)[0].detach(), full_matrices=False)
            replace_with_lowrank(model, name, u[:, :16] * s[:16], vh[:16])
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from vaclm.io.save import save_model

    root = tmp_path_factory.mktemp("nohook")
    model = factorised_llama()
    save_model(model, root / "v2", byte_tokenizer())
    v1 = root / "v1"  # the version 1 layout: the same tensors, no weights marker
    shutil.copytree(root / "v2", v1)
    config = json.loads((v1 / "config.json").read_text())
    del config["transformers_weights"]
    config["quantization_config"]["version"] = 1
    (v1 / "config.json").write_text(json.dumps(config, indent=2))
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    return root, expected


def run(code, *args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_saved_config_is_format_2_with_the_weights_marker(saved):
    from vaclm.io.validate import FORMAT_VERSION, WEIGHTS_MARKER

    config = json.loads((saved[0] / "v2" / "config.json").read_text())
    # low-rank folders stay version 2 (older vaclm reads them); 3 is written only for pruned layers
    assert FORMAT_VERSION == 3 and config["quantization_config"]["version"] == 2
    assert config["transformers_weights"] == WEIGHTS_MARKER and "pip install vaclm" in WEIGHTS_MARKER
    assert (saved[0] / "v2" / "model.safetensors").is_file()  # the standard name: vLLM and vaclm read it as before


def test_startup_hook_imports_nothing(tmp_path):
    proc = run("import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('vaclm', '_vaclm_hook', 'transformers', 'torch'))))", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout)
    assert loaded == ["_vaclm_hook"], ("vaclm-hook.pth is not active: reinstall vaclm (pip install -e .)"
                                       if not loaded else loaded)


def test_plain_transformers_loads_format_2_and_1_without_import_vaclm(saved, tmp_path):
    root, expected = saved
    proc = run(LOGITS, root / "v2", tmp_path / "v2.safetensors", root / "v1", tmp_path / "v1.safetensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered by: hook" in proc.stdout
    for name in ("v2", "v1"):
        torch.testing.assert_close(load_file(tmp_path / f"{name}.safetensors")["logits"], expected, atol=1e-5, rtol=1e-5)


def test_vaclm_reads_format_1(saved):
    from vaclm.io.loading import load_model

    model, _ = load_model(saved[0] / "v1")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, saved[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["not-installed", "hook-broken"])
def test_without_vaclm_loading_fails_naming_vaclm(saved, case):
    proc = run(NO_VACLM, saved[0] / "v2", case)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError:") and "vaclm low-rank factors" in last and "pip install vaclm" in last
    if case == "hook-broken":
        assert "vaclm is installed but could not register its transformers quantizer" in proc.stderr


def test_a_newer_format_is_refused_with_upgrade(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from vaclm.errors import VaclmError

    folder = tmp_path / "v4"
    shutil.copytree(saved[0] / "v2", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["version"] = 4  # 3 (pruned layers) is read since --structure prune
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VaclmError, match="format version 4 is not supported .*upgrade vaclm"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_dense_export_has_no_marker(saved, tmp_path):
    from vaclm.io.export import to_dense
    from vaclm.io.save import save_model
    from vaclm.io.loading import load_model

    model, tokenizer = load_model(saved[0] / "v2")
    to_dense(model)
    save_model(model, tmp_path / "dense", tokenizer)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "transformers_weights" not in config and "quantization_config" not in config


TASK = """\
task: vaclm_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"question": "The sky is", "choices": ["blue", "green"], "label": 0},
        {"question": "Ice is", "choices": ["cold", "hot"], "label": 0},
        {"question": "Fire is", "choices": ["cold", "hot"], "label": 1}]


def test_lm_eval_cli_scores_the_folder_as_vaclm_does(saved, tmp_path):
    """lm-eval's own CLI (no vaclm import anywhere) on a local task gives the loaded model's loglikelihoods."""
    pytest.importorskip("lm_eval", reason="lm-eval is installed by scripts/setup.sh (extra 'harness')")
    import torch.nn.functional as F

    from vaclm.io.loading import load_model

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={saved[0] / 'v2'},dtype=float32",
         "--tasks", "vaclm_tiny", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vaclm_tiny" in proc.stdout and "acc" in proc.stdout
    (samples,) = (tmp_path / "results").rglob("samples_vaclm_tiny_*.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines() if line), key=lambda s: s["doc_id"])
    theirs = [float(resp[0]) for sample in logged for resp in sample["filtered_resps"]]  # per doc, per choice
    model, tokenizer = load_model(saved[0] / "v2")
    ours = []
    for doc in DOCS:
        for choice in doc["choices"]:
            context = tokenizer(doc["question"]).input_ids
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            with torch.no_grad():
                logprobs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], dim=-1)
            ours.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    assert theirs == pytest.approx(ours, abs=1e-3)
