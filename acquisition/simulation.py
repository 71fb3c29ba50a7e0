"""Blinking-sample simulator: structure, fluorophore blinking, Gaussian PSF and camera noise.

It is the source of both the simulated Micro-Manager camera and the neural networks' training
data, so it is physical (photons, quantum efficiency, gain, offset, read noise) rather than
"image plus Gaussian noise", and it can return the ground truth that a perfect second-order
SOFI reconstruction would show. Defaults follow the thesis (004, ch. 5): 100 fps, 100 nm
pixels, 220 nm FWHM PSF, 10 ms on / 600-2400 ms off. numpy only (no torch, no Qt).

Coordinates: positions are (y, x) in nm; input pixel i covers [i*p, (i+1)*p). The ground
truth lives on the 2x grid, where output pixels 2i and 2i+1 cover input pixel i.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy.special import erf

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass
class CameraNoise:
    """Physical camera model: photons -> photo-electrons -> (EM gain) -> read noise -> ADU."""

    kind: Literal["scmos", "emccd", "ideal"] = "scmos"
    qe: float = 0.9
    offset_adu: float = 100.0
    gain_e_per_adu: float = 0.5
    read_noise_e: float = 1.5
    em_gain: float = 300.0
    per_pixel_maps: bool = False

    @classmethod
    def emccd(cls, **kw: float) -> CameraNoise:
        """Typical EMCCD (e.g. iXon 897): EM gain 300, ~10 e-/ADU after gain, ~200 ADU offset."""
        base = dict(kind="emccd", qe=0.95, offset_adu=200.0, gain_e_per_adu=12.0,
                    read_noise_e=50.0, em_gain=300.0)
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class SimulationConfig:
    """Everything that defines a simulated movie; the defaults run the embedded demo."""

    size: int = 64
    pixel_nm: float = 100.0
    fwhm_nm: float = 220.0
    fps: float = 100.0
    on_ms: float = 10.0
    off_ms: float = 1200.0
    photons: float = 400.0
    background: float = 15.0
    emitters_per_um: float = 50.0
    structure: Literal["filaments", "mitochondria"] = "filaments"
    structures_per_100um2: float = 6.0
    drift_px_per_frame: tuple[float, float] = (0.0, 0.0)
    rotation_deg_per_frame: float = 0.0
    bleach_s: float = 0.0
    camera: CameraNoise = field(default_factory=CameraNoise)
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"size must be >= 4 pixels, got {self.size}")
        for name in ("pixel_nm", "fwhm_nm", "fps", "on_ms", "off_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.photons < 0 or self.background < 0 or self.emitters_per_um < 0:
            raise ValueError("photons, background and emitters_per_um must be >= 0")
        if self.structure not in ("filaments", "mitochondria"):
            raise ValueError(f"unknown structure {self.structure!r}")

    @property
    def on_ratio(self) -> float:
        return self.on_ms / (self.on_ms + self.off_ms)

    def with_(self, **kw: object) -> SimulationConfig:
        return replace(self, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- structures
def _filament_paths(rng: np.random.Generator, lo: float, hi: float, n: int) -> list[np.ndarray]:
    """Worm-like chains (microtubule-like): smooth random walks with a persistence length."""
    paths = []
    step = 20.0  # nm
    for _ in range(n):
        length = rng.uniform(5_000.0, 20_000.0)
        k = int(length / step)
        angle0 = rng.uniform(0, 2 * np.pi)
        # persistence length ~ 5-20 um -> angular diffusion per step
        lp = rng.uniform(5_000.0, 20_000.0)
        dtheta = rng.normal(0.0, np.sqrt(step / lp), size=k)
        theta = angle0 + np.cumsum(dtheta)
        start = rng.uniform(lo, hi, size=2)
        yx = start + np.cumsum(np.stack([np.sin(theta), np.cos(theta)], 1) * step, axis=0)
        paths.append(yx)
    return paths


def _emitters_on_filaments(rng: np.random.Generator, paths: list[np.ndarray],
                           per_um: float) -> np.ndarray:
    pts = []
    for yx in paths:
        seg = np.diff(yx, axis=0)
        seglen = np.hypot(seg[:, 0], seg[:, 1])
        total = seglen.sum()
        n = rng.poisson(per_um * total / 1000.0)
        if n == 0:
            continue
        s = rng.uniform(0, total, n)
        cum = np.concatenate([[0.0], np.cumsum(seglen)])
        idx = np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1)
        frac = ((s - cum[idx]) / seglen[idx])[:, None]
        p = yx[idx] + frac * seg[idx]
        pts.append(p + rng.normal(0.0, 8.0, size=p.shape))  # antibody/label size ~ 10 nm
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def _emitters_on_mitochondria(rng: np.random.Generator, lo: float, hi: float, n: int,
                              per_um: float) -> np.ndarray:
    """Capsules (0.5-3 um long, 250-500 nm wide) labelled on the outer membrane."""
    pts = []
    for _ in range(n):
        length = rng.uniform(500.0, 3_000.0)
        radius = rng.uniform(125.0, 250.0)
        centre = rng.uniform(lo, hi, size=2)
        ang = rng.uniform(0, np.pi)
        area = 2 * np.pi * radius * length + 4 * np.pi * radius**2  # membrane surface, nm^2
        m = rng.poisson(per_um * 4.0 * area / 1e6)  # 4x the line density per um^2 of membrane
        if m == 0:
            continue
        u = rng.uniform(-length / 2 - radius, length / 2 + radius, m)  # along the axis
        phi = rng.uniform(0, 2 * np.pi, m)
        # radius of the capsule cross-section at u (hemispherical caps)
        over = np.clip(np.abs(u) - length / 2, 0, radius)
        r_u = np.sqrt(np.maximum(radius**2 - over**2, 0.0))
        v = r_u * np.cos(phi)  # lateral offset of a point on the tube surface, projected
        d = np.stack([np.sin(ang), np.cos(ang)])
        nrm = np.stack([np.cos(ang), -np.sin(ang)])
        pts.append(centre + u[:, None] * d + v[:, None] * nrm)
    return np.concatenate(pts) if pts else np.zeros((0, 2))


# --------------------------------------------------------------------------- rendering
def render_gaussians(yx_px: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
                     sigma_px: float) -> np.ndarray:
    """Pixel-integrated Gaussian spots (erf differences), separable per emitter: O(N r^2)."""
    h, w = shape
    out = np.zeros(h * w, dtype=np.float64)
    if len(yx_px) == 0:
        return out.reshape(h, w)
    r = int(np.ceil(4 * sigma_px)) + 1
    offs = np.arange(-r, r + 1)
    base = np.floor(yx_px).astype(np.int64)  # pixel containing the emitter
    s = np.sqrt(2.0) * sigma_px

    def axis_weights(coord: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        edges = b[:, None] + offs[None, :]
        wts = 0.5 * (erf((edges + 1 - coord[:, None]) / s) - erf((edges - coord[:, None]) / s))
        return edges, wts

    ey, wy = axis_weights(yx_px[:, 0], base[:, 0])
    ex, wx = axis_weights(yx_px[:, 1], base[:, 1])
    vals = weights[:, None, None] * wy[:, :, None] * wx[:, None, :]
    iy = np.broadcast_to(ey[:, :, None], vals.shape)
    ix = np.broadcast_to(ex[:, None, :], vals.shape)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    np.add.at(out, iy[ok] * w + ix[ok], vals[ok])
    return out.reshape(h, w)


# --------------------------------------------------------------------------- the scene
class BlinkingScene:
    """A blinking, optionally drifting/rotating sample seen through a camera, frame by frame."""

    def __init__(self, cfg: SimulationConfig | None = None) -> None:
        self.cfg = cfg = cfg or SimulationConfig()
        self.rng = np.random.default_rng(cfg.seed)
        fov = cfg.size * cfg.pixel_nm
        margin = 2_000.0 + fov * 0.25 if self._moves else 2_000.0
        lo, hi = -margin, fov + margin
        n = max(1, self.rng.poisson(cfg.structures_per_100um2 * (hi - lo) ** 2 / 1e8))
        if cfg.structure == "filaments":
            paths = _filament_paths(self.rng, lo, hi, n)
            pos = _emitters_on_filaments(self.rng, paths, cfg.emitters_per_um)
        else:
            pos = _emitters_on_mitochondria(self.rng, lo, hi, n, cfg.emitters_per_um)
        self._pos0 = pos
        self._brightness = self.rng.lognormal(0.0, 0.25, size=len(pos))
        self._alive = np.ones(len(pos), dtype=bool)
        dt = 1000.0 / cfg.fps
        self._p_off = 1.0 - np.exp(-dt / cfg.on_ms)
        self._p_on = 1.0 - np.exp(-dt / cfg.off_ms)
        self._p_bleach = 1.0 - np.exp(-dt / (cfg.bleach_s * 1000.0)) if cfg.bleach_s > 0 else 0.0
        self._on = self.rng.random(len(pos)) < cfg.on_ratio
        self.frame_index = 0
        self._maps = self._camera_maps()

    @property
    def _moves(self) -> bool:
        c = self.cfg
        return bool(np.any(np.asarray(c.drift_px_per_frame) != 0) or c.rotation_deg_per_frame)

    @property
    def n_emitters(self) -> int:
        return len(self._pos0)

    @property
    def emitters_nm(self) -> np.ndarray:
        """(N, 2) emitter positions (y, x) in nm at the current frame."""
        c = self.cfg
        t = self.frame_index
        if not self._moves:
            return self._pos0
        centre = c.size * c.pixel_nm / 2.0
        th = np.deg2rad(c.rotation_deg_per_frame * t)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        drift = np.asarray(c.drift_px_per_frame) * c.pixel_nm * t
        return (self._pos0 - centre) @ rot.T + centre + drift

    def _camera_maps(self) -> dict[str, np.ndarray | float]:
        cam, n = self.cfg.camera, self.cfg.size
        if cam.kind == "scmos" and cam.per_pixel_maps:
            rng = np.random.default_rng(None if self.cfg.seed is None else self.cfg.seed + 7)
            return {
                "offset": cam.offset_adu + rng.normal(0, 3.0, (n, n)),
                "read": cam.read_noise_e * rng.lognormal(0, 0.4, (n, n)),
                "gain": cam.gain_e_per_adu * rng.normal(1.0, 0.03, (n, n)),
            }
        return {"offset": cam.offset_adu, "read": cam.read_noise_e, "gain": cam.gain_e_per_adu}

    def signal_photons(self) -> np.ndarray:
        """Noise-free photons from the emitters that are on in the current frame (no background)."""
        c = self.cfg
        on = self._on & self._alive
        yx = self.emitters_nm[on] / c.pixel_nm  # pixel i covers [i, i+1)
        return render_gaussians(yx, c.photons * self._brightness[on], (c.size, c.size),
                                c.fwhm_nm * FWHM_TO_SIGMA / c.pixel_nm)

    def expected_photons(self) -> np.ndarray:
        """Noise-free photon image of the current frame (background + on emitters)."""
        return self.signal_photons() + self.cfg.background

    def _camera(self, signal: np.ndarray) -> np.ndarray:
        """Photons -> ADU. Background and emitter photons are independent Poisson processes.

        Exact Poisson sampling of every pixel costs most of a 256x256 frame, so when the
        background gives >= 10 photo-electrons (and no EM gain) the background, the faint
        PSF tails (< 1 e-) and the read noise are drawn together in the normal approximation
        (same mean and variance); pixels with >= 1 signal electron are sampled exactly.
        Below that background, or for EMCCD, every pixel is sampled exactly.
        """
        cam, m = self.cfg.camera, self._maps
        lam = self.cfg.background * cam.qe
        read = m["read"] if cam.kind != "ideal" else 0.0
        sig = signal.astype(np.float32) * np.float32(cam.qe)
        if cam.kind != "emccd" and lam >= 10.0:
            # faint emitter tails ride on the background's normal draw; bright pixels exact
            bright = sig >= 1.0
            faint = np.where(bright, np.float32(0), sig)
            z = self.rng.standard_normal(signal.shape, dtype=np.float32)
            electrons = z * np.sqrt(lam + faint + np.square(read)) + (faint + np.float32(lam))
            electrons[bright] += self.rng.poisson(sig[bright])
            read = 0.0
        else:
            electrons = self.rng.poisson(lam + sig).astype(np.float32)
        if cam.kind == "emccd":
            positive = electrons > 0
            electrons[positive] = self.rng.gamma(electrons[positive], cam.em_gain)
        if np.any(read):
            electrons += self.rng.standard_normal(electrons.shape, dtype=np.float32) * read
        adu = electrons / m["gain"] + m["offset"]  # python floats keep float32
        return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

    def _advance(self) -> None:
        r = self.rng.random(len(self._on))
        self._on = np.where(self._on, r >= self._p_off, r < self._p_on)
        if self._p_bleach:
            self._alive &= self.rng.random(len(self._alive)) >= self._p_bleach * self._on
        self.frame_index += 1

    def next_frame(self) -> np.ndarray:
        """The camera image (uint16, H x W) of the current frame; then time moves one frame on."""
        img = self._camera(self.signal_photons())
        self._last_index = self.frame_index
        self._advance()
        return img

    def frames(self, n: int) -> np.ndarray:
        return np.stack([self.next_frame() for _ in range(n)])

    def ground_truth(self, upsample: int = 2, blur_fwhm_nm: float | None = None) -> np.ndarray:
        """What ideal 2nd-order SOFI shows: every emitter (blinking or not) of the most recent
        frame, blurred with half the PSF FWHM on the `upsample`x grid, max-normalised."""
        c = self.cfg
        idx = getattr(self, "_last_index", self.frame_index)
        now, self.frame_index = self.frame_index, idx
        try:
            pos = self.emitters_nm[self._alive]
        finally:
            self.frame_index = now
        fine_nm = c.pixel_nm / upsample
        fwhm = c.fwhm_nm / 2.0 if blur_fwhm_nm is None else blur_fwhm_nm
        n = c.size * upsample
        gt = render_gaussians(pos / fine_nm, self._brightness[self._alive], (n, n),
                              fwhm * FWHM_TO_SIGMA / fine_nm)
        peak = gt.max()
        return (gt / peak if peak > 0 else gt).astype(np.float32)


def simulate(cfg: SimulationConfig, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Convenience: (frames uint16 (T, H, W), ground truth float32 (2H, 2W) of the last frame)."""
    scene = BlinkingScene(cfg)
    movie = scene.frames(n_frames)
    return movie, scene.ground_truth()
