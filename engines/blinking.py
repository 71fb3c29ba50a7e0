"""Does the movie carry independent emitter fluctuations? A cheap check, numpy only.

SOFI and the networks turn *independent, local* intensity fluctuations into resolution. A movie
without them still gives a confident-looking image: of shot noise, of static fluorescence
(squared), of a lamp that flickers over the whole field, or of camera noise that neighbouring
pixels share. :func:`assess_blinking` tells these apart with correlations of each pixel's
fluctuation (per-pixel linear trend removed, so bleaching does not count) with others:

    neighbour correlation   rho(d=1):  pixel pairs 1 apart (horizontal and vertical)
    far correlation         rho(far):  pairs ``far_px`` apart (8 px >> the PSF)

each on the *signal* (pairs whose mean intensity is in the top 20 %) and on the *background*
(pairs in the bottom 50 %). The statistic is the double difference

    local = [rho_sig(d=1) - rho_sig(far)] - [rho_bg(d=1) - rho_bg(far)]

Independent blinking makes neighbours on the structure correlate (they see the same emitter)
while pixels far apart do not: local > 0. Shot noise and static fluorescence give 0 everywhere;
global flicker raises near and far pairs alike (cancels in the first bracket); camera noise
shared by neighbours raises d=1 on signal and background alike (cancels between brackets).
``ok`` is ``local >= BLINKING_THRESHOLD`` (0.1). Measured (tests/test_blinking.py): real static
donut -0.03 (20 frames) / 0.03 (100 frames); real nucleus 0.36; simulated demo 0.70; synthetic
shot-noise / static / flicker / correlated-noise stacks |local| < 0.05, a synthetic blinking
ring > 0.3.

Cost: a few passes over T x pixels; at most ``max_pixels`` pixels are used (16 x 16 tiles spread
over the frame): 32 frames x 4096 pixels take ~8 ms (the live setting, ``realtime.worker``),
50 x 16384 ~40-70 ms on this 2-core machine. :class:`BlinkingMonitor` keeps the newest
``frames`` frames of a stream and says when the next check is due (every ``every`` frames).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .trend import detrend

__all__ = [
    "BLINKING_THRESHOLD",
    "BlinkingMonitor",
    "BlinkingReport",
    "CORRELATED_NOISE_THRESHOLD",
    "MIN_FRAMES",
    "NoiseCorrelation",
    "assess_blinking",
    "background_noise_correlation",
    "warm_up",
]

BLINKING_THRESHOLD = 0.1  # local correlation above which fluctuations are independent blinking
CORRELATED_NOISE_THRESHOLD = 0.1  # background neighbour correlation at lag 0 beyond lag 1
NOISE_D2_RATIO = 0.15  # camera noise: correlation 2 px apart below this fraction of d = 1
FLICKER_THRESHOLD = 0.1  # far-pair correlation on the signal beyond the background's
STATIC_CONTRAST = 3.0  # signal - background mean, in background noise SDs: a visible sample
MIN_FRAMES = 10
TILE = 16
SIGNAL_PERCENTILE = 80.0
BACKGROUND_PERCENTILE = 50.0
DARK_PERCENTILE = 25.0  # the camera-noise test uses the darkest quarter: no sample there

FAIL_SENTENCE = "the super-resolved view shows noise or static fluorescence, not resolved structure"


@dataclass(frozen=True)
class NoiseCorrelation:
    """Correlation of the darkest pixels' fluctuations with their neighbours (camera noise test).

    ``lag0`` / ``lag1``: nearest neighbours (d = 1) in the same frame / one frame apart;
    ``lag0_d2``: pixels two apart in the same frame.
    """

    lag0: float
    lag1: float
    lag0_d2: float = 0.0

    @property
    def correlated(self) -> bool:
        """Neighbours share noise within a frame that is gone one frame later and two pixels away.

        Both conditions are needed: blinking that lasts about one frame (the simulator's 10 ms at
        100 fps, or a dense sample with no dark background) also decorrelates by lag 1, but it
        follows the PSF, so pixels two apart still correlate (exp(-3 / (4 sigma^2)) of d = 1:
        >= 0.2 for any PSF wider than 1.5 px). Camera processing correlates only nearest
        neighbours (the real donut movie: 0.31 at d = 1, -0.13 at d = 2).
        """
        return (self.lag0 - max(self.lag1, 0.0) > CORRELATED_NOISE_THRESHOLD
                and self.lag0_d2 < NOISE_D2_RATIO * self.lag0)


@dataclass(frozen=True)
class BlinkingReport:
    """Result of :func:`assess_blinking`; ``message`` is one sentence for the user."""

    ok: bool
    local_correlation: float  # the decision statistic (see module docstring)
    neighbour_corr_signal: float
    neighbour_corr_background: float
    far_corr_signal: float
    far_corr_background: float
    background_corr_lag0: float  # darkest pixels, for the camera-noise finding
    background_corr_lag1: float
    contrast: float  # (signal - background mean) / background temporal SD
    threshold: float
    n_frames: int
    n_pixels: int
    reason: str  # "independent blinking" or what the fluctuations are instead
    message: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (floats rounded, NaN as None)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if not math.isfinite(v) else round(v, 4)
        return d


# ----------------------------------------------------------------------------- helpers
def _tiles(x: np.ndarray, max_pixels: int) -> np.ndarray:
    """(T, n, h, w) view-copies: the whole frame as one tile, or TILE x TILE tiles spread over it."""
    t, h, w = x.shape
    if h * w <= max_pixels or h < TILE or w < TILE:
        return x[:, None]
    n = max(1, max_pixels // (TILE * TILE))
    ny = max(1, min(h // TILE, int(round(math.sqrt(n * h / w)))))
    nx = max(1, min(w // TILE, n // ny))
    ys = np.linspace(0, h - TILE, ny).round().astype(int)
    xs = np.linspace(0, w - TILE, nx).round().astype(int)
    return np.stack([x[:, y:y + TILE, c:c + TILE] for y in ys for c in xs], axis=1)


def _pair_corr(z: np.ndarray, dy: int, dx: int, lag: int = 0) -> tuple[np.ndarray, tuple, tuple]:
    """Correlation of pixel pairs (p, p + (dy, dx)) within tiles; z is (T, n, h, w) standardised residuals."""
    h, w = z.shape[-2:]
    a = (slice(None), slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    b = (slice(None), slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
    za, zb = z[(slice(None),) + a], z[(slice(None),) + b]
    t = z.shape[0]
    if lag:
        c = 0.5 * (np.einsum("t...,t...->...", za[:-lag], zb[lag:])
                   + np.einsum("t...,t...->...", zb[:-lag], za[lag:])) / t
    else:
        c = np.einsum("t...,t...->...", za, zb) / t
    return c, a, b


def _select_mean(c: np.ndarray, m: np.ndarray, a: tuple, b: tuple, lo: float | None, hi: float | None,
                 both: bool) -> tuple[float, int]:
    """Mean of correlations c over pairs whose intensities lie below lo / above hi."""
    ma, mb = m[a], m[b]
    if both:
        sel = (ma > hi) & (mb > hi) if hi is not None else (ma < lo) & (mb < lo)
    else:
        pm = 0.5 * (ma + mb)
        sel = pm > hi if hi is not None else pm < lo
    n = int(sel.sum())
    return (float(c[sel].mean()) if n else float("nan")), n


def _as_stack(stack: npt.ArrayLike) -> np.ndarray:
    x = np.asarray(stack)
    if x.dtype.kind not in "uif":
        raise TypeError(f"stack must hold real numbers (integer or float), got dtype {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"stack must be (T, H, W), got shape {x.shape}")
    if x.shape[0] < MIN_FRAMES:
        raise ValueError(f"the blinking check needs at least {MIN_FRAMES} frames, got {x.shape[0]}")
    if x.shape[1] < 4 or x.shape[2] < 4:
        raise ValueError(f"the blinking check needs frames of at least 4 x 4 pixels, got {x.shape[1:]}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError("stack contains NaN or infinite values")
    return x


def _residuals(stack: npt.ArrayLike, max_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised residuals z (unit variance per pixel), temporal means, temporal SDs."""
    x = _tiles(_as_stack(stack), max_pixels)
    r = detrend(x, 1)
    sd = np.sqrt((r * r).mean(0))
    z = (r / np.where(sd > 0, sd, 1.0)).astype(np.float32)
    return z, x.mean(0, dtype=np.float64), sd


def _noise_corr(z: np.ndarray, m: np.ndarray) -> NoiseCorrelation:
    lo = np.percentile(m, DARK_PERCENTILE)
    vals = []
    for lag, shifts in ((0, ((0, 1), (1, 0))), (1, ((0, 1), (1, 0))), (0, ((0, 2), (2, 0)))):
        tot, n = 0.0, 0
        for dy, dx in shifts:
            c, a, b = _pair_corr(z, dy, dx, lag)
            v, k = _select_mean(c, m, a, b, lo, None, both=False)
            if k:
                tot, n = tot + v * k, n + k
        vals.append(tot / n if n else 0.0)
    return NoiseCorrelation(lag0=vals[0], lag1=vals[1], lag0_d2=vals[2])


# ----------------------------------------------------------------------------- public
def background_noise_correlation(stack: npt.ArrayLike, *, max_pixels: int = 16384) -> NoiseCorrelation:
    """Neighbour correlations of the darkest quarter of the pixels (see :class:`NoiseCorrelation`).

    Camera processing (e.g. on-chip filtering) makes neighbours share noise within a frame but
    not across frames; SOFI uses this to choose time-lag cumulants (``lag="auto"``).
    """
    z, m, _ = _residuals(stack, max_pixels)
    return _noise_corr(z, m)


def assess_blinking(stack: npt.ArrayLike, *, far_px: int = 8, threshold: float = BLINKING_THRESHOLD,
                    max_pixels: int = 16384) -> BlinkingReport:
    """Whether ``stack`` (T >= 10, H, W) carries independent local fluctuations (see module doc)."""
    z, m, sd = _residuals(stack, max_pixels)
    t = z.shape[0]
    hi = np.percentile(m, SIGNAL_PERCENTILE)
    lo = np.percentile(m, BACKGROUND_PERCENTILE)
    far_px = int(min(far_px, max(2, min(m.shape[-2:]) // 2)))

    def pooled(shifts: tuple[tuple[int, int], ...], lo_: float | None, hi_: float | None, both: bool) -> float:
        tot, n = 0.0, 0
        for dy, dx in shifts:
            c, a, b = _pair_corr(z, dy, dx)
            v, k = _select_mean(c, m, a, b, lo_, hi_, both)
            if k:
                tot, n = tot + v * k, n + k
        return tot / n if n else float("nan")

    near = ((0, 1), (1, 0))
    far = ((0, far_px), (far_px, 0), (far_px, far_px), (far_px, -far_px))
    nb_sig = pooled(near, None, hi, False)
    nb_bg = pooled(near, lo, None, False)
    far_sig = pooled(far, None, hi, True)
    far_bg = pooled(far, lo, None, True)
    if not math.isfinite(far_sig):  # no two bright pixels far apart: flicker cannot be told apart
        far_sig = far_bg if math.isfinite(far_bg) else 0.0
    if not math.isfinite(far_bg):
        far_bg = 0.0
    local = (nb_sig - far_sig) - (nb_bg - far_bg)
    if not math.isfinite(local):
        local = 0.0
    noise = _noise_corr(z, m)
    bg_sd = float(sd[m < lo].mean()) if (m < lo).any() else 0.0
    contrast = float((m[m > hi].mean() - m[m < lo].mean()) / bg_sd) if bg_sd > 0 and (m > hi).any() else 0.0
    ok = bool(local >= threshold)
    if ok:
        reason = "independent blinking"
        message = (f"Independent blinking detected (local fluctuation correlation {local:.2f} >= "
                   f"{threshold:.2f}): SOFI can resolve structure.")
    else:
        findings = []
        if far_sig - far_bg > FLICKER_THRESHOLD:
            findings.append("the whole field flickers together")
        if noise.correlated:
            findings.append(f"neighbouring pixels share camera noise ({noise.lag0:.2f})")
        findings.append("static fluorescence and shot noise" if contrast > STATIC_CONTRAST else "shot noise only")
        reason = "; ".join(findings)
        message = (f"No independent blinking detected (local fluctuation correlation {local:.2f} < "
                   f"{threshold:.2f}; {reason}): {FAIL_SENTENCE}.")
    return BlinkingReport(
        ok=ok, local_correlation=local, neighbour_corr_signal=nb_sig, neighbour_corr_background=nb_bg,
        far_corr_signal=far_sig, far_corr_background=far_bg, background_corr_lag0=noise.lag0,
        background_corr_lag1=noise.lag1, contrast=contrast, threshold=float(threshold), n_frames=int(t),
        n_pixels=int(np.prod(m.shape)), reason=reason, message=message,
    )


def warm_up() -> None:
    """Run the check once on a tiny stack, so that numpy's lazy imports (numpy.ma, linalg: ~50 ms)
    happen while an engine loads, not at the first live check."""
    rng = np.random.default_rng(0)
    assess_blinking(rng.poisson(10.0, (MIN_FRAMES, 32, 32)).astype(np.uint16))


class BlinkingMonitor:
    """Runs :func:`assess_blinking` on a live stream, cheaply.

    ``add(frame)`` copies the frame into a ring of the newest ``frames`` frames (one memcpy) and,
    at the ``first``-th frame and then every ``every`` frames, evaluates the check on the ring.
    ``reset()`` on a gap or a shape change. ``changed`` is True right after the first report
    and whenever ``ok`` flipped (what a log should show).
    """

    def __init__(self, frames: int = 50, every: int = 50, first: int = 20, **check: Any) -> None:
        """``check``: keyword arguments for :func:`assess_blinking` (e.g. ``max_pixels``)."""
        if not (MIN_FRAMES <= first <= frames) or every < 1:
            raise ValueError(f"need {MIN_FRAMES} <= first <= frames and every >= 1, got {first}, {frames}, {every}")
        self.frames, self.every, self.first = int(frames), int(every), int(first)
        self._check = check
        self.report: BlinkingReport | None = None
        self.changed = False
        self.reset()

    def reset(self) -> None:
        self._ring: np.ndarray | None = None
        self._n = 0

    def add(self, frame: npt.ArrayLike) -> BlinkingReport | None:
        """Store one frame; run the check when due and return its fresh report (else None)."""
        return self.evaluate() if self.store(frame) else None

    def evaluate(self) -> BlinkingReport:
        """Run the check on the newest frames now (``store`` says when it is due)."""
        self.update(assess_blinking(self.snapshot(), **self._check))
        assert self.report is not None
        return self.report

    def store(self, frame: npt.ArrayLike) -> bool:
        """Copy one frame into the ring; True when a check is due now (the caller may run it elsewhere)."""
        f = np.asarray(frame)
        if self._ring is None or self._ring.shape[1:] != f.shape or self._ring.dtype != f.dtype:
            self._ring = np.empty((self.frames, *f.shape), dtype=f.dtype)
            self._n = 0
        self._ring[self._n % self.frames] = f
        self._n += 1
        self.changed = False
        return self._n == self.first or (self._n >= self.frames and self._n % self.every == 0)

    def snapshot(self) -> np.ndarray:
        """A copy of the newest frames (up to ``frames``), oldest first."""
        if self._ring is None:
            raise ValueError("no frames stored")
        if self._n <= self.frames:
            return self._ring[: self._n].copy()
        return np.roll(self._ring, -(self._n % self.frames), axis=0)

    def update(self, report: BlinkingReport) -> bool:
        """Adopt a report computed from a snapshot; True (and ``changed``) if it is the first or ``ok`` flipped."""
        prev, self.report = self.report, report
        self.changed = prev is None or prev.ok != report.ok
        return self.changed
