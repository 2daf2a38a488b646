"""The merge methods: permute, weight matching, ZipIt! and CCA, on toys and digits MLPs."""

from __future__ import annotations

import itertools

import pytest
import torch

from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.maths.stats import JointCovariance, PairwiseCovariance, Statistics
from ccamerge.methods import AlignContext, make_method
from ccamerge.methods.permute import correlation
from ccamerge.methods.weight_matching import weight_match
from ccamerge.methods.zipit import zip_features, zip_transforms
from ccamerge.models.registry import detect_architecture
from ccamerge.models.spec import FeatureGroup, MergeSpec
from ccamerge.runs.merge import merge
from ccamerge.runtime.errors import OptionError


def _outputs(state_dict, x):
    model = detect_architecture(state_dict).build()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def permuted_copy(digits_mlps, tmp_path_factory):
    """Model 0 with every hidden group permuted, saved; and the permutations."""
    sd = digits_mlps.models[0].state_dict()
    spec = detect_architecture(sd).spec()
    perms = random_permutations(spec, seed=3)
    path = tmp_path_factory.mktemp("perm") / "permuted.pt"
    torch.save(permute_state_dict(sd, spec, perms), path)
    return path, perms


# Max |logit difference| to the original on the digits test split, measured on a 2-core CPU:
# permute, weight-matching and zipit 0.0 (the exact permutation), cca 1.9e-6.
@pytest.mark.parametrize(
    "method, tol",
    [("permute", 1e-5), ("weight-matching", 1e-5), ("zipit", 1e-5), ("cca", 1e-4)],
)
def test_each_method_recovers_a_permuted_copy(digits_mlps, permuted_copy, method, tol):
    path, perms = permuted_copy
    res = merge(
        [digits_mlps.paths[0], path], method=method, data=str(digits_mlps.calib_path), refit=False
    )
    x = digits_mlps.test.x
    expected = _outputs(digits_mlps.models[0].state_dict(), x)
    assert (_outputs(res.state_dict, x) - expected).abs().max() < tol
    for name, perm in perms.items():
        M = res.alignment.groups[name].M[1]
        # M_1 undoes the permutation: (M h_copy)[i] = h_copy[argsort(perm)[i]]
        expected_M = torch.zeros_like(M)
        expected_M[torch.arange(len(perm)), torch.argsort(perm)] = 1.0
        if method == "cca":
            assert torch.allclose(M, expected_M, atol=1e-4)
        else:
            assert torch.equal(M, expected_M)
            assert res.alignment.groups[name].quality[1] == pytest.approx(1.0, abs=1e-9)


def _toy_spec(d: int) -> MergeSpec:
    return MergeSpec(
        (
            FeatureGroup(
                "h", d, (("a.weight", 0), ("b.weight", 1)), collect_at="b", collect_on="input"
            ),
        )
    )


def _toy_stats(N: int, d: int, seed: int) -> tuple[JointCovariance, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(400, d, generator=gen, dtype=torch.float64)
    views = [X]
    for _ in range(N - 1):
        mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
        views.append(X @ mix + 0.5 * torch.randn(400, d, generator=gen, dtype=torch.float64))
    Z = torch.cat(views, 1)
    jc = JointCovariance(N, d)
    jc.update(Z)
    return jc, Z


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permute_equals_brute_force_on_five_units(seed):
    d = 5
    jc, Z = _toy_stats(2, d, seed)
    ctx = AlignContext(_toy_spec(d), [{}, {}], 0, Statistics(groups={"h": jc}))
    ga = make_method("permute").align(ctx).groups["h"]
    corr = torch.corrcoef(Z.T)[:d, d:]
    scores = {
        p: float(corr[torch.arange(d), list(p)].sum()) for p in itertools.permutations(range(d))
    }
    best = max(scores, key=scores.get)
    assert ga.details["permutation"][1] == list(best)
    assert ga.quality[1] == pytest.approx(scores[best] / d, abs=1e-12)
    P = ga.M[1]
    assert torch.equal(P @ ga.U[1], torch.eye(d, dtype=torch.float64))
    assert torch.equal(P[torch.arange(d), list(best)], torch.ones(d, dtype=torch.float64))


def test_correlation_is_zero_for_dead_units():
    C = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    R = correlation(C, torch.diagonal(C), torch.diagonal(C))
    assert torch.isfinite(R).all()
    assert R[0, 0] == 0.0 and R[0, 1] == 0.0 and R[1, 1] == pytest.approx(1.0)


def test_weight_matching_objective_never_decreases_on_digits(digits_mlps):
    res = merge(digits_mlps.paths, method="weight-matching")
    objectives = res.alignment.groups["hidden0"].details["objective"]
    assert objectives[0] is None  # the reference
    for obj in objectives[1:]:
        assert len(obj) >= 3  # several sweeps, the last one without change
        assert all(b >= a for a, b in zip(obj, obj[1:]))
        assert obj[-1] > 2 * obj[0]  # the matching found real agreement
        assert obj[-1] == obj[-2]  # stopped because nothing changed


def test_weight_matching_never_decreases_with_a_group_on_both_axes():
    # "r" reads and writes group h: the per-group step is then only an approximation of
    # the objective, and the step is kept only when the exact objective rises.
    d = 6
    spec = MergeSpec(
        (
            FeatureGroup(
                "h",
                d,
                (("a.weight", 0), ("r.weight", 0), ("r.weight", 1), ("b.weight", 1)),
                collect_at="b",
            ),
            FeatureGroup("g", d, (("b.weight", 0), ("c.weight", 1)), collect_at="c"),
        )
    )
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        ref = {"a.weight": rand(d, 3), "r.weight": rand(d, d), "b.weight": rand(d, d)}
        ref["c.weight"] = rand(2, d)
        other = {k: v + 2 * rand(*v.shape) for k, v in ref.items()}
        _, obj = weight_match(ref, other, spec, 50, torch.Generator().manual_seed(trial))
        assert all(b >= a for a, b in zip(obj, obj[1:])), obj


def test_zipit_merge_and_unmerge_matrices(digits_mlps):
    res = merge(digits_mlps.paths[:3], method="zipit", data=str(digits_mlps.calib_path))
    N = 3
    for ga in res.alignment.groups.values():
        d = ga.M[0].shape[0]
        for U in ga.U:  # every unit of every model goes to exactly one zipped unit
            assert torch.equal(U.sum(1), torch.ones(d, dtype=torch.float64))
            assert set(U.unique().tolist()) <= {0.0, 1.0}
        # with uniform weights each zipped unit is the mean of its members
        total = sum(M for M in ga.M) / N
        assert torch.allclose(total.sum(1), torch.ones(d, dtype=torch.float64))
        sizes = ga.details["cluster_sizes"]
        assert sum(sizes) == N * d and len(sizes) == d
        assert all(q is None or -1 <= q <= 1 for q in ga.quality)


def test_zipit_greedy_rule_on_a_toy():
    # two models of 2 units; unit 0 of model A is most correlated with unit 1 of model A
    R = torch.tensor(
        [
            [1.0, 0.95, 0.2, 0.9],
            [0.95, 1.0, 0.5, 0.1],
            [0.2, 0.5, 1.0, 0.3],
            [0.9, 0.1, 0.3, 1.0],
        ],
        dtype=torch.float64,
    )
    # beta = 0: cross-model merges only: (A0, B1) at 0.9, then (A1, B0) at 0.5
    z = zip_features(R, 2, 2, alpha=0.5, beta=0.0)
    assert z.clusters == [[0, 3], [1, 2]]
    assert z.same_model_merges == 0 and z.forced_merges == 0
    Ms, Us = zip_transforms(z, 2, 2)
    assert torch.equal(Ms[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    # beta = 1: budget of floor(1 * 1 * 2 / 2) = 1 same-model merge per model; (A0, A1) first
    z = zip_features(R, 2, 2, alpha=0.5, beta=1.0)
    # then (B0, B1) at 0.3 beats linking {A0, A1} with a B unit (min-linkage 0.2 * alpha)
    assert z.clusters == [[0, 1], [2, 3]]
    assert z.same_model_merges == 2
    Ms, Us = zip_transforms(z, 2, 2)
    assert torch.allclose(Ms[0][0], torch.tensor([1.0, 1.0], dtype=torch.float64))  # N / |c|
    assert torch.equal(Us[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_zipit_alpha_discounts_repeated_merges():
    # units A0 A1 B0 B1 C0 C1 of three models; after (A0, B0), extending that cluster with C0
    # (min-linkage 0.8) competes with the fresh pair (A1, B1) at 0.6
    R = torch.full((6, 6), 0.1, dtype=torch.float64)
    for (a, b), v in {
        (0, 2): 0.9,
        (0, 4): 0.8,
        (2, 4): 0.85,
        (1, 3): 0.6,
        (1, 5): 0.5,
        (3, 5): 0.55,
    }.items():
        R[a, b] = R[b, a] = v
    R.fill_diagonal_(1.0)
    no_discount = zip_features(R, 3, 2, alpha=1.0, beta=0.0)
    discounted = zip_features(R, 3, 2, alpha=0.5, beta=0.0)
    assert no_discount.merge_scores == [0.9, 0.8, 0.6, 0.5]
    assert discounted.merge_scores == [0.9, 0.6, 0.8, 0.5]
    for z in (no_discount, discounted):
        assert z.clusters == [[0, 2, 4], [1, 3, 5]]
        assert z.forced_merges == 0


def test_zipit_refuses_pairwise_statistics():
    d = 3
    pw = PairwiseCovariance(3, d)
    pw.update(torch.randn(50, 3 * d, dtype=torch.float64))
    ctx = AlignContext(_toy_spec(d), [{}, {}, {}], 0, Statistics(groups={"h": pw}))
    with pytest.raises(OptionError, match="joint covariance"):
        make_method("zipit").align(ctx)
    # permute and cca need only the blocks with the reference
    for name in ("permute", "cca"):
        make_method(name).align(ctx)


# the declared checks of every method's parameters: tests/test_method_params.py


def test_methods_record_their_parameters(digits_mlps):
    res = merge(
        digits_mlps.paths[:2],
        method="zipit",
        method_params={"alpha": 0.3, "beta": 0.25},
        data=str(digits_mlps.calib_path),
    )
    assert res.report["params"] == {"alpha": 0.3, "beta": 0.25}
    assert sum(ga.details["same_model_merges"] for ga in res.alignment.groups.values()) > 0
