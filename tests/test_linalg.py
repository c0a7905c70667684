import pytest
import torch

from vaclm.linalg.svd import truncated_svd
from vaclm.linalg.whitening import damped, sqrt_factor


def test_full_rank_rebuilds_matrix_and_errors_are_tail_sums():
    m = torch.randn(12, 7, dtype=torch.float64)
    t = truncated_svd(m, 7)
    assert torch.allclose(t.left @ t.right, m, atol=1e-10)
    for r in range(8):
        approx = t.left[:, :r] @ t.right[:r]
        assert t.errors[r].item() == pytest.approx(((m - approx) ** 2).sum().item(), rel=1e-8, abs=1e-10)
    assert t.errors[-1] == 0 and torch.all(t.errors[:-1] >= t.errors[1:])


def test_sqrt_factor_cholesky_on_positive_definite():
    x = torch.randn(200, 6, dtype=torch.float64)
    g = x.T @ x
    f = sqrt_factor(g, 1e-6)
    assert f.used_cholesky
    assert torch.allclose(f.factor @ f.factor.T, damped(g, 1e-6), rtol=1e-9)
    assert torch.allclose(f.factor @ f.inverse, torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_sqrt_factor_falls_back_to_eigh_when_singular():
    x = torch.randn(3, 6, dtype=torch.float64)  # rank 3 Gram, and no damping: Cholesky must fail
    g = x.T @ x
    g[0, 0] -= 1e-3 + g[0, 0]  # make it indefinite
    f = sqrt_factor(g, 0.0)
    assert not f.used_cholesky
    assert torch.isfinite(f.inverse).all()
    assert torch.allclose(f.factor @ f.inverse, torch.eye(6, dtype=torch.float64), atol=1e-6)
