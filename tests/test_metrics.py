"""Metrics checked against cases with a known answer (thesis appendix B)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engines.metrics import (
    align_to,
    decorrelation_analysis,
    decorrelation_resolution,
    evaluate_image,
    invented_filaments,
    invented_structure,
    li_threshold,
    line_like_mask,
    pearson,
    tpr_tnr,
    window_consistency,
)

PIXEL_NM = 50.0


def _points(n: int = 128, count: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))
    yx = rng.integers(0, n, (count, 2))
    np.add.at(img, (yx[:, 0], yx[:, 1]), rng.uniform(0.5, 1.0, count))
    return img


def _blurred(fwhm_nm: float, *, noisy: bool, seed: int = 0) -> np.ndarray:
    img = ndimage.gaussian_filter(_points(seed=seed), fwhm_nm / PIXEL_NM / 2.3548)
    if not noisy:
        return img
    rng = np.random.default_rng(seed + 1)
    return rng.poisson(img / img.max() * 200 + 10).astype(float)


def _filaments(n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))
    t = np.linspace(0, 1, 4 * n)
    for _ in range(6):
        y0, x0, y1, x1 = rng.uniform(0, n - 1, 4)
        img[np.round(y0 + (y1 - y0) * t).astype(int), np.round(x0 + (x1 - x0) * t).astype(int)] = 1
    return ndimage.gaussian_filter(img, 1.0)


# ------------------------------------------------------------------ Pearson
def test_pearson_of_image_with_itself_is_one():
    img = _filaments()
    assert pearson(img, img) == pytest.approx(1.0, abs=1e-9)
    assert pearson(img, img, align=False) == pytest.approx(1.0, abs=1e-12)
    assert pearson(3.0 * img + 7.0, img) == pytest.approx(1.0, abs=1e-9)  # scale-free


def test_pearson_recovers_subpixel_shift_and_noise_lowers_it():
    img = _filaments()
    moved = ndimage.shift(img, (1.4, -0.7), order=3, mode="nearest")
    unaligned = pearson(moved, img, align=False)
    aligned = pearson(moved, img)
    assert unaligned < 0.8
    assert aligned > 0.98
    _, (dy, dx) = align_to(moved, img)
    assert dy == pytest.approx(-1.4, abs=0.1)
    assert dx == pytest.approx(0.7, abs=0.1)
    noisy = moved + np.random.default_rng(1).normal(0, 0.3 * img.max(), img.shape)
    assert pearson(noisy, img) < aligned - 0.05


def test_pearson_ignores_implausibly_large_shift():
    img = _filaments()
    far = np.roll(img, 20, axis=1)
    _, shift = align_to(far, img, max_shift=3.0)
    assert shift == (0.0, 0.0)


def test_pearson_resamples_a_smaller_prediction():
    gt = _filaments(64)
    small = gt.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert pearson(small, gt) > 0.8


def test_pearson_of_constant_image_is_nan_and_bad_input_raises():
    img = _filaments()
    assert np.isnan(pearson(np.zeros_like(img), img))
    with pytest.raises(ValueError, match="2-D"):
        pearson(np.zeros((2, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        pearson(np.full((8, 8), np.nan), np.ones((8, 8)))


# ------------------------------------------------------------------ decorrelation
def test_decorrelation_increases_with_blur():
    widths = [100.0, 150.0, 200.0, 300.0, 400.0]
    res = [decorrelation_resolution(_blurred(w, noisy=True), PIXEL_NM) for w in widths]
    assert all(b > a for a, b in zip(res, res[1:])), res


@pytest.mark.parametrize("fwhm_nm", [100.0, 200.0, 300.0])
def test_decorrelation_absolute_value_near_psf_fwhm(fwhm_nm):
    res = decorrelation_resolution(_blurred(fwhm_nm, noisy=True), PIXEL_NM)
    assert res == pytest.approx(fwhm_nm, rel=0.3)


def test_decorrelation_of_flat_or_white_noise_image():
    assert np.isnan(decorrelation_resolution(np.ones((64, 64)), PIXEL_NM))
    white = np.random.default_rng(3).normal(size=(64, 64))
    result = decorrelation_analysis(white)
    # white noise: d0 rises monotonically up to Nyquist, so the unfiltered curve has no peak
    assert result.a0 < 0.05
    assert np.all(np.diff(result.d0[1:]) > 0)
    with pytest.raises(ValueError):
        decorrelation_resolution(white, 0.0)


# ------------------------------------------------------------------ Li, TPR, TNR
def test_li_threshold_separates_two_levels():
    img = np.full((32, 32), 10.0)
    img[8:16, 8:24] = 100.0
    t = li_threshold(img)
    assert 10.0 <= t < 100.0
    assert np.count_nonzero(img > t) == 8 * 16


def test_tpr_tnr_on_synthetic_masks():
    gt = np.zeros((40, 40))
    gt[10:20, 10:30] = 1.0  # 200 foreground pixels, 1400 background
    assert tpr_tnr(gt, gt) == (1.0, 1.0)
    pred = np.zeros_like(gt)
    pred[10:15, 10:30] = 1.0  # half of the structure found
    pred[30:35, 0:20] = 1.0  # 100 invented pixels
    tpr, tnr = tpr_tnr(pred, gt)
    assert tpr == pytest.approx(100 / 200)
    assert tnr == pytest.approx(1300 / 1400)


def test_evaluate_image_combines_metrics():
    gt = _filaments(64)
    pred = ndimage.gaussian_filter(gt, 1.0) + np.random.default_rng(0).normal(0, 0.01, gt.shape)
    out = evaluate_image(pred, gt, PIXEL_NM)
    assert set(out) == {"pearson", "resolution_nm", "tpr", "tnr", "shift_y", "shift_x"}
    assert 0.8 < out["pearson"] <= 1.0
    assert 0.0 <= out["tpr"] <= 1.0 and 0.0 <= out["tnr"] <= 1.0
    assert np.isfinite(out["resolution_nm"]) and out["resolution_nm"] > 2 * PIXEL_NM


def test_invented_structure_counts_claims_away_from_the_reference():
    ref = np.zeros((64, 64))
    ref[20:24, 10:50] = 1.0  # one bar
    ref = ndimage.gaussian_filter(ref, 1.0)
    assert invented_structure(ref, ref) == pytest.approx(0.0)
    extra = ref.copy()
    extra[40:44, 10:50] = ref[20:24, 10:50]  # a second, invented bar of the same size
    share = invented_structure(extra, ref)
    assert 0.35 < share < 0.6
    # a structure shifted by less than one input pixel (2 output px) is not invented ...
    assert invented_structure(np.roll(ref, 1, axis=0), ref) == pytest.approx(0.0)
    # ... one shifted by 4 input pixels is
    assert invented_structure(np.roll(ref, 8, axis=0), ref) > 0.9
    # a 1x image is compared on the reference grid
    assert invented_structure(ref[::2, ::2], ref) < 0.2
    assert np.isnan(invented_structure(ref, np.zeros((64, 64))))  # no reference structure



# ------------------------------------------------------------------ real movies: consistency, filaments
def _blobs(n: int = 96, count: int = 25, seed: int = 3, sigma: float = 2.0) -> np.ndarray:
    """Round spots (puncta) of a PSF-like width, no lines."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))
    yx = rng.integers(6, n - 6, (count, 2))
    img[yx[:, 0], yx[:, 1]] = rng.uniform(0.5, 1.0, count)
    img = ndimage.gaussian_filter(img, sigma)
    return img / img.max()


def _ridges(n: int = 96, seed: int = 1) -> np.ndarray:
    """Long thin lines of a PSF-like width (what a network draws when it hallucinates filaments)."""
    img = _filaments(n, seed)
    return img / img.max()


def test_window_consistency_high_for_a_static_stack_low_when_windows_differ():
    rng = np.random.default_rng(0)
    sample = _blobs()
    same = [sample + rng.normal(0, 0.01, sample.shape) for _ in range(5)]  # one sample, noise per window
    assert window_consistency(same) > 0.95
    differ = [_blobs(seed=s) for s in range(5)]  # a new guess in every window
    assert window_consistency(differ) < 0.2
    assert np.isnan(window_consistency(same[:1]))  # one window: nothing to compare
    with pytest.raises(ValueError, match="shape"):
        window_consistency([sample, sample[:50]])


def test_line_like_mask_fires_on_ridges_not_on_blobs_haze_or_noise():
    rng = np.random.default_rng(2)
    share = {}
    for name, img in {"ridges": _ridges(), "blobs": _blobs(), "haze": ndimage.gaussian_filter(rng.random((96, 96)), 8),
                      "noise": rng.exponential(1.0, (96, 96))}.items():
        line, claimed = line_like_mask(img)
        share[name] = line.sum() / claimed.sum()
    assert share["ridges"] > 0.3, share  # (the claimed foreground is wider than the ridge lines)
    assert max(share["blobs"], share["haze"], share["noise"]) < 0.02, share
    flat = line_like_mask(np.ones((32, 32)))
    assert not flat[0].any() and not flat[1].any()


def test_invented_filaments_counts_lines_the_reference_does_not_show():
    ridges, blobs = _ridges(), _blobs()
    assert invented_filaments(ridges, blobs) > 0.3  # filaments drawn over spots
    assert invented_filaments(blobs, blobs) == pytest.approx(0.0)  # spots where spots are
    assert invented_filaments(ridges, ridges) == pytest.approx(0.0)  # filaments the reference shows
    haze = ndimage.gaussian_filter(np.random.default_rng(4).random((96, 96)), 6)
    assert invented_filaments(haze, blobs) < 0.02  # a haze is no filament
    both = ridges / ridges.max() + blobs / blobs.max()
    assert 0.05 < invented_filaments(both, blobs) < invented_filaments(ridges, blobs)
    # the mean at 1x is compared on the reference's 2x grid; a constant output claims nothing
    assert invented_filaments(ridges[::2, ::2], blobs) > 0.2
    assert np.isnan(invented_filaments(np.zeros((96, 96)), blobs))
