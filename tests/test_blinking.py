"""engines.assess_blinking: independent blinking vs shot noise, static fluorescence, flicker, camera noise."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines import BlinkingReport, assess_blinking
from engines.blinking import BLINKING_THRESHOLD, FAIL_SENTENCE, BlinkingMonitor, background_noise_correlation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 32, 50


def ring_psfs(n: int = 40, size: int = SIZE, radius: float = 8.0, fwhm: float = 2.2, seed: int = 0) -> np.ndarray:
    """(n, size, size) Gaussian spots (unit sum) on a ring."""
    ang = np.random.default_rng(seed).uniform(0, 2 * np.pi, n)
    yy, xx = np.mgrid[:size, :size]
    s = fwhm / (2 * math.sqrt(2 * math.log(2)))
    y0, x0 = size / 2 + radius * np.sin(ang), size / 2 + radius * np.cos(ang)
    g = np.exp(-((yy[None] - y0[:, None, None]) ** 2 + (xx[None] - x0[:, None, None]) ** 2) / (2 * s * s))
    return g / g.sum((1, 2), keepdims=True)


def movie(kind: str, seed: int = 1, frames: int = FRAMES) -> np.ndarray:
    """Synthetic stacks, offset 100 counts, Poisson shot noise on everything."""
    rng = np.random.default_rng(seed)
    psf = ring_psfs()
    photons = 600.0
    if kind == "blinking":
        bright = photons * (rng.random((frames, len(psf))) < 0.3)
    elif kind in ("static", "flicker", "correlated"):
        bright = np.full((frames, len(psf)), 0.3 * photons)
    elif kind == "shot":
        bright = np.zeros((frames, len(psf)))
    else:
        raise ValueError(kind)
    lam = np.einsum("te,eij->tij", bright, psf) + 20.0
    if kind == "flicker":  # illumination: the whole field brightens and dims together
        lam = lam * (1.0 + 0.15 * rng.standard_normal(frames))[:, None, None]
    x = rng.poisson(lam).astype(np.float64) + 100.0
    if kind == "correlated":
        x += camera_noise(frames, SIZE, rng)
    return x


def camera_noise(frames: int, size: int, rng: np.random.Generator, sd: float = 8.0) -> np.ndarray:
    """Read noise shared by a pixel and its right and lower neighbours (correlation 1/3 at d = 1)."""
    n = rng.normal(0.0, sd, (frames, size + 1, size + 1))
    return (n[:, :-1, :-1] + n[:, :-1, 1:] + n[:, 1:, :-1]) / math.sqrt(3.0)


def test_independent_blinking_is_ok():
    r = assess_blinking(movie("blinking"))
    assert isinstance(r, BlinkingReport) and r.ok
    assert r.local_correlation > 0.3 and r.reason == "independent blinking"
    assert r.n_frames == FRAMES and r.n_pixels == SIZE * SIZE and r.threshold == BLINKING_THRESHOLD


@pytest.mark.parametrize("kind,finding", [
    ("shot", "shot noise only"),
    ("static", "static fluorescence"),
    ("flicker", "the whole field flickers together"),
    ("correlated", "neighbouring pixels share camera noise"),
])
def test_no_blinking_is_not_ok_and_says_why(kind, finding):
    r = assess_blinking(movie(kind))
    assert not r.ok
    assert r.local_correlation < 0.05, r  # (negative when shot noise dilutes shared read noise on the signal)
    assert finding in r.reason
    assert FAIL_SENTENCE in r.message and r.message.count(". ") == 0  # one sentence
    d = r.as_dict()
    assert d["ok"] is False and isinstance(d["local_correlation"], float)


def test_what_the_statistics_see():
    """Flicker correlates far pixels on the signal; camera noise correlates dark neighbours at lag 0 only."""
    f = assess_blinking(movie("flicker"))
    assert f.far_corr_signal > 0.3 and f.neighbour_corr_signal > 0.3
    c = assess_blinking(movie("correlated"))
    assert c.background_corr_lag0 > 0.2 and abs(c.background_corr_lag1) < 0.1
    assert background_noise_correlation(movie("correlated")).correlated
    assert not background_noise_correlation(movie("blinking")).correlated


@pytest.mark.parametrize("extra", ["flicker", "correlated"])
def test_blinking_survives_flicker_and_camera_noise(extra):
    rng = np.random.default_rng(5)
    x = movie("blinking")
    if extra == "flicker":
        x = 100.0 + (x - 100.0) * (1.0 + 0.15 * rng.standard_normal(FRAMES))[:, None, None]
    else:
        x = x + camera_noise(FRAMES, SIZE, rng)
    assert assess_blinking(x).ok


def test_bleaching_blinking_sample_is_ok():
    """A falling mean is no reason to fail: each pixel's linear trend is removed first."""
    x = 100.0 + (movie("blinking") - 100.0) * np.linspace(1.0, 0.4, FRAMES)[:, None, None]
    assert assess_blinking(x).ok


def test_bad_input_gets_one_clear_error():
    with pytest.raises(ValueError, match="at least 10 frames"):
        assess_blinking(np.zeros((5, 16, 16)))
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        assess_blinking(np.zeros((16, 16)))
    with pytest.raises(TypeError, match="real numbers"):
        assess_blinking(np.zeros((20, 8, 8), complex))
    with pytest.raises(ValueError, match="NaN"):
        assess_blinking(np.full((20, 8, 8), np.nan))


def test_large_frames_are_subsampled_in_tiles():
    rng = np.random.default_rng(3)
    x = rng.poisson(50.0, (12, 256, 256)).astype(np.uint16)
    r = assess_blinking(x, max_pixels=4096)
    assert r.n_pixels == 4096 and not r.ok


def test_monitor_evaluates_at_the_first_frames_then_periodically():
    x = movie("blinking", frames=130)
    mon = BlinkingMonitor(frames=50, every=50, first=20)
    when = [i + 1 for i, f in enumerate(x) if mon.add(f) is not None]
    assert when == [20, 50, 100]
    assert mon.report is not None and mon.report.ok and mon.report.n_frames == 50
    # the newest 50 frames, in time order
    np.testing.assert_array_equal(mon.snapshot(), x[80:130])
    changed = []
    mon = BlinkingMonitor(frames=20, every=20, first=20)
    for f in np.concatenate([movie("blinking", frames=40), movie("static", frames=40)]):
        if mon.add(f) is not None:
            changed.append((mon.report.ok, mon.changed))
    assert changed == [(True, True), (True, False), (False, True), (False, False)]
    mon.add(np.zeros((8, 8)))  # a new shape starts over
    assert mon.snapshot().shape == (1, 8, 8)


def test_import_engines_does_not_import_torch():
    code = "import sys, engines; engines.assess_blinking; engines.Optics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- real movies
def _read(name: str) -> np.ndarray:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"unavailable: {path} not present")
    tifffile = pytest.importorskip("tifffile")
    return tifffile.imread(path)


@pytest.mark.parametrize("frames", [20, 50, 100])
def test_real_static_donut_is_not_ok(frames):
    r = assess_blinking(_read("real-static-donut-100f.tif")[:frames])
    assert not r.ok and r.local_correlation < 0.05
    assert "share camera noise" in r.reason


@pytest.mark.parametrize("frames", [20, 50, 100])
def test_real_nucleus_is_ok(frames):
    r = assess_blinking(_read("real-emccd-nucleus-100f.tif")[:frames])
    assert r.ok and r.local_correlation > 0.25


def test_simulated_demo_is_ok():
    from acquisition.simulation import BlinkingScene, SimulationConfig

    r = assess_blinking(BlinkingScene(SimulationConfig(size=64, seed=0)).frames(20))
    assert r.ok and r.local_correlation > 0.3
