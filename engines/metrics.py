"""Image-quality metrics for super-resolved reconstructions (thesis appendix B).

Why these: Pearson correlation says how well intensities follow the ground
truth, decorrelation analysis measures the resolution actually reached (no ground
truth needed), Li-binarised TPR / TNR say whether structure is missing or
invented, independently of each method's brightness scale, and the invented-structure
share says how much of what an output claims lies away from any reference structure
(usable on real movies, with long-window SOFI as the reference).

numpy / scipy / scikit-image only: the neural engineer uses these for the model
card and the GUI may use them on live data, so nothing here imports torch or Qt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import structure_tensor, structure_tensor_eigenvalues
from skimage.filters import threshold_li
from skimage.registration import phase_cross_correlation
from skimage.transform import resize

__all__ = [
    "DecorrelationResult",
    "align_to",
    "apodize_edges",
    "decorrelation_analysis",
    "decorrelation_resolution",
    "evaluate_image",
    "invented_filaments",
    "invented_structure",
    "line_like_mask",
    "li_threshold",
    "pearson",
    "pearson_r",
    "sublattice_ratio",
    "tpr_tnr",
    "window_consistency",
]


# --------------------------------------------------------------------------- alignment
def _as_2d_float(img: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _to_shape(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample `img` onto `shape` (a widefield image vs a 2x ground truth)."""
    if img.shape == tuple(shape):
        return img
    return resize(img, shape, order=1, mode="edge", anti_aliasing=False, preserve_range=True)


def align_to(
    pred: np.ndarray, gt: np.ndarray, *, max_shift: float = 3.0, upsample_factor: int = 20
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample `pred` onto `gt`'s grid and shift it onto `gt` with sub-pixel precision.

    The shift comes from the cross-correlation peak (skimage, upsampled DFT). A shift
    larger than `max_shift` pixels is taken as spurious (blinking noise, periodic
    structure) and ignored, because a reconstruction method is only ever off by a
    pixel or two. Returns the aligned image and the applied (dy, dx).
    """
    pred = _as_2d_float(pred, "pred")
    gt = _as_2d_float(gt, "gt")
    pred = _to_shape(pred, gt.shape)
    if np.ptp(pred) == 0 or np.ptp(gt) == 0:
        return pred, (0.0, 0.0)
    shift, _, _ = phase_cross_correlation(
        gt - gt.mean(),
        pred - pred.mean(),
        upsample_factor=upsample_factor,
        normalization=None,  # plain cross-correlation: robust on noisy, sparse images
    )
    dy, dx = float(shift[0]), float(shift[1])
    if math.hypot(dy, dx) > max_shift:
        return pred, (0.0, 0.0)
    if dy == 0.0 and dx == 0.0:
        return pred, (0.0, 0.0)
    return ndimage.shift(pred, (dy, dx), order=1, mode="nearest"), (dy, dx)


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    if border <= 0 or min(img.shape) <= 2 * border + 1:
        return img
    return img[border:-border, border:-border]


# --------------------------------------------------------------------------- Pearson
def pearson_r(a: np.ndarray, b: np.ndarray, *, if_constant: float = float("nan")) -> float:
    """Plain Pearson r of two same-size arrays (no alignment, no resampling).

    A constant image has no correlation to speak of: NaN by default, so that a score never
    counts it; training's validation mean asks for 0.0 (a flat output scores as uncorrelated).
    """
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        return if_constant
    return float(a @ b) / den


def pearson(pred: np.ndarray, gt: np.ndarray, align: bool = True, *, max_shift: float = 3.0) -> float:
    """Pearson correlation of `pred` with `gt` (thesis eq. B.8).

    `pred` is resampled to `gt`'s shape when they differ (e.g. the widefield mean at
    1x vs the 2x ground truth); intensity scale does not matter. With `align`, `pred`
    is first shifted onto `gt` (at most `max_shift` pixels) and a border of
    ceil(max_shift) pixels is left out, so the filled-in edge cannot bias the score.
    Returns NaN when either image is constant.
    """
    if align:
        p, _ = align_to(pred, gt, max_shift=max_shift)
        g = _as_2d_float(gt, "gt")
        border = int(math.ceil(max_shift))
        return pearson_r(_crop(p, border), _crop(g, border))
    g = _as_2d_float(gt, "gt")
    p = _to_shape(_as_2d_float(pred, "pred"), g.shape)
    return pearson_r(p, g)


# --------------------------------------------------------------------------- Li / TPR / TNR
def li_threshold(img: np.ndarray) -> float:
    """Li's iterative minimum cross-entropy threshold (Li & Tam 1998), started at the mean."""
    arr = _as_2d_float(img, "img")
    if np.ptp(arr) == 0:
        return float(arr.flat[0])  # nothing to separate: everything is background
    return float(threshold_li(arr, initial_guess=float(arr.mean())))


def tpr_tnr(pred: np.ndarray, gt: np.ndarray, *, align: bool = False, max_shift: float = 3.0) -> tuple[float, float]:
    """True positive / true negative rates of Li-binarised `pred` against Li-binarised `gt`.

    TPR = TP / (TP + FN) (structure found), TNR = TN / (TN + FP) (no invented
    structure). Each image gets its own threshold, so brightness scale is irrelevant.
    NaN where the ground truth has no foreground (TPR) or no background (TNR).
    """
    g = _as_2d_float(gt, "gt")
    if align:
        p, _ = align_to(pred, g, max_shift=max_shift)
    else:
        p = _to_shape(_as_2d_float(pred, "pred"), g.shape)
    pm = p > li_threshold(p)
    gm = g > li_threshold(g)
    tp = int(np.count_nonzero(pm & gm))
    fn = int(np.count_nonzero(~pm & gm))
    tn = int(np.count_nonzero(~pm & ~gm))
    fp = int(np.count_nonzero(pm & ~gm))
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    tnr = tn / (tn + fp) if tn + fp else float("nan")
    return tpr, tnr


def invented_structure(pred: np.ndarray, reference: np.ndarray, *, min_distance: float = 2.0,
                       border: int = 3) -> float:
    """Share of `pred`'s claimed structure lying at least `min_distance` pixels (of the
    reference's grid; 2 = one input pixel on the 2x grid) from any reference structure.

    Claimed structure and reference structure are each image's Li-thresholded foreground,
    so the measure needs no common brightness scale and works on simulations (reference: the
    thresholded ground truth) and real movies alike (reference: SOFI of a long window).
    `pred` is resampled onto the reference grid but not shifted: outputs are pixel-aligned
    with the reference by construction, and a shifted structure counts as invented. A
    `border` of pixels is left out (SOFI's last row and column are empty). NaN when the
    reference has no structure or `pred` claims none.
    """
    ref = _crop(_as_2d_float(reference, "reference"), border)
    p = _crop(_to_shape(_as_2d_float(pred, "pred"), reference.shape), border)
    if np.ptp(ref) == 0 or np.ptp(p) == 0:
        return float("nan")
    ref_mask = ref > li_threshold(ref)
    claimed = p > li_threshold(p)
    if not ref_mask.any() or not claimed.any():
        return float("nan")
    dist = ndimage.distance_transform_edt(~ref_mask)
    return float(np.count_nonzero(claimed & (dist >= min_distance)) / np.count_nonzero(claimed))


# --------------------------------------------------------------------------- real movies
def window_consistency(images: list[np.ndarray], *, border: int = 3) -> float:
    """Mean Pearson over all pairs of outputs from disjoint windows of one movie.

    On a static sample every window shows the same structure, so a method that reports what
    the data carry scores high (up to its noise); one that draws a different guess per window
    scores low. Images are compared pixel by pixel (same grid, no shift) without a `border`.
    NaN with fewer than two images (or when a pair has a constant image).
    """
    imgs = [_crop(_as_2d_float(im, "image"), border) for im in images]
    if len(imgs) < 2:
        return float("nan")
    if any(im.shape != imgs[0].shape for im in imgs):
        raise ValueError(f"window outputs differ in shape: {[im.shape for im in imgs]}")
    rs = [pearson_r(imgs[i], imgs[j]) for i in range(len(imgs)) for j in range(i + 1, len(imgs))]
    rs = [r for r in rs if math.isfinite(r)]
    return float(np.mean(rs)) if rs else float("nan")


#: Line-likeness (``line_like_mask``), in output pixels: gradients and curvature at 1 pixel
#: (light smoothing) and 2 pixels, orientation averaged over 4 pixels (2 camera pixels, about a
#: PSF width). Checked on synthetic ridges / spots / haze / noise (tests/test_metrics.py) and on
#: simulated expected-cumulant images of every class (MODEL_CARD.md "Real data").
LINE_GRADIENT_SIGMA = 1.0
LINE_RIDGE_SIGMA = 2.0
LINE_INTEGRATION_SIGMA = 4.0
LINE_COHERENCE = 0.5  # ((l1 - l2) / (l1 + l2))^2 of the structure tensor
LINE_ANISOTROPY = 0.5  # |along-ridge curvature| < this x |across-ridge curvature|
LINE_NARROWNESS = 0.2  # -curvature x sigma^2 / value: 0.5 for a ridge as wide as sigma, 0.06 for a haze 4x wider


def line_like_mask(img: np.ndarray, *, gradient_sigma: float = LINE_GRADIENT_SIGMA,
                   ridge_sigma: float = LINE_RIDGE_SIGMA, integration_sigma: float = LINE_INTEGRATION_SIGMA,
                   coherence: float = LINE_COHERENCE, anisotropy: float = LINE_ANISOTROPY,
                   narrowness: float = LINE_NARROWNESS, border: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(line-like, claimed) masks of an image, without a `border` of pixels.

    Claimed structure is the Li foreground of the image smoothed by `gradient_sigma`. A claimed
    pixel is line-like (on a filament) where three things hold:

    * the local orientation is coherent: the structure tensor (gradients of the smoothed
      image, averaged over `integration_sigma`) has eigenvalues l1 >= l2 with
      ((l1 - l2) / (l1 + l2))^2 > `coherence` (every gradient points across one direction);
    * it is a bright ridge: the Hessian at `ridge_sigma` curves down strongly across
      (k1 < 0) and little along (|k2| < `anisotropy` |k1|), which a round spot does not do;
    * the ridge is narrow: -k1 sigma^2 / value > `narrowness` (a PSF-wide line, not a slope or
      a broad haze, whose orientation is coherent too).

    The image's own intensity scale does not matter (the mean, SOFI and networks alike).
    """
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals

    a = _crop(_as_2d_float(img, "img"), border)
    if np.ptp(a) == 0:
        none = np.zeros(a.shape, dtype=bool)
        return none, none
    top = float(np.percentile(a, 99.5))
    a = a / top if top > 0 else a / float(np.abs(a).max())
    smooth = ndimage.gaussian_filter(a, gradient_sigma, mode="nearest")
    claimed = smooth > li_threshold(smooth)
    # skimage's sigma is the integration (summation) scale; the gradients are of `smooth`
    tensor = structure_tensor(smooth, sigma=integration_sigma, order="rc", mode="nearest")
    l1, l2 = structure_tensor_eigenvalues(np.stack(tensor))
    total = l1 + l2
    coh = np.zeros_like(total)
    np.divide((l1 - l2) ** 2, total ** 2, out=coh, where=total > 0)
    h = hessian_matrix(a, sigma=ridge_sigma, order="rc", mode="nearest", use_gaussian_derivatives=False)
    e1, e2 = hessian_matrix_eigvals(h)  # e1 >= e2
    across = np.minimum(e1, e2)
    along = np.maximum(e1, e2)
    value = ndimage.gaussian_filter(a, ridge_sigma, mode="nearest")
    narrow = np.zeros_like(value, dtype=bool)
    np.greater(-across * ridge_sigma**2, narrowness * value, out=narrow, where=value > 0)
    ridge = (across < 0) & (np.abs(along) < anisotropy * np.abs(across)) & narrow
    return (coh > coherence) & ridge & claimed, claimed


def invented_filaments(pred: np.ndarray, reference: np.ndarray, *, min_distance: float = 2.0,
                       border: int = 3, **line: float) -> float:
    """Share of `pred`'s claimed structure that is line-like (filament-like) where the
    `reference` shows no line-like structure within `min_distance` pixels (of the reference's
    grid; 2 = one input pixel on the 2x grid).

    The measure for movies whose sample holds no filaments (a nucleus, diffusing molecules):
    a method that draws filaments the long acquisition (SOFI of all frames) does not show scores
    above 0; one that shows spots and haze where the data have them scores 0. `line` are
    :func:`line_like_mask`'s parameters. `pred` is resampled onto the reference grid, not shifted.
    NaN when `pred` claims no structure.
    """
    ref = _as_2d_float(reference, "reference")
    p = _to_shape(_as_2d_float(pred, "pred"), ref.shape)
    p_line, p_claimed = line_like_mask(p, border=border, **line)
    r_line, _ = line_like_mask(ref, border=border, **line)
    if not p_claimed.any():
        return float("nan")
    if r_line.any():
        far = ndimage.distance_transform_edt(~r_line) >= min_distance
    else:
        far = np.ones(r_line.shape, dtype=bool)
    return float(np.count_nonzero(p_line & far) / np.count_nonzero(p_claimed))


# --------------------------------------------------------------------------- decorrelation
def apodize_edges(img: np.ndarray, n: int = 20) -> np.ndarray:
    """Raised-cosine taper of the outer `n` pixels towards the mean (ImDecorr apodImRect).

    Without it the image's hard edges put a cross of spurious high frequencies into
    the spectrum and the decorrelation analysis reports a too-good resolution.
    """
    arr = np.asarray(img, dtype=np.float64)
    n = int(min(n, min(arr.shape) // 2))
    if n < 2:
        return arr.copy()

    def window(length: int) -> np.ndarray:
        w = np.ones(length)
        ramp = (1.0 - np.cos(np.pi * np.arange(n) / (n - 1))) / 2.0  # 0 at the edge, 1 inside
        w[:n] = ramp
        w[length - n :] = np.minimum(w[length - n :], ramp[::-1])
        return w

    mask = np.outer(window(arr.shape[0]), window(arr.shape[1]))
    val = arr.mean()
    return (arr - val) * mask + val


@dataclass(frozen=True)
class DecorrelationResult:
    """Outcome of one decorrelation analysis (frequencies normalised: 1 = Nyquist)."""

    kc_max: float  # highest significant peak position: the resolution estimate
    a0: float  # peak amplitude of the unfiltered curve (an SNR proxy)
    kc_gm: float  # peak with the best sqrt(kc * A): the geometric-mean estimate
    d0: np.ndarray  # decorrelation curve of the unfiltered image on r0
    r0: np.ndarray


def _dcorr_max(d: np.ndarray, dt: float = 1e-3) -> tuple[int, float]:
    """Index and amplitude of the decorrelation peak (ImDecorr getDcorrMax rules).

    A maximum at the last sample is not a peak (the curve is still rising); drop it
    and look again, accepting a lower maximum only if it stands more than `dt`
    above the minimum that follows it (numerical noise would otherwise qualify).
    """
    ind = int(np.argmax(d))
    amp = float(d[ind])
    t = np.array(d, dtype=np.float64)
    while ind == len(t) - 1:
        t = t[:-1]
        if len(t) == 0:
            return 0, 0.0
        ind = int(np.argmax(t))
        amp = float(t[ind])
        tail_min = float(np.min(d[ind:]))
        if t[ind] - tail_min > dt:
            break
        t[ind] = tail_min
        ind = len(t) - 1
    return ind, amp


class _Decorrelator:
    """Fourier-space state shared by all d(r) curves of one image."""

    def __init__(self, im: np.ndarray):
        ny, nx = im.shape
        ky = np.linspace(-1.0, 1.0, ny)
        kx = np.linspace(-1.0, 1.0, nx)
        rad = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
        mask0 = rad < 1.0
        f = np.fft.fftshift(np.fft.fft2(im))
        with np.errstate(divide="ignore", invalid="ignore"):
            i_n = f / np.abs(f)
        i_n[~np.isfinite(i_n)] = 0
        i_n = i_n * mask0
        i_n[ny // 2, nx // 2] = 0  # the mean carries no resolution information
        self.mask0 = mask0
        self.i_n = i_n
        # radii sorted once; every d(r) is then a cumulative sum up to r (mask: rad < r)
        self.order = np.argsort(rad, axis=None, kind="stable")
        self.rad_sorted = rad.ravel()[self.order]
        self.n_cum = np.cumsum(np.abs(i_n.ravel()[self.order]) ** 2)
        std = im.std()
        ik = mask0 * np.fft.fftshift(np.fft.fft2((im - im.mean()) / (std if std > 0 else 1.0)))
        self.imr = np.real(np.fft.ifft2(np.fft.ifftshift(ik)))

    def curve(self, imt: np.ndarray, r: np.ndarray) -> np.ndarray:
        ir = self.mask0 * np.fft.fftshift(np.fft.fft2(imt))
        c = math.sqrt(float(np.sum(np.abs(ir) ** 2)))
        num = np.cumsum(np.real(ir * np.conj(self.i_n)).ravel()[self.order])
        k = np.searchsorted(self.rad_sorted, r, side="left")  # pixels with rad < r
        out = np.zeros(len(r))
        ok = k > 0
        num_r = num[k[ok] - 1]
        den = c * np.sqrt(self.n_cum[k[ok] - 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(den > 0, num_r / den, 0.0)
        out[ok] = np.nan_to_num(vals)
        return out


def decorrelation_analysis(img: np.ndarray, *, n_r: int = 50, n_g: int = 10,
                           apodize: int | None = None) -> DecorrelationResult:
    """Parameter-free resolution estimate (Descloux, Grussmayer & Radenovic 2019).

    A faithful port of ImDecorr's getDcorr: d(r) is the correlation of the image
    with its phase-only (normalised) Fourier transform restricted to a disc of
    radius r; its peak marks where signal gives way to noise. The analysis is
    repeated on Ng Gaussian high-pass filtered copies (two passes, the second
    refining the filter range and radius sampling) and the highest significant
    peak position k_c wins. Peaks with amplitude below 0.05 are ignored.
    `apodize` is the edge taper width in pixels (default min(20, size // 8)).
    """
    im = _as_2d_float(img, "img")
    if min(im.shape) < 8:
        raise ValueError(f"image too small for decorrelation analysis: {im.shape}")
    n_r = max(int(n_r), 30)
    n_g = max(int(n_g), 10)
    taper = min(20, min(im.shape) // 8) if apodize is None else int(apodize)
    im = apodize_edges(im, taper)
    # odd size: the zero frequency sits on a pixel and the radius grid is symmetric
    im = im[: im.shape[0] - (1 - im.shape[0] % 2), : im.shape[1] - (1 - im.shape[1] % 2)]
    r0 = np.linspace(0.0, 1.0, n_r)
    if np.ptp(im) == 0:
        return DecorrelationResult(0.0, 0.0, 0.0, np.zeros(n_r), r0)

    dc = _Decorrelator(im)
    d0 = dc.curve(dc.imr, r0)
    ind0, snr0 = _dcorr_max(d0)
    res0 = float(r0[ind0])

    g_max = 2.0 / r0[ind0] if r0[ind0] > 0 else max(im.shape) / 2.0
    g = np.exp(np.linspace(math.log(g_max), math.log(0.15), n_g))
    r = r0.copy()
    kc: list[float] = []
    snr: list[float] = []
    for refinement in range(2):
        gm: list[float] = []
        kc_pass: list[float] = []
        snr_pass: list[float] = []
        for sigma in g:
            # MATLAB imgaussfilt: kernel 2*ceil(2*sigma)+1, replicate padding
            imt = dc.imr - ndimage.gaussian_filter(dc.imr, sigma, mode="nearest", truncate=2.0)
            d = dc.curve(imt, r)
            ind, a = _dcorr_max(d)
            kc_pass.append(float(r[ind]))
            snr_pass.append(a)
            gm.append(math.sqrt(max(a * r[ind], 0.0)))
        kc_arr = np.array(kc_pass)
        snr_arr = np.array(snr_pass)
        if refinement == 0:
            bad = snr_arr < 0.05
            kc_arr[bad] = 0.0
            snr_arr[bad] = 0.0
            gm_arr = np.array(gm)
            gm_arr[(snr_arr == 0) | (kc_arr == 0)] = 0.0
            ind_gm = int(np.argmax(gm_arr))
            ind_max = int(np.argmax(kc_arr))
            i1, i2 = min(ind_gm, ind_max), max(ind_gm, ind_max)
            if i1 == 0:
                i1 = i2 = 0
            elif i2 == n_g - 1:
                i2 = n_g - 2
            g = np.exp(np.linspace(math.log(g[i1]), math.log(g[i2 + 1]), n_g))
            r1 = max(kc_arr[ind_gm] - 0.05, 0.0)
            r2 = min(kc_arr[ind_gm] + 0.3, 1.0)
            r = np.linspace(r1, r2, n_r)
        kc.extend(kc_arr.tolist())
        snr.extend(snr_arr.tolist())

    kc.append(res0)
    snr.append(snr0)
    kc_all = np.array(kc)
    snr_all = np.array(snr)
    bad = snr_all < 0.05
    kc_all[bad] = 0.0
    snr_all[bad] = 0.0
    i_max = int(np.argmax(kc_all))
    i_gm = int(np.argmax(np.sqrt(kc_all * snr_all)))
    return DecorrelationResult(
        kc_max=float(kc_all[i_max]), a0=float(snr0), kc_gm=float(kc_all[i_gm]), d0=d0, r0=r0
    )


def decorrelation_resolution(img: np.ndarray, pixel_nm: float, **kwargs) -> float:
    """Resolution in nm from decorrelation analysis: 2 * pixel / k_c (thesis B.10).

    NaN when no significant peak exists (an empty or pure-noise image).
    """
    if pixel_nm <= 0:
        raise ValueError(f"pixel_nm must be positive, got {pixel_nm}")
    kc = decorrelation_analysis(img, **kwargs).kc_max
    return 2.0 * float(pixel_nm) / kc if kc > 0 else float("nan")


# --------------------------------------------------------------------------- combined
def evaluate_image(pred: np.ndarray, gt: np.ndarray, pixel_nm: float, *, max_shift: float = 3.0) -> dict[str, float]:
    """All metrics of one reconstruction against its ground truth.

    `pixel_nm` is the pixel size of `gt`'s grid (50 nm for the 2x grid of a 100 nm
    camera). For Pearson and TPR/TNR `pred` is resampled onto that grid and aligned;
    its resolution is measured on its own grid (pixel scaled by the size ratio),
    because interpolation adds spectral replicas that decorrelation would take for
    signal. Keys: pearson, resolution_nm, tpr, tnr, shift_y, shift_x.
    """
    g = _as_2d_float(gt, "gt")
    raw = _as_2d_float(pred, "pred")
    p, (dy, dx) = align_to(raw, g, max_shift=max_shift)
    border = int(math.ceil(max_shift))
    tpr, tnr = tpr_tnr(_crop(p, border), _crop(g, border))
    pred_pixel_nm = float(pixel_nm) * g.shape[0] / raw.shape[0]
    return {
        "pearson": pearson_r(_crop(p, border), _crop(g, border)),
        "resolution_nm": decorrelation_resolution(raw, pred_pixel_nm),
        "tpr": tpr,
        "tnr": tnr,
        "shift_y": dy,
        "shift_x": dx,
    }


# --------------------------------------------------------------------------- SOFI sub-lattices
def sublattice_ratio(sr: np.ndarray, mean: np.ndarray, *, percentile: float = 80.0, margin: int = 2) -> float:
    """max / min of the four 2x2 sub-lattice means of a 2x image over the bright input pixels.

    SOFI's four output classes (real pixel, two d=1 virtual pixels, the diagonal one) are each
    divided by their own distance factor; a wrong PSF width leaves a checkerboard, i.e. a ratio
    above 1. Bright = the 3x3-smoothed mean (widefield) image above its ``percentile``: smoothed,
    so that the selection does not favour the sub-lattice sampling pixel centres. ``margin``
    input pixels at each border are left out (the border classes lack pairs).
    """
    out = _as_2d_float(sr, "sr")
    m = ndimage.uniform_filter(_as_2d_float(mean, "mean"), 3)
    if out.shape != (2 * m.shape[0], 2 * m.shape[1]):
        raise ValueError(f"sr must be twice the mean image's shape, got {out.shape} vs {m.shape}")
    bright = m > np.percentile(m, percentile)
    bright[:margin] = bright[m.shape[0] - margin:] = False
    bright[:, :margin] = bright[:, m.shape[1] - margin:] = False
    if not bright.any():
        raise ValueError("no bright pixels inside the margin")
    vals = [out[a::2, b::2][bright].mean() for a in (0, 1) for b in (0, 1)]
    if min(vals) <= 0:
        return float("inf")
    return float(max(vals) / min(vals))
