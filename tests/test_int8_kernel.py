"""The CPU int8 path of Int8Linear (int8 weights, bfloat16 activations: aten._weight_int8pack_mm for
few tokens, a bfloat16 GEMM for many) against the dequantised reference, when it is chosen, and
that its zero-padded copy is invisible from outside (state dict, loading, moves, bytes)."""

import copy

import pytest
import torch

import vaclm.model.int8_lowrank as mod
from vaclm.errors import VaclmError
from vaclm.model.int8_lowrank import Int8Linear, Int8LowRankLinear, cpu_kernel_available
from vaclm.model.lowrank import LowRankLinear

from conftest import token_batch, tiny_model

needs_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason="no int8 weight kernel or no native bfloat16 on this CPU")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def layer(out_f=40, in_f=72, bias=True, seed=0):
    """in_f = 72: not a multiple of 16, so the kernel runs on a zero-padded copy."""
    torch.manual_seed(seed)
    return Int8Linear.from_float(torch.randn(out_f, in_f) * 0.1, torch.randn(out_f) if bias else None)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])  # <= 16: the int8 weight kernel; 40: the bfloat16 GEMM
def test_kernel_computes_the_dequantised_products(tokens):
    """Tolerances: against the same product with the activations rounded to bfloat16 first (what
    the kernel is given), 1% per element of the output's scale (the output is bfloat16: 8
    significant bits); against the float32 dequantised reference, 1% relative Frobenius."""
    m = layer()
    x = torch.randn(tokens, 72) * torch.logspace(-2, 1, 72)  # uneven channels, as in real activations
    with torch.no_grad():
        y = m(x)
        assert m._operand is not None  # the kernel ran
        ref = x @ m.dequantized().T + m.bias
        same_inputs = x.bfloat16().double() @ (m.weight.double() * m.weight_scale.bfloat16().double()[:, None]).T
        torch.testing.assert_close(y.double(), same_inputs + m.bias.double(), rtol=0, atol=1e-2 * ref.abs().max().item())
    assert y.shape == ref.shape and 0 < rel_err(y, ref) < 0.01


@needs_kernel
def test_kernel_chosen_for_cpu_inference_and_reference_elsewhere(monkeypatch):
    calls = []
    real = mod.bf16_int8_matmul
    monkeypatch.setattr(mod, "bf16_int8_matmul", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    m = layer()
    x = torch.randn(3, 72)
    exact = lambda x_: x_ @ m.dequantized(x_.dtype).T + m.bias.to(x_.dtype)  # noqa: E731
    with torch.no_grad():
        m(x)
    assert calls == [(3, 80)]  # padded to a multiple of 16
    # a gradient is wanted: the differentiable reference, exactly the dequantised product
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    y.sum().backward()
    torch.testing.assert_close(y, exact(xg), rtol=1e-5, atol=1e-5)
    assert xg.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(m(x.double()), exact(x.double()), rtol=1e-9, atol=1e-9)  # float64: reference
        monkeypatch.setattr(mod, "_cpu_kernel", lambda: False)  # a CPU without the kernel: reference
        torch.testing.assert_close(m(x), exact(x), rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(Int8Linear, "cpu_kernel", False)
        torch.testing.assert_close(m(x), exact(x), rtol=1e-5, atol=1e-5)
    assert calls == [(3, 80)]


def test_reference_where_the_cpu_has_no_native_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_kernel_available()


@needs_kernel
def test_padded_copy_is_invisible_and_keeps_one_byte_per_weight():
    m = layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 72)
    with torch.no_grad():
        y = m(x)
    assert m.weight.untyped_storage().nbytes() == 40 * 80  # the buffer is now a view of the padded copy
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert after["weight"].is_contiguous()
    clone = copy.deepcopy(m)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    new = {k: v.clone() for k, v in before.items()}
    new["weight"], new["weight_scale"] = -new["weight"], 2 * new["weight_scale"]
    m.load_state_dict(new)  # new values reach the kernel
    with torch.no_grad():
        torch.testing.assert_close(m(x) - m.bias, -2 * (y - m.bias), rtol=2e-2, atol=2e-2)
    m.to(torch.float32)
    assert torch.equal(m.weight, new["weight"]) and m.weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(m(x) - m.bias, -2 * (y - m.bias), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_int8_lowrank_fused_path_equals_its_submodules():
    torch.manual_seed(3)
    lowrank = LowRankLinear(64, 48, 24, bias=True)  # rank 24: the up factor is padded
    m = Int8LowRankLinear.from_lowrank(lowrank)
    for shape in [(1, 1, 64), (2, 3, 64), (40, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            fused = m(x)
            via_modules = m.up(m.down(x))
            assert rel_err(fused, lowrank(x)) < 0.03
        torch.testing.assert_close(fused, via_modules, rtol=0, atol=0)
    seen = []
    m.down.register_forward_hook(lambda mod_, args, out: seen.append(out.shape))  # e.g. a statistics hook
    with torch.no_grad():
        m(x)
    assert seen == [torch.Size([40, 24])]


def test_int8_weights_treats_factors_dense_targets_and_lm_head():
    import vaclm
    from vaclm.model.int8_dense import int8_weights
    from vaclm.model.arch import get_submodule
    from vaclm.model.surgery import Targets, replace_with_lowrank

    model = tiny_model("llama")
    for i, (name, module) in enumerate(Targets.of(model).modules.items()):
        if i % 2:  # every other target factorised (truncated SVD), the rest left dense
            u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            replace_with_lowrank(model, name, u[:, :16] * s[:16], vh[:16])
    ids = token_batch(2, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    targets = Targets.of(model).modules
    n_factorised = sum(isinstance(m, LowRankLinear) for m in targets.values())
    changed = int8_weights(model)
    assert changed == {"factorised": n_factorised, "dense": len(targets) - n_factorised, "lm_head": 1}
    assert all(isinstance(get_submodule(model, n), (Int8Linear, Int8LowRankLinear)) for n in targets)
    assert int8_weights(model) == {"factorised": 0, "dense": 0, "lm_head": 0}  # nothing left to change
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # a lookup reads one row: stays float
    with torch.no_grad():
        assert 0 < rel_err(model(input_ids=ids).logits, ref) < 0.05
    with pytest.raises(VaclmError, match="run-time int8"):
        vaclm.save(model, "unused-folder")


def test_weights_read_per_token_counts_tied_and_untied_heads():
    from vaclm.eval.speed import weights_read_per_token
    from vaclm.model.int8_dense import int8_weights

    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    tied = model.get_output_embeddings().weight is emb
    # tied: the lm_head reads the whole table; untied: the table is only looked up (one row)
    assert weights_read_per_token(model) == total - (0 if tied else emb.numel() * emb.element_size())
    int8_weights(model)
    head = model.get_output_embeddings()
    assert weights_read_per_token(model) < total
    assert weights_read_per_token(model) >= head.weight.numel() + head.weight_scale.numel() * 4


def test_unit_up_columns_keep_the_product_and_cut_the_int8_error():
    """A factorisation with the singular values in `up` (columns spread 30x): balancing moves each
    column's norm into `down`, the product stays (float32 rounding), and the int8 product's error on
    inputs along the small components (which per-row scales of `up` crushed) more than halves."""
    from vaclm.linalg.balance import unit_up_columns
    from vaclm.model.int8_lowrank import dequantize_rows, quantize_rows

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 32))
    v, _ = torch.linalg.qr(torch.randn(80, 32))
    up, down = u * torch.logspace(1.5, 0, 32), v.T.contiguous()  # up: 96 x 32, down: 32 x 80
    b_up, b_down = unit_up_columns(up, down)
    torch.testing.assert_close(b_up @ b_down, up @ down, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_up.norm(dim=0), torch.ones(32), rtol=1e-5, atol=1e-5)
    x = v[:, 16:] @ torch.randn(16, 50)  # inputs along the 16 smallest components
    int8_out = lambda a, b: dequantize_rows(*quantize_rows(a)) @ (dequantize_rows(*quantize_rows(b)) @ x)  # noqa: E731
    exact = up @ (down @ x)
    assert rel_err(int8_out(b_up, b_down), exact) < 0.5 * rel_err(int8_out(up, down), exact)  # measured 0.43x
    m = Int8LowRankLinear.from_lowrank(LowRankLinear(80, 96, 32, bias=False))
    assert m.up.dequantized().norm(dim=0).sub(1).abs().max() < 0.02  # from_lowrank balances


@needs_kernel
def test_many_tokens_apply_the_scale_in_float32():
    """Prefill (> 16 tokens): the bfloat16 GEMM's output is rounded once; the scale is applied in float32."""
    m = layer(bias=False)
    x = torch.randn(40, 72)
    with torch.no_grad():
        y = m(x)
        q_padded = m.operand()[0]  # the kernel's zero-padded copy: the same GEMM, the same rounding
        gemm = torch.nn.functional.linear(torch.nn.functional.pad(x.bfloat16(), (0, 8)), q_padded.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, gemm.float() * m.weight_scale, rtol=1e-6, atol=1e-6)
