"""Transform tensors along their grouped axes and average them.

For model k and group g, ``M[g]`` (d x d) maps the model's unit activations
(column vectors) into the shared space and ``U[g]`` maps back (normally
``U = M^-1``). A weight whose axis 0 lies in group a and axis 1 in group b
becomes ``M^a W U^b`` (docs/cca.md, 'Transforming and averaging'); a later grouped axis
(a ViT's position embeddings) is contracted with ``U`` as axis 1 is, ungrouped axes are
untouched (conv kernels); tensors with no grouped axis are only averaged. Arithmetic is in
float64 and the result is cast back to each tensor's dtype; integer tensors
(``num_batches_tracked``) are copied from the reference model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..models.spec import MergeSpec

Transforms = Mapping[str, torch.Tensor]


def transform_tensor(
    t: torch.Tensor,
    axes: Mapping[int, str],
    M: Transforms | None,
    U: Transforms | None,
) -> torch.Tensor:
    """Apply ``M`` on axis 0 and ``U`` on the other grouped axes of ``t`` (float64 in,
    float64 out)."""
    out = t
    if 0 in axes and M is not None and axes[0] in M:
        m = M[axes[0]].to(out)
        out = torch.tensordot(m, out, dims=([1], [0]))
    for axis in sorted(a for a in axes if a > 0):
        if U is None or axes[axis] not in U:
            continue
        u = U[axes[axis]].to(out)
        if axis == 1 and out.shape[1] < u.shape[0]:  # a grouped conv: each block reads
            out = _transform_blocks(out, u)  # its own units
            continue
        # contract the axis with U's rows, then move the new axis back to its position
        out = torch.movedim(torch.tensordot(out, u, dims=([axis], [0])), -1, axis)
    return out


def _transform_blocks(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A grouped conv's weight (blocks x rows, block size, ...) times the diagonal blocks
    of the block-diagonal ``u`` (docs/custom-models.md, 'Layers by what they compute')."""
    size = t.shape[1]
    blocks = u.shape[0] // size
    rows = t.reshape(blocks, t.shape[0] // blocks, *t.shape[1:])
    parts = []
    for b in range(blocks):
        ub = u[b * size : (b + 1) * size, b * size : (b + 1) * size]
        parts.append(torch.movedim(torch.tensordot(rows[b], ub, dims=([1], [0])), -1, 1))
    return torch.cat(parts)


def fold_norms(state_dict: Mapping[str, torch.Tensor], spec: MergeSpec) -> dict[str, torch.Tensor]:
    """``state_dict`` with every fold of ``spec`` made (:class:`~ccamerge.models.spec.NormFold`):
    each reader ``W x + c`` of a norm's output ``gain * n + bias`` becomes ``(W diag(gain)) n
    + (c + W bias)``, and the norm ``n`` (gain 1, bias 0): the same function. Arithmetic in
    float64, each tensor cast back to its dtype."""
    out = dict(state_dict)
    for fold in spec.folds:
        gain_name, bias_name = f"{fold.norm}.weight", f"{fold.norm}.bias"
        gain = out[gain_name].to(torch.float64)
        bias = out[bias_name].to(torch.float64) if bias_name in out else None
        for reader in fold.readers:
            weight = out[f"{reader}.weight"]
            W = weight.to(torch.float64)
            if bias is not None:
                c = out[f"{reader}.bias"]
                out[f"{reader}.bias"] = (c.to(torch.float64) + W @ bias).to(c.dtype)
            out[f"{reader}.weight"] = (W * gain).to(weight.dtype)
        out[gain_name] = torch.ones_like(out[gain_name])
        if bias is not None:
            out[bias_name] = torch.zeros_like(out[bias_name])
    return out


def transform_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    M: Transforms,
    U: Transforms,
) -> dict[str, torch.Tensor]:
    """One model's tensors mapped through its transforms (dtype preserved)."""
    return merge_state_dicts([state_dict], spec, [M], [U], [1.0])


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    spec: MergeSpec,
    Ms: Sequence[Transforms | None],
    Us: Sequence[Transforms | None],
    weights: Sequence[float],
    reference: int = 0,
) -> dict[str, torch.Tensor]:
    """``sum_k w_k * M_k W_k U_k`` for every tensor; ``None`` transforms mean identity."""
    ref = state_dicts[reference]
    Ms = [with_derived(spec, M) for M in Ms]
    Us = [with_derived(spec, U) for U in Us]
    out: dict[str, torch.Tensor] = {}
    for name, t_ref in ref.items():
        if not (t_ref.is_floating_point() or t_ref.is_complex()):
            out[name] = t_ref.clone()
            continue
        axes = spec.axes.get(name, {})
        acc = torch.zeros(t_ref.shape, dtype=torch.float64, device=t_ref.device)
        for sd, M, U, w in zip(state_dicts, Ms, Us, weights):
            if w == 0.0:
                continue
            acc += w * transform_tensor(sd[name].to(torch.float64), axes, M, U)
        out[name] = acc.to(t_ref.dtype).contiguous()
    return out


def with_derived(spec: MergeSpec, maps: Transforms | None) -> Transforms | None:
    """``maps`` and the maps derived from them: for each concatenation of the spec, the
    block-diagonal map of its parts' maps (the identity for a part without one), and for
    each head copies, its group's map applied to every copy (:func:`expand_heads`)."""
    if maps is None or not (spec.concats or spec.copies):
        return maps
    out = dict(maps)
    device = next((m.device for m in maps.values()), "cpu")
    for c in spec.concats:
        blocks = [
            maps[g] if g is not None and g in maps else torch.eye(n, dtype=torch.float64)
            for g, n in c.parts
        ]
        out[c.name] = torch.block_diag(*(b.to(device, torch.float64) for b in blocks))
    for c in spec.copies:
        if c.group in maps:
            out[c.name] = expand_heads(maps[c.group], spec.group(c.group).heads, c.copies)
    return out


def expand_heads(m: torch.Tensor, heads: int, copies: int) -> torch.Tensor:
    """The map of ``heads`` heads, each repeated ``copies`` times in a row: entry
    ``((h, c, i), (h', c', i'))`` is ``m[(h, i), (h', i')]`` where ``c = c'``, else 0."""
    size = m.shape[0] // heads
    blocks = m.reshape(heads, size, heads, size)
    eye = torch.eye(copies, dtype=m.dtype, device=m.device)
    return torch.einsum("aibj,cd->acibdj", blocks, eye).reshape(m.shape[0] * copies, -1)


def ones_complement(d: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """An orthonormal basis (d x (d - 1)) of the vectors orthogonal to the all-ones one:
    an orthogonal ``M`` with ``M 1 = 1`` is ``B R B^T + 1 1^T / d`` for an orthogonal ``R``."""
    ones = torch.ones(d, 1, dtype=dtype, device=device)
    eye = torch.eye(d, dtype=dtype, device=device)
    return torch.linalg.qr(torch.cat([ones, eye[:, 1:]], 1))[0][:, 1:]


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``P`` with ``(P h)[i] = h[perm[i]]``: unit i of the result is unit perm[i]."""
    d = perm.numel()
    P = torch.zeros(d, d, dtype=torch.float64)
    P[torch.arange(d), perm] = 1.0
    return P


def permute_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    perms: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Reorder every group's units by ``perms[group]``: the same function, new unit order."""
    M = {g: permutation_matrix(p) for g, p in perms.items()}
    U = {g: P.T for g, P in M.items()}
    return transform_state_dict(state_dict, spec, M, U)


def random_permutations(spec: MergeSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation per group, keeping each group's ``blocks`` (a heads group:
    its heads reordered, as the group it follows orders them, and the units within each
    head, unless ``whole_heads``)."""
    gen = torch.Generator().manual_seed(seed)
    out, head_starts = {}, {}
    for g in spec.groups:
        step = g.size // max(g.blocks, g.heads)
        starts = torch.arange(0, g.size, step)
        if g.heads > 1:
            starts = head_starts.get(g.follows, starts[torch.randperm(g.heads, generator=gen)])
            head_starts[g.name] = starts
        parts = [
            int(b) + (torch.arange(step) if g.whole_heads else torch.randperm(step, generator=gen))
            for b in starts
        ]
        out[g.name] = torch.cat(parts)
    return out
