"""SOFI engine: against a loop-over-pairs NumPy reference, streaming == batch, and the physics.

The physics tests generate their own small movies with numpy (independent blinking, Gaussian
PSF, Poisson noise) so that what is expected is known exactly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf

from benchmarks.sofi_checks import global_share, ring_z
from engines.metrics import sublattice_ratio
from engines.psf import FWHM_TO_SIGMA, Optics
from engines.sofi import SAMPLE_OFFSET_INPUT_PX, SofiEngine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DONUT = DATA / "real-static-donut-100f.tif"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def markov_blinking_movie(positions: np.ndarray, n_frames: int, size: int, *, seed: int,
                          p_on: float = 0.05, p_off: float = 0.3, photons: float = 800.0,
                          background: float = 10.0, fwhm_px: float = 2.2) -> np.ndarray:
    """Float movie of two-state (Markov) blinkers: on for ~1/p_off frames, so correlated at lag 1."""
    rng = np.random.default_rng(seed)
    psf = np.stack([pixel_psf(y, x, size, fwhm_px) for y, x in positions])
    state = rng.random(len(positions)) < p_on / (p_on + p_off)
    bright = np.empty((n_frames, len(positions)))
    for t in range(n_frames):
        flip = rng.random(len(positions))
        state = np.where(state, flip >= p_off, flip < p_on)
        bright[t] = photons * state
    lam = np.einsum("te,eij->tij", bright, psf) + background
    return rng.poisson(lam).astype(np.float64)


def camera_noise(n_frames: int, size: int, *, seed: int, sd: float = 10.0) -> np.ndarray:
    """Read noise that neighbouring pixels share within a frame (each pixel sums its own and its
    right and lower neighbour's white noise: correlation 1/3 at d = 1, 0 at d = 2), white in time."""
    n = np.random.default_rng(seed).normal(0.0, sd, (n_frames, size + 1, size + 1))
    return (n[:, :-1, :-1] + n[:, :-1, 1:] + n[:, 1:, :-1]) / math.sqrt(3.0)


def correlated_noise_movie(n_frames: int, size: int, *, seed: int, correlated: bool = True) -> np.ndarray:
    """A few Markov blinkers in the middle, offset 100, plus camera noise (shared or independent)."""
    pos = np.array([[size / 2, size / 2 - 1.2], [size / 2 + 0.7, size / 2 + 1.0]])
    movie = markov_blinking_movie(pos, n_frames, size, seed=seed) + 100.0
    noise = camera_noise(n_frames, size, seed=seed + 1)
    if not correlated:
        noise = np.random.default_rng(seed + 2).normal(0.0, 10.0, noise.shape)
    return movie + noise


# ----------------------------------------------------------------------------- reference
def _residuals_loop(x: np.ndarray, order: int) -> np.ndarray:
    """Each pixel minus its least-squares polynomial of degree ``order`` in time (np.polyfit)."""
    t = np.arange(x.shape[0], dtype=float)
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            out[:, i, j] = x[:, i, j] - np.polyval(np.polyfit(t, x[:, i, j], order), t)
    return out


def reference_sofi(stack: np.ndarray, distance: str, fwhm: float = 2.2, clip: bool = False,
                   order: int = 0, lag: int = 0):
    """Second-order cross-cumulant SOFI by explicit loops over pixel pairs (slow, obvious).

    Trend of degree ``order`` removed per pixel, products at time lag ``lag`` (symmetrised),
    divided by T - lag - order - 1; distance factors from the pixel-integrated PSF
    (sigma^2 + 1/12) of optical FWHM ``fwhm``, or fitted (``distance="data"``).
    """
    x = _residuals_loop(stack.astype(np.float64), order)
    t, h, w = x.shape
    norm = t - lag - order - 1

    def cov(p, q):
        assert p != q, "never an auto-cumulant"
        a, b = x[:, p[0], p[1]], x[:, q[0], q[1]]
        if lag == 0:
            return float((a * b).sum() / norm)
        return float(0.5 * ((a[:-lag] * b[lag:]).sum() + (b[:-lag] * a[lag:]).sum()) / norm)

    def inside(p):
        return 0 <= p[0] < h and 0 <= p[1] < w

    real = np.zeros((h, w))
    hv = np.full((h, w), np.nan)
    vv = np.full((h, w), np.nan)
    dv = np.full((h, w), np.nan)
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
    s2 = (fwhm * FWHM_TO_SIGMA) ** 2 + 1.0 / 12.0  # pixel-integrated PSF
    if distance == "data":
        d2 = np.array([1.0, 1.0, 2.0, 4.0])
        means = np.array([np.mean(h_all), np.mean(v_all), np.mean(d_all), np.mean(r_all)])
        assert (means > 0).all(), "reference data must allow the fit"
        slope = np.polyfit(d2, np.log(means), 1)[0]
        s2 = -1.0 / (4.0 * slope)
        fwhm = math.sqrt(s2 - 1.0 / 12.0) / FWHM_TO_SIGMA
    f = {1: 1.0, 2: 1.0, 4: 1.0}
    if distance != "none":
        f = {k: math.exp(-k / (4 * s2)) for k in (1, 2, 4)}
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
@pytest.mark.parametrize("order,lag", [(0, 0), (1, 0), (2, 0), (2, 1), (0, 2), (3, 1)])
def test_matches_loop_reference_fixed_factors(distance, order, lag):
    rng = np.random.default_rng(0)
    stack = rng.poisson(50.0, (30, 5, 6)).astype(np.uint16) + _tiny_blinking_stack()
    eng = SofiEngine(30, distance_factor=distance, psf_fwhm_px=2.2, clip_negative=False,
                     bleach_order=order, lag=lag)
    out = eng.reconstruct(stack)
    ref, _ = reference_sofi(stack, distance, 2.2, order=order, lag=lag)
    assert out.shape == (10, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    assert (ref < 0).any(), "noise must give some negative cumulants so the raw/clip distinction is tested"


def test_matches_loop_reference_data_fitted_factors():
    stack = _tiny_blinking_stack()
    ref, fwhm = reference_sofi(stack, "data", clip=True, order=2)
    eng = SofiEngine(30, distance_factor="data", psf_fwhm_px=fwhm * 1.2, clip_negative=True, lag=0)
    out = eng.reconstruct(stack)
    assert eng.last_fwhm_source == "data" and eng.output_info()["psf_fit"] == "used"
    assert eng.last_fwhm_px == pytest.approx(fwhm, rel=1e-9)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * _scale(ref))


def test_clip_negative_is_max_zero_of_raw():
    rng = np.random.default_rng(1)
    stack = rng.normal(1000.0, 10.0, (25, 7, 8))
    raw = SofiEngine(25, distance_factor="psf", clip_negative=False).reconstruct(stack)
    clipped = SofiEngine(25, distance_factor="psf", clip_negative=True).reconstruct(stack)
    assert (raw < 0).sum() > 10
    np.testing.assert_array_equal(clipped, np.maximum(raw, 0.0))


def test_psf_mode_uses_the_optics_and_reports_the_fit_only_as_a_check():
    """distance_factor="psf": the optical FWHM sets the factors; the fit is computed and reported, never used."""
    rng = np.random.default_rng(0)
    stack = blinking_movie(rng.uniform(-2, 21, (300, 2)), 100, 20, seed=5, on=0.1, photons=300.0, fwhm_px=3.0)
    eng = SofiEngine(100, distance_factor="psf",
                     optics=Optics(psf_fwhm_nm=300.0, pixel_size_um=0.1, pixel_size_source="test"))
    out = eng.reconstruct(stack)
    ref = SofiEngine(100, distance_factor="psf", psf_fwhm_px=3.0).reconstruct(stack)
    np.testing.assert_array_equal(out, ref)
    info = eng.output_info()
    assert info["psf_fwhm_px"] == pytest.approx(3.0) and info["psf_source"] == "--psf-fwhm-nm 300"
    assert info["pixel_size_um"] == 0.1 and info["pixel_size_source"] == "test"
    assert info["distance_fwhm_px"] == pytest.approx(3.0) and eng.last_fwhm_source == "psf"
    assert info["psf_fit_fwhm_px"] == pytest.approx(3.0, rel=0.15)  # the check agrees with the optics
    assert info["psf_fit"] == "check: agrees with the optics"
    assert info["bleach_correction"] == "quadratic" and info["lag"] == 0 and info["lag_choice"] == "auto"
    default = SofiEngine(100, optics=Optics(psf_fwhm_nm=300.0, pixel_size_um=0.1))
    default.reconstruct(stack)  # the default ("data") refines the optics with the fit, which agrees
    assert default.output_info()["psf_fit"] == "used"
    assert default.last_fwhm_px == pytest.approx(info["psf_fit_fwhm_px"], abs=1e-4)
    assert all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in info.items())


def test_unphysical_fit_is_rejected_with_a_warning(caplog):
    """data mode: a fit outside 0.7-1.5x the optical FWHM is not used (and said so), one inside is."""
    rng = np.random.default_rng(0)
    stack = blinking_movie(rng.uniform(-2, 21, (300, 2)), 100, 20, seed=5, on=0.1, photons=300.0, fwhm_px=3.0)
    with caplog.at_level(logging.WARNING, logger="engines.sofi"):
        eng = SofiEngine(100, distance_factor="data", psf_fwhm_px=1.5)  # the data say 3 px: 2x the optics
        out = eng.reconstruct(stack)
    info = eng.output_info()
    assert info["psf_fit"] == "rejected" and eng.last_fwhm_source == "psf (fit rejected)"
    assert eng.last_fwhm_px == 1.5 and info["psf_fit_fwhm_px"] == pytest.approx(3.0, rel=0.15)
    assert "PSF fit rejected" in info["warning"] and "outside 0.7-1.5x" in info["warning"]
    assert any("PSF fit rejected" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, SofiEngine(100, distance_factor="psf", psf_fwhm_px=1.5).reconstruct(stack))
    inside = SofiEngine(100, distance_factor="data", psf_fwhm_px=2.6)
    inside.reconstruct(stack)
    assert inside.output_info()["psf_fit"] == "used" and inside.output_info()["warning"] == ""
    assert inside.last_fwhm_px == pytest.approx(info["psf_fit_fwhm_px"], rel=1e-3)


def test_data_mode_falls_back_to_the_optics_on_noise_only():
    rng = np.random.default_rng(2)
    stack = rng.poisson(200.0, (20, 12, 12)).astype(np.uint16)  # independent pixels: means ~0, mixed signs
    eng = SofiEngine(20, distance_factor="data", psf_fwhm_px=1.7, clip_negative=False)
    out = eng.reconstruct(stack)
    ref = SofiEngine(20, distance_factor="psf", psf_fwhm_px=1.7, clip_negative=False).reconstruct(stack)
    assert eng.last_fwhm_source == "psf (fit rejected)" and eng.last_fwhm_px == 1.7
    assert "no fit possible" in eng.output_info()["warning"]
    np.testing.assert_array_equal(out, ref)


def test_default_optics_and_sources():
    eng = SofiEngine(20)
    info = eng.output_info()
    assert info["psf_source"] == "default NA 1.4 / 600 nm (0.51 lambda/NA)"
    assert info["pixel_size_source"] == "default 0.1 um"
    assert eng.psf_fwhm_px == pytest.approx(0.51 * 600 / 1.4 / 100)
    eng = SofiEngine(20, optics={"na": 1.3, "wavelength_nm": 561.0, "pixel_size_um": 0.16,
                                 "pixel_size_source": "from core pixel-size config"})
    assert eng.psf_fwhm_px == pytest.approx(0.51 * 561 / 1.3 / 160)
    assert eng.output_info()["psf_source"] == "NA 1.3 / 561 nm (0.51 lambda/NA)"
    with pytest.raises(ValueError, match="na"):
        SofiEngine(20, optics={"na": 3.0})
    with pytest.raises(ValueError, match="unknown optics"):
        SofiEngine(20, optics={"numerical_aperture": 1.3})


def test_bad_options_are_refused_with_clear_messages():
    with pytest.raises(ValueError, match="lag"):
        SofiEngine(20, lag=-1)
    with pytest.raises(ValueError, match="lag"):
        SofiEngine(20, lag="sometimes")
    with pytest.raises(ValueError, match="bleach_order"):
        SofiEngine(20, bleach_order=5)
    with pytest.raises(ValueError, match="too short"):
        SofiEngine(4, lag=2)
    with pytest.raises(ValueError, match="output_dtype"):
        SofiEngine(20, output_dtype="int8")


def test_sample_geometry_single_emitter():
    """Output (2i+a, 2j+b) samples input position (i + a/2, j + b/2): the documented offset."""
    stack = blinking_movie(np.array([[5.0, 7.5]]), 200, 14, seed=4, on=0.5, photons=2000.0)
    out = SofiEngine(200).reconstruct(stack)
    assert np.unravel_index(np.argmax(out), out.shape) == (10, 15)
    assert SAMPLE_OFFSET_INPUT_PX == 0.25


def test_uniform_blinking_field_has_no_checkerboard():
    """With the optical (pixel-integrated) or fitted factors the four pixel classes agree; without
    them, or with the bare (not pixel-integrated) PSF width, they do not."""
    rng = np.random.default_rng(0)
    size = 20
    pos = rng.uniform(-2, size + 1, (300, 2))
    stack = blinking_movie(pos, 600, size, seed=5, on=0.1, photons=300.0)

    def class_means(**kw):
        out = SofiEngine(600, clip_negative=False, **kw).reconstruct(stack)[4:-4, 4:-4]
        m = np.array([out[a::2, b::2].mean() for a in (0, 1) for b in (0, 1)])
        return m / m.mean()

    np.testing.assert_allclose(class_means(psf_fwhm_px=2.2), 1.0, atol=0.02)
    np.testing.assert_allclose(class_means(distance_factor="data", psf_fwhm_px=2.2), 1.0, atol=0.02)
    assert np.ptp(class_means(distance_factor="none")) > 0.3
    # the bare width over-corrects the real pixels (d = 2) by exp(1/s^2 - 1/(s^2 + 1/12)) ~ 10 %
    bare = SofiEngine(150, psf_fwhm_px=2.2, clip_negative=False)
    s2 = (2.2 * FWHM_TO_SIGMA) ** 2
    assert math.exp(-4 / (4 * (s2 + 1 / 12))) / math.exp(-4 / (4 * s2)) == pytest.approx(1.10, abs=0.01)
    assert bare.output_info()["psf_fwhm_px"] == 2.2


@pytest.mark.parametrize("window", [20, 500])
def test_simulated_filaments_sublattices_agree_within_5_percent(window):
    """The issue's criterion on the simulator (pixel-integrated PSF, 220 nm, 100 nm pixels), with
    the optics left at their default (NA 1.4 / 600 nm / 0.1 um = 2.19 px): max/min <= 1.05,
    for 20-frame windows (averaged over 25 windows) and for one 500-frame window.

    Four scenes are pooled: in one scene a few filaments of one orientation make even the ideal
    image's sub-lattices differ by up to ~6 % (the classes sample positions half a pixel apart
    across the filaments), which is structure, not calibration; per scene, SOFI's imbalance
    must match the ideal image's (the expected cumulant) within 1.5 %."""
    from acquisition.simulation import BlinkingScene, SimulationConfig

    outs, means = [], []
    for seed in (1, 2, 3, 4):
        scene = BlinkingScene(SimulationConfig(size=64, seed=seed))
        frames = scene.frames(500)
        eng = SofiEngine(window, clip_negative=False)
        out = np.mean([eng.reconstruct(frames[i:i + window]) for i in range(0, 500, window)], 0)
        ideal = scene.expected_cumulant()
        assert sublattice_ratio(out, frames.mean(0)) == pytest.approx(
            sublattice_ratio(ideal, frames.mean(0)), abs=0.015)
        outs.append(out[4:-4, 4:-4])  # the borders (pairs missing) stay out of the pool
        means.append(frames.mean(0)[2:-2, 2:-2])
    assert sublattice_ratio(np.hstack(outs), np.hstack(means), margin=0) <= 1.05
    assert sublattice_ratio(SofiEngine(window, distance_factor="none", clip_negative=False)
                            .reconstruct(frames[:window]), frames.mean(0)) > 1.2


# ----------------------------------------------------------------------------- streaming
def _check_stream(eng: SofiEngine, frames: np.ndarray, batch: SofiEngine, rtol: float = 1e-5) -> int:
    """Every streamed output against ``batch.reconstruct`` of the same window; returns the count."""
    compared = 0
    for k, f in enumerate(frames):
        out = eng.push(f)
        if k + 1 < eng.window:
            assert out is None
            continue
        ref = batch.reconstruct(frames[k + 1 - eng.window:k + 1])
        assert eng.lag == batch.lag
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * max(_scale(ref), 1e-12))
        compared += 1
    return compared


def _bleaching(frames: np.ndarray, tau: float = 80.0) -> np.ndarray:
    return frames * np.exp(-np.arange(len(frames)) / tau)[:, None, None]


@pytest.mark.parametrize("mode", ["data", "psf", "none"])
@pytest.mark.parametrize("order,lag", [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (2, 2), (3, 1)])
def test_streaming_equals_batch_for_every_option(mode, order, lag):
    """Exact to 1e-9 relative (float64 output), with the window wrapping many times, on a bleaching movie."""
    rng = np.random.default_rng(6)
    pos = rng.uniform(0, 10, (8, 2))
    frames = _bleaching(blinking_movie(pos, 120, 10, seed=7)[:, :9, :10].astype(np.float64))
    kw = dict(distance_factor=mode, clip_negative=False, bleach_order=order, lag=lag, output_dtype="float64")
    n = _check_stream(SofiEngine(9, **kw), frames, SofiEngine(9, **kw), rtol=1e-9)
    assert n == 120 - 9 + 1


@pytest.mark.parametrize("correlated", [False, True])
def test_streaming_equals_batch_with_automatic_lag(correlated):
    """lag="auto": the stream decides on its first window, batch on each window; here both agree."""
    movie = correlated_noise_movie(160, 24, seed=21, correlated=correlated)
    kw = dict(clip_negative=False, output_dtype="float64")
    eng = SofiEngine(20, **kw)
    n = _check_stream(eng, movie, SofiEngine(20, **kw), rtol=1e-9)
    assert n == 160 - 20 + 1
    assert eng.lag == (1 if correlated else 0)
    assert eng.output_info()["lag_choice"] == "auto" and eng.output_info()["lag_reason"].startswith("auto: lag")


def test_streaming_long_float_stream_has_no_drift():
    """Thousands of pushes of float data on a large offset, without and with periodic resync."""
    rng = np.random.default_rng(8)
    n, win = 2000, 6
    common = rng.normal(0, 30.0, (n, 1, 1))  # correlated part so the cumulants are not ~0
    frames = 5.0e4 + common + rng.normal(0.0, 10.0, (n, 6, 6))
    for lag in (0, 1):
        kw = dict(distance_factor="psf", clip_negative=False, lag=lag, output_dtype="float64")
        for resync, length in ((10_000, n), (7, 300)):
            eng = SofiEngine(win, resync_every=resync, **kw)
            for f in frames[: length - 1]:
                eng.push(f)
            out = eng.push(frames[length - 1])
            ref = SofiEngine(win, **kw).reconstruct(frames[length - win:length])
            np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9 * _scale(ref))
        # and every step of a shorter run with a tiny resync period
        _check_stream(SofiEngine(win, resync_every=3, **kw), frames[:60], SofiEngine(win, **kw), rtol=1e-9)


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
    eng.reset()  # same shape again (buffers kept): a restart equals batch on the new frames only
    for f in b[5:8]:
        eng.push(f)
    out = eng.push(b[8])
    np.testing.assert_allclose(out, eng.reconstruct(b[5:9]), rtol=1e-5, atol=1e-6 * _scale(out))
    for lag in (0, 1):  # and with a lag, after a reset in the middle of a wrapped ring
        kw = dict(distance_factor="psf", clip_negative=False, lag=lag, bleach_order=1, output_dtype="float64")
        eng = SofiEngine(5, **kw)
        for f in a[:7]:
            eng.push(f)
        eng.reset()
        n = _check_stream(eng, a[3:12], SofiEngine(5, **kw), rtol=1e-9)
        assert n == 5


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
    s = SofiEngine(t, distance_factor="none", clip_negative=False, bleach_order=0, lag=0).reconstruct(stack)
    s = s.astype(np.float64)
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
        sofi = SofiEngine(t, distance_factor="none", clip_negative=False, bleach_order=0, lag=0).reconstruct(stack)
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


# ----------------------------------------------------------------------------- bleaching, lag, real cameras
NUCLEUS = DATA / "real-emccd-nucleus-100f.tif"


def test_bleach_correction_removes_an_exponential_trend_and_keeps_the_blinking_pattern():
    """A bleaching autofluorescence blob (exp(-t/60)) next to blinking emitters: with the default
    quadratic correction SOFI equals that of the blinking alone (within 5 % of its peak, at 20 and
    100 frames); without correction the blob dominates. A trend of degree <= 2 is removed exactly."""
    size, n = 20, 100
    pos = np.array([[6.0, 4.2], [7.1, 5.6], [5.4, 6.3]])
    blink = blinking_movie(pos, n, size, seed=40, on=0.3).astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    blob = 400.0 * np.exp(-((yy - 12.0) ** 2 + (xx - 14.0) ** 2) / (2 * 3.0**2))
    t = np.arange(n, dtype=np.float64)
    trend = blob[None] * np.exp(-t / 60.0)[:, None, None]
    for window in (20, 100):
        kw = dict(clip_negative=False, lag=0)
        ref = SofiEngine(window, **kw).reconstruct(blink[:window])
        got = SofiEngine(window, **kw).reconstruct((blink + trend)[:window])
        off = SofiEngine(window, bleach_order=0, **kw).reconstruct((blink + trend)[:window])
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max(), window
        assert np.abs(off - ref).max() > 1.0 * np.abs(ref).max(), window
    poly = blob[None] * (1.0 - 0.004 * t + 1.5e-5 * t**2)[:, None, None]
    kw = dict(clip_negative=False, lag=0, output_dtype="float64")
    np.testing.assert_allclose(SofiEngine(n, **kw).reconstruct(blink + poly), SofiEngine(n, **kw).reconstruct(blink),
                               rtol=1e-9, atol=1e-9 * _scale(SofiEngine(n, **kw).reconstruct(blink)))


def test_lag_cumulants_remove_correlated_camera_noise():
    """Camera noise shared by neighbours (correlation 1/3 at lag 0, none at lag 1): zero-lag SOFI
    paints it into the background; lag-1 SOFI leaves the background at 0 and keeps the blinkers."""
    size, n = 24, 400
    movie = correlated_noise_movie(n, size, seed=30)
    yy, xx = np.mgrid[: 2 * size, : 2 * size] / 2.0
    far = np.hypot(yy - size / 2, xx - size / 2) > 6.0
    far[-2:] = far[:, -2:] = False
    virtual_h = np.zeros_like(far)
    virtual_h[0::2, 1::2] = True

    def background(img, mask):
        v = img[mask].astype(np.float64)
        return v.mean(), v.std() / math.sqrt(v.size / 4)  # ~4 neighbouring outputs share noise

    zero = SofiEngine(n, lag=0, clip_negative=False).reconstruct(movie)
    one = SofiEngine(n, lag=1, clip_negative=False).reconstruct(movie)
    m0, se0 = background(zero, far & virtual_h)
    m1, se1 = background(one, far)
    assert m0 > 10 * se0, (m0, se0)  # the shared noise: ~ 100 / 3 / f1 counts^2
    assert abs(m1) < 4 * se1, (m1, se1)
    assert one.max() > 20 * one[far].std()  # the blinkers survive the lag
    auto = SofiEngine(n, clip_negative=False)
    np.testing.assert_array_equal(auto.reconstruct(movie), one)
    assert auto.lag == 1 and "correlated camera noise" in auto.output_info()["lag_reason"]
    indep = SofiEngine(n)
    indep.reconstruct(correlated_noise_movie(n, size, seed=30, correlated=False))
    assert indep.lag == 0


@pytest.mark.skipif(not DONUT.exists(), reason=f"unavailable: {DONUT} not present")
def test_static_donut_with_automatic_lag_shows_no_ring():
    """The real negative control through the live default (20-frame windows, lag "auto"): lag 1 is
    chosen, and no window's SOFI (raw values) shows the ring above the background (z < 2; zero-lag
    SOFI without bleaching correction, the former engine, reaches z = 4.5)."""
    tifffile = pytest.importorskip("tifffile")
    stack = tifffile.imread(DONUT)
    mean = stack.astype(np.float64).mean(0)
    auto = SofiEngine(20, clip_negative=False)
    old = SofiEngine(20, clip_negative=False, lag=0, bleach_order=0)
    z_auto, z_old, outs = [], [], []
    for i in range(len(stack) - 19):
        outs.append(auto.reconstruct(stack[i:i + 20]))
        z_auto.append(ring_z(outs[-1], mean))
        z_old.append(ring_z(old.reconstruct(stack[i:i + 20]), mean))
        assert auto.lag == 1
    assert max(z_auto) < 2.0, max(z_auto)
    assert ring_z(np.mean(outs, 0), mean) < 1.0
    assert max(z_old) > 3.0  # the criterion does see the ring the former engine drew


@pytest.mark.skipif(not NUCLEUS.exists(), reason=f"unavailable: {NUCLEUS} not present")
def test_nucleus_whole_movie_sofi_no_longer_shows_the_bleaching_trend():
    """Real EMCCD nucleus movie (frame mean 1909 -> 787): SOFI of all 100 frames is 64 % one global
    time course without correction, 25 % with a linear and < 10 % with the default quadratic one."""
    tifffile = pytest.importorskip("tifffile")
    stack = tifffile.imread(NUCLEUS)
    assert global_share(stack, 0) > 0.5
    assert global_share(stack, 1) > 0.15
    assert global_share(stack, 2) < 0.1
    eng = SofiEngine(100, optics={"na": 1.3, "wavelength_nm": 603.0, "pixel_size_um": 0.16})
    out = eng.reconstruct(stack)
    assert eng.lag == 0 and eng.output_info()["bleach_correction"] == "quadratic"
    assert np.isfinite(out).all() and out.max() > 0
