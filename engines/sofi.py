"""Second-order cross-cumulant SOFI with virtual pixels, batch and streaming.

Physics (thesis 004, ch. 3.2, eq. 3.3): for independently blinking emitters the cross-cumulant
of pixels r1, r2 is

    k2(r1, r2) = U((r1 - r2)/sqrt 2) * sum_k U^2((r1 + r2)/2 - r_k) w_k

i.e. an image with the squared PSF (sqrt 2 narrower) sampled at the pair's midpoint, times a
"distance factor" that depends only on the pair separation d:
U(d/sqrt 2) = exp(-d^2 / (4 sigma^2)) for a Gaussian PSF of width sigma (pixels). Here sigma is
the *pixel-integrated* PSF's (sigma^2 + 1/12 px^2, ``engines.psf``), which is what makes the
four sub-lattices below agree on simulated and real data.

Only pairs of *different* pixels are used: the auto-cumulant of one pixel carries the shot
and read noise variance, while noise in different pixels is independent and averages out of a
cross-cumulant (for a camera whose pixels have independent noise; see ``lag`` otherwise).

Output grid, (2H, 2W) float32, input pixel (i, j) -> output (2i..2i+1, 2j..2j+1):

    (2i,   2j)   "real"    mean of (i-1,j)x(i+1,j) and (i,j-1)x(i,j+1)     d = 2
    (2i,   2j+1) virtual   (i,j)x(i,j+1)                                   d = 1
    (2i+1, 2j)   virtual   (i,j)x(i+1,j)                                   d = 1
    (2i+1, 2j+1) virtual   mean of (i,j)x(i+1,j+1) and (i,j+1)x(i+1,j)     d = sqrt 2

Output pixel (2i+a, 2j+b) is therefore the cumulant at input position (i + a/2, j + b/2) in
pixel-centre coordinates: a quarter input pixel (half an output pixel) down-right of that output
pixel's centre under the block convention. ``SAMPLE_OFFSET_INPUT_PX`` records this for metrics.

Borders: a pair that would leave the frame is not used (no padding, so no pixel is ever paired
with itself). Real pixels on the first/last row or column use the one pair that exists; the
four corner real pixels, the last output row and the last output column have no pair and are 0.

What is cumulated (all options are exact in both the batch and the streaming form):

* Bleaching correction (``bleach_order``, default 2): each pixel's least-squares polynomial in
  time over the window is removed first (``engines.trend``: why a polynomial, why quadratic).
  ``bleach_order=0`` removes only the mean (plain covariance, no correction).
* Time lag (``lag``, default "auto"): the cumulant pairs a pixel at frame t with its partner at
  frame t + lag, symmetrised: 1/2 <dx(r1,t) dx(r2,t+lag) + dx(r2,t) dx(r1,t+lag)>. Camera noise
  that neighbouring pixels share within a frame (on-chip processing) vanishes at lag >= 1 while
  blinking, which lasts about a frame or longer, survives (weaker: the price of the lag).
  "auto" uses lag 1 when the darkest pixels' neighbour correlation at lag 0 exceeds that at lag 1
  by more than 0.1 (``engines.blinking.background_noise_correlation``; the real donut movie:
  0.31 vs -0.01), else lag 0. Streaming decides once per stream, on its first full window;
  ``reconstruct`` decides on the window it is given.
  The sum over the T - lag frame pairs is divided by T - lag - (bleach_order + 1) (unbiased
  for white noise at lag 0; at lag >= 1 the trend removal leaks about -(order+1)/(T-lag-order-1)
  of the lag-0 covariance, a small negative offset).

Distance-factor correction (``distance_factor=``). The PSF width comes from the optics
(``optics=`` or ``psf_fwhm_px=``; ``engines.psf``: NA / wavelength / pixel size, documented
defaults); a width is also fitted to every output (log(class mean) = const - d^2 / (4 sigma^2)
over d^2 = 1, 1, 2, 4, reported as ``output_info()["psf_fit_fwhm_px"]``, pixel integration removed).
  * "data" (default): the fit refines the optical width when it lies within 0.7x-1.5x of it
    (``engines.psf.FIT_BOUNDS``); otherwise it is rejected with a warning and the optical width is
    used. Why refine at all: on real cameras the correlations SOFI sees are wider than the
    textbook 0.51 lambda / NA (aberrations, emitters above and below focus). Two real STORM
    movies (SMLM-2013 tubulin, a Zhuang-lab sCMOS movie) fit 3.1-3.2 px where the optics say
    2.2-2.4 px, and only the fitted width balances their sub-lattices (max/min 1.03 vs 1.3-1.5).
    Why bound it: static samples, correlated camera noise and diffusion bend the fit far off
    (1.2 px on the static donut, 3 px for the 1.5 px optics of the diffusing nucleus).
  * "psf": always the optical width (the fit is only reported).
  * "none": raw cross-cumulants (classes not balanced: a checkerboard).
Each class is divided by its factor, so every class estimates sum_k U^2(r - r_k) w_k.

Cumulants can be negative where there is only noise; ``clip_negative=True`` (default, for
display) sets those to 0, ``clip_negative=False`` keeps the raw values (for statistics).
``output_dtype="float64"`` returns the image unrounded (exactness checks); default float32.

Streaming: ``push`` keeps float64 running sums over a ring of the last ``window`` frames: the
per-pixel time moments m_k = sum_t t^k x(t) (t counted back from the newest frame, k <= order;
shifting the time origin by one frame is a binomial update) and, for the six pair shifts, the
pair products x(r1, t) x(r2, t + lag). Each push adds the new frame's terms and subtracts the
leaving frame's: O(pixels) per frame, independent of the window. The trend projection is applied
when an image is assembled, from the moments (orthonormal polynomial basis of the centred time,
plus the l frames at each end of the window for a lag). Frames are stored relative to the
stream's first frame mean (no cumulant changes with a constant offset) and all sums are
recomputed from the ring every ``resync_every`` frames, so rounding can never accumulate.
Equal to ``reconstruct`` to ~1e-12 relative (tests/test_sofi.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from .base import EngineBase
from .blinking import MIN_FRAMES, NoiseCorrelation, background_noise_correlation
from .psf import FIT_BOUNDS, FWHM_TO_SIGMA, Optics, ResolvedPsf, effective_fwhm_px, optical_fwhm_px
from .registry import ENGINES
from .trend import MAX_ORDER, centred_times, polynomial_basis, polynomial_coefficients

logger = logging.getLogger(__name__)

SAMPLE_OFFSET_INPUT_PX = 0.25
FWHM_FIT_RANGE_PX = (1.0, 10.0)  # effective widths outside this are not even a fit
DEFAULT_BLEACH_ORDER = 2
AUTO = "auto"

# (dy, dx) from the first pixel of a pair to the second
SHIFT_H = (0, 1)
SHIFT_V = (1, 0)
SHIFT_D = (1, 1)
SHIFT_A = (1, -1)
SHIFT_H2 = (0, 2)
SHIFT_V2 = (2, 0)
SHIFTS = (SHIFT_H, SHIFT_V, SHIFT_D, SHIFT_A, SHIFT_H2, SHIFT_V2)

DistanceFactor = Literal["psf", "data", "none"]
BLEACH_NAMES = {0: "off", 1: "linear", 2: "quadratic", 3: "cubic"}
#: one pair class: its shift, then the slices of the first and the second pixel
_Region = tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]


def pair_slices(shift: tuple[int, int], h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(first, second) pixel regions for a shift: first[k] pairs with second[k]."""
    dy, dx = shift
    first = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    second = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
    return first, second


def distance_factor(d2: float, fwhm_px: float) -> float:
    """U(d / sqrt 2) for a Gaussian of this FWHM: exp(-d^2 / (4 sigma^2)), d^2 in pixels^2.

    ``fwhm_px`` is the width the pixels see, i.e. the pixel-integrated one.
    """
    sigma = fwhm_px * FWHM_TO_SIGMA
    return math.exp(-d2 / (4.0 * sigma * sigma))


def fit_fwhm_from_class_means(means: dict[float, list[float]]) -> float | None:
    """Least-squares fit of log(mean) = a - d^2 / (4 sigma^2); FWHM in pixels, or None if unusable.

    ``means`` maps d^2 to the mean cumulant of each class at that separation. The width is that
    of the pixel-integrated PSF (what the pixels see).
    """
    xs: list[float] = []
    ys: list[float] = []
    for d2, vals in means.items():
        for v in vals:
            if not (v > 0.0 and math.isfinite(v)):
                return None
            xs.append(d2)
            ys.append(math.log(v))
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0.0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if not slope < 0.0:
        return None
    sigma = math.sqrt(-1.0 / (4.0 * slope))
    fwhm = sigma / FWHM_TO_SIGMA
    lo, hi = FWHM_FIT_RANGE_PX
    return fwhm if lo <= fwhm <= hi else None


def _pair_regions(h: int, w: int) -> list[tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]]:
    return [(s, *pair_slices(s, h, w)) for s in SHIFTS]


def _product_sums(frames: torch.Tensor, lag: int) -> dict[tuple[int, int], torch.Tensor]:
    """Per shift: sum_t x_t(r) x_t(r + shift) (lag 0), or the symmetrised lagged sum
    sum_t [x_t(r) x_{t+l}(r + shift) + x_t(r + shift) x_{t+l}(r)] (lag l >= 1).

    Frame by frame, so memory stays O(H W).
    """
    h, w = frames.shape[1:]
    regions = _pair_regions(h, w)
    sums = {s: frames.new_zeros((h - s[0], w - abs(s[1]))) for s in SHIFTS}
    if lag == 0:
        for x in frames:
            for s, a, b in regions:
                sums[s].addcmul_(x[a], x[b])
        return sums
    for t in range(frames.shape[0] - lag):
        x, y = frames[t], frames[t + lag]
        for s, a, b in regions:
            sums[s].addcmul_(x[a], y[b]).addcmul_(x[b], y[a])
    return sums


def _binomial_shift(k: int, delta: float) -> np.ndarray:
    """(k, k) matrix S with sum (t + delta)^i x = sum_j S[i, j] sum t^j x."""
    S = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1):
            S[i, j] = math.comb(i, j) * delta ** (i - j)
    return S


class SofiEngine(EngineBase):
    """Second-order cross-cumulant SOFI on the last ``window`` frames (see module docstring)."""

    name = "sofi"
    upsample = 2
    min_window = ENGINES[name].min_window
    min_size = 2
    compute_dtype = torch.float64

    def __init__(
        self,
        window: int | None = None,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        weights: Any = None,
        optics: Optics | Mapping[str, Any] | None = None,
        psf_fwhm_px: float | None = None,
        distance_factor: DistanceFactor = "data",
        lag: int | str = AUTO,
        bleach_order: int = DEFAULT_BLEACH_ORDER,
        clip_negative: bool = True,
        output_dtype: str = "float32",
        resync_every: int = 10_000,
    ) -> None:
        if weights is not None:
            raise ValueError("sofi has no weights: it is computed from the data (pass weights=None)")
        if distance_factor not in ("data", "psf", "none"):
            raise ValueError(f"distance_factor must be 'psf', 'data' or 'none', got {distance_factor!r}")
        if psf_fwhm_px is not None and not (
            isinstance(psf_fwhm_px, (int, float)) and not isinstance(psf_fwhm_px, bool)
            and psf_fwhm_px > 0 and math.isfinite(psf_fwhm_px)
        ):
            raise ValueError(f"psf_fwhm_px must be a positive number of pixels, got {psf_fwhm_px!r}")
        if isinstance(bleach_order, bool) or not isinstance(bleach_order, (int, np.integer)) \
                or not 0 <= bleach_order <= MAX_ORDER:
            raise ValueError(f"bleach_order must be an integer 0..{MAX_ORDER} (0 = no bleaching correction), "
                             f"got {bleach_order!r}")
        if lag != AUTO and (isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or lag < 0):
            raise ValueError(f"lag must be 'auto' or an integer >= 0 frames, got {lag!r}")
        if output_dtype not in ("float32", "float64"):
            raise ValueError(f"output_dtype must be 'float32' or 'float64', got {output_dtype!r}")
        if resync_every < 1:
            raise ValueError(f"resync_every must be >= 1, got {resync_every}")
        # precision is accepted for API symmetry; cumulants are always accumulated in float64
        # (differences of large sums) and returned as float32
        super().__init__(ENGINES[self.name].default_window if window is None else window,
                         device=device, precision=precision)
        self.bleach_order = int(bleach_order)
        self.lag_setting: int | str = lag if lag == AUTO else int(lag)
        fixed = 0 if lag == AUTO else int(lag)
        if self.window - fixed - (self.bleach_order + 1) < 1:
            raise ValueError(
                f"sofi: window {self.window} is too short for lag {fixed} with bleach_order "
                f"{self.bleach_order}: it needs window > lag + bleach_order + 1 "
                f"(use a longer window, or bleach_order=0)")
        self.optics = Optics.coerce(optics)
        if psf_fwhm_px is not None:
            self.psf = ResolvedPsf(fwhm_px=float(psf_fwhm_px), source=f"psf_fwhm_px={float(psf_fwhm_px):g}")
        else:
            self.psf = self.optics.resolve()
        self.distance_factor: DistanceFactor = distance_factor
        self.clip_negative = bool(clip_negative)
        self.output_dtype = output_dtype
        self.resync_every = int(resync_every)
        self.last_fwhm_px: float | None = None  # optical-equivalent FWHM the last output's factors used
        self.last_fwhm_source: str | None = None  # "psf", "data", "psf (fit rejected)", "none"
        self.last_fit_fwhm_px: float | None = None  # optical-equivalent FWHM fitted to the last output
        self._fit_status = "not run"
        self._warning = ""
        self._warned = False
        self._lag: int | None = None if lag == AUTO else int(lag)
        self._lag_reason = "fixed" if lag != AUTO else "not decided yet"
        self._noise: NoiseCorrelation | None = None
        if lag == AUTO:  # its first live decision should not pay numpy's lazy imports (~50 ms)
            from .blinking import warm_up

            warm_up()
        self._reset_stream()

    @property
    def psf_fwhm_px(self) -> float:
        """The optical PSF FWHM in camera pixels (before pixel integration)."""
        return self.psf.fwhm_px

    @property
    def lag(self) -> int | None:
        """Lag of the last output (None until "auto" has decided)."""
        return self._lag

    # ------------------------------------------------------------------ info
    def output_info(self) -> dict[str, Any]:
        """What the last output used and where it came from (flat, JSON-ready; see ResultHeader.info)."""
        noise = self._noise
        info = dict(self.psf.info())
        info.update({
            "distance_factor": self.distance_factor,
            "distance_fwhm_px": None if self.last_fwhm_px is None else round(self.last_fwhm_px, 4),
            "psf_fit_fwhm_px": None if self.last_fit_fwhm_px is None else round(self.last_fit_fwhm_px, 4),
            "psf_fit": self._fit_status,
            "lag": self._lag,
            "lag_choice": "auto" if self.lag_setting == AUTO else "fixed",
            "lag_reason": self._lag_reason,
            "noise_corr_lag0": None if noise is None else round(noise.lag0, 4),
            "noise_corr_lag1": None if noise is None else round(noise.lag1, 4),
            "bleach_correction": BLEACH_NAMES[self.bleach_order],
            "window": self.window,
            "warning": self._warning,
        })
        return info

    # ------------------------------------------------------------------ lag choice
    def _decide_lag(self, frames: torch.Tensor) -> int:
        """The fixed lag, or the "auto" choice from these frames (see module docstring)."""
        if self.lag_setting != AUTO:
            return int(self.lag_setting)
        t = frames.shape[0]
        if t < MIN_FRAMES or t - 1 - (self.bleach_order + 1) < 1:
            self._noise = None
            self._lag_reason = f"auto: lag 0 (a {t}-frame window is too short to test the camera noise)"
            return 0
        noise = background_noise_correlation(frames.detach().to("cpu").numpy(), max_pixels=4096)
        self._noise = noise
        if noise.correlated:
            self._lag_reason = (f"auto: lag 1 (neighbouring dark pixels correlate {noise.lag0:.2f} at lag 0, "
                                f"{noise.lag1:.2f} at lag 1: correlated camera noise)")
            return 1
        self._lag_reason = f"auto: lag 0 (dark-pixel neighbour correlation {noise.lag0:.2f}: independent noise)"
        return 0

    # ------------------------------------------------------------------ batch
    def _residuals(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames minus each pixel's polynomial trend (order ``bleach_order``) over the window."""
        basis = torch.from_numpy(polynomial_basis(frames.shape[0], self.bleach_order)).to(frames)
        coef = torch.einsum("tk,thw->khw", basis, frames)
        return frames - torch.einsum("tk,khw->thw", basis, coef)

    def _batch_sums(self, frames: torch.Tensor, lag: int) -> tuple[dict[tuple[int, int], torch.Tensor], float]:
        t = frames.shape[0]
        if t - lag - (self.bleach_order + 1) < 1:
            raise ValueError(f"sofi: {t} frames are too few for lag {lag} with bleach_order {self.bleach_order}")
        sums = _product_sums(self._residuals(frames), lag)
        if lag:
            sums = {s: v.mul_(0.5) for s, v in sums.items()}
        return sums, 1.0 / (t - lag - (self.bleach_order + 1))

    def _reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        t, h, w = frames.shape
        self._lag = self._decide_lag(frames)
        num, scale = self._batch_sums(frames, self._lag)
        return self._assemble(num, scale, h, w)

    def reconstruct(self, stack: Any) -> np.ndarray:
        frames = self._stack_tensor(stack)
        with torch.inference_mode():
            out = self._reconstruct(frames)
        return self._to_output(out)

    def _to_output(self, img: torch.Tensor) -> np.ndarray:
        dt = torch.float64 if self.output_dtype == "float64" else torch.float32
        return np.ascontiguousarray(img.detach().to("cpu", dt).numpy())

    # ------------------------------------------------------------------ assembly
    def _fit(self, num: dict[tuple[int, int], torch.Tensor]) -> float | None:
        """Optical-equivalent PSF FWHM fitted to the class means of this output (None if impossible)."""
        sums = torch.stack([num[s].sum() for s in SHIFTS]).tolist()
        sizes = [num[s].numel() for s in SHIFTS]
        mean = {s: (v / n if n else float("nan")) for s, v, n in zip(SHIFTS, sums, sizes, strict=True)}
        n_diag, n_real = sizes[2] + sizes[3], sizes[4] + sizes[5]
        m_d = (sums[2] + sums[3]) / n_diag if n_diag else float("nan")
        m_r = (sums[4] + sums[5]) / n_real if n_real else float("nan")
        eff = fit_fwhm_from_class_means({1.0: [mean[SHIFT_H], mean[SHIFT_V]], 2.0: [m_d], 4.0: [m_r]})
        return None if eff is None else optical_fwhm_px(eff)

    def _fwhm(self, num: dict[tuple[int, int], torch.Tensor]) -> float | None:
        """Optical-equivalent PSF FWHM (pixels) for the distance factors of this output."""
        if self.distance_factor == "none":
            self.last_fwhm_px, self.last_fwhm_source, self.last_fit_fwhm_px = None, "none", None
            self._fit_status = "off"
            return None
        optical = self.psf.fwhm_px
        fit = self._fit(num)
        self.last_fit_fwhm_px = fit
        lo, hi = FIT_BOUNDS
        inside = fit is not None and lo * optical <= fit <= hi * optical
        if self.distance_factor == "psf":
            self._fit_status = ("impossible" if fit is None else
                                "check: agrees with the optics" if inside else "check: disagrees with the optics")
            self.last_fwhm_px, self.last_fwhm_source = optical, "psf"
            return optical
        if inside:
            self._set_fit_status("used", "")
            self.last_fwhm_px, self.last_fwhm_source = fit, "data"
            return fit
        why = ("no fit possible (class means not positive or not falling with distance)" if fit is None
               else f"fitted {fit:.2f} px is outside {lo:g}-{hi:g}x the optical {optical:.2f} px")
        self._set_fit_status("rejected",
                             f"PSF fit rejected: {why}; using the optical {optical:.2f} px ({self.psf.source})")
        self.last_fwhm_px, self.last_fwhm_source = optical, "psf (fit rejected)"
        return optical

    def _set_fit_status(self, status: str, warning: str) -> None:
        if status != self._fit_status and warning:  # once at WARNING; flapping near a bound at DEBUG
            logger.log(logging.DEBUG if self._warned else logging.WARNING, "sofi: %s", warning)
            self._warned = True
        self._fit_status, self._warning = status, warning

    def _assemble(self, num: dict[tuple[int, int], torch.Tensor], scale: float, h: int, w: int) -> torch.Tensor:
        """Interleave the four pixel classes of ``scale * num`` into the (2H, 2W) image."""
        dev = num[SHIFT_H].device
        fwhm = self._fwhm(num)
        f1 = f2 = f4 = 1.0
        if fwhm is not None:
            eff = effective_fwhm_px(fwhm)
            f1, f2, f4 = (distance_factor(d2, eff) for d2 in (1.0, 2.0, 4.0))
        dt = torch.float64 if self.output_dtype == "float64" else torch.float32
        out = torch.zeros((2 * h, 2 * w), device=dev, dtype=dt)
        # real pixels: mean over the pairs that exist (interior rows/cols have both)
        real_sum = self._scratch("real_sum", (h, w), num[SHIFT_H].dtype, dev).zero_()
        real_sum[1:h - 1, :] = num[SHIFT_V2]
        real_sum[:, 1:w - 1] += num[SHIFT_H2]
        real_sum.mul_(self._real_weights(h, w, dev, real_sum.dtype))
        torch.mul(real_sum, scale / f4, out=out[0::2, 0::2])
        torch.mul(num[SHIFT_H], scale / f1, out=out[0::2, 1::2][:, : w - 1])
        torch.mul(num[SHIFT_V], scale / f1, out=out[1::2, 0::2][: h - 1, :])
        torch.mul(num[SHIFT_D] + num[SHIFT_A], 0.5 * scale / f2, out=out[1::2, 1::2][: h - 1, : w - 1])
        if self.clip_negative:
            out.clamp_(min=0.0)
        return out

    def _scratch(self, name: str, shape: tuple[int, ...], dt: torch.dtype, dev: torch.device) -> torch.Tensor:
        """A reusable work buffer (allocating ~MB arrays per frame costs page faults, not just time)."""
        bufs = self.__dict__.setdefault("_bufs", {})
        b = bufs.get(name)
        if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dt or b.device != dev:
            b = bufs[name] = torch.empty(shape, dtype=dt, device=dev)
        return b

    def _real_weights(self, h: int, w: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
        """1 / (number of pairs) per real pixel: 1/2 inside, 1 on edges, corners (no pair) 0."""
        key = (h, w, str(dev), dt)
        if getattr(self, "_weights_key", None) != key:
            c = torch.zeros((h, w), device=dev, dtype=dt)
            c[1:h - 1, :] += 1
            c[:, 1:w - 1] += 1
            self._weights = torch.where(c > 0, 1.0 / c.clamp(min=1.0), torch.zeros_like(c))
            self._weights_key = key
        return self._weights

    # ------------------------------------------------------------------ streaming
    def _reset_stream(self) -> None:
        """Forget every frame and sum, and drop the buffers (a new frame shape)."""
        self._ring: torch.Tensor | None = None
        self._moments: torch.Tensor | None = None  # (K, H, W): sum_t t^k x, t = 0 for the newest
        self._pairs: dict[tuple[int, int], torch.Tensor] = {}
        self._regions: list[_Region] = []
        self._stream_lag: int | None = None
        # time origin moves one frame back per push: m_k <- sum_j C(k,j) (-1)^(k-j) m_j
        self._shift = _binomial_shift(self.bleach_order + 1, -1.0)
        self._consts: dict[str, np.ndarray] | None = None
        self._plan: _StreamPlan | None = None
        self._restart()

    def _restart(self) -> None:
        """Forget the frames (the buffers stay: a worker catching up restarts often, and
        re-allocating ~10 MB each time costs more in page faults than the restart itself)."""
        self._n = 0             # frames pushed since reset
        self._head = 0          # ring slot of the next frame (= the oldest once full)
        self._offset = 0.0
        self._since_resync = 0

    def reset(self) -> None:
        """Forget the frames and sums. An "auto" lag chosen for this frame shape is kept: it is a
        property of the camera, and re-deciding on every catch-up restart would cost each time."""
        super().reset()
        self._restart()

    def _ordered_ring(self) -> torch.Tensor:
        """The ring's frames oldest first."""
        assert self._ring is not None
        if self._n < self.window:
            return self._ring[: self._n]
        if self._head == 0:  # (the first full window after a reset)
            return self._ring
        return torch.roll(self._ring, -self._head, dims=0)

    def _resync(self) -> None:
        """Recompute every running sum exactly from the ring (bounds accumulated rounding)."""
        frames = self._ordered_ring()
        n = frames.shape[0]
        t = torch.arange(-(n - 1), 1, device=frames.device, dtype=frames.dtype)
        k = self.bleach_order + 1
        powers = torch.stack([t**j for j in range(k)], dim=1)  # (n, K)
        moments = torch.einsum("tk,thw->khw", powers, frames)
        pairs = _product_sums(frames, self._stream_lag or 0)
        if self._moments is None:
            self._moments, self._pairs = moments, pairs
        else:  # in place: the stream plan holds views of these buffers
            self._moments.copy_(moments)
            for s_, v in pairs.items():
                self._pairs[s_].copy_(v)
        self._since_resync = 0

    def _stream_lag_for(self, h: int, w: int) -> int:
        cache = self.__dict__.setdefault("_lag_by_shape", {})
        if self.lag_setting != AUTO:
            return int(self.lag_setting)
        if (h, w) not in cache:
            cache[(h, w)] = (self._decide_lag(self._ordered_ring()), self._lag_reason, self._noise)
        lag, self._lag_reason, self._noise = cache[(h, w)]
        return lag

    def push(self, frame: Any, *, output: bool = True) -> np.ndarray | None:
        """Add one frame; the newest window's image once it is full. ``output=False`` only
        updates the running sums (a companion that needs an image now and then: ``current()``)."""
        x = self._frame_tensor(frame)
        h, w = int(x.shape[0]), int(x.shape[1])
        T = self.window
        with torch.inference_mode():
            if self._ring is not None and tuple(self._ring.shape[1:]) != (h, w):
                self._reset_stream()  # a new frame shape after reset(): new buffers
            if self._n == 0:
                self._frame_shape = (h, w)
                self._offset = float(x.mean())
            if self._ring is None:
                self._ring = torch.zeros((T, h, w), device=self.device, dtype=self.compute_dtype)
                self._regions = _pair_regions(h, w)
            plan = self._plan
            slot = self._ring[self._head]
            if self._n >= T:  # running sums exist: take the oldest frame out, move the time origin
                assert plan is not None
                plan.add_pairs(self._head, (self._head + plan.lag) % T, -1.0)
                plan.drop_and_shift(slot)
            torch.sub(x, self._offset, out=slot)
            self._head = (self._head + 1) % T
            self._n += 1
            if self._n < T:
                return None
            if self._n == T:  # first full window: decide the lag, build the sums from the ring
                lag = self._stream_lag_for(h, w)
                if lag != self._stream_lag:
                    self._moments, self._pairs, self._plan, self._consts = None, {}, None, None
                self._stream_lag = self._lag = lag
                self._resync()
                if self._plan is None:
                    assert self._moments is not None
                    self._plan = _StreamPlan(self, h, w, ring=self._ring, moments=self._moments, pairs=self._pairs,
                                             regions=self._regions, lag=lag, consts=self._stream_constants(),
                                             shift=self._shift)
                plan = self._plan
            else:
                assert plan is not None
                plan.moments[0].add_(slot)
                newest = (self._head - 1) % T
                plan.add_pairs((newest - plan.lag) % T, newest, +1.0)
                self._since_resync += 1
                if self._since_resync >= self.resync_every:
                    self._resync()
            return self._to_output(plan.image(self._head, self._assemble)) if output else None

    def current(self) -> np.ndarray | None:
        """The image of the newest full window (None before ``window`` frames were pushed)."""
        if self._n < self.window or self._plan is None:
            return None
        with torch.inference_mode():
            return self._to_output(self._plan.image(self._head, self._assemble))

    def _stream_constants(self) -> dict[str, np.ndarray]:
        """Basis matrices for the window (depend only on T, order and lag): computed once."""
        if self._consts is not None:
            return self._consts
        T, order, lag = self.window, self.bleach_order, self._stream_lag or 0
        k = order + 1
        C = polynomial_coefficients(T, order)  # Bn = U C, U = centred monomials
        c = -(T - 1) / 2.0  # window centre in "newest = 0" time
        to_centred = _binomial_shift(k, -c)  # mu_i = sum_j to_centred[i, j] m_j
        consts: dict[str, np.ndarray] = {"a_from_m": C.T @ to_centred}
        if lag:
            u = centred_times(T)

            def basis_at(times: np.ndarray) -> np.ndarray:  # Bn_k evaluated at any centred times
                return np.stack([times**j for j in range(k)], axis=1) @ C

            B = basis_at(u)
            M = B[: T - lag].T @ basis_at(u[: T - lag] + lag)  # sum_t Bn_j(t) Bn_k(t + lag)
            # full-window sums of x(t) Bn_k(t +- lag), as matrices on the centred moments
            full_plus = (C.T @ _binomial_shift(k, float(lag))) @ to_centred
            full_minus = (C.T @ _binomial_shift(k, float(-lag))) @ to_centred
            consts.update({
                "f_from_m": full_plus + full_minus,
                "half_N": 0.5 * (M + M.T),
                # boundary weights: h drops the newest lag frames (Bn(t + lag)), e the oldest (Bn(t - lag))
                "w_newest": basis_at(u[T - lag:] + lag),  # (lag, K), oldest of those first
                "w_oldest": basis_at(u[:lag] - lag),
            })
        self._consts = consts
        return consts



class _StreamPlan:
    """Views and constants for one stream's per-frame work, built once (at the first full window).

    Why: at 128 x 128 the per-frame arithmetic is ~1 ms, and creating the ~100 tensor views it
    touches (ring slot x pair region, trend coefficient x region) cost about as much again.
    """

    def __init__(self, eng: SofiEngine, h: int, w: int, *, ring: torch.Tensor, moments: torch.Tensor,
                 pairs: dict[tuple[int, int], torch.Tensor], regions: list[_Region], lag: int,
                 consts: dict[str, np.ndarray], shift: np.ndarray) -> None:
        self.h, self.w = h, w
        self.T, self.lag, self.k = eng.window, lag, eng.bleach_order + 1
        dt, dev = eng.compute_dtype, eng.device
        self.regions = regions
        self.moments = [moments[i] for i in range(self.k)]
        self.slot_views = [[(ring[i][a], ring[i][b]) for _, a, b in regions] for i in range(self.T)]
        self.pair_bufs = [pairs[s] for s, _, _ in regions]
        c = consts
        t_old = -(self.T - 1.0)
        self.drop_weights = [-(t_old**i) for i in range(self.k)]
        S = shift
        self.shift_terms = [(i, j, float(S[i, j])) for i in range(self.k - 1, 0, -1) for j in range(i)]
        self.a = torch.empty((self.k, h, w), dtype=dt, device=dev)
        self.a_from_m = c["a_from_m"]
        if self.lag:
            self.f = torch.empty((self.k, h, w), dtype=dt, device=dev)
            self.g = torch.empty((self.k, h, w), dtype=dt, device=dev)
            self.f_from_m, self.half_N = c["f_from_m"], c["half_N"]
            self.w_newest, self.w_oldest = c["w_newest"], c["w_oldest"]
            self.ring_slots = [ring[i] for i in range(self.T)]
        g = self.g if self.lag else self.a
        self.nums = {s: torch.empty_like(pairs[s]) for s, _, _ in regions}
        # per shift: (pair sum, output buffer, [(a_first, g_second, g_first, a_second) per trend term])
        self.terms = [(pairs[s], self.nums[s], [(self.a[j][a], g[j][b], g[j][a], self.a[j][b])
                                                for j in range(self.k)]) for s, a, b in regions]

    def add_pairs(self, early: int, late: int, sign: float) -> None:
        """Pair products of ring slots (early, late) (the same slot twice at lag 0)."""
        ev, lv = self.slot_views[early], self.slot_views[late]
        if self.lag:
            for buf, (e_a, e_b), (l_a, l_b) in zip(self.pair_bufs, ev, lv, strict=True):
                buf.addcmul_(e_a, l_b, value=sign).addcmul_(e_b, l_a, value=sign)
        else:
            for buf, (e_a, e_b) in zip(self.pair_bufs, ev, strict=True):
                buf.addcmul_(e_a, e_b, value=sign)

    def drop_and_shift(self, oldest: torch.Tensor) -> None:
        """Remove the oldest frame's moments, then move the time origin one frame back (in place,
        highest moment first: it needs the old lower ones)."""
        m = self.moments
        for i, wgt in enumerate(self.drop_weights):
            m[i].add_(oldest, alpha=wgt)
        for i, j, c in self.shift_terms:
            m[i].add_(m[j], alpha=c)

    def image(self, head: int, assemble: Callable[[dict[tuple[int, int], torch.Tensor], float, int, int],
                                                  torch.Tensor]) -> torch.Tensor:
        """The window's image; ``head`` is the engine's oldest ring slot, ``assemble`` its interleaver."""
        T, lag, k = self.T, self.lag, self.k
        _combine(self.a_from_m, self.moments, self.a)  # orthonormal trend coefficients per pixel
        if lag:
            f, slots = self.f, self.ring_slots  # head = the oldest slot (ring full)
            _combine(self.f_from_m, self.moments, f)
            for j in range(lag):  # h drops the newest lag frames, e the oldest lag frames
                newest, oldest = slots[(head - lag + j) % T], slots[(head + j) % T]
                for i in range(k):
                    f[i].add_(newest, alpha=-float(self.w_newest[j, i])).add_(oldest, alpha=-float(self.w_oldest[j, i]))
            _combine(self.half_N, self.a, self.g, alpha=-1.0, add_to=f)
        num = {}
        for (s, _, _), (pairs, out, terms) in zip(self.regions, self.terms, strict=True):
            a0, g0, g0a, a0b = terms[0]
            torch.addcmul(pairs, a0, g0, value=-1.0, out=out)
            if lag:
                out.addcmul_(g0a, a0b, value=-1.0)
            for a_f, g_s, g_f, a_s in terms[1:]:
                out.addcmul_(a_f, g_s, value=-1.0)
                if lag:
                    out.addcmul_(g_f, a_s, value=-1.0)
            num[s] = out.mul_(0.5) if lag else out
        return assemble(num, 1.0 / (T - lag - k), self.h, self.w)


def _combine(mat: np.ndarray, x: Sequence[torch.Tensor] | torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
             add_to: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = add_to[i] + alpha * sum_j mat[i, j] x[j] (a few axpys: einsum is slow on CPU here)."""
    for i in range(mat.shape[0]):
        if add_to is None:
            torch.mul(x[0], alpha * float(mat[i, 0]), out=out[i])
        else:
            torch.add(add_to[i], x[0], alpha=alpha * float(mat[i, 0]), out=out[i])
        for j in range(1, mat.shape[1]):
            c = alpha * float(mat[i, j])
            if c != 0.0:
                out[i].add_(x[j], alpha=c)
    return out
