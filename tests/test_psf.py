"""engines.psf: the PSF width from the optics, its documented defaults and where each number came from."""

from __future__ import annotations

import math

import pytest

from engines.psf import (
    DEFAULT_NA,
    DEFAULT_PIXEL_SIZE_UM,
    DEFAULT_WAVELENGTH_NM,
    FWHM_TO_SIGMA,
    Optics,
    effective_fwhm_px,
    optical_fwhm_px,
)


def test_fwhm_from_na_and_wavelength():
    r = Optics(na=1.3, wavelength_nm=561.0, pixel_size_um=0.16, pixel_size_source="from file metadata").resolve()
    assert r.fwhm_nm == pytest.approx(0.51 * 561.0 / 1.3)
    assert r.fwhm_px == pytest.approx(0.51 * 561.0 / 1.3 / 160.0)
    assert r.source == "NA 1.3 / 561 nm (0.51 lambda/NA)"
    assert (r.pixel_size_um, r.pixel_size_source) == (0.16, "from file metadata")


def test_defaults_are_documented_and_reported():
    r = Optics().resolve()
    assert (DEFAULT_NA, DEFAULT_WAVELENGTH_NM, DEFAULT_PIXEL_SIZE_UM) == (1.4, 600.0, 0.1)
    assert r.fwhm_px == pytest.approx(0.51 * 600 / 1.4 / 100)  # 2.19 px: the simulator's 220 nm
    assert r.source == "default NA 1.4 / 600 nm (0.51 lambda/NA)"
    assert r.pixel_size_source == "default 0.1 um"
    assert Optics().pixel_size_is_default and not Optics(pixel_size_um=0.2).pixel_size_is_default
    # one of NA / wavelength given: the other is the default, and said so
    assert Optics(na=1.2).resolve().source == "NA 1.2 / 600 nm (default) (0.51 lambda/NA)"
    assert Optics(wavelength_nm=670).resolve().source == "NA 1.4 (default) / 670 nm (0.51 lambda/NA)"


def test_explicit_fwhm_wins_and_excludes_na():
    r = Optics(psf_fwhm_nm=250.0, pixel_size_um=0.1, pixel_size_source="--pixel-size-um").resolve()
    assert r.fwhm_px == pytest.approx(2.5) and r.source == "--psf-fwhm-nm 250"
    with pytest.raises(ValueError, match="not both"):
        Optics(psf_fwhm_nm=250.0, na=1.4)


@pytest.mark.parametrize("field,value", [("na", 0.0), ("na", 2.0), ("wavelength_nm", 50.0), ("pixel_size_um", -0.1),
                                         ("psf_fwhm_nm", float("nan")), ("na", True), ("na", "1.4")])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Optics(**{field: value})


def test_coerce_from_mapping_and_unknown_fields():
    assert Optics.coerce({"na": 1.3}) == Optics(na=1.3)
    assert Optics.coerce(None) == Optics()
    with pytest.raises(ValueError, match="unknown optics"):
        Optics.coerce({"magnification": 100})
    with pytest.raises(TypeError):
        Optics.coerce(1.3)  # type: ignore[arg-type]


def test_pixel_integration_widens_by_a_box():
    s = 2.2 * FWHM_TO_SIGMA
    assert effective_fwhm_px(2.2) == pytest.approx(math.sqrt(s * s + 1 / 12) / FWHM_TO_SIGMA)
    assert optical_fwhm_px(effective_fwhm_px(1.7)) == pytest.approx(1.7)
    assert optical_fwhm_px(0.5) is None  # narrower than a pixel box can produce
    info = Optics().resolve().info()
    assert set(info) == {"psf_fwhm_px", "psf_fwhm_nm", "psf_source", "pixel_size_um", "pixel_size_source"}
