"""Training data for the neural engines, simulated on the fly (seeded) by acquisition.simulation.

Why on the fly: a fresh random scene per sample (density, SNR, PSF, structure, motion, camera)
means the networks never see the same movie twice and learn to be camera-independent. Samples
are produced by background worker processes (`SampleStream`) so the trainer never waits on
numpy while torch computes.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from dataclasses import dataclass
import numpy as np

from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig


@dataclass
class DataConfig:
    """Ranges the random scenes are drawn from (each sample draws its own values)."""

    size: int = 32                       # patch size (input pixels)
    frames: int = 20                     # frames per sample
    per_frame_targets: bool = False      # ConvLSTM: one target per frame (moving scenes)
    target_from: int = 0                 # first frame that gets a target (per-frame mode)
    off_ms: tuple[float, float] = (600.0, 2400.0)
    emitters_per_um: tuple[float, float] = (25.0, 100.0)
    photons: tuple[float, float] = (150.0, 2000.0)
    background: tuple[float, float] = (3.0, 60.0)
    fwhm_nm: tuple[float, float] = (200.0, 260.0)
    structures_per_100um2: tuple[float, float] = (3.0, 10.0)
    p_mitochondria: float = 0.3
    p_moving: float = 0.3                # fraction of drifting/rotating scenes
    max_drift_px: float = 0.15           # px per frame
    max_rotation_deg: float = 0.3        # deg per frame
    p_emccd: float = 0.3
    target: str = "gt"                   # "gt" (ideal SOFI) | "sofi" (many-frame SOFI)
    sofi_frames: int = 500               # frames for --target sofi


def _logu(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def random_camera(rng: np.random.Generator, p_emccd: float) -> CameraNoise:
    """A random sCMOS or EMCCD: offset, gain and read noise vary so normalisation must cope."""
    if rng.random() < p_emccd:
        return CameraNoise.emccd(offset_adu=float(rng.uniform(100, 1000)),
                                 em_gain=float(rng.uniform(50, 300)),
                                 gain_e_per_adu=float(rng.uniform(3, 30)),
                                 read_noise_e=float(rng.uniform(20, 80)))
    return CameraNoise(kind="scmos", qe=float(rng.uniform(0.7, 0.95)),
                       offset_adu=float(rng.uniform(50, 1000)),
                       gain_e_per_adu=float(_logu(rng, (0.2, 4.0))),
                       read_noise_e=float(rng.uniform(0.8, 3.0)),
                       per_pixel_maps=bool(rng.random() < 0.3))


def random_sim_config(rng: np.random.Generator, cfg: DataConfig, seed: int) -> SimulationConfig:
    """Draw one scene's simulation parameters from the DataConfig ranges."""
    moving = rng.random() < cfg.p_moving
    drift = (0.0, 0.0)
    rot = 0.0
    if moving:
        if rng.random() < 0.6:
            ang = rng.uniform(0, 2 * np.pi)
            v = rng.uniform(0.02, cfg.max_drift_px)
            drift = (float(v * np.sin(ang)), float(v * np.cos(ang)))
        else:
            rot = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    return SimulationConfig(
        size=cfg.size,
        fwhm_nm=float(rng.uniform(*cfg.fwhm_nm)),
        off_ms=_logu(rng, cfg.off_ms),
        photons=_logu(rng, cfg.photons),
        background=_logu(rng, cfg.background),
        emitters_per_um=_logu(rng, cfg.emitters_per_um),
        structure="mitochondria" if rng.random() < cfg.p_mitochondria else "filaments",
        structures_per_100um2=float(rng.uniform(*cfg.structures_per_100um2)),
        drift_px_per_frame=drift,
        rotation_deg_per_frame=rot,
        camera=random_camera(rng, cfg.p_emccd),
        seed=seed,
    )


def _sofi_target(scene: BlinkingScene, n: int) -> np.ndarray:
    """Many-frame second-order SOFI of the scene (thesis-style target), max-normalised."""
    from engines import load_engine  # lazy: only for --target sofi

    movie = scene.frames(n)
    eng = load_engine("sofi", window=n)
    img = np.asarray(eng.reconstruct(movie), dtype=np.float32)
    img = np.clip(img, 0, None)
    peak = img.max()
    return img / peak if peak > 0 else img


def make_sample(seed: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: raw frames float32 (T, h, w) and target(s) float32.

    Target is (2h, 2w) of the last frame, or (T, 2h, 2w) with per_frame_targets (frames before
    `target_from` get zeros; the trainer ignores them).
    """
    rng = np.random.default_rng([seed, 0x5EED])
    sim = random_sim_config(rng, cfg, seed)
    scene = BlinkingScene(sim)
    if cfg.per_frame_targets:
        frames = np.empty((cfg.frames, cfg.size, cfg.size), np.float32)
        tgt = np.zeros((cfg.frames, 2 * cfg.size, 2 * cfg.size), np.float32)
        for t in range(cfg.frames):
            frames[t] = scene.next_frame()
            if t >= cfg.target_from:
                if t > cfg.target_from and not scene._moves:
                    tgt[t] = tgt[t - 1]
                else:
                    tgt[t] = scene.ground_truth()
        return frames, tgt
    frames = scene.frames(cfg.frames).astype(np.float32)
    if cfg.target == "sofi":
        return frames, _sofi_target(scene, cfg.sofi_frames)
    return frames, scene.ground_truth()


def make_batch(seeds: list[int], cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(make_sample(s, cfg) for s in seeds))
    return np.stack(xs), np.stack(ys)


def _worker(args: tuple[list[int], DataConfig]) -> tuple[np.ndarray, np.ndarray]:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
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
        self.workers, self.prefetch = workers, prefetch
        self._pool = None
        self._pending: deque = deque()
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
