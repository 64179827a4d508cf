"""Saliency metrics: SPEC.md worked examples, independent re-computations, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import ndimage, stats

from xaiwidgets import metrics

E = np.array([[0.9, 0.1], [0.4, 0.0]])
G = np.array([[0.8, 0.2], [0.6, 0.4]])
F = np.array([[1, 0], [1, 0]])
RNG = np.random.default_rng(0)


def random_maps(*shape: int) -> np.ndarray:
    return RNG.random(shape)


def reference_for(name: str, size: int = 24) -> np.ndarray:
    """A density map or a fixation map of ``size``², as the metric needs."""
    g = np.random.default_rng(1).random((size, size))
    return g if metrics.METRICS[name].needs == "map" else (g > 0.85).astype(int)


# ------------------------------------------------------------ worked examples
@pytest.mark.parametrize(
    ("name", "reference", "expected"),
    [
        ("pcc", G, 2 / np.sqrt(5)),
        ("sim", G, 11 / 14),
        ("kld", G, 6.745344),
        ("nss", F, 0.742307),
        ("spearman", G, 0.8),
        ("l1", G, 1 / 6),  # mean |minmax(E) - minmax(G)| = (0 + 1/9 + 2/9 + 1/3) / 4
    ],
)
def test_worked_examples(name, reference, expected):
    assert metrics.METRICS[name](E, reference) == pytest.approx(expected, abs=1e-6)


def test_l1_of_sim_distributions_is_two_minus_two_sim():
    assert metrics.l1(E, G, normalize="distribution") == pytest.approx(2 - 2 * 11 / 14)
    with pytest.raises(ValueError, match="normalize"):
        metrics.l1(E, G, normalize="bogus")


def test_auc_judd_worked_example():
    e = np.array([[0.9, 0.2, 0.2], [0.5, 0.8, 0.1], [0.2, 0.0, 0.3]])
    f = np.zeros((3, 3), dtype=int)
    f[0, 0] = f[2, 0] = 1
    assert metrics.auc_judd(e, f) == pytest.approx(23 / 28)


def test_nss_uses_sample_std():
    # ddof=0 would give 0.857143 (SPEC.md)
    assert metrics.nss(E, F) != pytest.approx(0.857143, abs=1e-3)


# ------------------------------------------------- independent computations
def slow_auc_judd(s: np.ndarray, f: np.ndarray) -> float:
    """SPEC.md's text, one threshold at a time."""
    s, f = s.ravel(), f.ravel() > 0
    fpr, tpr = [0.0], [0.0]
    for t in sorted(s[f], reverse=True):
        tpr.append(np.mean(s[f] >= t))
        fpr.append(np.mean(s[~f] >= t))
    fpr.append(1.0)
    tpr.append(1.0)
    return float(np.trapezoid(tpr, fpr))


def slow_auc_borji(s: np.ndarray, f: np.ndarray, seed: int = 0, n_splits: int = 100) -> float:
    """Port of the MIT AUC_Borji.m loops (same random draws)."""
    s = s.ravel()
    s = (s - s.min()) / (s.max() - s.min())
    fixated = s[f.ravel() > 0]
    draws = np.random.default_rng(seed).integers(0, s.size, size=(n_splits, fixated.size))
    areas = []
    for split in range(n_splits):
        random = s[draws[split]]
        top = max(fixated.max(), random.max())
        thresholds = [round(0.1 * k, 10) for k in range(11) if round(0.1 * k, 10) <= top]
        tp, fp = [0.0], [0.0]
        for t in reversed(thresholds):
            tp.append(np.mean(fixated >= t))
            fp.append(np.mean(random >= t))
        tp.append(1.0)
        fp.append(1.0)
        areas.append(np.trapezoid(tp, fp))
    return float(np.mean(areas))


def wang_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written out (Wang et al. 2004): Gaussian σ=1.5 window, C1/C2 for range 1."""
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())

    def blur(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map[5:-5, 5:-5].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_implementations(seed):
    rng = np.random.default_rng(seed)
    s = ndimage.gaussian_filter(rng.random((32, 40)), 2)
    g = ndimage.gaussian_filter(rng.random((32, 40)), 3)
    f = (rng.random((32, 40)) > 0.9).astype(int)
    f[0, 0] = 3  # a pixel fixated several times counts once
    assert metrics.pcc(s, g) == pytest.approx(stats.pearsonr(s.ravel(), g.ravel())[0])
    assert metrics.spearman(s, g) == pytest.approx(stats.spearmanr(s.ravel(), g.ravel())[0])
    signed = s - s.mean()
    assert metrics.spearman(signed, g, abs=True) == pytest.approx(
        stats.spearmanr(np.abs(signed).ravel(), g.ravel())[0]
    )
    # strictly positive maps: KLD is scipy's relative entropy up to the MIT epsilons
    assert metrics.kld(s, g) == pytest.approx(stats.entropy(g.ravel(), s.ravel()), rel=1e-6)
    z = (s - s.mean()) / s.std(ddof=1)
    assert metrics.nss(s, f) == pytest.approx(z[f > 0].mean())
    assert metrics.ssim(s, g) == pytest.approx(wang_ssim(s, g), abs=1e-10)
    assert metrics.auc_judd(s, f) == pytest.approx(slow_auc_judd(s, f))
    assert metrics.auc_borji(s, f, seed=seed) == pytest.approx(slow_auc_borji(s, f, seed=seed))


def test_auc_judd_with_ties_matches_slow_loop():
    s = np.round(random_maps(20, 20) * 4) / 4  # five distinct values: many ties
    f = (random_maps(20, 20) > 0.8).astype(int)
    assert metrics.auc_judd(s, f) == pytest.approx(slow_auc_judd(s, f))


# ------------------------------------------------------------------ properties
def test_identity_and_perfect_scores():
    a = ndimage.gaussian_filter(random_maps(30, 30), 2)
    assert metrics.pcc(a, a) == pytest.approx(1)
    assert metrics.sim(a, a) == pytest.approx(1)
    assert metrics.kld(a, a) == pytest.approx(0, abs=1e-12)
    assert metrics.ssim(a, a) == pytest.approx(1)
    assert metrics.spearman(a, a) == pytest.approx(1)
    assert metrics.l1(a, a) == pytest.approx(0)
    assert metrics.pcc(a, -a) == pytest.approx(-1)


def test_fixation_metrics_reward_a_map_high_at_fixations():
    f = np.zeros((30, 30), dtype=int)
    f[RNG.integers(0, 30, 12), RNG.integers(0, 30, 12)] = 1
    perfect = f.astype(float)
    assert metrics.nss(perfect, f) > 3
    assert metrics.auc_judd(perfect, f) == pytest.approx(1)
    assert metrics.auc_borji(perfect, f) > 0.95
    # the inverted map: Judd's only threshold (the fixations' value) is the minimum, so
    # its curve is the diagonal; Borji's fixed thresholds see the inversion
    assert metrics.auc_judd(1 - perfect, f) == pytest.approx(0.5)
    assert metrics.auc_borji(1 - perfect, f) < 0.05
    constant = np.full((30, 30), 0.3)
    assert metrics.auc_judd(constant, f) == pytest.approx(0.5)
    random = random_maps(30, 30)
    assert 0.2 < metrics.auc_judd(random, f) < 0.8


def test_affine_invariance():
    a, g = random_maps(16, 16), random_maps(16, 16)
    f = (g > 0.8).astype(int)
    for name, ref in (("pcc", g), ("nss", f), ("spearman", g), ("sim", g), ("auc_judd", f)):
        fn = metrics.METRICS[name]
        assert fn(2 * a + 3, ref) == pytest.approx(fn(a, ref)), name


@pytest.mark.parametrize("name", metrics.available())
@pytest.mark.parametrize("fill", [0.0, 0.7])
def test_constant_and_zero_maps_are_defined(name, fill):
    flat = np.full((24, 24), fill)
    ref = reference_for(name)
    for s, r in ((flat, ref), (ref.astype(float), flat), (flat, flat)):
        if metrics.METRICS[name].needs == "fixations" and r is flat:
            continue  # an empty fixation map has no answer (NaN, tested below)
        assert np.isfinite(metrics.METRICS[name](s, r)), (name, fill)


def test_documented_constant_values():
    flat, g = np.zeros((12, 12)), random_maps(12, 12)
    f = (g > 0.8).astype(int)
    assert metrics.pcc(flat, g) == 0
    assert metrics.spearman(flat, g) == 0
    assert metrics.nss(flat, f) == 0
    # no mass = uniform density
    assert metrics.sim(flat, g) == pytest.approx(metrics.sim(np.ones((12, 12)), g))
    assert np.isnan(metrics.nss(g, np.zeros((12, 12))))
    assert np.isnan(metrics.auc_judd(g, np.zeros((12, 12))))


@pytest.mark.parametrize("name", metrics.available())
def test_vectorised_equals_loop_and_inputs_agree(name):
    fn = metrics.METRICS[name]
    stack = random_maps(3, 2, 24, 24)
    ref = reference_for(name)
    result = fn(stack, ref)
    loop = np.array([[fn(stack[i, j], ref) for j in range(2)] for i in range(3)])
    assert result.shape == (3, 2)
    np.testing.assert_allclose(result, loop, rtol=1e-12)
    np.testing.assert_allclose(fn(torch.from_numpy(stack), torch.from_numpy(ref)), result)
    np.testing.assert_allclose(fn(stack.astype(np.float32), ref), result, rtol=1e-5)
    # DataArrays broadcast by dim name and keep the leading coords
    da = xr.DataArray(stack, dims=("image", "method", "y", "x"),
                      coords={"image": [10, 11, 12], "method": ["a", "b"]})
    refs = xr.DataArray(np.broadcast_to(ref, (3, 24, 24)), dims=("image", "y", "x"),
                        coords={"image": [10, 11, 12]})
    out = fn(da, refs)
    assert isinstance(out, xr.DataArray) and out.name == name
    assert set(out.dims) == {"image", "method"}
    np.testing.assert_allclose(out.transpose("image", "method").values, result)
    assert list(out.method.values) == ["a", "b"]
    np.testing.assert_allclose(fn(da, ref).values, result)  # plain reference array


def test_shape_mismatch_and_registry_errors():
    with pytest.raises(ValueError, match="do not match"):
        metrics.pcc(np.zeros((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.pcc(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(E, G)
    with pytest.raises(ValueError, match="Did you mean"):
        metrics.get("pc")


def test_registry_describes_every_metric():
    assert metrics.available() == [
        "pcc", "sim", "kld", "ssim", "spearman", "l1", "nss", "auc_judd", "auc_borji"
    ]
    lower = {m for m in metrics.available() if not metrics.METRICS[m].higher_is_better}
    assert lower == {"kld", "l1"}
    assert metrics.available("fixations") == ["nss", "auc_judd", "auc_borji"]
    assert metrics.get("sim").doc.startswith("Similarity")
    assert metrics.get("pcc")(E, G) == metrics.pcc(E, G)


def test_auc_borji_seed():
    s, f = random_maps(20, 20), (random_maps(20, 20) > 0.9).astype(int)
    assert metrics.auc_borji(s, f, seed=1) == metrics.auc_borji(s, f, seed=1)
    assert metrics.auc_borji(s, f, seed=1) != metrics.auc_borji(s, f, seed=2)


def test_vectorised_average_ranks_equal_scipy_rankdata_with_ties():
    from scipy.stats import rankdata

    from xaiwidgets.evaluation.metrics import _average_ranks

    rng = np.random.default_rng(3)
    rows = np.concatenate([rng.integers(0, 5, (6, 300)).astype(float),  # many ties
                           rng.random((2, 300)), np.zeros((1, 300))])
    np.testing.assert_array_equal(_average_ranks(rows), rankdata(rows, axis=1))
