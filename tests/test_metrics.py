"""Saliency metrics: docs/methods.md worked examples, independent re-computations, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import ndimage, stats

from xaiwidgets import metrics

#: the metrics that compare a map with gaze data (a density map or fixations)
GAZE = metrics.available("map") + metrics.available("fixations")

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
    # ddof=0 would give 0.857143 (docs/methods.md)
    assert metrics.nss(E, F) != pytest.approx(0.857143, abs=1e-3)


# ------------------------------------------------- independent computations
def slow_auc_judd(s: np.ndarray, f: np.ndarray) -> float:
    """docs/methods.md's text, one threshold at a time."""
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


@pytest.mark.parametrize("name", GAZE)
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


@pytest.mark.parametrize("name", GAZE)
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
    assert metrics.available("map") + metrics.available("fixations") == [
        "pcc", "sim", "kld", "ssim", "spearman", "l1", "emd", "nss", "auc_judd", "auc_borji",
        "info_gain"]
    assert set(metrics.available()) == set(GAZE) | {
        "pointing_game", "relevance_mass", "relevance_rank", "sparseness", "complexity",
        "shuffled_auc", "faithfulness_correlation", "road", "irof", "infidelity",
        "max_sensitivity", "avg_sensitivity", "random_logit"}
    lower = {m for m in metrics.available() if not metrics.METRICS[m].higher_is_better}
    assert lower == {"kld", "l1", "emd", "complexity", "road", "infidelity", "max_sensitivity",
                     "avg_sensitivity", "random_logit"}
    assert metrics.available("fixations") == ["nss", "auc_judd", "auc_borji", "info_gain"]
    assert {metrics.METRICS[m].needs for m in metrics.available()} == {
        "map", "fixations", "mask", "shuffled", "none", "explainer", "method"}
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


# ------------------------------------------------- batched SSIM, ranks, AUC, chunks
def skimage_ssim(s: np.ndarray, g: np.ndarray) -> float:
    """scikit-image's SSIM with the settings ``metrics.ssim`` documents, one map."""
    from skimage.metrics import structural_similarity

    def minmax(a):
        span = a.max() - a.min()
        return (a - a.min()) / span if span > 0 else np.zeros_like(a)

    return structural_similarity(minmax(s), minmax(g), data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("shape", [(6, 224, 224), (4, 11, 11), (3, 11, 17), (3, 40, 29)])
def test_batched_ssim_equals_scikit_image(shape):
    rng = np.random.default_rng(sum(shape))
    s, g = rng.random(shape), ndimage.gaussian_filter(rng.random(shape), (0, 2, 2))
    s[0] = 0.4  # constant map: all zeros after min-max
    g[1] = 0.0
    s[2] = np.round(s[2] * 3) - 1  # few values, negative ones too
    got = metrics.ssim(s, g)
    expected = np.array([skimage_ssim(a, b) for a, b in zip(s, g, strict=True)])
    assert np.abs(got - expected).max() <= 1e-6
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # in fact to rounding


def test_batched_ssim_on_video_volumes_equals_scikit_image_per_frame():
    rng = np.random.default_rng(5)
    dims = ("image", "t", "y", "x")
    sal = xr.DataArray(rng.random((2, 3, 16, 20)), dims=dims)
    gfdm = xr.DataArray(ndimage.gaussian_filter(rng.random((2, 3, 16, 20)), (0, 0, 2, 2)),
                        dims=dims)
    expected = [np.mean([skimage_ssim(sal.values[i, t], gfdm.values[i, t]) for t in range(3)])
                for i in range(2)]
    assert np.abs(metrics.ssim(sal, gfdm).values - expected).max() <= 1e-6


def test_ranks_equal_rankdata_for_negatives_signed_zeros_and_near_ties():
    from scipy.stats import rankdata

    from xaiwidgets.evaluation.metrics import _average_ranks

    rng = np.random.default_rng(4)
    base = rng.normal(size=(4, 500))
    base[0, :50] = 0.0
    base[0, 50:100] = -0.0  # ties with +0.0 although the bits differ
    base[1, 1::2] = np.nextafter(base[1, ::2], np.inf)  # 1 ulp apart: same sort keys
    base[2, 1::2] = np.nextafter(base[2, ::2], -np.inf)
    base[3, :10] = [np.inf, -np.inf, 1e-310, -1e-310, 1e308, -1e308, 5e-324, 0, 1, -1]
    np.testing.assert_array_equal(_average_ranks(base), rankdata(base, axis=1))


@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_stack_with_ties_and_near_ties_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(5, 30, 30))
    s[0] = np.maximum(s[0], 0)  # ReLU'd map: many ties at 0
    s[1] = np.round(s[1])
    s[2].flat[1::2] = np.nextafter(s[2].flat[::2], np.inf)
    g = ndimage.gaussian_filter(rng.random((5, 30, 30)), (0, 2, 2))
    g[3] = np.round(g[3], 2)
    expected = [stats.spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(s, g, strict=True)]
    np.testing.assert_allclose(metrics.spearman(s, g), expected, rtol=1e-12)


def test_auc_judd_stack_with_uneven_fixations_equals_slow_loop():
    rng = np.random.default_rng(6)
    s = np.round(rng.random((6, 20, 20)) * 6) / 6  # ties
    f = (rng.random((6, 20, 20)) > np.array([0.99, 0.9, 0.5, 0.0, 1.0, 0.97])[:, None, None])
    f[4, 3, 4] = True  # one fixation; row 3: every pixel fixated (no negatives: NaN)
    got = metrics.auc_judd(s, f.astype(int))
    for i in range(6):
        if i == 3:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(slow_auc_judd(s[i], f[i]), abs=1e-12), i


def test_chunks_on_threads_give_the_same_scores(monkeypatch):
    rng = np.random.default_rng(7)
    s, g = rng.random((7, 24, 24)), rng.random((7, 24, 24))
    f = (g > 0.9).astype(int)
    names = metrics.available("map") + metrics.available("fixations")
    whole = {name: metrics.METRICS[name](s, f if metrics.METRICS[name].needs == "fixations"
                                         else g) for name in names}
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 2 * 24 * 24)  # chunks of two maps
    monkeypatch.setattr(metrics, "THREADS", 3)
    for name, expected in whole.items():
        ref = f if metrics.METRICS[name].needs == "fixations" else g
        np.testing.assert_allclose(metrics.METRICS[name](s, ref), expected, rtol=1e-14,
                                   err_msg=name)
    # the chunks do run on worker threads, each on its own rows, in order
    import threading

    seen = []

    def core(a, b):
        seen.append((threading.current_thread().name, len(a)))
        return a[:, 0, 0]

    out = metrics._in_chunks(core, [s, g], {})
    np.testing.assert_array_equal(out, s[:, 0, 0])
    assert sorted(n for _, n in seen) == [1, 2, 2, 2]
    assert all(name.startswith("xaiwidgets-metrics") for name, _ in seen)
    monkeypatch.setattr(metrics, "THREADS", 1)
    seen.clear()
    metrics._in_chunks(core, [s, g], {})
    assert {name for name, _ in seen} == {threading.current_thread().name}


@pytest.mark.parametrize("value", [0.4, 0.7, 0.1, 1 / 3, 1e-9])
def test_constant_maps_whose_mean_rounds_give_zero(value):
    # the mean of 0.4 repeated rounds one step: the residuals are ~1e-17, not 0, and a
    # check of std > 0 standardised them into +-0.999 (issue #25)
    flat = np.full((7, 9), value)
    fix = np.zeros((7, 9))
    fix[1, 2] = fix[5, 5] = 1
    g = random_maps(7, 9)
    assert metrics.nss(flat, fix) == 0.0
    assert metrics.pcc(flat, g) == 0.0 and metrics.pcc(g, flat) == 0.0
    assert metrics.spearman(flat, g) == 0.0
    assert metrics.auc_judd(flat, fix) == 0.5
    assert metrics.sim(flat, g) == pytest.approx(metrics.sim(np.ones((7, 9)), g))
    stack = np.stack([flat, g])  # and in a stack, next to a map that varies
    np.testing.assert_array_equal(metrics.nss(stack, fix)[:1], [0.0])
