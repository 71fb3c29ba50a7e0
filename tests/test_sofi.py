"""SOFI engine: against a loop-over-pairs NumPy reference, streaming == batch, and the physics.

The physics tests generate their own small movies with numpy (independent blinking, Gaussian
PSF, Poisson noise) so that what is expected is known exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf

from engines.sofi import SAMPLE_OFFSET_INPUT_PX, SofiEngine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DONUT = DATA / "real-static-donut-100f.tif"
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- movie helpers
def pixel_psf(y: float, x: float, size: int, fwhm_px: float) -> np.ndarray:
    """Pixel-integrated Gaussian PSF (sums to ~1); pixel i spans [i - 0.5, i + 0.5]."""
    s = fwhm_px * FWHM_TO_SIGMA
    edges = np.arange(size + 1) - 0.5

    def w1(mu: float) -> np.ndarray:
        return np.diff(0.5 * (1.0 + erf((edges - mu) / (math.sqrt(2.0) * s))))

    return np.outer(w1(y), w1(x))


def blinking_movie(
    positions: np.ndarray,
    n_frames: int,
    size: int,
    *,
    seed: int,
    on: float = 0.3,
    photons: float = 500.0,
    background: float = 10.0,
    fwhm_px: float = 2.2,
    blink: bool = True,
) -> np.ndarray:
    """uint16 movie: independent Bernoulli blinking (or constant mean), Poisson noise, offset 100."""
    rng = np.random.default_rng(seed)
    psf = np.stack([pixel_psf(y, x, size, fwhm_px) for y, x in positions])
    if blink:
        bright = photons * (rng.random((n_frames, len(positions))) < on)
    else:
        bright = np.full((n_frames, len(positions)), photons * on)
    lam = np.einsum("te,eij->tij", bright, psf) + background
    return (rng.poisson(lam) + 100).astype(np.uint16)


# ----------------------------------------------------------------------------- reference
def reference_sofi(stack: np.ndarray, distance: str, fwhm: float = 2.2, clip: bool = False):
    """Second-order cross-cumulant SOFI by explicit loops over pixel pairs (slow, obvious)."""
    x = stack.astype(np.float64)
    t, h, w = x.shape

    def cov(p, q):
        assert p != q, "never an auto-cumulant"
        a, b = x[:, p[0], p[1]], x[:, q[0], q[1]]
        return float(((a - a.mean()) * (b - b.mean())).sum() / (t - 1))

    def inside(p):
        return 0 <= p[0] < h and 0 <= p[1] < w

    real = np.zeros((h, w))
    hv = np.full((h, w), np.nan)
    vv = np.full((h, w), np.nan)
    dv = np.full((h, w), np.nan)
    cls = {1.0: [], 2.0: [], 4.0: []}
    h_all, v_all, d_all, r_all = [], [], [], []
    for i in range(h):
        for j in range(w):
            vals = []
            for p, q in (((i - 1, j), (i + 1, j)), ((i, j - 1), (i, j + 1))):
                if inside(p) and inside(q):
                    vals.append(cov(p, q))
            r_all += vals
            real[i, j] = np.mean(vals) if vals else 0.0
            if j + 1 < w:
                hv[i, j] = cov((i, j), (i, j + 1))
                h_all.append(hv[i, j])
            if i + 1 < h:
                vv[i, j] = cov((i, j), (i + 1, j))
                v_all.append(vv[i, j])
            if i + 1 < h and j + 1 < w:
                c1, c2 = cov((i, j), (i + 1, j + 1)), cov((i, j + 1), (i + 1, j))
                d_all += [c1, c2]
                dv[i, j] = 0.5 * (c1 + c2)
    if distance == "data":
        d2 = np.array([1.0, 1.0, 2.0, 4.0])
        means = np.array([np.mean(h_all), np.mean(v_all), np.mean(d_all), np.mean(r_all)])
        assert (means > 0).all(), "reference data must allow the fit"
        slope = np.polyfit(d2, np.log(means), 1)[0]
        fwhm = math.sqrt(-1.0 / (4.0 * slope)) / FWHM_TO_SIGMA
    f = {1: 1.0, 2: 1.0, 4: 1.0}
    if distance != "none":
        s = fwhm * FWHM_TO_SIGMA
        f = {k: math.exp(-k / (4 * s * s)) for k in (1, 2, 4)}
    out = np.zeros((2 * h, 2 * w))
    for i in range(h):
        for j in range(w):
            out[2 * i, 2 * j] = real[i, j] / f[4]
            out[2 * i, 2 * j + 1] = 0.0 if np.isnan(hv[i, j]) else hv[i, j] / f[1]
            out[2 * i + 1, 2 * j] = 0.0 if np.isnan(vv[i, j]) else vv[i, j] / f[1]
            out[2 * i + 1, 2 * j + 1] = 0.0 if np.isnan(dv[i, j]) else dv[i, j] / f[2]
    if clip:
        out = np.maximum(out, 0.0)
    return out, fwhm


def _tiny_blinking_stack(seed: int = 3) -> np.ndarray:
    """5 x 6 pixels, 30 frames, emitters near the middle so the class means are positive."""
    pos = np.array([[2.0, 2.4], [2.6, 3.3], [1.7, 3.0]])
    return blinking_movie(pos, 30, 6, seed=seed, on=0.4)[:, :5, :6]


def _scale(ref: np.ndarray) -> float:
    return float(np.abs(ref).max())


@pytest.mark.parametrize("distance", ["psf", "none"])
def test_matches_loop_reference_fixed_factors(distance):
    rng = np.random.default_rng(0)
    stack = rng.poisson(50.0, (30, 5, 6)).astype(np.uint16) + _tiny_blinking_stack()
    eng = SofiEngine(30, distance_factor=distance, psf_fwhm_px=2.2, clip_negative=False)
    out = eng.reconstruct(stack)
    ref, _ = reference_sofi(stack, distance, 2.2)
    assert out.shape == (10, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    assert (ref < 0).any(), "noise must give some negative cumulants so the raw/clip distinction is tested"


def test_matches_loop_reference_data_fitted_factors():
    stack = _tiny_blinking_stack()
    eng = SofiEngine(30, distance_factor="data", clip_negative=True)
    out = eng.reconstruct(stack)
    ref, fwhm = reference_sofi(stack, "data", clip=True)
    assert eng.last_fwhm_source == "data"
    assert eng.last_fwhm_px == pytest.approx(fwhm, rel=1e-9)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * _scale(ref))


def test_clip_negative_is_max_zero_of_raw():
    rng = np.random.default_rng(1)
    stack = rng.normal(1000.0, 10.0, (25, 7, 8))
    raw = SofiEngine(25, distance_factor="psf", clip_negative=False).reconstruct(stack)
    clipped = SofiEngine(25, distance_factor="psf", clip_negative=True).reconstruct(stack)
    assert (raw < 0).sum() > 10
    np.testing.assert_array_equal(clipped, np.maximum(raw, 0.0))


def test_data_mode_falls_back_to_given_psf_on_noise_only():
    rng = np.random.default_rng(2)
    stack = rng.poisson(200.0, (20, 12, 12)).astype(np.uint16)  # independent pixels: means ~0, mixed signs
    eng = SofiEngine(20, distance_factor="data", psf_fwhm_px=1.7, clip_negative=False)
    out = eng.reconstruct(stack)
    ref = SofiEngine(20, distance_factor="psf", psf_fwhm_px=1.7, clip_negative=False).reconstruct(stack)
    assert eng.last_fwhm_source == "psf-fallback" and eng.last_fwhm_px == 1.7
    np.testing.assert_array_equal(out, ref)


def test_sample_geometry_single_emitter():
    """Output (2i+a, 2j+b) samples input position (i + a/2, j + b/2): the documented offset."""
    stack = blinking_movie(np.array([[5.0, 7.5]]), 200, 14, seed=4, on=0.5, photons=2000.0)
    out = SofiEngine(200).reconstruct(stack)
    assert np.unravel_index(np.argmax(out), out.shape) == (10, 15)
    assert SAMPLE_OFFSET_INPUT_PX == 0.25


def test_uniform_blinking_field_has_no_checkerboard():
    """With the fitted distance factors the four pixel classes agree; without them they do not."""
    rng = np.random.default_rng(0)
    size = 20
    pos = rng.uniform(-2, size + 1, (300, 2))
    stack = blinking_movie(pos, 150, size, seed=5, on=0.1, photons=300.0)

    def class_means(mode):
        out = SofiEngine(150, distance_factor=mode, clip_negative=False).reconstruct(stack)[4:-4, 4:-4]
        m = np.array([out[a::2, b::2].mean() for a in (0, 1) for b in (0, 1)])
        return m / m.mean()

    np.testing.assert_allclose(class_means("data"), 1.0, atol=0.04)
    assert np.ptp(class_means("none")) > 0.3


# ----------------------------------------------------------------------------- streaming
def _check_stream(eng: SofiEngine, frames: np.ndarray, batch: SofiEngine) -> int:
    compared = 0
    for k, f in enumerate(frames):
        out = eng.push(f)
        if k + 1 < eng.window:
            assert out is None
            continue
        ref = batch.reconstruct(frames[k + 1 - eng.window:k + 1])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * max(_scale(ref), 1e-12))
        compared += 1
    return compared


@pytest.mark.parametrize("mode", ["data", "psf", "none"])
def test_streaming_equals_batch_with_window_wrap(mode):
    rng = np.random.default_rng(6)
    pos = rng.uniform(0, 10, (8, 2))
    frames = blinking_movie(pos, 120, 10, seed=7)[:, :9, :10]
    kw = dict(distance_factor=mode, clip_negative=False)
    n = _check_stream(SofiEngine(7, **kw), frames, SofiEngine(7, **kw))
    assert n == 120 - 7 + 1


def test_streaming_long_float_stream_has_no_drift():
    """Thousands of pushes of float data on a large offset, without and with periodic resync."""
    rng = np.random.default_rng(8)
    n, win = 2000, 5
    common = rng.normal(0, 30.0, (n, 1, 1))  # correlated part so the cumulants are not ~0
    frames = 5.0e4 + common + rng.normal(0.0, 10.0, (n, 6, 6))
    kw = dict(distance_factor="psf", clip_negative=False)
    for resync, length in ((10_000, n), (7, 300)):
        eng = SofiEngine(win, resync_every=resync, **kw)
        for f in frames[: length - 1]:
            eng.push(f)
        out = eng.push(frames[length - 1])
        ref = SofiEngine(win, **kw).reconstruct(frames[length - win:length])
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7 * _scale(ref))
    # and every step of a shorter run with a tiny resync period
    _check_stream(SofiEngine(win, resync_every=3, **kw), frames[:60], SofiEngine(win, **kw))


def test_streaming_reset_and_shape_change_lose_nothing():
    rng = np.random.default_rng(9)
    a = rng.poisson(100.0, (12, 6, 7)).astype(np.uint16)
    b = rng.poisson(100.0, (12, 8, 8)).astype(np.uint16)
    eng = SofiEngine(4, distance_factor="psf", clip_negative=False)
    for f in a[:5]:
        eng.push(f)
    with pytest.raises(ValueError, match="reset"):
        eng.push(b[0])
    out = eng.push(a[5])  # the wrong-shape frame changed nothing
    np.testing.assert_allclose(out, eng.reconstruct(a[2:6]), rtol=1e-5, atol=1e-6 * _scale(out))
    eng.reset()
    assert [eng.push(f) is None for f in b[:4]] == [True, True, True, False]


def test_streaming_does_not_alias_caller_buffer():
    """A camera may reuse its buffer: pushing then overwriting the array must not change the state."""
    rng = np.random.default_rng(10)
    frames = rng.poisson(100.0, (8, 5, 5)).astype(np.float64)
    eng = SofiEngine(4, distance_factor="psf", clip_negative=False)
    buf = np.empty((5, 5))
    for f in frames:
        buf[:] = f
        out = eng.push(buf)
    buf[:] = 0.0
    np.testing.assert_allclose(out, eng.reconstruct(frames[-4:]), rtol=1e-6, atol=1e-6 * _scale(out))


# ----------------------------------------------------------------------------- physics
@pytest.mark.parametrize("centre_x", [8.0, 8.5])  # midpoint on a real and on a virtual output pixel
def test_two_emitters_below_diffraction_limit_separate_in_sofi_not_in_mean(centre_x):
    """180 nm apart, 220 nm FWHM PSF, 100 nm pixels: mean image one peak, SOFI a dip between two."""
    sep_px = 1.8
    pos = np.array([[8.0, centre_x - sep_px / 2], [8.0, centre_x + sep_px / 2]])
    stack = blinking_movie(pos, 400, 16, seed=11, on=0.5, photons=500.0)
    mean_row = stack.mean(0)[8]
    near = range(int(centre_x) - 4, int(centre_x) + 5)  # +-400 nm around the pair
    peaks_mean = [i for i in near if mean_row[i] > mean_row[i - 1] and mean_row[i] >= mean_row[i + 1]]
    assert len(peaks_mean) == 1, f"mean image should show one peak, got {peaks_mean}"

    row = SofiEngine(400).reconstruct(stack)[16]
    mid = int(round(2 * centre_x))
    left, right = row[mid - 3:mid].max(), row[mid + 1:mid + 4].max()
    assert row[mid] < 0.95 * min(left, right), f"no dip: mid {row[mid]:.1f}, peaks {left:.1f} {right:.1f}"
    assert row[mid - 3:mid].argmax() > 0 and row[mid + 1:mid + 4].argmax() < 2  # real maxima, not edges


def _neighbour_correlation(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SOFI virtual pixels (engine, raw) / sqrt(var_a var_b): nearest-neighbour correlation maps.

    The auto-cumulants (variances) are used only to express the cross-cumulant in units of the
    noise; returns (horizontal map, its pair-mean intensity, vertical map, its pair-mean intensity).
    """
    t, h, w = stack.shape
    s = SofiEngine(t, distance_factor="none", clip_negative=False).reconstruct(stack).astype(np.float64)
    x = stack.astype(np.float64)
    v = x.var(0, ddof=1)
    m = x.mean(0)
    ch = s[0::2, 1::2][:, : w - 1] / np.sqrt(v[:, :-1] * v[:, 1:])
    cv = s[1::2, 0::2][: h - 1, :] / np.sqrt(v[:-1, :] * v[1:, :])
    return ch, 0.5 * (m[:, :-1] + m[:, 1:]), cv, 0.5 * (m[:-1] + m[1:])


def excess_correlation(stack: np.ndarray) -> float:
    """Neighbour correlation on the structure (top 20 % of the mean) minus on the background (bottom 50 %).

    Noise that is the same everywhere (independent, or correlated by the detector) gives 0;
    blinking adds correlation only where the emitters are.
    """
    ch, mh, cv, mv = _neighbour_correlation(stack)
    m = stack.mean(0)
    hi, lo = np.percentile(m, 80), np.percentile(m, 50)
    ring = np.concatenate([ch[mh > hi], cv[mv > hi]])
    bg = np.concatenate([ch[mh < lo], cv[mv < lo]])
    return float(ring.mean() - bg.mean())


def frame_bootstrap_se(stat, stack: np.ndarray, n: int = 60, block: int = 10, seed: int = 0) -> float:
    """Standard error of ``stat`` by resampling blocks of frames (keeps slow fluctuations)."""
    rng = np.random.default_rng(seed)
    nb = len(stack) // block
    vals = []
    for _ in range(n):
        idx = np.concatenate([np.arange(b * block, (b + 1) * block) for b in rng.integers(0, nb, nb)])
        vals.append(stat(stack[idx]))
    return float(np.std(vals, ddof=1))


def _ring(n: int, size: int, radius: float, seed: int) -> np.ndarray:
    ang = np.random.default_rng(seed).uniform(0, 2 * np.pi, n)
    return np.stack([size / 2 + radius * np.sin(ang), size / 2 + radius * np.cos(ang)], 1)


def test_shot_noise_only_cross_cumulant_is_zero_blinking_is_not():
    """Independent-pixel shot noise: SOFI ring mean within 3 SE of 0; the same ring blinking: >> 3 SE.

    SE from the per-frame terms of the ring-averaged cumulant (frames are independent here), so
    the spatial correlation between neighbouring SOFI pixels is accounted for.
    """
    pos = _ring(60, 32, 3.0, seed=12)

    def ring_mean_and_se(stack):
        x = stack.astype(np.float64)
        t = len(x)
        xc = x - x.mean(0)
        m = x.mean(0)
        mask = 0.5 * (m[:, :-1] + m[:, 1:]) > np.percentile(m, 80)
        per_frame = (xc[:, :, :-1] * xc[:, :, 1:])[:, mask].mean(1) * t / (t - 1)
        sofi = SofiEngine(t, distance_factor="none", clip_negative=False).reconstruct(stack)
        hv = sofi[0::2, 1::2][:, :-1].astype(np.float64)
        assert hv[mask].mean() == pytest.approx(per_frame.mean(), rel=1e-4, abs=1e-6)
        return hv[mask].mean(), per_frame.std(ddof=1) / math.sqrt(t)

    static_mean, static_se = ring_mean_and_se(blinking_movie(pos, 100, 32, seed=13, blink=False, photons=300.0))
    blink_mean, blink_se = ring_mean_and_se(blinking_movie(pos, 100, 32, seed=13, blink=True, photons=300.0))
    assert abs(static_mean) < 3 * static_se, (static_mean, static_se)
    assert blink_mean > 10 * blink_se, (blink_mean, blink_se)
    assert excess_correlation(blinking_movie(pos, 100, 32, seed=14)) > 0.3


@pytest.mark.skipif(not DONUT.exists(), reason=f"unavailable: {DONUT} not present")
def test_static_donut_shows_no_blinking_structure():
    """Real negative control: a static ring, no blinking.

    The raw SOFI of this file is NOT zero on the ring: the camera correlates neighbouring pixels'
    noise (correlation ~0.3 even in the dark background) and the ring's brightness flickers by
    about +-10 % from frame to frame (illumination), both of which a zero-lag cross-cumulant sees.
    Neither is super-resolution: the criterion is the neighbour correlation on the ring in excess
    of the background's. Raw it must be far below a blinking ring's (>0.3, previous test); after
    dividing out the one-number-per-frame ring brightness it must be 0 within 3 standard errors.
    """
    tifffile = pytest.importorskip("tifffile")
    stack = tifffile.imread(DONUT)
    assert stack.shape == (100, 32, 32)

    ch, mh, _, _ = _neighbour_correlation(stack)
    assert np.median(ch[mh < np.percentile(stack.mean(0), 50)]) > 0.15  # the detector-correlated noise

    raw_excess = excess_correlation(stack)
    assert raw_excess < 0.1, raw_excess

    x = stack.astype(np.float64)
    m = x.mean(0)
    offset = np.median(m[m < np.percentile(m, 50)])
    ring = (m - offset) > np.percentile(m - offset, 80)
    gain = (x[:, ring] - offset).mean(1) / (m[ring] - offset).mean()
    flat = offset + (x - offset) / gain[:, None, None]
    corrected = excess_correlation(flat)
    se = frame_bootstrap_se(excess_correlation, flat)
    assert abs(corrected) < 3 * se, (corrected, se)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="unavailable: CUDA is not available on this machine")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(15)
    frames = blinking_movie(rng.uniform(0, 24, (20, 2)), 60, 24, seed=16)
    cpu, gpu = SofiEngine(20), SofiEngine(20, device="cuda")
    np.testing.assert_allclose(gpu.reconstruct(frames), cpu.reconstruct(frames), rtol=1e-5, atol=1e-3)
    for f in frames:
        a, b = cpu.push(f), gpu.push(f)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3)
