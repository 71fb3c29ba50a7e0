"""Second-order cross-cumulant SOFI with virtual pixels, batch and streaming.

Physics (thesis 004, ch. 3.2, eq. 3.3): for independently blinking emitters the zero-lag
cross-cumulant of pixels r1, r2 is

    k2(r1, r2) = U((r1 - r2)/sqrt 2) * sum_k U^2((r1 + r2)/2 - r_k) w_k

i.e. an image with the squared PSF (sqrt 2 narrower) sampled at the pair's midpoint, times a
"distance factor" that depends only on the pair separation d:
U(d/sqrt 2) = exp(-d^2 / (4 sigma^2)) for a Gaussian PSF of width sigma (pixels).

Only pairs of *different* pixels are used: the auto-cumulant of one pixel carries the shot
and read noise variance, while noise in different pixels is independent and averages out of a
cross-cumulant (for a camera whose pixels have independent noise).

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

Distance-factor correction (``distance_factor=``):
  * "data" (default): the PSF width is fitted to the data, as the sofipackage/bSOFI flattening
    does: log(mean cumulant of a class) = const - d^2 / (4 sigma^2) over the four classes
    (d^2 = 1, 1, 2, 4), per output window. If the fit is impossible (a class mean <= 0, or
    the means do not fall with distance, as for noise-only data) the given ``psf_fwhm_px`` is
    used; ``last_fwhm_px`` / ``last_fwhm_source`` say what the last output used.
  * "psf": the factors come from ``psf_fwhm_px`` (FWHM of the PSF in input pixels; 2.2 =
    220 nm at 100 nm pixels, the simulator default).
  * "none": raw cross-cumulants (classes not balanced: a checkerboard).
Each class is divided by its factor, so every class estimates sum_k U^2(r - r_k) w_k.

Cumulants are the unbiased sample covariance over the window (divide by T - 1). They can be
negative where there is only noise; ``clip_negative=True`` (default, for display) sets those
to 0, ``clip_negative=False`` keeps the raw values (for statistics).

Streaming: ``push`` keeps float64 running sums of x and of x(r1) x(r2) for the six pair shifts
over a ring of the last ``window`` frames, adding the new frame's terms and subtracting the
leaving frame's: O(pixels) per frame, independent of the window. Frames are stored relative to
the stream's first frame mean (a covariance does not change with a constant offset) to keep the
sums small, and the sums are recomputed from the ring every ``resync_every`` frames so rounding
can never accumulate. Numerically equal to ``reconstruct`` (tests/test_sofi.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from .base import EngineBase

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
SAMPLE_OFFSET_INPUT_PX = 0.25
FWHM_FIT_RANGE_PX = (1.0, 10.0)  # a fitted width outside this is not trusted (fallback to psf_fwhm_px)

# (dy, dx) from the first pixel of a pair to the second
SHIFT_H = (0, 1)
SHIFT_V = (1, 0)
SHIFT_D = (1, 1)
SHIFT_A = (1, -1)
SHIFT_H2 = (0, 2)
SHIFT_V2 = (2, 0)
SHIFTS = (SHIFT_H, SHIFT_V, SHIFT_D, SHIFT_A, SHIFT_H2, SHIFT_V2)

DistanceFactor = Literal["data", "psf", "none"]


def pair_slices(shift: tuple[int, int], h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(first, second) pixel regions for a shift: first[k] pairs with second[k]."""
    dy, dx = shift
    first = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    second = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
    return first, second


def distance_factor(d2: float, fwhm_px: float) -> float:
    """U(d / sqrt 2) for a Gaussian PSF: exp(-d^2 / (4 sigma^2)), d^2 in pixels^2."""
    sigma = fwhm_px * FWHM_TO_SIGMA
    return math.exp(-d2 / (4.0 * sigma * sigma))


def fit_fwhm_from_class_means(means: dict[float, list[float]]) -> float | None:
    """Least-squares fit of log(mean) = a - d^2 / (4 sigma^2); FWHM in pixels, or None if unusable.

    ``means`` maps d^2 to the mean cumulant of each class at that separation.
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
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if not slope < 0.0:
        return None
    sigma = math.sqrt(-1.0 / (4.0 * slope))
    fwhm = sigma / FWHM_TO_SIGMA
    lo, hi = FWHM_FIT_RANGE_PX
    return fwhm if lo <= fwhm <= hi else None


def _product_sums(frames: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """sum_t x_t(r) x_t(r + shift) for each shift; frame by frame, so memory stays O(H W)."""
    h, w = frames.shape[1:]
    regions = [(s, *pair_slices(s, h, w)) for s in SHIFTS]
    sums = {s: frames.new_zeros((h - s[0], w - abs(s[1]))) for s in SHIFTS}
    for x in frames:
        for s, a, b in regions:
            sums[s].addcmul_(x[a], x[b])
    return sums


class SofiEngine(EngineBase):
    """Second-order cross-cumulant SOFI on the last ``window`` frames (see module docstring)."""

    name = "sofi"
    upsample = 2
    min_window = 2
    min_size = 2
    compute_dtype = torch.float64

    def __init__(
        self,
        window: int | None = None,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        weights: Any = None,
        distance_factor: DistanceFactor = "data",
        psf_fwhm_px: float = 2.2,
        clip_negative: bool = True,
        resync_every: int = 10_000,
    ) -> None:
        if weights is not None:
            raise ValueError("sofi has no weights: it is computed from the data (pass weights=None)")
        if distance_factor not in ("data", "psf", "none"):
            raise ValueError(f"distance_factor must be 'data', 'psf' or 'none', got {distance_factor!r}")
        if not (isinstance(psf_fwhm_px, (int, float)) and psf_fwhm_px > 0 and math.isfinite(psf_fwhm_px)):
            raise ValueError(f"psf_fwhm_px must be a positive number of pixels, got {psf_fwhm_px!r}")
        if resync_every < 1:
            raise ValueError(f"resync_every must be >= 1, got {resync_every}")
        # precision is accepted for API symmetry; cumulants are always accumulated in float64
        # (differences of large sums) and returned as float32
        super().__init__(20 if window is None else window, device=device, precision=precision)
        self.distance_factor: DistanceFactor = distance_factor
        self.psf_fwhm_px = float(psf_fwhm_px)
        self.clip_negative = bool(clip_negative)
        self.resync_every = int(resync_every)
        self.last_fwhm_px: float | None = None
        self.last_fwhm_source: str | None = None
        self._reset_stream()

    # ------------------------------------------------------------------ batch
    def pair_sums(self, frames: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """Sum over time of centred products for each shift (first-pixel region maps).

        Divided by T - 1 these are the cross-cumulant maps; centring on the per-pixel mean
        first is the numerically stable two-pass covariance.
        """
        return _product_sums(frames - frames.mean(dim=0, keepdim=True))

    def covariances(self, frames: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """Cross-cumulant maps of a (T, H, W) float tensor: {shift: (first-pixel region)}."""
        t = frames.shape[0]
        return {s: v / (t - 1) for s, v in self.pair_sums(frames).items()}

    def _reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        t, h, w = frames.shape
        return self._assemble(self.pair_sums(frames), 1.0 / (t - 1), h, w)

    # ------------------------------------------------------------------ assembly
    def _fwhm(self, num: dict[tuple[int, int], torch.Tensor]) -> float | None:
        """PSF FWHM (pixels) for the distance factors of this output, per ``distance_factor``."""
        if self.distance_factor == "none":
            self.last_fwhm_px, self.last_fwhm_source = None, "none"
            return None
        if self.distance_factor == "data":
            # class means; a common positive scale (1 / (T-1)) does not change the fitted width
            sums = torch.stack([num[s].sum() for s in SHIFTS]).tolist()
            sizes = [num[s].numel() for s in SHIFTS]
            mean = {s: (v / n if n else float("nan")) for s, v, n in zip(SHIFTS, sums, sizes)}
            n_diag = sizes[2] + sizes[3]
            m_d = (sums[2] + sums[3]) / n_diag if n_diag else float("nan")
            n_real = sizes[4] + sizes[5]
            m_r = (sums[4] + sums[5]) / n_real if n_real else float("nan")
            fwhm = fit_fwhm_from_class_means({1.0: [mean[SHIFT_H], mean[SHIFT_V]], 2.0: [m_d], 4.0: [m_r]})
            if fwhm is not None:
                self.last_fwhm_px, self.last_fwhm_source = fwhm, "data"
                return fwhm
            self.last_fwhm_px, self.last_fwhm_source = self.psf_fwhm_px, "psf-fallback"
            return self.psf_fwhm_px
        self.last_fwhm_px, self.last_fwhm_source = self.psf_fwhm_px, "psf"
        return self.psf_fwhm_px

    def _assemble(self, num: dict[tuple[int, int], torch.Tensor], scale: float, h: int, w: int) -> torch.Tensor:
        """Interleave the four pixel classes of ``scale * num`` into the (2H, 2W) float32 image."""
        dev = num[SHIFT_H].device
        fwhm = self._fwhm(num)
        f1 = f2 = f4 = 1.0
        if fwhm is not None:
            f1, f2, f4 = (distance_factor(d2, fwhm) for d2 in (1.0, 2.0, 4.0))
        out = torch.zeros((2 * h, 2 * w), device=dev, dtype=torch.float32)
        # real pixels: mean over the pairs that exist (interior rows/cols have both)
        real_sum = torch.zeros((h, w), device=dev, dtype=num[SHIFT_H].dtype)
        real_sum[1:h - 1, :] = num[SHIFT_V2]
        real_sum[:, 1:w - 1] += num[SHIFT_H2]
        torch.mul(real_sum, self._real_weights(h, w, dev, real_sum.dtype) * (scale / f4), out=out[0::2, 0::2])
        torch.mul(num[SHIFT_H], scale / f1, out=out[0::2, 1::2][:, : w - 1])
        torch.mul(num[SHIFT_V], scale / f1, out=out[1::2, 0::2][: h - 1, :])
        torch.mul(num[SHIFT_D] + num[SHIFT_A], 0.5 * scale / f2, out=out[1::2, 1::2][: h - 1, : w - 1])
        if self.clip_negative:
            out.clamp_(min=0.0)
        return out

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
        self._ring: torch.Tensor | None = None
        self._n = 0             # frames pushed since reset
        self._head = 0          # ring slot of the next frame
        self._offset = 0.0
        self._s1: torch.Tensor | None = None
        self._pairs: dict[tuple[int, int], torch.Tensor] = {}
        self._regions: list[tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]] = []
        self._since_resync = 0

    def reset(self) -> None:
        super().reset()
        self._reset_stream()

    def _add_terms(self, x: torch.Tensor, sign: float) -> None:
        assert self._s1 is not None
        self._s1.add_(x, alpha=sign)
        for s, a, b in self._regions:
            self._pairs[s].addcmul_(x[a], x[b], value=sign)

    def _resync(self) -> None:
        """Recompute the running sums exactly from the ring (bounds accumulated rounding)."""
        assert self._ring is not None
        n = min(self._n, self.window)
        frames = self._ring if n == self.window else self._ring[:n]
        self._s1 = frames.sum(dim=0)
        self._pairs = _product_sums(frames)
        self._since_resync = 0

    def push(self, frame: Any) -> np.ndarray | None:
        x = self._frame_tensor(frame)
        h, w = int(x.shape[0]), int(x.shape[1])
        with torch.inference_mode():
            if self._ring is None:
                self._frame_shape = (h, w)
                self._offset = float(x.mean())
                self._ring = torch.zeros((self.window, h, w), device=self.device, dtype=self.compute_dtype)
                self._s1 = torch.zeros((h, w), device=self.device, dtype=self.compute_dtype)
                self._regions = [(s, *pair_slices(s, h, w)) for s in SHIFTS]
                self._pairs = {s: torch.zeros_like(self._s1[a]) for s, a, _ in self._regions}
            slot = self._ring[self._head]
            if self._n >= self.window:
                self._add_terms(slot, -1.0)
            torch.sub(x, self._offset, out=slot)
            self._add_terms(slot, +1.0)
            self._head = (self._head + 1) % self.window
            self._n += 1
            self._since_resync += 1
            if self._since_resync >= self.resync_every:
                self._resync()
            if self._n < self.window:
                return None
            return self._to_numpy(self._image_from_sums(h, w))

    def _image_from_sums(self, h: int, w: int) -> torch.Tensor:
        assert self._s1 is not None
        t = float(self.window)
        s1 = self._s1
        num = {}
        for s, a, b in self._regions:
            num[s] = torch.addcmul(self._pairs[s], s1[a], s1[b], value=-1.0 / t)  # sum xy - sum x sum y / T
        return self._assemble(num, 1.0 / (t - 1.0), h, w)
