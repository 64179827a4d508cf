"""Map-only metrics against their reference libraries (test-only dependencies):
Quantus 0.6 (localisation, complexity), pysaliency 0.2.22 (shuffled AUC, information
gain) and POT (EMD), on fixed random and structured inputs; agreement <= 1e-4 relative.

Both Quantus and pysaliency still call ``np.trapz`` (removed in NumPy 2.4): aliased here,
inside the tests only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from xaiwidgets import metrics

if not hasattr(np, "trapz"):  # the references' NumPy 1 name, for them only
    np.trapz = np.trapezoid

quantus = pytest.importorskip("quantus")
RTOL = 1e-4


def _maps(h: int = 12, w: int = 17) -> list[np.ndarray]:
    """Random, tied, constant, all-zero, signed and one-hot maps of a non-square size."""
    rng = np.random.default_rng(0)
    tied = np.round(rng.random((h, w)) * 4) / 4
    one_hot = np.zeros((h, w))
    one_hot[3, 5] = 2.0
    return [rng.random((h, w)), tied, np.full((h, w), 0.4), np.full((h, w), 0.7),
            np.zeros((h, w)), rng.normal(size=(h, w)), one_hot, rng.random((h, w)) ** 8]


def _masks(h: int = 12, w: int = 17) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    box = np.zeros((h, w), bool)
    box[2:7, 4:11] = True
    single = np.zeros((h, w), bool)
    single[3, 5] = True
    return [box, single, rng.random((h, w)) > 0.7, np.ones((h, w), bool)]


def _quantus(metric, a: np.ndarray, s: np.ndarray | None = None) -> float:
    """Quantus on one map (its normalisation spans the batch: one map per call)."""
    x = np.zeros((1, 1, *a.shape), np.float32)
    batch = {"x_batch": x, "y_batch": np.zeros(1, int), "a_batch": a[None, None].astype(float),
             "s_batch": None if s is None else s[None, None].astype(np.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.ptp(a) > 0:
            out = metric(model=None, **batch)
        else:  # Quantus' input checks refuse constant maps: its own steps, by hand
            if metric.normalise:
                batch["a_batch"] = metric.normalise_func(batch["a_batch"])
            if metric.abs:
                batch["a_batch"] = np.abs(batch["a_batch"])
            out = metric.evaluate_batch(model=None, **batch)
    return float(np.asarray(out, dtype=np.float64).ravel()[0])


def _close(ours: float, ref: float) -> None:
    if np.isnan(ref):
        assert np.isnan(ours)
    else:
        assert ours == pytest.approx(ref, rel=RTOL, abs=1e-9)


@pytest.mark.parametrize("name,reference", [
    ("pointing_game", "PointingGame"),
    ("relevance_mass", "RelevanceMassAccuracy"),
    ("relevance_rank", "RelevanceRankAccuracy"),
])
def test_localisation_matches_quantus(name, reference):
    metric = getattr(quantus, reference)(disable_warnings=True)
    ours = getattr(metrics, name)
    worst = 0.0
    for i, a in enumerate(_maps()):
        for j, s in enumerate(_masks()):
            if name == "relevance_rank" and len(np.unique(a)) < a.size:
                continue  # ties: Quantus' unstable argsort (tested below against a stable sort)
            ref = _quantus(metric, a, s)
            if name == "relevance_mass" and not np.isfinite(ref):
                assert np.isnan(ours(a, s)), (i, j)  # 0/0 of an all-zero map
                continue
            _close(ours(a, s), ref)
            worst = max(worst, abs(ours(a, s) - ref))
    assert worst <= 1e-12


def test_localisation_stack_equals_one_by_one_and_inputs():
    maps, masks = np.stack(_maps()), np.stack(_masks() * 2)
    for name in ("pointing_game", "relevance_mass", "relevance_rank"):
        f = getattr(metrics, name)
        stacked = f(maps, masks)
        one = [f(a, m) for a, m in zip(maps, masks, strict=True)]
        np.testing.assert_array_equal(stacked, one)
        import torch

        np.testing.assert_array_equal(f(torch.as_tensor(maps), torch.as_tensor(masks)), stacked)
        da = f(xr.DataArray(maps, dims=("image", "y", "x")), masks)
        assert da.dims == ("image",) and da.name == name
        np.testing.assert_array_equal(da.values, stacked)


def test_relevance_rank_ties_in_raster_order():
    a = np.array([[0.5, 0.2, 0.5], [0.5, 0.1, 0.0]])
    m = np.array([[False, False, True], [True, False, False]])  # K = 2
    # stable descending order: (0,0), (0,2), (1,0) ... -> the top 2 are (0,0) and (0,2)
    assert metrics.relevance_rank(a, m) == 0.5
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = np.round(rng.random((6, 7)) * 3)
        m = rng.random((6, 7)) > 0.6
        k = m.sum()
        top = np.argsort(-a.ravel(), kind="stable")[:k]
        assert metrics.relevance_rank(a, m) == pytest.approx(m.ravel()[top].mean())


def test_pointing_game_tolerance_and_empty_mask():
    a = np.zeros((9, 9))
    a[4, 4] = 1.0
    m = np.zeros((9, 9), bool)
    m[4, 7] = True  # 3 pixels right of the maximum
    assert metrics.pointing_game(a, m) == 0.0  # Quantus: no margin
    assert metrics.pointing_game(a, m, tolerance=2.9) == 0.0
    assert metrics.pointing_game(a, m, tolerance=3) == 1.0
    m2 = np.zeros((9, 9), bool)
    m2[6, 6] = True  # distance sqrt(8) = 2.83
    assert metrics.pointing_game(a, m2, tolerance=2.8) == 0.0
    assert metrics.pointing_game(a, m2, tolerance=2.83) == 1.0
    for f in (metrics.pointing_game, metrics.relevance_mass, metrics.relevance_rank):
        assert np.isnan(f(a, np.zeros((9, 9), bool)))


def test_bad_masks_and_shapes_say_what_to_pass():
    a = np.random.default_rng(0).random((8, 8))
    with pytest.raises(ValueError, match="boolean mask.*mask > 0.5"):
        metrics.pointing_game(a, a)
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.relevance_mass(a, np.ones((8, 9), bool))
    assert metrics.relevance_mass(a, (a > 0.5).astype(np.uint8)) == metrics.relevance_mass(
        a, a > 0.5)  # 0/1 integers are a mask


@pytest.mark.parametrize("name,reference", [("sparseness", "Sparseness"),
                                            ("complexity", "Complexity")])
def test_complexity_matches_quantus(name, reference):
    metric = getattr(quantus, reference)(disable_warnings=True)
    ours = getattr(metrics, name)
    for i, a in enumerate(_maps()):
        ref = _quantus(metric, a)
        if not np.any(a) and name == "complexity":
            assert np.isnan(ref) and ours(a) == 0.0  # documented: 0, Quantus 0/0
            continue
        if np.ptp(a) == 0:
            assert ours(a) == pytest.approx(ref, abs=1e-9), i  # constant: 0 / ln P
            continue
        _close(ours(a), ref)
    stack = np.stack(_maps())
    np.testing.assert_allclose(ours(stack), [ours(a) for a in stack], rtol=1e-12)


def test_sparseness_and_complexity_by_hand():
    # Gini of (0, 0, 0, 1) + eps ~ 0.75; entropy of (1/2, 1/2) = ln 2
    assert metrics.sparseness(np.array([[0.0, 0.0], [0.0, 5.0]])) == pytest.approx(0.75, abs=1e-6)
    assert metrics.complexity(np.array([[-2.0, 2.0], [0.0, 0.0]])) == pytest.approx(np.log(2))
    assert metrics.sparseness(np.full((4, 4), 0.7)) == 0.0
    assert metrics.complexity(np.full((4, 4), 0.7)) == pytest.approx(np.log(16), rel=1e-9)
    assert metrics.METRICS["complexity"].needs == "none"
    assert not metrics.METRICS["complexity"].higher_is_better


# ------------------------------------------------------------------ pysaliency
def _pysaliency():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("pysaliency")


def _fixations(ps, masks: list[np.ndarray]):
    ys, xs, ns = [], [], []
    for n, m in enumerate(masks):
        y, x = np.nonzero(m)
        ys.append(y)
        xs.append(x)
        ns.append(np.full(len(y), n))
    y, x, n = (np.concatenate(v) for v in (ys, xs, ns))
    return ps.Fixations.create_without_history(x.astype(float), y.astype(float), n)


def _saliency_model(ps, maps: list[np.ndarray]):
    class Fixed(ps.SaliencyMapModel):
        def _saliency_map(self, stimulus):
            return maps[int(stimulus[0, 0, 0])]

    return Fixed()


def _stimuli(ps, count: int, h: int, w: int):
    return ps.Stimuli([np.full((h, w, 3), n, np.uint8) for n in range(count)])


def test_shuffled_auc_matches_pysaliency():
    ps = _pysaliency()
    h, w = 12, 17
    rng = np.random.default_rng(5)
    maps = [*_maps(h, w)[:4], np.round(rng.random((h, w)) * 3)]
    fix = [rng.random((h, w)) > 0.85 for _ in maps]
    model = _saliency_model(ps, maps)
    stimuli, fixations = _stimuli(ps, len(maps), h, w), _fixations(ps, fix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_fixation = model.AUCs(stimuli, fixations, nonfixations="shuffled")
    # the negatives as distinct pixels: for image n, every pixel fixated on another one
    others = [np.any([g for k, g in enumerate(fix) if k != n], axis=0) for n in range(len(fix))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distinct = model.AUCs(stimuli, fixations, nonfixations=_fixations(ps, others))
    for n, (a, f) in enumerate(zip(maps, fix, strict=True)):
        ref = distinct[fixations.n == n].mean()
        assert metrics.shuffled_auc(a, f, others[n]) == pytest.approx(ref, rel=RTOL), n
    # "shuffled": the other images' fixations with repeats; same when they do not overlap
    disjoint = [np.zeros((h, w), bool) for _ in range(3)]
    for k, m in enumerate(disjoint):
        m[k::3, ::2] = True
    model = _saliency_model(ps, maps[:3])
    fixations = _fixations(ps, disjoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_fixation = model.AUCs(_stimuli(ps, 3, h, w), fixations, nonfixations="shuffled")
    for n in range(3):
        others = np.any([g for k, g in enumerate(disjoint) if k != n], axis=0)
        assert metrics.shuffled_auc(maps[n], disjoint[n], others) == pytest.approx(
            per_fixation[fixations.n == n].mean(), rel=RTOL)


def test_shuffled_auc_errors_and_nan():
    a = np.random.default_rng(0).random((6, 6))
    f = a > 0.8
    with pytest.raises(ValueError, match="other images"):
        metrics.shuffled_auc(a, f, np.zeros((6, 6)))
    assert np.isnan(metrics.shuffled_auc(a, np.zeros((6, 6)), f))


def test_info_gain_matches_pysaliency():
    ps = _pysaliency()
    h, w = 10, 13
    rng = np.random.default_rng(8)
    maps = [rng.random((h, w)) + 0.01, np.round(rng.random((h, w)) * 3) + 1,
            np.full((h, w), 0.4), rng.random((h, w)) ** 4 + 1e-3]
    baseline = rng.random((h, w)) + 0.1
    fix = [rng.random((h, w)) > 0.8 for _ in maps]

    class Density(ps.Model):
        def __init__(self, maps):
            super().__init__(caching=False)
            self.maps = maps

        def _log_density(self, stimulus):
            m = self.maps[int(stimulus[0, 0, 0])]
            return np.log(m / m.sum())

    stimuli, fixations = _stimuli(ps, len(maps), h, w), _fixations(ps, fix)
    for base, ours_base in ((None, None), (Density([baseline] * len(maps)), baseline)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gains = Density(maps).information_gains(stimuli, fixations, baseline_model=base)
        for n, (a, f) in enumerate(zip(maps, fix, strict=True)):
            ref = gains[fixations.n == n].mean()
            assert metrics.info_gain(a, f, ours_base) == pytest.approx(ref, rel=RTOL), n
    zero = np.ones((h, w))
    zero[0, 0] = 0.0
    f = np.zeros((h, w), bool)
    f[0, 0] = True
    assert metrics.info_gain(zero, f) == -np.inf
    with pytest.raises(ValueError, match="non-negative"):
        metrics.info_gain(zero - 0.5, f)
    assert np.isnan(metrics.info_gain(zero, np.zeros((h, w))))


def test_emd_matches_pot():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(2)
    for h, w in ((5, 7), (12, 9), (16, 11)):
        a, b = rng.random((h, w)) ** 3, rng.random((h, w))
        y, x = np.divmod(np.arange(h * w), w)
        pts = np.stack([y, x], 1).astype(float)
        ref = ot.emd2(a.ravel() / a.sum(), b.ravel() / b.sum(), ot.dist(pts, pts, "euclidean"))
        assert metrics.emd(a, b) == pytest.approx(ref, rel=RTOL)
    # one unit of mass moved 3 pixels down and 4 right: 5
    a, b = np.zeros((8, 8)), np.zeros((8, 8))
    a[1, 1], b[4, 5] = 1.0, 2.0
    assert metrics.emd(a, b) == pytest.approx(5.0)
    # a 64x46 map is block-summed by 4 (46 zero-padded to 48): the same as POT on the 4x4
    # block sums, distances x4
    a, b = rng.random((64, 46)), rng.random((64, 46))
    ab, bb = (np.pad(m, ((0, 0), (0, 2))).reshape(16, 4, 12, 4).sum((1, 3)) for m in (a, b))
    y, x = np.divmod(np.arange(16 * 12), 12)
    pts = np.stack([y, x], 1).astype(float)
    ref = ot.emd2(ab.ravel() / ab.sum(), bb.ravel() / bb.sum(), 4 * ot.dist(pts, pts, "euclidean"))
    assert metrics.emd(a, b) == pytest.approx(ref, rel=RTOL)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.emd(a - 0.5, b)


def test_single_map_and_shuffled_metrics_take_every_input_kind():
    import torch

    rng = np.random.default_rng(9)
    maps = rng.random((3, 10, 12))
    fix = rng.random((3, 10, 12)) > 0.8
    others = rng.random((3, 10, 12)) > 0.7
    for name, refs in (("sparseness", ()), ("complexity", ()), ("shuffled_auc", (fix, others)),
                       ("info_gain", (fix,))):
        f = metrics.METRICS[name]
        stacked = f(maps, *refs)
        np.testing.assert_allclose(stacked, [f(m, *(r[i] for r in refs))
                                             for i, m in enumerate(maps)], rtol=1e-12)
        np.testing.assert_allclose(f(torch.as_tensor(maps), *map(torch.as_tensor, refs)),
                                   stacked)
        da = f(xr.DataArray(maps, dims=("image", "y", "x")), *refs)
        assert da.dims == ("image",) and da.name == name
        np.testing.assert_allclose(da.values, stacked)
