"""Fine-tuning pairs from a recording of a fixed sample: short windows in, SOFI of ALL frames out.

Why this target (thesis ch. 2.3 / 5.2): for a sample that does not move, the SOFI of thousands
of frames is what the networks are trained to predict from 20 (the expected second-order
cumulant, ADU^2, on the same 2x grid: ``nn_common.OutputConfig``), measured on the user's own
sample, camera and optics instead of simulated ones. The SOFI engine supplies the real-camera
handling (PSF width from the optics, refined within bounds; bleaching trend; lag for correlated
camera noise). Bleaching also lowers the cumulant itself over the recording (fewer emitters
blink later), so each window's target is the long SOFI times the relative cumulant level at
its frames (`cumulant_level`), measured on blocks of the movie.

Why a spatial hold-out: the agreement reported to the user must come from pixels the network
never trained on. Each field is cut into a training part and a held-out stripe at the far end
of its longer axis, with a gap between; the two parts are cropped BEFORE anything is computed
from them (their SOFI targets, PSF fits, levels are each computed from that part's own pixels),
so nothing of the held-out part can reach a training pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DRIFT_WARN_PX",
    "FieldPairs",
    "LEVEL_BLOCK",
    "PairSampler",
    "Region",
    "build_field",
    "cumulant_level",
    "drift_px",
    "long_sofi",
    "split_field",
    "static_twin",
]

HOLDOUT_GAP_PX = 4  # input pixels between the training part and the held-out stripe
LEVEL_BLOCK = 100  # frames per block of the bleaching level (and of the drift estimate)
DRIFT_WARN_PX = 0.5  # first vs last block: a larger shift blurs the long-window target
MIN_PART_PX = 8  # smallest side of a training or held-out part


@dataclass(frozen=True)
class Region:
    """A rectangle of input pixels [y0, y1) x [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def as_dict(self) -> dict[str, int]:
        return {"y0": self.y0, "y1": self.y1, "x0": self.x0, "x1": self.x1}


def split_field(h: int, w: int, holdout: float = 0.25, gap: int = HOLDOUT_GAP_PX
                ) -> tuple[Region, Region]:
    """(training part, held-out part) of an h x w field: the held-out part is the last
    `holdout` share of the longer axis, `gap` pixels away from the training part."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a share in (0, 1), got {holdout}")
    along_x = w >= h
    n = w if along_x else h
    n_held = max(MIN_PART_PX, int(round(holdout * n)))
    n_train = n - n_held - gap
    if n_train < MIN_PART_PX or min(h, w) < MIN_PART_PX:
        raise ValueError(f"a {h}x{w} field is too small to hold out {holdout:.0%} of it and "
                         f"still train on >= {MIN_PART_PX} pixels")
    if along_x:
        return Region(0, h, 0, n_train), Region(0, h, n - n_held, w)
    return Region(0, n_train, 0, w), Region(n - n_held, h, 0, w)


def long_sofi(frames: np.ndarray, sofi_options: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """SOFI of all frames (float32 (2h, 2w), ADU^2) and what it used (output_info)."""
    from engines.sofi import SofiEngine

    eng = SofiEngine(window=int(frames.shape[0]), **sofi_options)
    return eng.reconstruct(frames), eng.output_info()


def cumulant_level(frames: np.ndarray, target: np.ndarray, sofi_options: dict[str, Any],
                   block: int = LEVEL_BLOCK) -> np.ndarray:
    """(T,) cumulant level at each frame relative to the whole recording's (mean 1).

    The SOFI of each `block`-frame block, summed over the pixels where the long SOFI has
    structure, over the same sum of the long SOFI; a quadratic in time fitted through the
    blocks (clipped to 0.05-20) gives every frame its level. Without bleaching it is ~1.
    """
    from engines.sofi import SofiEngine

    t = int(frames.shape[0])
    n_blocks = t // block
    if n_blocks < 3:
        return np.ones(t, np.float32)
    opts = {**sofi_options, "clip_negative": False}
    mask = target > 0.2 * float(np.percentile(target, 99.0))
    if not mask.any():
        return np.ones(t, np.float32)
    eng = SofiEngine(window=block, **opts)
    ref = float(target[mask].sum())
    centres, levels = [], []
    for k in range(n_blocks):
        img = eng.reconstruct(frames[k * block:(k + 1) * block])
        centres.append((k + 0.5) * block)
        levels.append(float(img[mask].sum()) / ref)
    coef = np.polyfit(np.asarray(centres), np.asarray(levels), deg=2)
    level = np.clip(np.polyval(coef, np.arange(t)), 0.05, 20.0)
    return (level / level.mean()).astype(np.float32)


def drift_px(frames: np.ndarray, block: int = LEVEL_BLOCK) -> tuple[float, float]:
    """(dy, dx) shift in pixels of the last block's mean image against the first block's
    (phase correlation to 0.1 px, scikit-image)."""
    from skimage.registration import phase_cross_correlation

    b = max(1, min(block, frames.shape[0] // 4))
    first = frames[:b].astype(np.float64).mean(0)
    last = frames[-b:].astype(np.float64).mean(0)
    shift, _, _ = phase_cross_correlation(first, last, upsample_factor=10)
    return -float(shift[0]), -float(shift[1])  # (it returns the shift that undoes the motion)


@dataclass
class FieldPairs:
    """One recording's training part and held-out part, each with its own long-SOFI target."""

    name: str
    train_region: Region
    held_region: Region
    train_frames: np.ndarray  # (T, h, w) float32, the training part only
    train_target: np.ndarray  # (2h, 2w) ADU^2, SOFI of all frames of the training part
    train_level: np.ndarray  # (T,) relative cumulant level (bleaching)
    held_frames: np.ndarray
    held_target: np.ndarray
    target_info: dict[str, Any]  # what the training part's SOFI used

    @property
    def n_frames(self) -> int:
        return int(self.train_frames.shape[0])


def build_field(name: str, frames: np.ndarray, sofi_options: dict[str, Any], *,
                holdout: float = 0.25, gap: int = HOLDOUT_GAP_PX) -> FieldPairs:
    """Split a (T, H, W) movie of a fixed sample and compute each part's target."""
    train, held = split_field(frames.shape[1], frames.shape[2], holdout, gap)
    tf = np.ascontiguousarray(frames[(slice(None),) + train.slices], dtype=np.float32)
    hf = np.ascontiguousarray(frames[(slice(None),) + held.slices], dtype=np.float32)
    t_img, info = long_sofi(tf, sofi_options)
    h_img, _ = long_sofi(hf, sofi_options)
    return FieldPairs(name=name, train_region=train, held_region=held, train_frames=tf,
                      train_target=t_img, train_level=cumulant_level(tf, t_img, sofi_options),
                      held_frames=hf, held_target=h_img, target_info=info)


def static_twin(frames: np.ndarray, rng: np.random.Generator,
                stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The same field with nothing blinking: each pixel's temporal mean plus independent
    Gaussian noise of that pixel's own temporal SD (`stats`: precomputed (mean, SD)). No pixel
    correlates with another or with itself in time, so its SOFI is zero: whatever a network
    shows on it is invented from the look of the sample."""
    m, sd = stats if stats is not None else (frames.mean(0), frames.std(0))
    return (m + sd * rng.standard_normal(frames.shape, dtype=np.float32)).astype(np.float32)


class PairSampler:
    """Seeded random training pairs from the training parts: batch k is a function of
    (seed, k) only, so a resumed run sees the batches it would have seen.

    ConvGRU (`per_frame=False`): x (B, frames, p, p), y (B, 2p, 2p) = the long SOFI of that
    patch times the level at the window's last frame. ConvLSTM (`per_frame=True`): y (B,
    frames, 2p, 2p), each frame's long SOFI times its level. Patches avoid the last row and
    column of a part, where SOFI has no pixel pair (zero by construction, not by the sample).

    A share `static_share` of the samples are the patch's static twin (`static_twin`, from
    the training part's own mean and SD) with a zero target. Why: in one sample, where it is
    bright is where it blinks, so without them a few hundred steps teach a network to draw
    the sample from its mean image (measured: on a static twin of the held-out part the
    fine-tuned ConvGRU showed 1.6x, the ConvLSTM 1.0x its output on the real one).
    """

    def __init__(self, fields: list[FieldPairs], *, patch: int, frames: int, per_frame: bool,
                 seed: int = 0, static_share: float = 0.0):
        if not 0.0 <= static_share < 1.0:
            raise ValueError(f"static_share must be in [0, 1), got {static_share}")
        self.fields, self.frames, self.per_frame, self.seed = fields, frames, per_frame, seed
        self.static_share = static_share
        self._stats = [(f.train_frames.mean(0), f.train_frames.std(0)) for f in fields]
        usable = [min(f.train_frames.shape[1:]) - 1 for f in fields]
        self.patch = int(min(patch, *usable))
        if self.patch < MIN_PART_PX:
            raise ValueError(f"the training part is too small for patches ({min(usable)} px)")
        short = [f.name for f in fields if f.n_frames < frames]
        if short:
            raise ValueError(f"{', '.join(short)}: fewer frames than one training sample ({frames})")
        # each field in proportion to the patch positions and windows it offers
        w = np.array([self._positions(f) for f in fields], dtype=np.float64)
        self.weights = w / w.sum()

    def _positions(self, f: FieldPairs) -> float:
        t, h, w = f.train_frames.shape
        return float((t - self.frames + 1) * (h - self.patch) * (w - self.patch))

    def batch(self, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, k, 0xF17E])
        p, n = self.patch, self.frames
        xs = np.empty((size, n, p, p), np.float32)
        ys = np.empty((size, n, 2 * p, 2 * p) if self.per_frame else (size, 2 * p, 2 * p), np.float32)
        n_static = int(round(self.static_share * size))
        for i in range(size):
            j = int(rng.choice(len(self.fields), p=self.weights))
            f = self.fields[j]
            t, h, w = f.train_frames.shape
            t0 = int(rng.integers(0, t - n + 1))
            y0, x0 = int(rng.integers(0, h - p)), int(rng.integers(0, w - p))
            if i >= size - n_static:
                m, sd = self._stats[j]
                win = (slice(y0, y0 + p), slice(x0, x0 + p))
                xs[i] = static_twin(f.train_frames[t0:t0 + n, win[0], win[1]], rng, (m[win], sd[win]))
                ys[i] = 0.0
                continue
            xs[i] = f.train_frames[t0:t0 + n, y0:y0 + p, x0:x0 + p]
            tgt = f.train_target[2 * y0:2 * (y0 + p), 2 * x0:2 * (x0 + p)]
            lv = f.train_level[t0:t0 + n]
            ys[i] = tgt[None] * lv[:, None, None] if self.per_frame else tgt * lv[-1]
        return xs, ys

