"""Elastic folders (`vaclm compress --elastic`, `vaclm resize`, `vaclm.load(..., keep=)`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaclm
from conftest import tiny_model, token_batch
from test_methods import IN, make_stats
from vaclm.allocate.candidates import Candidates
from vaclm.allocate.knapsack import solve_exact
from vaclm.allocate.nested import nested_order
from vaclm.cli import main
from vaclm.config import CompressConfig
from vaclm.errors import VaclmError
from vaclm.io.elastic import ELASTIC_DIR, ORDER_FILE, SPARE_FILE, read_order
from vaclm.io.resize import resize_folder
from vaclm.methods import build_method

KEEPS = (0.85, 0.7, 0.55, 0.4)


def test_prefixes_of_the_factors_are_the_truncation_in_the_weighted_metric():
    stats, _ = make_stats()
    w = torch.randn(24, IN, dtype=torch.float64)
    method = build_method("gfwsvd", damping=0.0, cov_damping=0.0)
    full = method.factorize(w, stats, max_rank=12)
    a, b = stats.inputs.mean_gram, stats.gradients.mean_cov
    for r in (3, 7, 12):
        up, down = full.at_rank(r)
        alone = method.factorize(w, stats, max_rank=r)
        assert torch.equal(up, alone.up) and torch.equal(down, alone.down)  # nested: the same SVD, cut
        dw = w - up @ down
        # the Kronecker-Fisher form vec(dW)^T (A x B) vec(dW) = tr(dW^T B dW A): what rank r minimises
        assert torch.isclose(torch.trace(dw.T @ b @ dw @ a), full.errors[r], rtol=1e-6)


def _convex_options(seed: int, count: int = 6) -> tuple[dict, dict]:
    """Square matrices of width 2(k+1): rank r costs r/(k+1) of dense, so dense is the next point of
    the same line; losses are tail sums of falling values (a truncated SVD's shape): convex."""
    rng = np.random.default_rng(seed)
    options, shapes = {}, {}
    for i in range(count):
        k = int(rng.integers(3, 7))
        width = 2 * (k + 1)
        values = np.sort(rng.random(k + 1) * rng.random() * 10)[::-1]
        losses = [float(values[r:].sum()) for r in range(1, k + 2)]  # rank 1 .. k, then dense: 0
        costs = [r * 2 * width for r in range(1, k + 2)]
        options[f"m{i}"] = Candidates([*range(1, k + 1), None], np.asarray(costs, float), np.asarray(losses))
        shapes[f"m{i}"] = (width, width)
    return options, shapes


@pytest.mark.parametrize("seed", [0, 1])
def test_every_prefix_of_the_order_is_an_optimal_knapsack_and_ranks_nest(seed):
    options, shapes = _convex_options(seed)
    order = nested_order(options, shapes, keep=1.0)
    previous = None
    for n in range(len(order.steps) + 1):
        ranks = order.ranks_after(n)
        loss = sum(float(options[k].losses[options[k].ranks.index(r)]) for k, r in ranks.items())
        exact = solve_exact([o.costs for o in options.values()], [o.losses for o in options.values()], order.costs[n])
        best = sum(float(o.losses[j]) for o, j in zip(options.values(), exact))
        assert loss <= best + 1e-9  # the Lagrangian path: optimal at its own costs
        if previous is not None:  # ranks only fall along the order (dense counts as the largest)
            assert all(r is None or (previous[k] is None or r <= previous[k]) for k, r in ranks.items())
            assert all(not (previous[k] is not None and r is None) for k, r in ranks.items())
        previous = ranks


CONFIG = dict(keep=0.9, method="svd-llm", calib_samples=8, calib_seq_len=32)  # svd-llm: fast; any method nests


@pytest.fixture(scope="module")
def compressed():
    """A tiny llama compressed once with --elastic at keep 0.9."""
    model = tiny_model("llama")
    result = vaclm.compress(model, CompressConfig(elastic=True, **CONFIG), token_batch(8, 32), progress=False)
    return model, result


@pytest.fixture(scope="module", params=[False, True], ids=["float", "int8"])
def elastic(request, compressed, tmp_path_factory):
    """Its folder, with float or int8 factors (spares quantised alike)."""
    import copy

    model, result = compressed
    if request.param:
        model = vaclm.quantize_int8(copy.deepcopy(model))
    folder = tmp_path_factory.mktemp("elastic") / "top"
    vaclm.save(model, folder, result=result)
    return folder, result, model


def _reference(folder, keep):
    """The elastic folder's tensors sliced by hand: what a model at `keep` must hold."""
    tensors = load_file(str(folder / "model.safetensors"))
    spare = load_file(str(folder / ELASTIC_DIR / SPARE_FILE))
    order = read_order(folder)
    top, ranks = order.ranks_after(order.top), order.ranks_at(keep)
    want = {}
    for key, t in tensors.items():
        name = next((n for n in ranks if key.startswith(n + ".")), None)
        if name is None or ranks[name] is None:
            want[key] = t
            continue
        source = tensors if top[name] is not None else {k: v for k, v in spare.items() if k.startswith(name + ".")}
        part = key[len(name) + 1:]
        if top[name] is None:
            if part == "bias":
                want[f"{name}.up.bias"] = t
            for k, v in source.items():
                v = v if v.dtype == torch.int8 else v.to(t.dtype)  # float spares are stored in float16
                want[k] = v[: ranks[name]] if ".down." in k else v[:, : ranks[name]] if k.endswith("up.weight") else v
        else:
            r = ranks[name]
            want[key] = t[:r] if ".down." in key else t[:, :r] if key.endswith("up.weight") else t
    return want, ranks


def test_resize_equals_slicing_and_meets_every_budget(elastic, tmp_path):
    folder, result, _ = elastic
    order = read_order(folder)
    shapes = result.shapes
    dense = sum(o * i for o, i in shapes.values())
    biggest_step = max(8 * (o + i) for o, i in shapes.values())  # one rank-grid step (rank_align 8)
    grew = 0
    for keep in KEEPS:
        summary = resize_folder(folder, keep, tmp_path / f"k{keep}")
        got = load_file(str(tmp_path / f"k{keep}" / "model.safetensors"))
        want, ranks = _reference(folder, keep)
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        cost = sum(o * i if ranks[n] is None else ranks[n] * (o + i) for n, (o, i) in shapes.items())
        assert cost <= keep * dense * (1 + 1e-9) and cost > keep * dense - biggest_step
        assert summary["kept_fraction"] == pytest.approx(cost / dense)
        config = json.loads((tmp_path / f"k{keep}" / "config.json").read_text())
        assert config["quantization_config"]["ranks"] == {n: r for n, r in ranks.items() if r is not None}
        assert not (tmp_path / f"k{keep}" / ELASTIC_DIR).exists()
        grew += sum(r is not None and result.ranks[n] is None for n, r in ranks.items())
    assert grew > 0  # matrices dense at the top size were factorised from their spare factors
    spare = load_file(str(folder / ELASTIC_DIR / SPARE_FILE))
    int8 = any(k.endswith("_scale") for k in spare)
    want = {torch.int8, torch.float32} if int8 else {torch.float16}  # float32 spares are stored in half the bytes
    assert {v.dtype for v in spare.values()} == want
    assert order.min_keep < KEEPS[-1]


def test_load_at_keep_equals_the_resized_folder_in_vaclm_and_plain_transformers(elastic, tmp_path):
    from transformers import AutoModelForCausalLM

    from vaclm.io.hf_quantizer import VaclmConfig

    folder, _, _ = elastic
    keep = 0.55
    resize_folder(folder, keep, tmp_path / "small")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    loaded = vaclm.load(str(folder), keep=keep).model
    override = AutoModelForCausalLM.from_pretrained(folder, quantization_config=VaclmConfig(keep=keep))
    reference = plain.state_dict()
    for model in (loaded, override):
        state = model.state_dict()
        assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    ids = token_batch(2, 16)
    assert torch.equal(loaded(ids).logits, plain(ids).logits)
    # what a keep-loaded model saves is an ordinary folder at that keep
    vaclm.save(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    small = json.loads((tmp_path / "small" / "config.json").read_text())["quantization_config"]
    assert again["ranks"] == small["ranks"]
    assert "keep" not in again


def test_the_top_size_is_the_default_pass_at_the_same_ranks(compressed):
    """The spare factorisations leave the model alone: the elastic top model is the sequential run at its ranks."""
    model, result = compressed
    other = tiny_model("llama")
    vaclm.compress(other, CompressConfig(**CONFIG), token_batch(8, 32), ranks=result.ranks, progress=False)
    a, b = model.state_dict(), other.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_keeps_outside_the_folder_are_refused_in_one_line(elastic, tmp_path, capsys):
    folder, _, _ = elastic
    order = read_order(folder)
    for keep in (0.95, order.min_keep / 2):
        assert main(["resize", str(folder), "--keep", str(keep), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "outside" in err
        assert not (tmp_path / "x").exists()
        with pytest.raises(VaclmError, match="outside"):
            vaclm.load(str(folder), keep=keep)
    plain = tmp_path / "plain"
    resize_folder(folder, 0.7, plain)
    assert main(["resize", str(plain), "--keep", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "not an elastic" in capsys.readouterr().err


def test_a_modified_order_is_refused(elastic, tmp_path):
    import shutil

    folder, _, _ = elastic
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / ELASTIC_DIR / ORDER_FILE
    data = json.loads(path.read_text())
    data["order"]["top"] -= 1
    path.write_text(json.dumps(data))
    with pytest.raises(VaclmError, match="does not match"):
        resize_folder(copy, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_elastic_needs_the_knapsack():
    with pytest.raises(VaclmError, match="knapsack"):
        CompressConfig(elastic=True, allocation="uniform")


def test_an_interrupted_elastic_run_resumes_to_the_same_model_and_spares(compressed, tmp_path, monkeypatch):
    from vaclm.io.checkpoint import Checkpoint

    model, result = compressed
    original, calls = Checkpoint.save_block, []

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two blocks

    monkeypatch.setattr(Checkpoint, "save_block", save_then_stop)
    config = CompressConfig(elastic=True, **CONFIG)
    with pytest.raises(KeyboardInterrupt):
        vaclm.compress(tiny_model("llama"), config, token_batch(8, 32), progress=False, checkpoint_dir=tmp_path / "p")
    monkeypatch.setattr(Checkpoint, "save_block", original)
    again = tiny_model("llama")
    resumed = vaclm.compress(again, config, token_batch(8, 32), progress=False, checkpoint_dir=tmp_path / "p",
                             resume=True)
    assert resumed.elastic.to_dict() == result.elastic.to_dict()
    assert set(resumed.spare) == set(result.spare)
    assert all(torch.equal(resumed.spare[n][i], result.spare[n][i]) for n in result.spare for i in (0, 1))
    a, b = again.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_resized_folder_holds_what_a_compress_at_its_ranks_saves(elastic, tmp_path):
    """What transformers and the vLLM plugin read (tensor names, shapes, dtypes; quantization_config)
    is that of an ordinary folder: a fresh compression at the resized ranks, saved."""
    from safetensors import safe_open

    folder, _, top_model = elastic
    resize_folder(folder, 0.55, tmp_path / "small")
    small = json.loads((tmp_path / "small" / "config.json").read_text())["quantization_config"]
    other = tiny_model("llama")
    ranks = {n: small["ranks"].get(n) for n in read_order(folder).shapes}  # None: dense
    vaclm.compress(other, CompressConfig(**CONFIG), token_batch(8, 32), ranks=ranks, progress=False)
    if any(k.endswith("_scale") for k in top_model.state_dict()):
        other = vaclm.quantize_int8(other)
    vaclm.save(other, tmp_path / "fresh")

    def meta(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert meta(tmp_path / "small") == meta(tmp_path / "fresh")
    fresh = json.loads((tmp_path / "fresh" / "config.json").read_text())["quantization_config"]
    assert small == fresh
