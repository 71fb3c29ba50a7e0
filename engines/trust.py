"""The live trust signal of the network engines: does this image show what the data support?

Why a companion SOFI: a network's 20-frame image is an estimate of the expected second-order
cumulant (ADU^2), exactly what SOFI of a long acquisition measures on the same pixel grid.
So the worker runs a streaming SOFI over the last ``window`` frames (default 100) next to the
network (O(pixels) per frame: ``push(output=False)``; an image only when one is compared) and
reports the **agreement**, the Pearson correlation of the two images after a light blur (both
blurred by ``blur_px`` output pixels, a 3-pixel border left out, where SOFI's last row and
column are empty). A network that draws what the data carry agrees with what the data show
after 5x more frames; one that draws its prior does not.

Why also an out-of-domain check: the agreement needs a full companion window and cannot say
*why* a network fails. The input itself says when it leaves the training range
(``engines.data.DataConfig``), from the first frames:

* the blinking check failed (``engines.blinking``): no independent blinking, so there is
  nothing to super-resolve (the static donut);
* the PSF FWHM in camera pixels is outside the training range 1.2-3.5 px (the width SOFI's
  distance factors use: the optics, refined by the bounded fit to the data);
* the input SNR proxy (:func:`frame_snr`: the 99th percentile above the median, in units of
  the robust noise SD) is outside what the training domain produces (``SNR_RANGE``).

``TrustReport.ok`` is True when the agreement was measured, is at least ``min_agreement`` and
no input check failed; False when any failed; None while it cannot be told yet (the companion
window is not full). The thresholds are calibrated on held-out simulations of the training
domain (``python -m benchmarks.trust_calibration``; numbers in engines/weights/MODEL_CARD.md).

numpy / scipy and the SOFI engine only; no Qt.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.blinking import BlinkingReport

__all__ = [
    "MIN_AGREEMENT",
    "PSF_RANGE_PX",
    "SNR_RANGE",
    "TRUST_PREFIX",
    "TrustConfig",
    "TrustMonitor",
    "TrustReport",
    "TrustTally",
    "agreement",
    "frame_snr",
]

#: the worker's latest blinking check: the report, its ``as_dict()`` (from another process), or
#: None before the first check
Blinking = Union[BlinkingReport, Mapping[str, Any], None]

#: ResultHeader.info keys of the trust signal start with this
TRUST_PREFIX = "trust."
#: the training range of the PSF FWHM, camera pixels (engines.data.DataConfig.fwhm_px)
PSF_RANGE_PX = (1.2, 3.5)
#: the training domain's frame_snr range: its 0.5th and 99.5th percentiles over 2000 frames of
#: 400 DataConfig scenes (python -m benchmarks.trust_calibration, MODEL_CARD.md "Trust signal")
SNR_RANGE = (1.3, 400.0)
#: agreement below this is flagged: the lower of the networks' 5th percentiles of the in-domain
#: agreement with SOFI of the last 100 frames, over held-out static blinking scenes the input
#: checks pass (benchmarks.trust_calibration; in-progress weights, MODEL_CARD.md "Trust signal")
MIN_AGREEMENT = 0.4
DEFAULT_WINDOW = 100
WARNING_SEPARATOR = " | "  # between the warnings in the flat "trust.warnings" (a reason may hold "; ")
SNR_PIXELS = 4096  # frame_snr looks at a strided subsample of at most this many pixels
SNR_EVERY = 10  # frames between two SNR measurements
SNR_KEEP = 9  # the reported SNR is the median of this many measurements
SNR_MIN_REL_SCALE = 1e-3  # = engines.nn_common.NormConfig.min_rel_scale (that module imports torch)


def frame_snr(frame: npt.ArrayLike, *, max_pixels: int = SNR_PIXELS) -> float:
    """The input SNR proxy: (99th percentile - median) / (1.4826 MAD) of one frame.

    The median is the camera offset plus background (blinking frames are sparse) and the MAD
    the background noise, the normalisation the networks themselves use
    (``engines.nn_common.NormConfig``), so this is how bright the brightest 1 % of the pixels
    look to the network, in noise SDs. On a strided subsample: ~0.1 ms.
    """
    x = np.asarray(frame)
    if x.ndim != 2:
        raise ValueError(f"frame must be 2-D, got shape {x.shape}")
    step = max(1, int(math.ceil(math.sqrt(x.size / max_pixels))))
    s = np.asarray(x[::step, ::step], dtype=np.float64).ravel()
    med = float(np.median(s))
    mad = 1.4826 * float(np.median(np.abs(s - med)))
    top = float(np.percentile(s, 99.0))
    # the networks' own floor on the scale (NormConfig.min_rel_scale): integer-valued frames of
    # a low-noise camera have MAD 0, and the network then sees the signal in units of 1/1000 of
    # the frame's range; so a noise-free or constant frame is SNR 1000 (or 0), never infinite
    scale = max(mad, SNR_MIN_REL_SCALE * (float(s.max()) - float(s.min())))
    return (top - med) / scale if scale > 0 else 0.0


def agreement(output: np.ndarray, reference: np.ndarray, *, blur_px: float = 1.0, border: int = 3) -> float | None:
    """Pearson correlation of two same-grid images after a Gaussian blur of ``blur_px`` pixels,
    without a ``border``; None when either is constant (nothing to compare)."""
    a = np.asarray(output, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output {a.shape} and reference {b.shape} differ in shape")
    if blur_px > 0:
        a = ndimage.gaussian_filter(a, blur_px, mode="nearest")
        b = ndimage.gaussian_filter(b, blur_px, mode="nearest")
    if border > 0 and min(a.shape) > 2 * border + 1:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    # elementwise sums, not BLAS dot products: a BLAS thread pool spinning against the engine
    # on a busy machine made this 40 ms instead of 0.1 ms
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    if not den > 0:
        return None
    return float(np.sum(a * b)) / den


@dataclass(frozen=True)
class TrustConfig:
    """How the worker checks a network's output (see the module docstring)."""

    window: int = DEFAULT_WINDOW  # frames of the companion SOFI
    every_s: float = 0.5  # the agreement is computed at most this often (cost; GUI rate)
    blur_px: float = 1.0  # Gaussian blur (output pixels) of both images before the Pearson
    min_agreement: float = MIN_AGREEMENT
    psf_range_px: tuple[float, float] = PSF_RANGE_PX
    snr_range: tuple[float, float] = SNR_RANGE
    sofi: Mapping[str, Any] = field(default_factory=dict)  # the companion's SOFI options (optics, lag, ...)

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 10:
            raise ValueError(f"trust window must be an integer >= 10 frames, got {self.window!r}")
        if not self.every_s >= 0:
            raise ValueError(f"every_s must be >= 0, got {self.every_s!r}")
        if not self.blur_px >= 0:
            raise ValueError(f"blur_px must be >= 0, got {self.blur_px!r}")
        if not -1.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [-1, 1], got {self.min_agreement!r}")

    @classmethod
    def coerce(cls, value: TrustConfig | Mapping[str, Any] | None) -> TrustConfig:
        """A TrustConfig from itself, a mapping of its fields (what travels to a worker) or None."""
        if value is None:
            return cls()
        if isinstance(value, TrustConfig):
            return value
        known = set(cls.__dataclass_fields__)
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown trust option(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(value)
        for k in ("psf_range_px", "snr_range"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class TrustReport:
    """The trust verdict that rides on a network output (``info()``: flat ``trust.*`` keys)."""

    ok: bool | None  # None: not known yet
    agreement: float | None  # with SOFI of the last `reference_frames` frames
    reason: str  # "agrees", "low agreement", "out of domain", "checking"
    message: str  # one plain sentence for the user
    warnings: tuple[str, ...] = ()
    reference_frames: int = DEFAULT_WINDOW
    frames_seen: int = 0
    measured_at: int | None = None  # the frame (seq) the agreement was measured at
    min_agreement: float = MIN_AGREEMENT
    psf_fwhm_px: float | None = None
    snr: float | None = None

    def info(self) -> dict[str, Any]:
        """Flat JSON-ready keys for ``ResultHeader.info`` (the warnings joined by ``WARNING_SEPARATOR``)."""
        def r(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {
            "trust.ok": self.ok,
            "trust.agreement": r(self.agreement),
            "trust.reason": self.reason,
            "trust.message": self.message[:500],
            "trust.warnings": WARNING_SEPARATOR.join(self.warnings)[:500],
            "trust.reference_frames": int(self.reference_frames),
            "trust.measured_at": self.measured_at,
            "trust.min_agreement": r(self.min_agreement),
            "trust.psf_fwhm_px": r(self.psf_fwhm_px),
            "trust.snr": r(self.snr),
        }


class TrustMonitor:
    """The companion SOFI and input statistics of one stream; ``assess`` gives the verdict.

    ``add(frame, seq)`` for every frame the network sees (cheap), ``reset()`` on a gap or a
    shape change, ``assess(output, seq, blinking=)`` with each network output: it computes a
    new agreement when ``every_s`` has passed since the last one (else it reuses it) and
    returns the report; ``reference`` is then the companion's newest image and its frame range.
    """

    def __init__(self, config: TrustConfig | Mapping[str, Any] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from engines.sofi import SofiEngine  # torch: only where a network runs anyway

        self.config = TrustConfig.coerce(config)
        opts = dict(self.config.sofi)
        self._sofi = SofiEngine(window=self.config.window, **opts)
        self._clock = clock
        self.reference: tuple[np.ndarray, int, int] | None = None  # (image, seq_first, seq_last)
        self.fresh_reference = False  # a new reference image since the last assess()
        self.report: TrustReport | None = None
        self.reset()

    @property
    def window(self) -> int:
        return self.config.window

    def reset(self) -> None:
        """Forget the frames (a gap or a new shape); the lag SOFI chose for this camera stays."""
        self._sofi.reset()
        self._n = 0
        self._last_seq: int | None = None
        self._snrs: list[float] = []
        self._agreement: float | None = None
        self._measured_at: int | None = None
        self._t_last: float | None = None
        self.reference = None

    def add(self, frame: npt.ArrayLike, seq: int | None = None) -> None:
        """Feed one frame to the companion SOFI (running sums only) and, now and then, the SNR proxy."""
        if self._n % SNR_EVERY == 0:
            self._snrs = (self._snrs + [frame_snr(frame)])[-SNR_KEEP:]
        self._sofi.push(frame, output=False)
        self._n += 1
        self._last_seq = seq if seq is not None else self._n - 1

    @property
    def frames_seen(self) -> int:
        return self._n

    def snr(self) -> float | None:
        return float(np.median(self._snrs)) if self._snrs else None

    def psf_fwhm_px(self) -> float:
        """The PSF width SOFI uses: the optics, refined by its bounded fit once an image was made."""
        fitted = self._sofi.last_fwhm_px
        return float(fitted) if fitted is not None else float(self._sofi.psf_fwhm_px)

    def input_warnings(self, blinking: Blinking = None) -> list[str]:
        """Why the input is outside the training range (empty when it is not, as far as known)."""
        out = []
        check = blinking.as_dict() if isinstance(blinking, BlinkingReport) else (blinking or {})
        if check and check.get("ok") is False:
            out.append(f"no independent blinking ({check.get('reason') or 'blinking check failed'})")
        lo, hi = self.config.psf_range_px
        psf = self.psf_fwhm_px()
        if not lo <= psf <= hi:
            out.append(f"PSF FWHM {psf:.2f} px is outside the training range {lo:g}-{hi:g} px")
        snr = self.snr()
        slo, shi = self.config.snr_range
        if snr is not None and not slo <= snr <= shi:
            side = "fainter" if snr < slo else "brighter"
            out.append(f"input SNR {snr:.1f} is {side} than the training range {slo:g}-{shi:g}")
        return out

    def _measure(self, output: np.ndarray, seq: int | None) -> None:
        ref = self._sofi.current()
        if ref is None:
            return
        if ref.shape != np.shape(output):
            raise ValueError(f"network output {np.shape(output)} and companion SOFI {ref.shape} differ in shape")
        self._agreement = agreement(output, ref, blur_px=self.config.blur_px)
        self._measured_at = seq if seq is not None else self._last_seq
        last = self._last_seq if self._last_seq is not None else self._n - 1
        self.reference = (ref, last - self.config.window + 1, last)
        self.fresh_reference = True

    def assess(self, output: np.ndarray, seq: int | None = None, *, blinking: Blinking = None,
               force: bool = False) -> TrustReport:
        """The verdict for this output (a new agreement if due, or ``force``)."""
        now = self._clock()
        if force or self._t_last is None or now - self._t_last >= self.config.every_s:
            if self._n >= self.config.window:
                self._measure(output, seq)
                self._t_last = now
        self.report = self._report(blinking)
        return self.report

    def _report(self, blinking: Blinking) -> TrustReport:
        cfg = self.config
        warnings = self.input_warnings(blinking)
        a = self._agreement
        ref = f"SOFI of the last {cfg.window} frames"
        if a is not None and a < cfg.min_agreement:
            warnings.append(f"agreement {a:.2f} with {ref} is below {cfg.min_agreement:.2f}")
        psf, snr = self.psf_fwhm_px(), self.snr()

        def report(ok: bool | None, reason: str, message: str) -> TrustReport:
            return TrustReport(ok=ok, reason=reason, message=message, agreement=a, warnings=tuple(warnings),
                               reference_frames=cfg.window, frames_seen=self._n, measured_at=self._measured_at,
                               min_agreement=cfg.min_agreement, psf_fwhm_px=psf, snr=snr)

        if warnings:
            reason = "low agreement" if len(warnings) == 1 and a is not None and a < cfg.min_agreement \
                else "out of domain"
            return report(False, reason, "Do not trust this image: " + "; ".join(warnings) + ". Switch to SOFI.")
        if a is None:
            if self._n < cfg.window:
                msg = (f"Checking: the comparison with {ref} needs {cfg.window} frames "
                       f"({self._n} so far).")
            else:
                msg = f"Checking: nothing to compare yet (the network or {ref} shows a flat image)."
            return report(None, "checking", msg)
        return report(True, "agrees", f"Agrees with {ref} (r = {a:.2f} >= {cfg.min_agreement:.2f}): the network "
                      "shows what the data support.")


class TrustTally:
    """The ``--json`` ``trust`` summary, added up output by output (constant memory per output).

    ``add(info)`` takes a ResultHeader.info; only its ``trust.*`` keys count. Agreement
    statistics are over the distinct measurements (``measured_at``), the flagged share over
    every output that carried a verdict.
    """

    def __init__(self) -> None:
        self.outputs = self.flagged = self.pending = 0
        self._measured: dict[Any, float] = {}
        self.warnings: list[str] = []
        self._kinds: set[str] = set()
        self.last: dict[str, Any] = {}

    def add(self, info: Mapping[str, Any]) -> bool:
        """Count one output's verdict; False (nothing counted) when it carries none."""
        r = {k[len(TRUST_PREFIX):]: v for k, v in info.items() if k.startswith(TRUST_PREFIX)}
        if not r:
            return False
        self.outputs += 1
        if r.get("ok") is False:
            self.flagged += 1
        elif r.get("ok") is None:
            self.pending += 1
        a = r.get("agreement")
        if isinstance(a, (int, float)) and r.get("measured_at") is not None:
            self._measured[r["measured_at"]] = float(a)
        for w in str(r.get("warnings") or "").split(WARNING_SEPARATOR):
            kind = re.sub(r"[-+]?\d[\d.]*", "#", w)  # the numbers change from output to output
            if w and kind not in self._kinds:
                self._kinds.add(kind)
                self.warnings.append(w)
        self.last = r
        return True

    def summary(self) -> dict[str, Any] | None:
        """JSON-ready; None when no output carried a verdict (SOFI, or trust off)."""
        if not self.outputs:
            return None
        vals = list(self._measured.values())
        r = self.last
        return {
            "outputs": self.outputs,
            "outputs_flagged": self.flagged,
            "flagged_share": round(self.flagged / self.outputs, 4),
            "outputs_checking": self.pending,
            "agreement_median": round(float(np.median(vals)), 4) if vals else None,
            "agreement_min": round(float(min(vals)), 4) if vals else None,
            "agreement_measurements": len(vals),
            "min_agreement": r.get("min_agreement"),
            "reference_frames": r.get("reference_frames"),
            "warnings": list(self.warnings),
            "last": {k: r.get(k) for k in ("ok", "agreement", "reason", "message")},
        }
