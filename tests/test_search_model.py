"""The search on tiny models: factor bank, KL fitness, data roles, Ray backend, end to end."""

import copy
import json

import pytest
import torch

import vaclm
from conftest import VOCAB, tiny_model, token_batch
from vaclm.config import CompressConfig, SearchOptions
from vaclm.errors import VaclmError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls are dominated by thread synchronisation on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def evolve_config(**search):
    options = {**dict(generations=2, offspring=4, survivors=(2, 1), fitness_tokens=(64, 256)), **search}
    return CompressConfig(keep=0.5, method="gfwsvd", allocation="evolve", calib_samples=8, calib_seq_len=32,
                          search=SearchOptions(**options))


def bank_setup(method="gfwsvd", family="llama"):
    from vaclm.methods import build_method
    from vaclm.model.surgery import Targets
    from vaclm.model.statistics import gradient_stats
    from vaclm.search.bank import build_bank

    model = tiny_model(family)
    targets = Targets.of(model)
    calib = token_batch(8, 32)
    m = build_method(method, CompressConfig().options)
    grads = gradient_stats(model, targets.modules, calib, "cpu", cov=m.needs_cov, fisher=m.needs_fisher, progress=False)
    return model, targets, calib, m, grads, build_bank(model, targets, m, calib, grads, 8, 4, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bank_slices_equal_a_fresh_truncated_factorisation(family):
    """A one-shot compression at given ranks (one SVD per matrix at that rank) gives the bank's slices,
    and the sliced model computes the compressed model's logits."""
    from vaclm.search.bank import set_ranks, sliced
    from vaclm.pipeline.compress import compress_model

    model, targets, calib, method, grads, bank = bank_setup("gfwsvd", family)
    names = list(targets.shapes)
    ranks = {n: [8, 16, None][k % 3] if bank.get(n) is not None else None for k, n in enumerate(names)}
    config = CompressConfig(keep=0.5, method="gfwsvd", allocation="uniform", sequential=False, calib_samples=8,
                            calib_seq_len=32)
    fresh = copy.deepcopy(model)
    compress_model(fresh, config, calib, ranks=ranks, progress=False, gradients=grads)
    for name, rank in ranks.items():
        if rank is not None:
            module = fresh.get_submodule(name)
            assert torch.allclose(module.down.weight, bank[name][1][:rank], atol=1e-6)
            assert torch.allclose(module.up.weight, bank[name][0][:rank].T, atol=1e-6)
    ids = token_batch(2, 16, seed=5)
    with sliced(model, bank) as modules:
        set_ranks(modules, ranks)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, fresh(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert all(type(m).__name__ != "SlicedLowRank" for m in model.modules())  # originals restored


def test_kl_reference_exact_coarsened_and_zero_for_the_dense_model():
    from vaclm.search.fitness import Reference, model_fitness

    model = tiny_model("llama")
    windows = token_batch(3, 16, seed=4)
    exact = Reference.compute(model, windows, top_k=VOCAB, progress=False)
    assert model_fitness(model, windows, exact) == pytest.approx(0.0, abs=1e-6)
    other = tiny_model("llama", seed=1)
    full = model_fitness(other, windows, exact)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=windows).logits, -1)
        q = torch.log_softmax(other(input_ids=windows).logits, -1)
    assert full == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    coarse = [model_fitness(other, windows, Reference.compute(model, windows, top_k=k, progress=False)) for k in (16, 128)]
    assert 0 < coarse[0] < coarse[1] < full  # coarsening lower-bounds the KL, tighter with more outcomes


def test_bfloat16_scoring_tracks_float32_and_leaves_the_dense_model_exact():
    """--search-dtype bfloat16 scores a bf16 copy: close to the float32 scores, the same ranking of
    clearly different genomes, and the dense model keeps its float32 weights bit for bit."""
    from vaclm.allocate.candidates import rank_grid
    from vaclm.search.backends import InProcess
    from vaclm.search.engine import Genome
    from vaclm.search.fitness import FitnessSpec, Reference, search_dtype

    model, targets, calib, method, grads, bank = bank_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(targets.shapes)
    choices = [rank_grid(targets.shapes[n], 8) + [None] for n in names]
    windows = token_batch(6, 32, seed=3)
    reference = Reference.compute(model, windows, VOCAB, progress=False)
    genomes = [Genome(tuple(min(k, len(c) - 1) for c in choices)) for k in range(4)]  # rank 8, 16, ... per matrix
    scores = {}
    for dtype in ("float32", "bfloat16"):
        spec = FitnessSpec(model, names, choices, windows, reference, [2, 6], seed=0, bank=bank, dtype=dtype)
        backend = InProcess(spec)
        assert next(backend.evaluator.model.parameters()).dtype == getattr(torch, dtype)
        scores[dtype] = backend(genomes, 1, 0)
        backend.close()
    assert scores["bfloat16"] == pytest.approx(scores["float32"], rel=0.05)
    assert sorted(range(4), key=scores["bfloat16"].__getitem__) == sorted(range(4), key=scores["float32"].__getitem__)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert search_dtype("auto", model.to(torch.float16)) == torch.float16  # non-float32 models: their own dtype
    with pytest.raises(VaclmError, match="search dtype must be one of auto, float32"):
        SearchOptions(generations=1, dtype="int8")


def test_fitness_windows_are_disjoint_from_calibration_by_position():
    from vaclm.data.roles import fitness_split

    stream = torch.arange(5000)  # each token is its own position
    calib, fit = fitness_split(stream, 10, 50, seed=2, tokens=1000)
    assert fit.shape == (20, 50)
    starts = lambda w: {int(r[0]) for r in w}
    assert all(s % 50 == 0 for s in starts(calib) | starts(fit))  # whole windows of one tiling
    assert not starts(calib) & starts(fit)
    with pytest.raises(VaclmError, match="too few for 10000 fitness tokens"):
        fitness_split(stream, 10, 50, seed=2, tokens=10_000)
    _, more = fitness_split(stream, 10, 50, seed=2, tokens=1000, extra_tokens=1000)  # + held-out selection windows
    assert more.shape == (40, 50) and torch.equal(more[:20], fit)
    _, rest = fitness_split(stream, 10, 50, seed=2, tokens=1000, extra_tokens=10**6)  # extra: only what there is
    assert rest.shape == (90, 50) and not starts(calib) & starts(rest)


def test_overlapping_data_roles_are_refused():
    model = tiny_model("llama")
    calib, fitness, held_out = token_batch(8, 32, seed=1), token_batch(8, 32, seed=2), token_batch(4, 32, seed=3)
    with pytest.raises(VaclmError, match="calibration and fitness data overlap"):
        vaclm.compress(model, evolve_config(), calib, fitness=torch.cat([fitness[:4], calib[:4]]), progress=False)
    with pytest.raises(VaclmError, match="fitness and evaluation data overlap"):
        vaclm.compress(model, evolve_config(), calib, fitness=fitness, eval_text=fitness[2:5].flatten(), progress=False)
    with pytest.raises(VaclmError, match="calibration and evaluation data overlap"):
        vaclm.compress(model, evolve_config(), calib, fitness=fitness, eval_text=calib.flatten(), progress=False)
    with pytest.raises(VaclmError, match="pass fitness token ids too"):
        vaclm.compress(model, evolve_config(), calib, progress=False)
    with pytest.raises(VaclmError, match="only by --allocation evolve"):
        vaclm.compress(model, CompressConfig(allocation="uniform"), calib, fitness=fitness, progress=False)
    assert all(type(m).__name__ == "LlamaMLP" for m in model.modules() if "MLP" in type(m).__name__)
    assert not any("LowRank" in type(m).__name__ for m in model.modules())  # nothing touched
    from vaclm.data.roles import check_disjoint

    check_disjoint({"calibration": calib, "fitness": fitness, "evaluation": held_out.flatten()})  # disjoint: fine


def test_evolve_end_to_end_saves_search_history(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", num_hidden_layers=4)
    config = evolve_config(generations=3)
    result = vaclm.compress(model, config, token_batch(8, 32, seed=1), fitness=token_batch(16, 32, seed=2),
                            progress=False)
    search = result.search
    fitness = [h["fitness"] for h in search["history"]]
    assert len(fitness) == 4 and all(b <= a for a, b in zip(fitness, fitness[1:]))
    assert search["final_fitness"] <= search["start_fitness"]
    step = 8 * (32 + 64)  # one grid step of the smallest matrix (k_proj / v_proj)
    total = sum(o * i for o, i in result.shapes.values())
    assert 0.5 - step / total < result.kept_fraction <= 0.5
    assert abs(result.kept_fraction - search["start_kept_fraction"]) < step / total
    # the search scores 8 windows, the other 8 choose the result; the knapsack start is a contender
    assert search["fitness_windows"] == [8, 32] and search["selection_windows"] == [8, 32]
    scores = search["materialised"]
    assert {"one-shot", "front-to-back", "knapsack start"} <= set(scores)
    assert scores[search["chosen"]] == min(scores.values())
    if search["chosen"] == "knapsack start":
        assert all(a["rank"] == a["knapsack_rank"] for a in result.allocation.values())
    vaclm.save(model, tmp_path / "out", result=result)
    saved = json.loads((tmp_path / "out" / "search.json").read_text())
    assert saved["history"] == json.loads(json.dumps(search["history"]))
    assert (tmp_path / "out" / "search.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "vaclm_report.json").read_text())["search"]["generations"] == 3
    ids = token_batch(2, 16, seed=9)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_evolve_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from vaclm.search.engine import Evolution

    calib, fitness = token_batch(8, 32, seed=1), token_batch(8, 32, seed=2)
    config = evolve_config(generations=4)
    plain = vaclm.compress(tiny_model("llama"), config, calib, fitness=fitness, progress=False)

    original = Evolution.step

    def killed_at_three(self):
        if self.generation == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Evolution, "step", killed_at_three)
    with pytest.raises(KeyboardInterrupt):
        vaclm.compress(tiny_model("llama"), config, calib, fitness=fitness, progress=False,
                       checkpoint_dir=tmp_path / "p")
    state = json.loads((tmp_path / "p" / "search-state.json").read_text())
    assert state["engine"]["generation"] == 2
    monkeypatch.setattr(Evolution, "step", original)
    resumed = vaclm.compress(tiny_model("llama"), config, calib, fitness=fitness, progress=False,
                             checkpoint_dir=tmp_path / "p", resume=True)
    assert resumed.ranks == plain.ranks
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(resumed.search["history"]) == strip(plain.search["history"])


def test_evolve_needs_a_stopping_rule():
    with pytest.raises(VaclmError, match="needs --generations N, --time-limit"):
        CompressConfig(allocation="evolve")


@pytest.mark.slow  # 41-49 s on the busy 2-core machine (starting Ray and two workers), over the 40 s budget
def test_ray_backend_scores_like_in_process():
    ray = pytest.importorskip("ray")
    from vaclm.search.backends import InProcess, RayPool
    from vaclm.search.engine import Genome
    from vaclm.search.fitness import FitnessSpec, Reference
    from vaclm.allocate.candidates import rank_grid

    model, targets, calib, method, grads, bank = bank_setup()
    names = list(targets.shapes)
    choices = [rank_grid(targets.shapes[n], 8) + [None] for n in names]
    windows = token_batch(6, 32, seed=3)
    spec = FitnessSpec(model, names, choices, windows, Reference.compute(model, windows, VOCAB, progress=False),
                       [2, 6], seed=0, bank=bank)
    genomes = [Genome(tuple((k + j) % len(c) for j, c in enumerate(choices))) for k in range(4)]
    local = InProcess(spec)
    expected = [local(genomes, 0, 3), local(genomes, 1, 3)]
    local.close()
    pool = RayPool(spec, 2)
    try:
        assert pool.workers == 2
        got = [pool(genomes, 0, 3), pool(genomes, 1, 3)]
    finally:
        pool.close()
    assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[1] == pytest.approx(expected[1], rel=1e-5)
    assert len(set(expected[1])) == 4  # different genomes, different scores


def byte_tokenizer():
    """A 256-token byte-level tokenizer, so a tiny model reads real text through the CLI."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_cli_evolve_end_to_end_and_evaluation_text_refused(tmp_path, capsys):
    from conftest import WIKI_TEST, WIKI_VALID
    from vaclm.cli import main

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "valid.txt").write_text(WIKI_VALID.read_text()[:40_000])
    (tmp_path / "test.txt").write_text(WIKI_TEST.read_text()[:20_000])
    common = ["compress", str(tmp_path / "tiny"), "--keep", "0.5", "--allocation", "evolve", "--generations", "2",
              "--offspring", "3", "--fitness-tokens", "128,512", "--calib", str(tmp_path / "valid.txt"),
              "--calib-samples", "8", "--calib-seq-len", "64", "--quiet"]
    capsys.readouterr()
    assert main([*common, "--eval", str(tmp_path / "test.txt"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "search: 2 generations, fitness KL" in out
    assert "chosen on held-out windows:" in out and "knapsack start" in out
    history = json.loads((tmp_path / "out" / "search.json").read_text())["history"]
    assert len(history) == 3 and history[-1]["fitness"] <= history[0]["fitness"]
    assert not (tmp_path / "out.partial").exists()

    assert main([*common, "--eval", str(tmp_path / "valid.txt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar of transformers
    assert err.startswith("vaclm: error: calibration and evaluation data overlap (100.0% of their 32-token")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_evolve_with_int8_and_a_byte_budget_searches_in_bytes():
    """--allocation evolve --int8 --target-size: the search space is priced in bytes like its knapsack
    start, so the evolved model meets the byte budget (in parameters it may keep more than 0.5)."""
    from dataclasses import replace

    model = tiny_model("llama", num_hidden_layers=4)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = int(0.7 * dense_bytes)
    config = replace(evolve_config(generations=2), int8=True, target_bytes=target)
    result = vaclm.compress(model, config, token_batch(8, 32, seed=1), fitness=token_batch(16, 32, seed=2),
                            progress=False)
    now = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert now <= target * 1.001, (now, target)
    # costs in the report are bytes: a factorised matrix costs (out + in) bytes per rank plus float scales
    name, entry = next((n, a) for n, a in result.allocation.items() if a["rank"] is not None)
    out_f, in_f = result.shapes[name]
    assert entry["cost"] == entry["rank"] * (out_f + in_f + 4) + out_f * 4
