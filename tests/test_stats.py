"""Streaming statistics equal the batch statistics; hooks read the right features."""

from __future__ import annotations

import pytest
import torch

from ccamerge.maths.stats import JointCovariance, collect_statistics, features_as_rows
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.registry import detect_architecture


@pytest.mark.parametrize("splits", [[1000], [1, 999], [10, 300, 7, 683], [250] * 4])
def test_streaming_covariance_equals_batch_covariance(splits):
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(1000, 2 * 6, generator=g, dtype=torch.float64) * 3 + 5
    jc = JointCovariance(2, 6)
    for chunk in torch.split(Z, splits):
        jc.update(chunk)
    assert jc.n == 1000
    assert torch.allclose(jc.mean, Z.mean(0), atol=1e-12)
    assert torch.allclose(jc.cov, torch.cov(Z.T, correction=0), atol=1e-10)
    assert torch.allclose(jc.block(1, 0), torch.cov(Z.T, correction=0)[6:, :6], atol=1e-10)


def test_merge_of_accumulators_equals_one_accumulator():
    Z = torch.randn(500, 8, dtype=torch.float64)
    a, b, whole = JointCovariance(2, 4), JointCovariance(2, 4), JointCovariance(2, 4)
    a.update(Z[:123])
    b.update(Z[123:])
    whole.update(Z)
    a.merge(b)
    assert a.n == whole.n and torch.allclose(a.cov, whole.cov, atol=1e-12)


def test_features_as_rows_flattens_spatial_positions():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    rows = features_as_rows(x)
    assert rows.shape == (2 * 4 * 5, 3)
    assert torch.equal(rows[7], x[0, :, 1, 2])


def test_collected_statistics_match_direct_computation():
    torch.manual_seed(0)
    models = [MLP([10, 7, 5, 3]) for _ in range(3)]
    spec = detect_architecture(models[0].state_dict()).spec()
    x = torch.randn(300, 10)
    stats = collect_statistics(models, spec, torch.split(x, 64))
    assert stats.num_samples == 300
    # hidden0 is the ReLU output of layer 0 in every model, concatenated
    feats = torch.cat([torch.relu(m.layers[0](x)) for m in models], 1).double()
    jc = stats.groups["hidden0"]
    assert jc.n == 300
    assert torch.allclose(jc.cov, torch.cov(feats.T, correction=0), atol=1e-6)


def test_conv_features_in_float32_match_the_float64_reference():
    """Spatial activations are centred and multiplied in float32, added in float64."""
    from ccamerge.maths.stats import PairwiseCovariance, centre

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 5, 6, 6, generator=g) * 0.5 + 30 for _ in range(3)]  # mean >> std
    rows = torch.cat([features_as_rows(x).double() for x in xs], 1)
    jc, pw = JointCovariance(3, 5), PairwiseCovariance(3, 5, reference=1)
    for half in (slice(0, 4), slice(4, 8)):
        jc.add_batch([centre(x[half]) for x in xs])
        pw.add_batch([centre(x[half]) for x in xs])
    ref = torch.cov(rows.T, correction=0)
    assert jc.n == pw.n == 8 * 36
    assert torch.allclose(jc.mean, rows.mean(0), rtol=1e-6)
    assert torch.allclose(jc.cov, ref, atol=1e-5 * float(ref.abs().max()))
    for i, j in [(0, 0), (1, 2), (0, 1), (2, 2)]:
        assert torch.allclose(pw.block(i, j), jc.block(i, j), atol=1e-9)
    x = xs[0].clone()
    batch = centre(x)
    x.zero_()  # an in-place op after the hook must not change what was stored
    assert batch.Z.abs().max() > 0.1


def test_batches_centred_on_the_running_shift_match_the_float64_reference():
    """After the first batch every batch is centred on the accumulator's fixed shift (not
    on its own mean); batches whose means drift far from it still give the exact moments."""
    from ccamerge.maths.stats import centre

    g = torch.Generator().manual_seed(1)
    # four float32 conv batches, the later ones with means far from the first's
    xs = [
        [torch.randn(6, 4, 5, 5, generator=g) * 0.3 + 20 + 7 * b + k for k in range(2)]
        for b in range(4)
    ]
    jc = JointCovariance(2, 4)
    for batch in xs:
        jc.add_batch([centre(x, jc.shift(k)) for k, x in enumerate(batch)])
    rows = torch.cat([torch.cat([features_as_rows(x).double() for x in batch], 1) for batch in xs])
    ref = torch.cov(rows.T, correction=0)
    assert jc.n == 4 * 6 * 25
    assert torch.allclose(jc.mean, rows.mean(0), rtol=1e-7)
    assert torch.allclose(jc.cov, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert torch.allclose(
        jc.block(1, 0), ref[4:, :4], rtol=1e-4, atol=1e-5 * float(ref.abs().max())
    )


def test_products_that_overflow_float32_are_recomputed_in_float64():
    from ccamerge.maths.stats import centre

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 3, 8, 8, generator=g) * 1e20 for _ in range(2)]  # squares > 3e38
    jc = JointCovariance(2, 3)
    jc.add_batch([centre(x) for x in xs])
    rows = torch.cat([features_as_rows(x).double() for x in xs], 1)
    ref = torch.cov(rows.T, correction=0)
    assert torch.isfinite(jc.cov).all()
    assert torch.allclose(jc.cov, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
