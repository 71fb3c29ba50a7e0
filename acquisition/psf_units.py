"""Gaussian PSF unit conversion shared by the simulation and the engines' optics (stdlib only)."""

import math

#: sigma of a Gaussian = FWHM * FWHM_TO_SIGMA
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
