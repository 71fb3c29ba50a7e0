"""Training data for the neural engines, simulated on the fly (seeded) by acquisition.simulation.

Why on the fly: a fresh random scene per sample (structure class, density, SNR, PSF, blinking,
static emitters, flicker, bleaching, motion, camera) means the networks never see the same
movie twice and learn to be camera-independent. The target is what a long acquisition would
support (the expected second-order cumulant, zero wherever nothing blinks), so the networks are
never rewarded for drawing structure the data do not carry. Samples are produced by background
worker processes (`SampleStream`) so the trainer never waits on numpy while torch computes.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from dataclasses import dataclass, field, fields
from multiprocessing.pool import AsyncResult, Pool

import numpy as np
from threadpoolctl import threadpool_limits

from acquisition.simulation import STATIC_MARGIN_NM, BlinkingScene, CameraNoise, SimulationConfig
from acquisition.structures import STRUCTURES
from engines.registry import DEFAULT_NETWORK, ENGINES

# Class probabilities of the training domain: filaments do not dominate; with the fully static
# samples (p_fully_static) about 10 % of the scenes carry no blinking at all.
CLASS_WEIGHTS: dict[str, float] = {
    "filaments": 0.13, "mitochondria": 0.10, "puncta": 0.10, "rings": 0.08, "blobs": 0.08,
    "membranes": 0.08, "diffuse": 0.08, "texture": 0.08, "diffusing": 0.06, "mixture": 0.17,
    "empty": 0.04,
}
MIXABLE = tuple(k for k in STRUCTURES if k != "empty")


@dataclass
class DataConfig:
    """Ranges the random scenes are drawn from (each sample draws its own values; log-uniform
    for the ranges that span decades). Pixels are 100 nm; the PSF range is in camera pixels."""

    size: int = 32                       # patch size (input pixels)
    frames: int = ENGINES[DEFAULT_NETWORK].default_window  # frames per sample: the network's window
    per_frame_targets: bool = False      # ConvLSTM: one target per frame (moving scenes)
    target_from: int = 0                 # first frame that gets a target (per-frame mode)
    # frames a diffusing molecule's haze is averaged over in a per-frame target: the window of
    # the streaming network those targets train
    target_window: int = ENGINES["convlstm"].default_window
    classes: dict[str, float] = field(default_factory=lambda: dict(CLASS_WEIGHTS))
    photons: tuple[float, float] = (40.0, 1000.0)        # per on-emitter per frame (log)
    on_ratio: tuple[float, float] = (0.002, 0.05)        # (log)
    on_frames: tuple[float, float] = (1.0, 5.0)          # mean on-time in frames
    fwhm_px: tuple[float, float] = (1.2, 3.5)            # PSF FWHM in camera pixels
    background: tuple[float, float] = (1.0, 100.0)       # photons / pixel / frame (log)
    emitters_per_um: tuple[float, float] = (20.0, 100.0)  # along lines and rims (log)
    emitters_per_um2: tuple[float, float] = (50.0, 1000.0)  # in filled regions (log)
    structures_per_100um2: tuple[float, float] = (3.0, 12.0)
    punctum_size: tuple[float, float] = (3.0, 30.0)      # emitters per punctum (log)
    p_static_emitters: float = 0.4       # scenes with a fraction of always-on emitters ...
    static_fraction: tuple[float, float] = (0.0, 0.3)    # ... of this share
    static_brightness: tuple[float, float] = (0.02, 1.0)  # relative to photons (log)
    p_fully_static: float = 0.06         # samples whose emitters never blink
    p_flicker: float = 0.3
    flicker: tuple[float, float] = (0.005, 0.05)         # std of the per-frame factor
    p_bleach: float = 0.3
    bleach_frames: tuple[float, float] = (100.0, 3000.0)  # mean on-frames before bleaching (log)
    p_correlated_noise: float = 0.3
    noise_correlation: tuple[float, float] = (0.0, 0.4)  # neighbouring pixels, zero lag
    diffusing_per_um2: tuple[float, float] = (0.1, 2.0)  # (log)
    diffusion_um2_s: tuple[float, float] = (0.01, 1.0)   # (log)
    diffusing_on_ratio: tuple[float, float] = (0.02, 0.3)  # (log)
    p_moving: float = 0.3                # fraction of drifting/rotating scenes
    max_drift_px: float = 0.15           # px per frame
    max_rotation_deg: float = 0.3        # deg per frame
    p_emccd: float = 0.3
    fps: float = 100.0

    def __post_init__(self) -> None:
        if self.size < 4 or self.frames < 1:
            raise ValueError(f"size must be >= 4 and frames >= 1, got {self.size}, {self.frames}")
        if not 0 <= self.target_from < self.frames:
            raise ValueError(f"target_from must be in [0, frames), got {self.target_from}")
        if self.target_window < 1:
            raise ValueError(f"target_window must be >= 1, got {self.target_window}")
        bad = [k for k in self.classes if k not in STRUCTURES and k != "mixture"]
        if bad or not self.classes or any(v < 0 for v in self.classes.values()) \
                or sum(self.classes.values()) <= 0:
            raise ValueError(f"classes must map {STRUCTURES + ('mixture',)} to weights >= 0 "
                             f"with a positive sum; got {self.classes}")
        for name in ("p_static_emitters", "p_fully_static", "p_flicker", "p_bleach",
                     "p_correlated_noise", "p_moving", "p_emccd"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        for name, (lo, hi) in self.ranges().items():
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= lo <= hi, got {(lo, hi)}")

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), tuple)}


def _logu(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def random_camera(rng: np.random.Generator, p_emccd: float) -> CameraNoise:
    """A random sCMOS or EMCCD: offset, gain and read noise vary so normalisation must cope."""
    if rng.random() < p_emccd:
        return CameraNoise.emccd(offset_adu=float(rng.uniform(100, 1000)),
                                 em_gain=float(rng.uniform(50, 300)),
                                 gain_e_per_adu=float(rng.uniform(3, 30)),
                                 read_noise_e=float(rng.uniform(20, 80)),
                                 per_pixel_maps=bool(rng.random() < 0.3))
    return CameraNoise(kind="scmos", qe=float(rng.uniform(0.7, 0.95)),
                       offset_adu=float(rng.uniform(50, 1000)),
                       gain_e_per_adu=float(_logu(rng, (0.2, 4.0))),
                       read_noise_e=float(rng.uniform(0.8, 3.0)),
                       per_pixel_maps=bool(rng.random() < 0.3))


def random_structure(rng: np.random.Generator, classes: dict[str, float]) -> str:
    """One class name by weight; "mixture" becomes 2-3 distinct classes joined by '+'."""
    names = list(classes)
    p = np.asarray([classes[k] for k in names], dtype=np.float64)
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    if name != "mixture":
        return name
    parts = rng.choice(len(MIXABLE), size=int(rng.integers(2, 4)), replace=False)
    return "+".join(MIXABLE[i] for i in sorted(parts))


def motion_margin_nm(size: int, drift: tuple[float, float], rot_deg: float, frames: int,
                     pixel_nm: float = 100.0) -> float:
    """Sample needed beyond the view so that nothing empty moves in within `frames` frames."""
    drift_nm = float(np.hypot(*drift)) * frames * pixel_nm
    rot_nm = size * pixel_nm * np.deg2rad(abs(rot_deg)) * frames  # a corner's path, bounded
    return STATIC_MARGIN_NM + drift_nm + rot_nm


def random_sim_config(rng: np.random.Generator, cfg: DataConfig, seed: int,
                      horizon: int | None = None) -> SimulationConfig:
    """Draw one scene's simulation parameters from the DataConfig ranges. A moving sample
    extends only as far beyond the view as it moves in `horizon` frames (default: the
    sample's), which keeps dense moving scenes cheap."""
    dt_ms = 1000.0 / cfg.fps
    on_ms = float(rng.uniform(*cfg.on_frames)) * dt_ms
    rho = _logu(rng, cfg.on_ratio)
    drift, rot = (0.0, 0.0), 0.0
    if rng.random() < cfg.p_moving:
        if rng.random() < 0.6:
            ang = rng.uniform(0, 2 * np.pi)
            v = rng.uniform(0.02, cfg.max_drift_px)
            drift = (float(v * np.sin(ang)), float(v * np.cos(ang)))
        else:
            rot = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    static = 0.0
    if rng.random() < cfg.p_fully_static:
        static = 1.0
    elif rng.random() < cfg.p_static_emitters:
        static = float(rng.uniform(*cfg.static_fraction))
    return SimulationConfig(
        size=cfg.size,
        fps=cfg.fps,
        fwhm_nm=100.0 * float(rng.uniform(*cfg.fwhm_px)),
        on_ms=on_ms,
        off_ms=on_ms * (1.0 - rho) / rho,
        photons=_logu(rng, cfg.photons),
        background=_logu(rng, cfg.background),
        emitters_per_um=_logu(rng, cfg.emitters_per_um),
        emitters_per_um2=_logu(rng, cfg.emitters_per_um2),
        structure=random_structure(rng, cfg.classes),
        structures_per_100um2=float(rng.uniform(*cfg.structures_per_100um2)),
        punctum_size=_logu(rng, cfg.punctum_size),
        static_fraction=static,
        static_brightness=_logu(rng, cfg.static_brightness),
        flicker=_logu(rng, cfg.flicker) if rng.random() < cfg.p_flicker else 0.0,
        bleach_s=(_logu(rng, cfg.bleach_frames) * dt_ms / 1000.0
                  if rng.random() < cfg.p_bleach else 0.0),
        diffusing_per_um2=_logu(rng, cfg.diffusing_per_um2),
        diffusion_um2_s=_logu(rng, cfg.diffusion_um2_s),
        diffusing_on_ratio=_logu(rng, cfg.diffusing_on_ratio),
        noise_correlation=(float(rng.uniform(*cfg.noise_correlation))
                           if rng.random() < cfg.p_correlated_noise else 0.0),
        drift_px_per_frame=drift,
        rotation_deg_per_frame=rot,
        margin_nm=(motion_margin_nm(cfg.size, drift, rot, horizon or cfg.frames)
                   if drift != (0.0, 0.0) or rot else None),
        camera=random_camera(rng, cfg.p_emccd),
        seed=seed,
    )


def scene_for_seed(seed: int, cfg: DataConfig) -> BlinkingScene:
    """The scene of sample `seed` (its parameters drawn from the ranges, seeded)."""
    rng = np.random.default_rng([seed, 0x5EED])
    return BlinkingScene(random_sim_config(rng, cfg, seed))


def make_sample(seed: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: raw frames float32 (T, h, w) and target(s) float32 in ADU^2.

    The target is the scene's expected second-order cumulant (BlinkingScene.expected_cumulant)
    at the last frame, (2h, 2w), or with per_frame_targets at every frame, (T, 2h, 2w), each
    from the positions of that frame (causal: a diffusing molecule's haze is the mean over
    the trailing `target_window` frames); frames before `target_from` get zeros (ignored).
    """
    scene = scene_for_seed(seed, cfg)
    if cfg.per_frame_targets:
        frames = np.empty((cfg.frames, cfg.size, cfg.size), np.float32)
        tgt = np.zeros((cfg.frames, 2 * cfg.size, 2 * cfg.size), np.float32)
        for t in range(cfg.frames):
            frames[t] = scene.next_frame()
            if t >= cfg.target_from:
                tgt[t] = scene.expected_cumulant(window=cfg.target_window)
        return frames, tgt
    frames = scene.frames(cfg.frames).astype(np.float32)
    return frames, scene.expected_cumulant(window=cfg.frames)


def make_batch(seeds: list[int], cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Samples stacked; numpy's BLAS held to one thread (the simulator's matrix products run
    ~10x slower with two threads on a shared 2-core CPU)."""
    with threadpool_limits(1, user_api="blas"):
        xs, ys = zip(*(make_sample(s, cfg) for s in seeds), strict=True)
    return np.stack(xs), np.stack(ys)


def _worker(args: tuple[list[int], DataConfig]) -> tuple[np.ndarray, np.ndarray]:
    return make_batch(*args)


class SampleStream:
    """Endless, seeded, ordered stream of batches produced by background processes.

    Batch k holds samples seeded `seed * 1_000_003 + k * batch + i`, so a resumed run
    (start_batch=k) continues exactly where it stopped.
    """

    def __init__(self, cfg: DataConfig, batch: int, seed: int = 0, start_batch: int = 0,
                 workers: int = 1, prefetch: int = 8):
        self.cfg, self.batch, self.seed = cfg, batch, seed
        self.k = start_batch
        # each batch is one job: keep every worker busy (and one more batch each queued)
        self.workers, self.prefetch = workers, max(prefetch, 2 * workers)
        self._pool: Pool | None = None
        self._pending: deque[AsyncResult] = deque()
        self._next_job = start_batch

    def _seeds(self, k: int) -> list[int]:
        base = self.seed * 1_000_003 + k * self.batch
        return [base + i for i in range(self.batch)]

    def __iter__(self) -> SampleStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.workers <= 0:
            out = make_batch(self._seeds(self.k), self.cfg)
        else:
            if self._pool is None:
                self._pool = mp.get_context("spawn").Pool(self.workers)
                self._next_job = self.k
            # keep `prefetch` batches in flight, in order (imap would queue endlessly)
            while len(self._pending) < self.prefetch:
                self._pending.append(self._pool.apply_async(
                    _worker, ((self._seeds(self._next_job), self.cfg),)))
                self._next_job += 1
            out = self._pending.popleft().get()
        self.k += 1
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
            self._pending.clear()


def heldout_set(n: int, cfg: DataConfig, seed: int = 987_654) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation set (seeds disjoint from training streams for seed < 900)."""
    return make_batch([seed * 1_000_003 + i for i in range(n)], cfg)
