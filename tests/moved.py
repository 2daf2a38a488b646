"""A network's tensors in other coordinates: the same function with its units moved, for
the tests that merge a model with such a copy of itself."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ccamerge.maths.algebra import (
    fold_norms,
    ones_complement,
    permutation_matrix,
    random_permutations,
    transform_state_dict,
)
from ccamerge.models.spec import MergeSpec


def moved_state(
    state: Mapping[str, torch.Tensor], spec: MergeSpec, dense_heads: bool
) -> dict[str, torch.Tensor]:
    """``state`` with every group's units permuted and, with ``dense_heads``, each
    attention head's value space mixed by a random invertible map and its query/key space
    by a random orthogonal one (orthogonal maps keep the scores; groups of whole heads,
    under rotary position embeddings, keep their units within heads), and every
    ``orthogonal`` group (a residual stream, its norms folded first) mixed by a random
    orthogonal map that keeps the all-ones direction."""
    M = {g: permutation_matrix(p) for g, p in random_permutations(spec, seed=3).items()}
    gen = torch.Generator().manual_seed(4)
    for g in spec.groups:
        if dense_heads and g.orthogonal:
            M[g.name] = _orthogonal_keeping_ones(g.size, gen) @ M[g.name]
        if dense_heads and g.heads > 1 and not g.whole_heads:
            step = g.size // g.heads
            mixes = [
                torch.randn(step, step, generator=gen, dtype=torch.float64)
                + 2 * torch.eye(step, dtype=torch.float64)
                for _ in range(g.heads)
            ]
            if g.follows is not None:
                mixes = [torch.linalg.qr(m)[0] for m in mixes]
            M[g.name] = torch.block_diag(*mixes) @ M[g.name]
    U = {g: torch.linalg.inv(m) for g, m in M.items()}
    return transform_state_dict(fold_norms(state, spec), spec, M, U)


def _orthogonal_keeping_ones(d: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``Q`` with ``Q 1 = 1``: a random rotation of the all-ones
    vector's complement."""
    ones, basis = torch.ones(d, 1, dtype=torch.float64), ones_complement(d)
    R = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=gen, dtype=torch.float64))[0]
    return basis @ R @ basis.T + ones @ ones.T / d


def assert_merged_back(result, x: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """A merge of a model with its moved copy: the original function on ``x`` (outputs
    ``expected``), every parameter aligned, by CCA."""
    with torch.no_grad():
        got = result.model.float().eval()(x)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 2e-4 * scale, name
    aligned = result.report["aligned"]
    assert aligned["fraction"] == 1.0 and aligned["kept_averaged"] == {}, aligned
    assert result.report["method"] == "cca"
