"""The CCA transform's identities (docs/cca.md, 'The CCA transform' and 'Exact properties')."""

from __future__ import annotations

import pytest
import torch

from ccamerge.methods.cca import SymEig, cca_transform


def _views(n=2000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    return X, g


def _blocks(X, Y):
    d = X.shape[1]
    C = torch.cov(torch.cat([X, Y], 1).T, correction=0)
    return C[:d, :d], C[d:, d:], C[:d, d:]


def test_self_correlations_are_one():
    X, _ = _views()
    res = cca_transform(*_blocks(X, X), gamma=0.0)
    assert torch.allclose(res.rho, torch.ones_like(res.rho), atol=1e-8)
    assert torch.allclose(res.corr, torch.ones_like(res.corr), atol=1e-8)


@pytest.mark.parametrize("gamma", [0.0, 1e-3, 0.1, 1.0])
def test_transform_times_inverse_is_identity(gamma):
    X, g = _views()
    Y = torch.relu(X @ torch.randn(12, 12, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        X.shape, generator=g, dtype=torch.float64
    )
    res = cca_transform(*_blocks(X, Y), gamma=gamma)
    eye = torch.eye(12, dtype=torch.float64)
    assert (res.T @ res.T_inv - eye).abs().max() < 1e-9
    assert (res.T_inv @ res.T - eye).abs().max() < 1e-9


@pytest.mark.parametrize("gamma", [0.0, 0.1, 10.0])
def test_permuted_view_is_recovered_exactly_with_any_relative_ridge(gamma):
    # With a scale-relative ridge, K = S^-1/2 C S^-1/2 P and its polar factor is P,
    # so T is the permutation whatever gamma is.
    X, g = _views()
    perm = torch.randperm(12, generator=g)
    res = cca_transform(*_blocks(X, X[:, perm]), gamma=gamma)
    assert (X[:, perm] @ res.T - X).abs().max() < 1e-8
    assert torch.allclose(res.T.abs().sum(0), torch.ones(12, dtype=torch.float64), atol=1e-9)


def test_invertible_linear_mix_is_recovered_without_ridge():
    X, g = _views()
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    res = cca_transform(*_blocks(X, X @ A), gamma=0.0)
    assert ((X @ A) @ res.T - X).abs().max() < 1e-7
    assert torch.allclose(res.T, torch.linalg.inv(A), atol=1e-7)


def test_canonical_variates_are_whitened_and_diagonal():
    X, g = _views()
    Y = X @ torch.randn(12, 12, generator=g, dtype=torch.float64) + torch.randn(
        X.shape, generator=g, dtype=torch.float64
    )
    C_xx, C_yy, C_xy = _blocks(X, Y)
    res = cca_transform(C_xx, C_yy, C_xy, gamma=0.0)
    # corr is the per-pair correlation; with no ridge it equals the singular values
    assert torch.allclose(res.corr, res.rho, atol=1e-8)
    assert (res.rho[:-1] >= res.rho[1:] - 1e-12).all()


def test_dead_units_give_finite_transforms():
    X, _ = _views()
    Y = X.clone()
    Y[:, :3] = 0.0  # three dead units
    for gamma in (0.0, 0.1):
        res = cca_transform(*_blocks(X, Y), gamma=gamma)
        assert torch.isfinite(res.T).all() and torch.isfinite(res.T_inv).all()
        assert torch.isfinite(res.corr).all()


def test_symmetric_powers():
    X, _ = _views()
    S = X.T @ X / len(X)
    half, inv_half, cond = SymEig.of(S).powers()
    eye = torch.eye(12, dtype=torch.float64)
    assert (half @ half - S).abs().max() < 1e-9 * S.abs().max()
    assert (half @ inv_half - eye).abs().max() < 1e-9
    assert cond >= 1.0
