"""The microscope's PSF width in camera pixels, from the optics, and where that number came from.

Why from the optics: the SOFI distance factor (``engines.sofi``) depends steeply on the PSF width
(a real pixel's pair is 2 pixels apart, its factor is exp(-1/sigma^2)), and a width fitted to the
data is unreliable on real movies (static samples, correlated camera noise, bleaching and
diffusion all bend the fit: 1.2 to 8 px where the optics say ~2.4 px). The optics are known to
the user; a fit may only *check* them (see ``FIT_BOUNDS``).

Precedence, highest first (each resolved value carries a ``source`` string for the user):

    PSF FWHM:  an explicit ``psf_fwhm_nm``  ("--psf-fwhm-nm 250")
               else NA and emission wavelength: FWHM = 0.51 lambda / NA  ("NA 1.3 / 561 nm (0.51 lambda/NA)"),
               a missing one taken from the defaults below
               else the defaults  ("default NA 1.4 / 600 nm (0.51 lambda/NA)")
    pixel:     ``pixel_size_um`` with its ``pixel_size_source`` ("--pixel-size-um", "from core
               pixel-size config", "from file metadata"), else ``DEFAULT_PIXEL_SIZE_UM`` ("default 0.1 um").

The defaults (NA 1.4 oil objective, 600 nm emission, 0.1 um camera pixels in the sample) give
219 nm = 2.19 px, the simulator's 220 nm / 100 nm pixels.

Pixel integration: a camera pixel integrates the PSF over its area, which widens it by a box of
one pixel: effective sigma^2 = sigma^2 + 1/12 px^2. The cross-cumulant between two pixels is set
by the *pixel-integrated* PSF, so ``ResolvedPsf.effective_sigma_px`` is what the distance factor
uses. Measured on simulated filaments (pixel-integrated PSF, 220 nm FWHM, 100 nm pixels), the four
2x2 sub-lattices of SOFI agree to max/min 1.008 with it and 1.086 with the bare sigma.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from acquisition.psf_units import FWHM_TO_SIGMA

__all__ = [
    "DEFAULT_NA",
    "DEFAULT_PIXEL_SIZE_UM",
    "DEFAULT_WAVELENGTH_NM",
    "FIT_BOUNDS",
    "FWHM_PER_LAMBDA_OVER_NA",
    "FWHM_TO_SIGMA",
    "Optics",
    "ResolvedPsf",
    "effective_fwhm_px",
    "optical_fwhm_px",
]

DEFAULT_NA = 1.4
DEFAULT_WAVELENGTH_NM = 600.0  # emission
DEFAULT_PIXEL_SIZE_UM = 0.1  # camera pixel in the sample plane
FWHM_PER_LAMBDA_OVER_NA = 0.51  # FWHM of the widefield (Airy) PSF in units of lambda / NA
PIXEL_BOX_VARIANCE = 1.0 / 12.0  # variance of a uniform 1-pixel box, px^2
#: a PSF width fitted to the data is trusted only within this factor of the optical one
FIT_BOUNDS = (0.7, 1.5)


def effective_fwhm_px(fwhm_px: float) -> float:
    """FWHM of the pixel-integrated PSF: sigma_eff^2 = sigma^2 + 1/12 px^2."""
    s = fwhm_px * FWHM_TO_SIGMA
    return math.sqrt(s * s + PIXEL_BOX_VARIANCE) / FWHM_TO_SIGMA


def optical_fwhm_px(effective_px: float) -> float | None:
    """Inverse of :func:`effective_fwhm_px` (None when narrower than a pixel box allows)."""
    s2 = (effective_px * FWHM_TO_SIGMA) ** 2 - PIXEL_BOX_VARIANCE
    return math.sqrt(s2) / FWHM_TO_SIGMA if s2 > 0 else None


def _positive(name: str, v: object, lo: float, hi: float) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (lo < v <= hi):
        raise ValueError(f"{name} must be a number in ({lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _num(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class ResolvedPsf:
    """The PSF width the distance factor uses, with where each number came from."""

    fwhm_px: float  # optical PSF FWHM in camera pixels (before pixel integration)
    source: str  # where the FWHM came from, for the user
    fwhm_nm: float | None = None  # None when given directly in pixels
    pixel_size_um: float | None = None
    pixel_size_source: str = ""

    @property
    def effective_fwhm_px(self) -> float:
        return effective_fwhm_px(self.fwhm_px)

    @property
    def effective_sigma_px(self) -> float:
        return self.effective_fwhm_px * FWHM_TO_SIGMA

    def info(self) -> dict[str, Any]:
        return {
            "psf_fwhm_px": round(self.fwhm_px, 4),
            "psf_fwhm_nm": None if self.fwhm_nm is None else round(self.fwhm_nm, 2),
            "psf_source": self.source,
            "pixel_size_um": self.pixel_size_um,
            "pixel_size_source": self.pixel_size_source,
        }


@dataclass(frozen=True)
class Optics:
    """What the user knows about the microscope; every field optional (documented defaults).

    ``pixel_size_source`` says where ``pixel_size_um`` came from ("--pixel-size-um", "from
    core pixel-size config", ...); ``psf_fwhm_nm`` and ``na``/``wavelength_nm`` exclude each other.
    """

    psf_fwhm_nm: float | None = None
    na: float | None = None
    wavelength_nm: float | None = None
    pixel_size_um: float | None = None
    pixel_size_source: str | None = None

    def __post_init__(self) -> None:
        _positive("psf_fwhm_nm", self.psf_fwhm_nm, 0.0, 10_000.0)
        _positive("na", self.na, 0.0, 1.7)
        _positive("wavelength_nm", self.wavelength_nm, 150.0, 2_000.0)
        _positive("pixel_size_um", self.pixel_size_um, 0.0, 100.0)
        if self.psf_fwhm_nm is not None and (self.na is not None or self.wavelength_nm is not None):
            raise ValueError("give the PSF FWHM or the NA / wavelength, not both")

    @classmethod
    def coerce(cls, value: Optics | Mapping[str, Any] | None) -> Optics:
        """An Optics from an Optics, a mapping of its fields (what travels to a worker) or None."""
        if value is None:
            return cls()
        if isinstance(value, Optics):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = set(value) - names
            if unknown:
                raise ValueError(f"unknown optics field(s) {sorted(unknown)}; known: {sorted(names)}")
            return cls(**dict(value))
        raise TypeError(f"optics must be an Optics, a mapping or None, got {type(value).__name__}")

    def psf_fwhm(self) -> tuple[float, str]:
        """PSF FWHM in nm and where it came from."""
        if self.psf_fwhm_nm is not None:
            return self.psf_fwhm_nm, f"--psf-fwhm-nm {_num(self.psf_fwhm_nm)}"
        na = self.na if self.na is not None else DEFAULT_NA
        lam = self.wavelength_nm if self.wavelength_nm is not None else DEFAULT_WAVELENGTH_NM
        fwhm = FWHM_PER_LAMBDA_OVER_NA * lam / na
        rule = f"({FWHM_PER_LAMBDA_OVER_NA:g} lambda/NA)"
        if self.na is None and self.wavelength_nm is None:
            return fwhm, f"default NA {_num(na)} / {_num(lam)} nm {rule}"
        parts = [f"NA {_num(na)}" + ("" if self.na is not None else " (default)"),
                 f"{_num(lam)} nm" + ("" if self.wavelength_nm is not None else " (default)")]
        return fwhm, f"{' / '.join(parts)} {rule}"

    def pixel_size(self) -> tuple[float, str]:
        """Camera pixel size in the sample (um) and where it came from."""
        if self.pixel_size_um is not None:
            return self.pixel_size_um, self.pixel_size_source or "given"
        return DEFAULT_PIXEL_SIZE_UM, f"default {_num(DEFAULT_PIXEL_SIZE_UM)} um"

    @property
    def pixel_size_is_default(self) -> bool:
        return self.pixel_size_um is None

    def resolve(self) -> ResolvedPsf:
        fwhm_nm, src = self.psf_fwhm()
        px_um, px_src = self.pixel_size()
        return ResolvedPsf(fwhm_px=fwhm_nm / (1000.0 * px_um), source=src, fwhm_nm=fwhm_nm,
                           pixel_size_um=px_um, pixel_size_source=px_src)
