"""Method.loss_scale: a method's truncation error times its loss_scale is the allocator's estimate
of the loss increase. Checked three ways:

1. gfwsvd's error of its own rank-r truncation dW = W - up_r down_r equals the Kronecker-Fisher
   quadratic form vec(dW)^T (A (x) B) vec(dW), formed here with an explicit Kronecker product;
2. the other methods, whose metrics ignore A or B, are priced with the isotropic stand-in of
   base.Method.loss_scale's docstring (B, or A, replaced by its mean diagonal), with the same
   constant gfwsvd uses, so all methods price in one unit; with isotropic statistics every
   method's estimate equals the Kronecker form;
3. end to end: the Kronecker form of a small random dW, from the statistics the code collects,
   against the measured increase of the calibration loss. The increase is measured as the mean
   KL divergence of the perturbed model's next-token distributions from the dense model's: that is
   the expected loss increase when labels follow the dense model, the setting in which the Fisher
   is the Hessian (a random tiny model is far from a minimum of its data loss, so a finite
   difference of the data loss is dominated by curvature the Fisher does not have).
"""

import math

import pytest
import torch

from vaclm.linalg.stats import GradientStats, InputStats
from vaclm.methods import LayerStats, build_method
from vaclm.model.arch import get_submodule, spec_for, target_names

from conftest import tiny_model, token_batch

try:  # moved by the refactor; the function keeps its name
    from vaclm.pipeline.statistics import gradient_stats
except ImportError:
    from vaclm.model.statistics import gradient_stats

TINY = 1e-12  # damping: small enough that the damped metric is the measured one
SAMPLES, SEQ_LEN = 16, 16
OPTIONS = {"svd": {}, "asvd": {}, "fwsvd": {}, "svd-llm": {"damping": TINY}, "gfwsvd": {"damping": TINY, "cov_damping": TINY}}


def method(name):
    """build_method across the options refactor: per-method keyword options, or one MethodOptions."""
    try:
        return build_method(name, **OPTIONS[name])
    except TypeError:
        from vaclm.config import MethodOptions

        return build_method(name, MethodOptions(**OPTIONS[name]))


def kron_form(dw, a, b):
    """vec(dW)^T (A (x) B) vec(dW) with column-stacking vec and an explicit Kronecker product."""
    v = dw.T.reshape(-1)
    return float(v @ torch.kron(a, b) @ v)


@pytest.fixture(scope="module")
def tiny():
    """A float64 tiny Llama, its targets, and their input and gradient statistics."""
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=48).double()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = spec_for(model.config.model_type)
    modules = {n: get_submodule(model, n) for block in target_names(model, spec) for n in block}
    calib = token_batch(SAMPLES, SEQ_LEN, seed=2)
    inputs = {n: InputStats(m.in_features) for n, m in modules.items()}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs[n].add_batch(a[0])) for n, m in modules.items()]
    with torch.no_grad():
        dense_logp = model(input_ids=calib, use_cache=False).logits.log_softmax(-1)
    for h in hooks:
        h.remove()
    grads = gradient_stats(model, modules, calib, "cpu", cov=True, fisher=True, progress=False, labels="model")
    stats = {n: LayerStats(inputs[n], grads[n]) for n in modules}
    return model, modules, calib, dense_logp, stats


def test_gfwsvd_errors_are_the_kronecker_form_of_its_truncations(tiny):
    _, modules, _, _, stats = tiny
    gfwsvd = method("gfwsvd")
    scales = set()
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        w, s = modules[name].weight.double(), stats[name]
        a, b = s.inputs.mean_gram, s.gradients.mean_cov
        full = min(w.shape)
        f = gfwsvd.factorize(w, s, full)
        assert f.errors.shape == (full + 1,)
        for r in (0, 1, full // 2, full - 1, full):
            up, down = f.at_rank(r)
            want = kron_form(w - up @ down, a, b)
            assert float(f.errors[r]) == pytest.approx(want, rel=1e-6, abs=1e-12 * kron_form(w, a, b)), (name, r)
        torch.testing.assert_close(gfwsvd.error_curve(w, s), f.errors, rtol=1e-8, atol=1e-14)
        scales.add(gfwsvd.loss_scale(w, s))
    assert len(scales) == 1 and next(iter(scales)) > 0  # one unit for every matrix


def stand_in(m, dw, s):
    """The isotropic stand-in of base.Method.loss_scale, from the statistics' definitions."""
    a, b = s.inputs.mean_gram, s.gradients.mean_cov
    a_bar, b_bar = float(a.diagonal().mean()), float(b.diagonal().mean())
    if m.name == "svd":  # ||dW||^2 with A and B both isotropic
        return float(dw.square().sum()) * a_bar * b_bar
    if m.name == "svd-llm":  # E||dW x||^2 = tr(dW A dW^T), B isotropic
        return float(torch.trace(dw @ a @ dw.T)) * b_bar
    if m.name == "asvd":  # ||dW diag(s)||^2, s = mean|x|^alpha normalised to mean 1, rescaled by a_bar / mean s^2
        cols = s.inputs.mean_abs.pow(m.options.asvd_alpha)
        cols = cols / cols.mean()
        return float((dw * cols).square().sum()) * a_bar * b_bar / float(cols.square().mean())
    if m.name == "fwsvd":  # ||diag(r) dW diag(c)||^2, Fisher sums^p normalised to mean 1
        p = m.options.fisher_exponent
        rows, cols = (v.pow(p) / v.pow(p).mean() for v in (s.gradients.fisher_rows, s.gradients.fisher_cols))
        if getattr(m.options, "fisher_mode", "rows+cols") == "rows":  # FWSVD proper (an option once)
            cols = torch.ones_like(cols)
        return float((rows[:, None] * dw * cols).square().sum()) * a_bar * b_bar / float(rows.square().mean() * cols.square().mean())
    raise AssertionError(m.name)


@pytest.mark.parametrize("name", ["svd", "svd-llm", "asvd", "fwsvd"])
def test_other_methods_price_with_the_isotropic_stand_in(tiny, name):
    _, modules, _, _, stats = tiny
    m, unit = method(name), method("gfwsvd")
    for target in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        w, s = modules[target].weight.double(), stats[target]
        full = min(w.shape)
        f = m.factorize(w, s, full)
        scale = m.loss_scale(w, s)
        for r in (1, full // 2, full - 2):
            up, down = f.at_rank(r)
            want = unit.loss_scale(w, s) * stand_in(m, w - up @ down, s)
            assert float(f.errors[r]) * scale == pytest.approx(want, rel=1e-6), (target, r)


def isotropic_stats(n, a, b):
    """Statistics with A = a I, B = b I and uniform mean|x| and Fisher sums (n x n weights)."""
    inputs = InputStats(n)
    x = math.sqrt(a * n) * torch.eye(n, dtype=torch.float64)  # n tokens: X^T X / n = a I
    inputs.add_batch(x)
    grads = GradientStats(n, n)
    grads.add_sample(x, math.sqrt(b * n) * torch.eye(n, dtype=torch.float64))
    return LayerStats(inputs, grads)


def test_with_isotropic_statistics_every_method_gives_the_kronecker_form():
    torch.manual_seed(0)
    n, a, b = 12, 0.7, 3e-3
    w = torch.randn(n, n, dtype=torch.float64)
    s = isotropic_stats(n, a, b)
    unit = method("gfwsvd").loss_scale(w, s)
    for name in OPTIONS:
        m = method(name)
        f = m.factorize(w, s, n)
        scale = m.loss_scale(w, s)
        for r in (0, 3, 7, 11):
            up, down = f.at_rank(r)
            want = unit * kron_form(w - up @ down, a * torch.eye(n, dtype=torch.float64), b * torch.eye(n, dtype=torch.float64))
            assert float(f.errors[r]) * scale == pytest.approx(want, rel=1e-6), (name, r)


# --- end to end: estimate against measurement --------------------------------------------------

@pytest.fixture(scope="module")
def measured(tiny):
    """Per target: (quadratic form of a random dW of 1% of ||W||, its estimate, measured KL)."""
    model, modules, calib, dense_logp, stats = tiny
    gfwsvd = method("gfwsvd")
    g = torch.Generator().manual_seed(0)
    rows = {}
    for name, module in modules.items():
        w, s = module.weight, stats[name]
        dw = torch.randn(w.shape, generator=g, dtype=torch.float64)
        dw *= 1e-2 * float(w.norm()) / float(dw.norm())
        quad = float(torch.trace(dw.T @ s.gradients.mean_cov @ dw @ s.inputs.mean_gram))
        with torch.no_grad():
            w += dw
            logp = model(input_ids=calib, use_cache=False).logits.log_softmax(-1)
            w -= dw
        kl = float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean())
        rows[name] = (quad, gfwsvd.loss_scale(w, s) * quad, kl)
    return rows


def geometric_mean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_kronecker_fisher_predicts_the_measured_loss_increase(measured, tiny):
    """KL ~= 1/2 vec(dW)^T F vec(dW) with F ~= T^2 (A (x) B): B is the covariance of gradients of
    a sequence's *mean* loss (over T tokens), so each token's gradient carries a factor 1/T.

    Measured (SAMPLES = SEQ_LEN = 16, these seeds): KL / (T^2/2 quad) per target 0.86 to 1.35 but
    for layers.1.v_proj at 2.58, geometric mean 1.11; over 4 calibration x 2 perturbation seeds the
    geometric mean stayed in 1.02-1.15 and the worst target 2.8x from it (also ~1 for 8 x 32 and
    32 x 8 tokens, so the factor is T^2). Bounds: [0.7, 1.45] fails for a factor 2 either way; each
    target within 3x of the common factor.
    """
    *_, stats = tiny
    t = next(iter(stats.values())).gradients.tokens / SAMPLES
    assert t == SEQ_LEN
    ratios = {n: kl / (t * t / 2 * quad) for n, (quad, _, kl) in measured.items()}
    assert all(r > 0 for r in ratios.values()), ratios
    mean = geometric_mean(ratios.values())
    assert 0.7 < mean < 1.45, ratios
    assert all(mean / 3 < r < 3 * mean for r in ratios.values()), ratios


def test_loss_scale_gives_the_loss_increase_in_nats(measured):
    """base.Method.loss_scale promises the loss increase in nats per token, 1/2 vec(dW)^T F vec(dW)
    with F = A (x) B * fisher_scale: B holds gradients of a sequence's mean loss, and
    fisher_scale = T^2 (model-drawn labels) turns it into the per-token Fisher."""
    mean = geometric_mean(kl / estimate for _, estimate, kl in measured.values())
    assert 0.7 < mean < 1.45, mean
