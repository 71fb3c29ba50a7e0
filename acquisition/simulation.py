"""Blinking-sample simulator: structure, fluorophore behaviour, Gaussian PSF and camera noise.

It is the source of both the simulated Micro-Manager camera and the neural networks' training
data, so it is physical (photons, quantum efficiency, gain, offset, read noise) rather than
"image plus Gaussian noise", and it returns the image a long acquisition would support: the
expected second-order cumulant (`BlinkingScene.expected_cumulant`), i.e. SOFI of infinitely
many noise-free frames. Defaults follow the thesis (004, ch. 5): 100 fps, 100 nm pixels,
220 nm FWHM PSF, 10 ms on / 600-2400 ms off. numpy only (no torch, no Qt).

What a scene can hold (SimulationConfig): the structure classes of acquisition/structures.py
and their mixtures ("filaments+puncta"); blinking emitters (two-state Markov chain, one state
per frame), a fraction of always-on (non-blinking) emitters, diffusing single molecules
(random walks), global flicker (one factor per frame for every emitter), exponential
bleaching, drift / rotation, and sCMOS / EMCCD cameras with optional per-pixel maps and
spatially correlated noise.

Coordinates: positions are (y, x) in nm; input pixel i covers [i*p, (i+1)*p). The cumulant
image lives on the SOFI output grid: output pixel k samples input pixel-centre coordinate
k / 2 (engines/sofi.py, SAMPLE_OFFSET_INPUT_PX), i.e. simulator coordinate k / 2 + 0.5 px.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy.special import erf

from acquisition import structures as S
from acquisition.psf_units import FWHM_TO_SIGMA

PIXEL_VARIANCE = 1.0 / 12.0   # variance (px^2) a uniform pixel adds to a Gaussian PSF
DIFFUSION_HISTORY = 128       # frames of diffusing-molecule positions kept for the target
STATIC_MARGIN_NM = 1_000.0    # emitters this far outside a static field still reach it


@dataclass
class CameraNoise:
    """Physical camera model: photons -> photo-electrons -> (EM gain) -> read noise -> ADU."""

    kind: Literal["scmos", "emccd", "ideal"] = "scmos"
    qe: float = 0.9
    offset_adu: float = 100.0
    gain_e_per_adu: float = 0.5
    read_noise_e: float = 1.5
    em_gain: float = 300.0
    per_pixel_maps: bool = False   # per-pixel offset / read-noise / gain maps, seeded

    def __post_init__(self) -> None:
        if self.kind not in ("scmos", "emccd", "ideal"):
            raise ValueError(f"camera kind must be scmos, emccd or ideal, got {self.kind!r}")
        if not (0 < self.qe <= 1 and self.gain_e_per_adu > 0 and self.em_gain >= 1
                and self.read_noise_e >= 0):
            raise ValueError("camera needs 0 < qe <= 1, gain_e_per_adu > 0, em_gain >= 1, "
                             "read_noise_e >= 0")

    @classmethod
    def emccd(cls, **kw: float) -> CameraNoise:
        """Typical EMCCD (e.g. iXon 897): EM gain 300, ~10 e-/ADU after gain, ~200 ADU offset."""
        base = dict(kind="emccd", qe=0.95, offset_adu=200.0, gain_e_per_adu=12.0,
                    read_noise_e=50.0, em_gain=300.0)
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]

    @property
    def adu_per_photon(self) -> float:
        """Mean ADU per detected-side photon: qe x EM gain / (e- per ADU), as `_camera` does."""
        em = self.em_gain if self.kind == "emccd" else 1.0
        return self.qe * em / self.gain_e_per_adu


@dataclass
class SimulationConfig:
    """Everything that defines a simulated movie; the defaults run the embedded demo."""

    size: int = 64
    pixel_nm: float = 100.0
    fwhm_nm: float = 220.0
    fps: float = 100.0
    on_ms: float = 10.0            # mean on-time of a blinking emitter (>= 1 frame: 1 state/frame)
    off_ms: float = 1200.0
    photons: float = 400.0         # per on-emitter per frame, mean
    background: float = 15.0       # photons / pixel / frame
    emitters_per_um: float = 50.0  # along filaments, rings, membranes (mitochondria: x4 per um^2)
    emitters_per_um2: float = 300.0  # in filled classes (blobs, filled membranes, texture, diffuse)
    structure: str = "filaments"   # a class of structures.STRUCTURES or a mixture "a+b"
    structures_per_100um2: float = 6.0
    punctum_size: float = 12.0     # mean emitters per punctum
    static_fraction: float = 0.0   # share of emitters that never blink (always on)
    static_brightness: float = 1.0  # photons of an always-on emitter relative to `photons`
    flicker: float = 0.0           # std of one multiplicative factor per frame, all emitters
    bleach_s: float = 0.0          # mean time in the on state before bleaching (0: never)
    diffusing_per_um2: float = 0.5   # single molecules of the "diffusing" class
    diffusion_um2_s: float = 0.1
    diffusing_on_ratio: float = 0.1  # their on-fraction (on-time on_ms)
    drift_px_per_frame: tuple[float, float] = (0.0, 0.0)
    rotation_deg_per_frame: float = 0.0
    noise_correlation: float = 0.0  # zero-lag correlation of neighbouring pixels' noise (0-0.45)
    margin_nm: float | None = None  # sample beyond the view (None: 2 um, + fov/4 if it moves)
    camera: CameraNoise = field(default_factory=CameraNoise)
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"size must be >= 4 pixels, got {self.size}")
        for name in ("pixel_nm", "fwhm_nm", "fps", "on_ms", "off_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.margin_nm is not None and not self.margin_nm >= 0:
            raise ValueError(f"margin_nm must be >= 0, got {self.margin_nm}")
        for name in ("photons", "background", "emitters_per_um", "emitters_per_um2",
                     "structures_per_100um2", "punctum_size", "static_brightness", "flicker",
                     "bleach_s", "diffusing_per_um2", "diffusion_um2_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.static_fraction <= 1.0:
            raise ValueError(f"static_fraction must be in [0, 1], got {self.static_fraction}")
        if not 0.0 < self.diffusing_on_ratio < 1.0:
            raise ValueError(f"diffusing_on_ratio must be in (0, 1), got {self.diffusing_on_ratio}")
        if not 0.0 <= self.noise_correlation <= 0.45:
            raise ValueError(f"noise_correlation must be in [0, 0.45], got {self.noise_correlation}")
        S.parse_structure(self.structure)

    @property
    def on_ratio(self) -> float:
        """Stationary on-probability of a blinking emitter (exact for the per-frame chain)."""
        return _stationary_on(self.on_ms, self.off_ms, self.fps)

    @property
    def sigma_px(self) -> float:
        """PSF sigma in camera pixels (the optics alone)."""
        return self.fwhm_nm * FWHM_TO_SIGMA / self.pixel_nm

    @property
    def sigma_eff_px(self) -> float:
        """Width of the pixel-integrated PSF: sqrt(sigma^2 + 1/12) px (what SOFI fits)."""
        return float(np.sqrt(self.sigma_px**2 + PIXEL_VARIANCE))

    @property
    def moves(self) -> bool:
        return bool(np.any(np.asarray(self.drift_px_per_frame) != 0) or self.rotation_deg_per_frame)


def _rates(on_ms: float, off_ms: float, fps: float) -> tuple[float, float]:
    """Per-frame switching probabilities (p_on: off->on, p_off: on->off).

    One state per frame, so the on- and off-durations are geometric with means on_ms and
    off_ms in frames (floored at one frame): the stationary on-probability is then exactly
    on_ms / (on_ms + off_ms) whenever both are at least one frame long.
    """
    dt = 1000.0 / fps
    return min(1.0, dt / off_ms), min(1.0, dt / on_ms)


def _stationary_on(on_ms: float, off_ms: float, fps: float) -> float:
    p_on, p_off = _rates(on_ms, off_ms, fps)
    return p_on / (p_on + p_off)


# --------------------------------------------------------------------------- rendering
def _axis_integrals(c: np.ndarray, n: int, s: float) -> np.ndarray:
    """(N, n): share of a Gaussian at c (erf width s = sqrt 2 sigma) in each pixel 0..n-1."""
    return 0.5 * np.diff(erf((np.arange(n + 1, dtype=np.float64)[None, :] - c[:, None]) / s), axis=1)


def render_gaussians(yx_px: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
                     sigma_px: float) -> np.ndarray:
    """Pixel-integrated Gaussian spots (erf differences), separable per emitter.

    Two exact forms: on small frames (training patches) one matrix product of the per-axis
    pixel integrals, O(N (H + W) + N H W / BLAS); on large ones (the live camera) a
    (2r+1)^2 patch per emitter, O(N r^2). Both need a single-threaded BLAS on a shared
    CPU (engines.data limits it); the product is 2-5x faster at 32 px.
    """
    h, w = shape
    out = np.zeros(h * w, dtype=np.float64)
    r = int(np.ceil(4 * sigma_px)) + 1
    seen = np.all((yx_px > -r) & (yx_px < np.array([h, w]) + r), axis=1)  # spots in view
    yx_px, weights = yx_px[seen], weights[seen]
    if len(yx_px) == 0:
        return out.reshape(h, w)
    s = np.sqrt(2.0) * sigma_px
    if h * w <= 12 * (2 * r + 1) ** 2:
        out = np.zeros((h, w), dtype=np.float64)
        for a in range(0, len(yx_px), 4096):
            p, wt = yx_px[a:a + 4096], weights[a:a + 4096]
            out += (_axis_integrals(p[:, 0], h, s) * wt[:, None]).T @ _axis_integrals(p[:, 1], w, s)
        return out
    offs = np.arange(-r, r + 1)
    base = np.floor(yx_px).astype(np.int64)  # pixel containing the emitter

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


def render_cumulant(yx_px: np.ndarray, weights: np.ndarray, size: tuple[int, int],
                    sigma_eff_px: float, chunk: int = 8192) -> np.ndarray:
    """Expected distance-corrected 2nd-order cumulant on the SOFI output grid (2H, 2W):

        sum_k w_k (1 / (2 pi s^2))^2 exp(-|m - r_k|^2 / s^2),   s = sigma_eff_px,

    sampled at m = k / 2 + 0.5 px (simulator coordinates; see the module docstring). With
    w_k = b_k^2 rho_k (1 - rho_k) in ADU^2 this is the zero-lag cross-cumulant of two
    pixels whose midpoint is m, divided by the distance factor exp(-d^2 / (4 s^2)).
    float32 (the sum is smooth; float64 would double the cost for nothing).
    """
    h, w = size
    out = np.zeros((2 * h, 2 * w), dtype=np.float32)
    r = 4.0 * sigma_eff_px + 1.0  # exp(-d^2 / s^2) < 1e-7 beyond: emitters there add nothing
    seen = np.all((yx_px > -r) & (yx_px < np.array([h, w]) + r), axis=1)
    yx_px, weights = yx_px[seen], weights[seen]
    if len(yx_px) == 0:
        return out
    s2 = np.float32(sigma_eff_px**2)
    norm = np.float32((1.0 / (2.0 * np.pi * sigma_eff_px**2)) ** 2)
    my = (np.arange(2 * h, dtype=np.float32) / 2 + 0.5)
    mx = (np.arange(2 * w, dtype=np.float32) / 2 + 0.5)
    for a in range(0, len(yx_px), chunk):
        p = yx_px[a:a + chunk].astype(np.float32)
        wt = (weights[a:a + chunk] * norm).astype(np.float32)
        gy = np.exp(-np.square(my[None, :] - p[:, :1]) / s2) * wt[:, None]
        gx = np.exp(-np.square(mx[None, :] - p[:, 1:]) / s2)
        out += gy.T @ gx
    return out


def _neighbour_mix(noise: np.ndarray, c: float) -> np.ndarray:
    """Spatially correlate white noise: kernel a*centre + b*(4 neighbours), a^2 + 4b^2 = 1,
    so the variance is kept and adjacent pixels correlate by 2ab / (a^2 + 4b^2) = c."""
    if c <= 0:
        return noise
    t = (1.0 - np.sqrt(1.0 - 4.0 * c * c)) / (4.0 * c)  # b / a
    a = 1.0 / np.sqrt(1.0 + 4.0 * t * t)
    b = a * t
    p = np.pad(noise, 1, mode="reflect")
    return a * noise + b * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])


# --------------------------------------------------------------------------- the scene
class BlinkingScene:
    """A blinking, optionally moving sample seen through a camera, frame by frame.

    `next_frame()` renders the current state and then time moves on one frame, so after a
    call the scene's state (positions, on/alive, `expected_cumulant()`) is that of the frame
    just returned until the next call; `frame_index` counts the frames rendered.
    """

    def __init__(self, cfg: SimulationConfig | None = None) -> None:
        self.cfg = cfg = cfg or SimulationConfig()
        self.rng = rng = np.random.default_rng(cfg.seed)
        fov = cfg.size * cfg.pixel_nm
        margin = cfg.margin_nm if cfg.margin_nm is not None else (
            2_000.0 + fov * 0.25 if cfg.moves else 2_000.0)
        self._box = (-margin, fov + margin)
        layout = S.Layout(rng, -margin, fov + margin, cfg.emitters_per_um, cfg.emitters_per_um2,
                          cfg.structures_per_100um2, cfg.punctum_size)
        parts = S.parse_structure(cfg.structure)
        scale = 1.0 / len(parts)  # a mixture shares the object budget between its classes
        pos, gain, diff = [], [], []
        for name in parts:
            if name == "diffusing":
                p, g = S.diffusing(layout, cfg.diffusing_per_um2 * scale)
            else:
                p, g = S.GENERATORS[name](replace(layout, count_per_100um2=
                                                  cfg.structures_per_100um2 * scale))
            pos.append(p)
            gain.append(g)
            diff.append(np.full(len(p), name == "diffusing"))
        pos_all = np.concatenate(pos) if pos else np.zeros((0, 2))
        gain_all, diff_all = np.concatenate(gain), np.concatenate(diff)
        if not cfg.moves:  # emitters far outside a static field never reach it
            keep = diff_all | np.all((pos_all > -STATIC_MARGIN_NM)
                                     & (pos_all < fov + STATIC_MARGIN_NM), axis=1)
            pos_all, gain_all, diff_all = pos_all[keep], gain_all[keep], diff_all[keep]
        n = len(pos_all)
        self._pos0 = pos_all.astype(np.float64)
        self._brightness = gain_all * rng.lognormal(0.0, 0.25, size=n)
        self._diffusing = diff_all
        self._static = rng.random(n) < cfg.static_fraction
        self._brightness[self._static] *= cfg.static_brightness
        dt = 1000.0 / cfg.fps
        p_on, p_off = _rates(cfg.on_ms, cfg.off_ms, cfg.fps)
        r = cfg.diffusing_on_ratio
        pd_on, pd_off = _rates(cfg.on_ms, cfg.on_ms * (1 - r) / r, cfg.fps)
        self._p_on = np.where(diff_all, pd_on, p_on)
        self._p_off = np.where(diff_all, pd_off, p_off)
        self._rho = self._p_on / (self._p_on + self._p_off)
        self._p_bleach = 1.0 - np.exp(-dt / (cfg.bleach_s * 1000.0)) if cfg.bleach_s > 0 else 0.0
        self._step_nm = np.sqrt(2.0 * cfg.diffusion_um2_s * 1e6 * dt / 1000.0)
        self._on = self._static | (rng.random(n) < self._rho)
        self._alive = np.ones(n, dtype=bool)
        self.frame_index = 0
        self._flicker = 1.0
        self._maps = self._camera_maps()
        self._static_layer: np.ndarray | None = None     # always-on, non-diffusing, not moving
        self._history: deque = deque(maxlen=DIFFUSION_HISTORY)  # diffusing (yx_px, w) per frame
        self._target_cache: tuple[int, np.ndarray] | None = None
        self._bleached_since: list[np.ndarray] = []      # blinkers bleached since the cache

    # ------------------------------------------------------------------ state
    @property
    def _moves(self) -> bool:
        return self.cfg.moves

    @property
    def _t(self) -> int:
        """Index of the frame the current state describes."""
        return max(self.frame_index - 1, 0)

    @property
    def n_emitters(self) -> int:
        return len(self._pos0)

    @property
    def emitters_nm(self) -> np.ndarray:
        """(N, 2) emitter positions (y, x) in nm at the current frame."""
        c = self.cfg
        if not self._moves:
            return self._pos0
        t = self._t
        centre = c.size * c.pixel_nm / 2.0
        th = np.deg2rad(c.rotation_deg_per_frame * t)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        drift = np.asarray(c.drift_px_per_frame) * c.pixel_nm * t
        return (self._pos0 - centre) @ rot.T + centre + drift

    @property
    def on_probability(self) -> np.ndarray:
        """(N,) stationary on-probability of each emitter (1 for always-on ones)."""
        return np.where(self._static, 1.0, self._rho)

    @property
    def adu_per_photon(self) -> float:
        return self.cfg.camera.adu_per_photon

    def _camera_maps(self) -> dict[str, np.ndarray | float]:
        cam, n = self.cfg.camera, self.cfg.size
        if cam.per_pixel_maps and cam.kind != "ideal":
            rng = np.random.default_rng(None if self.cfg.seed is None else self.cfg.seed + 7)
            return {
                "offset": cam.offset_adu + rng.normal(0, 3.0, (n, n)),
                "read": cam.read_noise_e * rng.lognormal(0, 0.4, (n, n)),
                "gain": cam.gain_e_per_adu * rng.normal(1.0, 0.03, (n, n)),
            }
        return {"offset": cam.offset_adu, "read": cam.read_noise_e, "gain": cam.gain_e_per_adu}

    # ------------------------------------------------------------------ rendering
    def _render(self, mask: np.ndarray) -> np.ndarray:
        c = self.cfg
        yx = self.emitters_nm[mask] / c.pixel_nm  # pixel i covers [i, i+1)
        return render_gaussians(yx, c.photons * self._brightness[mask], (c.size, c.size),
                                c.sigma_px)

    def _static_photons(self) -> np.ndarray:
        """Always-on emitters that keep still: rendered once, bleached ones subtracted."""
        layer_mask = self._static & ~self._diffusing
        if self._moves:
            return self._render(layer_mask & self._alive)
        if self._static_layer is None:
            self._static_layer = self._render(layer_mask & self._alive)
        return self._static_layer

    def signal_photons(self) -> np.ndarray:
        """Noise-free photons from the emitters shining in the current frame (no background)."""
        moving_static = self._static & self._diffusing & self._alive
        blink = self._on & self._alive & ~self._static
        img = self._static_photons() + self._render(blink | moving_static)
        return img * self._flicker if self._flicker != 1.0 else img

    def expected_photons(self) -> np.ndarray:
        """Noise-free photon image of the current frame (background + emitters)."""
        return self.signal_photons() + self.cfg.background

    def expected_adu(self) -> np.ndarray:
        """Noise-free camera image (ADU, float) of the current frame: the mean of next_frame."""
        m = self._maps
        em = self.cfg.camera.em_gain if self.cfg.camera.kind == "emccd" else 1.0
        return self.expected_photons() * self.cfg.camera.qe * em / m["gain"] + m["offset"]

    def _camera(self, signal: np.ndarray) -> np.ndarray:
        """Photons -> ADU. Background and emitter photons are independent Poisson processes.

        Exact Poisson sampling of every pixel costs most of a 256x256 frame, so when the
        background gives >= 10 photo-electrons (and no EM gain) the background, the faint
        PSF tails (< 1 e-) and the read noise are drawn together in the normal approximation
        (same mean and variance); pixels with >= 1 signal electron are sampled exactly.
        Below that background, or for EMCCD, every pixel is sampled exactly. With
        `noise_correlation` the noise (everything but the mean) is spatially mixed.
        """
        cfg, cam, m = self.cfg, self.cfg.camera, self._maps
        lam = cfg.background * cam.qe
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
        em = 1.0
        if cam.kind == "emccd":
            em = cam.em_gain
            positive = electrons > 0
            electrons[positive] = self.rng.gamma(electrons[positive], cam.em_gain)
        if np.any(read):
            electrons += self.rng.standard_normal(electrons.shape, dtype=np.float32) * read
        if cfg.noise_correlation > 0:
            mean = (sig + np.float32(lam)) * np.float32(em)
            electrons = mean + _neighbour_mix(electrons - mean, cfg.noise_correlation)
        adu = electrons / m["gain"] + m["offset"]  # python floats keep float32
        return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

    # ------------------------------------------------------------------ time
    def _advance(self) -> None:
        """One frame on: blinking, bleaching, diffusion."""
        n = len(self._on)
        r = self.rng.random(n)
        self._on = self._static | np.where(self._on, r >= self._p_off, r < self._p_on)
        if self._p_bleach:
            gone = self._alive & self._on & (self.rng.random(n) < self._p_bleach)
            if gone.any():
                self._alive &= ~gone
                still_static = gone & self._static & ~self._diffusing
                if still_static.any() and self._static_layer is not None:
                    self._static_layer = self._static_layer - self._render(still_static)
                if self._target_cache is not None:  # else the next target is computed afresh
                    self._bleached_since.append(np.flatnonzero(gone & ~self._static))
        if self._diffusing.any() and self._step_nm > 0:
            d = self._diffusing
            lo, hi = self._box
            walked = self._pos0[d] + self.rng.normal(0.0, self._step_nm, (int(d.sum()), 2))
            self._pos0[d] = lo + np.mod(walked - lo, hi - lo)  # periodic box: none walks away

    def _next_state(self) -> None:
        """Move to the next frame's state (the first frame keeps the initial state)."""
        if self.frame_index > 0:
            self._advance()
        if self.cfg.flicker > 0:
            self._flicker = max(0.0, 1.0 + self.cfg.flicker * float(self.rng.standard_normal()))
        self.frame_index += 1
        self._record_diffusers()

    def next_frame(self) -> np.ndarray:
        """The camera image (uint16, H x W) of the next frame; the scene's state is then that
        frame's state until the next call."""
        self._next_state()
        return self._camera(self.signal_photons())

    def next_expected_frame(self) -> np.ndarray:
        """Like next_frame but noise-free: float32 expected ADU (for checks of the target)."""
        self._next_state()
        return self.expected_adu().astype(np.float32)

    def frames(self, n: int, noise: bool = True) -> np.ndarray:
        step = self.next_frame if noise else self.next_expected_frame
        return np.stack([step() for _ in range(n)])

    # ------------------------------------------------------------------ the target
    def _cumulant_weights(self, mask: np.ndarray) -> np.ndarray:
        """w_k = b_k^2 rho_k (1 - rho_k) in ADU^2, b_k the on-state signal in ADU per frame."""
        b = self.cfg.photons * self._brightness[mask] * self.adu_per_photon
        rho = self._rho[mask]
        return b * b * rho * (1.0 - rho)

    def _record_diffusers(self) -> None:
        if not self._diffusing.any():
            return
        m = self._diffusing & self._alive & ~self._static
        self._history.append((self.emitters_nm[m] / self.cfg.pixel_nm, self._cumulant_weights(m)))

    def _structure_cumulant(self) -> np.ndarray:
        """The fixed-structure part of the target, cached while nothing moves."""
        c = self.cfg
        key = self._t if self._moves else 0
        if self._target_cache is not None and self._target_cache[0] == key:
            img = self._target_cache[1]
            if self._bleached_since:  # subtract what bleached since (incremental, exact)
                gone = np.zeros(self.n_emitters, bool)
                gone[np.concatenate(self._bleached_since)] = True
                gone &= ~self._diffusing
                yx = self.emitters_nm[gone] / c.pixel_nm
                img = img - render_cumulant(yx, self._cumulant_weights(gone), (c.size, c.size),
                                            c.sigma_eff_px)
                np.maximum(img, 0, out=img)
                self._target_cache = (key, img)
            self._bleached_since.clear()
            return img
        m = self._alive & ~self._static & ~self._diffusing
        img = render_cumulant(self.emitters_nm[m] / c.pixel_nm, self._cumulant_weights(m),
                              (c.size, c.size), c.sigma_eff_px)
        self._target_cache = (key, img)
        self._bleached_since.clear()
        return img

    # window 20: the engines' default window, defined in engines.registry (ENGINES[...].default_window);
    # written here because acquisition/ must not import engines/
    def expected_cumulant(self, window: int = 20) -> np.ndarray:
        """What a long acquisition would show: SOFI of infinitely many noise-free frames with
        a perfect distance-factor correction, float32 (2H, 2W) in ADU^2 (the quantity the
        `sofi` engine estimates), pixel-aligned with SOFI's output grid.

        Blinking emitters alive now, at their current positions, contribute
        w_k = b_k^2 rho_k (1 - rho_k); always-on emitters (rho = 1), flicker and camera noise
        contribute nothing, so a static or empty sample has a zero target. Diffusing
        molecules contribute the mean over the last `window` rendered frames of their
        per-frame cumulant (a haze along their paths, never a filament). The PSF width is that
        of the pixel-integrated PSF, sqrt(sigma^2 + 1/12) px; the camera gain is its mean.
        """
        c = self.cfg
        img = self._structure_cumulant()
        if self._diffusing.any():
            hist = list(self._history)[-window:] if self._history else []
            if not hist:
                m = self._diffusing & self._alive & ~self._static
                hist = [(self.emitters_nm[m] / c.pixel_nm, self._cumulant_weights(m))]
            yx = np.concatenate([h[0] for h in hist])
            w = np.concatenate([h[1] for h in hist]) / len(hist)
            img = img + render_cumulant(yx, w, (c.size, c.size), c.sigma_eff_px)
        return img.copy()

    def oracle_cumulant(self, frames: int, known_rates: bool = False) -> np.ndarray:
        """Noise-free SOFI of the next `frames` frames: the cumulant image of the switching the
        blinking emitters really did in them (their true on/off states, no photons, camera
        noise or flicker), float32 (2H, 2W) in ADU^2 on expected_cumulant()'s grid.

        Why: an engine that uses only what those frames carry cannot know an emitter that did
        not switch in them, so its agreement with expected_cumulant() is bounded near this
        image's; above it lies only a learned prior (benchmarks/information_ceiling.py).
        Advances the scene `frames` frames (then expected_cumulant() is the target at the end
        of the window). Static, non-diffusing scenes only. With `known_rates` every emitter
        that switched in the window gets its expected weight b^2 rho (1 - rho) instead of its
        window's sample variance: the best a detector of switching emitters could draw.
        """
        c = self.cfg
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        if c.moves or self._diffusing.any():
            raise ValueError("oracle_cumulant needs a static scene without diffusing molecules")
        blink = ~self._static
        s = np.zeros(self.n_emitters)
        for _ in range(frames):
            self._next_state()
            s += self._on & self._alive & blink
        m = blink & (s > 0) & (s < frames)  # switched in the window: its sample variance > 0
        if known_rates:
            w = self._cumulant_weights(m)
        else:
            p = s[m] / frames
            b = c.photons * self._brightness[m] * self.adu_per_photon
            w = b * b * p * (1.0 - p)  # the window's sample variance of a 0/1 state, times b^2
        return render_cumulant(self.emitters_nm[m] / c.pixel_nm, w, (c.size, c.size),
                               c.sigma_eff_px).astype(np.float32)

    def ground_truth(self, upsample: int = 2, blur_fwhm_nm: float | None = None) -> np.ndarray:
        """LEGACY target (what the first networks were trained on): every alive emitter,
        blinking or not, blurred with half the PSF FWHM on the `upsample`x grid, max 1.
        It draws structure the blinking does not carry; use expected_cumulant()."""
        c = self.cfg
        pos = self.emitters_nm[self._alive]
        fine_nm = c.pixel_nm / upsample
        fwhm = c.fwhm_nm / 2.0 if blur_fwhm_nm is None else blur_fwhm_nm
        n = c.size * upsample
        gt = render_gaussians(pos / fine_nm, self._brightness[self._alive], (n, n),
                              fwhm * FWHM_TO_SIGMA / fine_nm)
        peak = gt.max()
        return (gt / peak if peak > 0 else gt).astype(np.float32)
