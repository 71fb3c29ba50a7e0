"""Per-pixel polynomial trends over a window of frames (numpy only): the bleaching correction.

Why a polynomial, removed by linear projection: photobleaching makes every pixel's mean fall
during the window, and a falling mean is a fluctuation shared by all pixels that a cumulant
reports as structure (the SOFI of the whole bleaching nucleus movie is then 64 % one global
time course). Removing each pixel's least-squares polynomial in time before the cumulants is

* exact to stream: the projection needs only sum_t t^k x(t) per pixel (k <= order), which a
  running sum keeps in O(pixels) per frame, so streaming SOFI stays equal to batch SOFI;
* linear in the data, so it cannot create structure, and it leaves fast blinking alone
  (order + 1 of the T degrees of freedom are removed; the cumulant divides by T - order - 1);
* smooth enough for any real bleaching curve over one window. An exponential fit is not linear
  (per-pixel iterations, no exact streaming form) and is not needed at these lengths.

``order=2`` (quadratic) is the default in SOFI: a 20-frame live window bleaches linearly, but on
the 100-frame nucleus movie (frame mean 1909 -> 787 counts, mostly in the first 30 frames) a
linear trend still leaves 25 % of the whole-movie SOFI in the global time course, a quadratic
5 % (see tests/test_sofi.py and the README).

The basis is orthonormal over the window's frame times, built from monomials of the centred
time u = t - mean(t) (Gram-Schmidt in float64), so projections are well conditioned.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_ORDER", "centred_times", "detrend", "polynomial_basis", "polynomial_coefficients"]

MAX_ORDER = 3


def centred_times(n: int) -> np.ndarray:
    """u_t = t - (n - 1) / 2 for t = 0 .. n-1 (float64)."""
    return np.arange(n, dtype=np.float64) - (n - 1) / 2.0


def polynomial_coefficients(n: int, order: int) -> np.ndarray:
    """(order+1, order+1) matrix C with B = U C orthonormal, U[:, j] = u^j (u = centred_times(n)).

    B[:, k] is a polynomial of degree k in u, so it can be evaluated at any time (``U`` of
    other times times ``C``), which the streaming lagged cumulants need.
    """
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"trend order must be an integer 0..{MAX_ORDER}, got {order!r}")
    k = int(order) + 1
    if n < k + 1:
        raise ValueError(f"a polynomial trend of order {order} needs more than {k} frames, got {n}")
    u = centred_times(n)
    U = np.stack([u**j for j in range(k)], axis=1)
    # modified Gram-Schmidt on the columns, tracking the coefficients
    C = np.eye(k)
    B = U.copy()
    for j in range(k):
        for i in range(j):
            proj = B[:, i] @ B[:, j]
            B[:, j] -= proj * B[:, i]
            C[:, j] -= proj * C[:, i]
        norm = np.linalg.norm(B[:, j])
        B[:, j] /= norm
        C[:, j] /= norm
    return C


def polynomial_basis(n: int, order: int) -> np.ndarray:
    """(n, order+1) orthonormal basis of polynomials of degree <= order over n frames."""
    C = polynomial_coefficients(n, order)
    u = centred_times(n)
    return np.stack([u**j for j in range(C.shape[0])], axis=1) @ C


def detrend(stack: np.ndarray, order: int) -> np.ndarray:
    """(T, ...) float64 residuals after removing each pixel's polynomial trend (order 0 = the mean)."""
    x = np.array(stack, dtype=np.float64)  # a copy: the residuals are formed in place
    B = polynomial_basis(x.shape[0], order)
    coef = np.einsum("tk,t...->k...", B, x)
    x -= np.einsum("tk,k...->t...", B, coef)  # (einsum: BLAS is slow for this skinny product)
    return x
