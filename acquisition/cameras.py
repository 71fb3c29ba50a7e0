"""Frame sources as Micro-Manager cameras: simulated blinking sample, TIFF replay, hardware.

Every source is a pymmcore-plus camera, so the rest of livesr only ever talks to a
`CMMCorePlus` (sequence acquisition, `popNextImageAndMD`, ROI, exposure) and never knows
whether the frames come from a sensor, the simulator or a file. The Python cameras run in
`UniMMCore` without a Micro-Manager installation.

A Python camera must pace itself (UniMMCore ignores `intervalMs`). `FramePacer` schedules
frame k at `t0 + (k + 1) * period` on the monotonic clock, so the long-run rate is exact
however long each frame takes to compute (no drift from `sleep(period)` per frame).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, UniMMCore

from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig
from acquisition.structures import ALL_STRUCTURES

log = logging.getLogger(__name__)

__all__ = [
    "CAMERA_MODELS",
    "FramePacer",
    "MicroManagerConfigError",
    "PacedCamera",
    "ReplayCamera",
    "ReplayFileError",
    "ReplayStack",
    "SimulatedCamera",
    "load_replay_stack",
    "make_core",
]

# Default labels under which make_core loads the Python cameras.
SIM_LABEL = "SimCamera"
REPLAY_LABEL = "ReplayCamera"
PIXEL_CONFIG = "livesr-px"


class ReplayFileError(ValueError):
    """A file that cannot be replayed; the message names the path and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot replay {self.path!r}: {problem}")


class MicroManagerConfigError(RuntimeError):
    """A Micro-Manager .cfg that cannot be loaded (no installation, missing or bad file)."""


# --------------------------------------------------------------------------- pacing
class FramePacer:
    """Deadline scheduler: frame k is due at ``t0 + (k + 1) * period`` (monotonic clock).

    When the producer falls more than `max_lag_frames` behind (a stall, an overloaded
    machine), the schedule restarts from now instead of bursting to catch up: a real
    camera does not deliver a backlog of frames at once either.
    """

    def __init__(self, period_s: float, *, max_lag_frames: int = 5,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s}")
        self._period = period_s
        self._max_lag = max_lag_frames
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._k = 0
        self.resyncs = 0

    @property
    def period_s(self) -> float:
        return self._period

    def set_period(self, period_s: float) -> None:
        """Change the rate from the next frame on, keeping the current frame's deadline."""
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s}")
        if period_s != self._period:
            self._t0 = self._t0 + self._k * self._period
            self._k = 0
            self._period = period_s

    def wait(self) -> None:
        """Block until the next frame is due."""
        due = self._t0 + (self._k + 1) * self._period
        now = self._clock()
        if due > now:
            self._sleep(due - now)
        elif now - due > self._max_lag * self._period:
            self._t0 = now - (self._k + 1) * self._period  # this frame is due now
            self.resyncs += 1
        self._k += 1


# --------------------------------------------------------------------------- base camera
class PacedCamera(SimpleCameraDevice):
    """Base of livesr's Python cameras: paced sequences, software ROI, and why a sequence ended.

    Subclasses implement `sensor_shape`, `dtype`, `frame_period_s` and `next_image(buffer)`
    (fill the full-sensor buffer, return metadata, or None when the source is exhausted).
    `sequence_end` / `sequence_error` let the acquisition thread tell a normal end (a replay
    that played once) from a camera failure: UniMMCore itself only ends the sequence.
    """

    pixel_size_um: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 10.0
        self._actual_interval_ms = 0.0
        self.sequence_end: str | None = None
        self.sequence_error: str | None = None
        self.frames_delivered = 0

    # -- what subclasses provide ------------------------------------------------------
    @abstractmethod
    def frame_period_s(self) -> float:
        """Seconds between frames (read every frame, so rate changes apply live)."""

    @abstractmethod
    def next_image(self, buffer: np.ndarray) -> Mapping[str, Any] | None:
        """Fill `buffer` (full sensor) with the next frame; None when nothing is left."""

    def on_sequence_start(self, n: int | None) -> None:
        """Hook called before the first frame of every sequence (`n` frames; 1 for a snap)."""

    def on_sequence_end(self) -> None:
        """Hook called when a sequence ends, however it ends."""

    # -- standard properties ----------------------------------------------------------
    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if not float(exposure) > 0:
            raise ValueError(f"exposure must be > 0 ms, got {exposure}")
        self._exposure_ms = float(exposure)

    def get_actual_interval_ms(self) -> float:
        """Measured time between the last two delivered frames."""
        return self._actual_interval_ms

    # -- acquisition --------------------------------------------------------------------
    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        meta = self.next_image(buffer)
        if meta is None:
            raise RuntimeError(f"{type(self).__name__}: no frame left to snap")
        return meta

    def start_sequence(
        self,
        n: int | None,
        get_buffer: Callable[[Sequence[int], Any], np.ndarray],
    ) -> Iterator[Mapping[str, Any]]:
        """Render, wait for the frame's deadline, then hand it to the core's buffer."""
        self.sequence_end = None
        self.sequence_error = None
        self.frames_delivered = 0
        limit = math.inf if n is None else n
        try:
            self.on_sequence_start(n)
            sensor, dtype = self.sensor_shape(), np.dtype(self.dtype())
            roi, out_shape = self._roi, self.shape()
            scratch = np.empty(sensor, dtype=dtype)
            pacer = FramePacer(self.frame_period_s())
            last = None
            count = 0
            while count < limit:
                meta = self.next_image(scratch)
                if meta is None:
                    self.sequence_end = "end of source"
                    return
                pacer.set_period(self.frame_period_s())
                pacer.wait()
                out = get_buffer(out_shape, dtype)
                if roi is None:
                    out[...] = scratch
                else:
                    x, y, w, h = roi
                    out[...] = scratch[y : y + h, x : x + w]
                now = time.monotonic()
                if last is not None:
                    self._actual_interval_ms = (now - last) * 1000.0
                last = now
                count += 1
                self.frames_delivered = count
                yield {"Exposure-ms": f"{self._exposure_ms:.3f}", **meta}
            self.sequence_end = "requested frames acquired"
        except Exception as exc:
            self.sequence_error = f"{type(exc).__name__}: {exc}"
            if n == 1:
                raise  # snapImage: the caller gets the error directly
            # A sequence: the acquisition thread reports it (`error` signal); the sequence
            # ends quietly instead of UniMMCore printing an unhandled thread exception.
            log.error("camera %r failed during sequence acquisition", self.get_label(),
                      exc_info=True)
        finally:
            self.on_sequence_end()


# --------------------------------------------------------------------------- simulated camera
CAMERA_MODELS: dict[str, Callable[[], CameraNoise]] = {
    "scmos": CameraNoise,
    "emccd": CameraNoise.emccd,
    "ideal": lambda: CameraNoise(kind="ideal"),
}


@dataclass(frozen=True)
class _SimProp:
    """One simulator setting exposed as a Micro-Manager property."""

    attr: str
    type: type
    limits: tuple[float, float] | None = None
    allowed: tuple[Any, ...] | None = None


# Micro-Manager property name -> SimulationConfig field. Changing one rebuilds the scene
# (same seed, so the same structure) at the next frame; "Size" applies at the next sequence.
_SIM_PROPS: dict[str, _SimProp] = {
    "Size": _SimProp("size", int, limits=(8, 4096)),
    "OnTime-ms": _SimProp("on_ms", float, limits=(0.01, 1e6)),
    "OffTime-ms": _SimProp("off_ms", float, limits=(0.01, 1e7)),
    "Photons": _SimProp("photons", float, limits=(0.0, 1e7)),
    "Background": _SimProp("background", float, limits=(0.0, 1e6)),
    "EmittersPerUm": _SimProp("emitters_per_um", float, limits=(0.0, 1e4)),
    "DriftX-px": _SimProp("drift_x", float, limits=(-10.0, 10.0)),
    "DriftY-px": _SimProp("drift_y", float, limits=(-10.0, 10.0)),
    "Rotation-deg": _SimProp("rotation_deg_per_frame", float, limits=(-10.0, 10.0)),
    "CameraModel": _SimProp("camera", str, allowed=tuple(CAMERA_MODELS)),
    "Structure": _SimProp("structure", str, allowed=ALL_STRUCTURES),
    "Seed": _SimProp("seed", int, limits=(0, 2**31 - 1)),
}


class SimulatedCamera(PacedCamera):
    """A camera looking at a blinking sample (`BlinkingScene`), at a steady frame rate.

    As on a real sensor, the exposure never exceeds the frame period: a longer exposure
    lowers the frame rate, a higher frame rate shortens the exposure. "Photons" is per
    on-emitter per frame. Changing a setting mid-sequence rebuilds the scene with the same
    seed (same structure); "Size" applies from the next sequence, whose buffer shape it sets.
    """

    def __init__(self, config: SimulationConfig | None = None) -> None:
        self._cfg = config or SimulationConfig()
        super().__init__()
        self._exposure_ms = 1000.0 / self._cfg.fps
        self._scene: BlinkingScene | None = None
        self._scene_cfg: SimulationConfig | None = None  # the config the scene was built from
        self._scene_lock = threading.Lock()
        self._running_size: int | None = None  # sensor size fixed for the running sequence
        self._register_sim_properties()

    # -- configuration ------------------------------------------------------------------
    @property
    def config(self) -> SimulationConfig:
        return self._cfg

    @property
    def pixel_size_um(self) -> float:  # type: ignore[override]
        return self._cfg.pixel_nm / 1000.0

    def update_config(self, **changes: Any) -> None:
        """Replace simulator settings (SimulationConfig fields); validated immediately."""
        cfg = replace(self._cfg, **changes)
        if self._roi is not None and "size" in changes:
            x, y, w, h = self._roi
            if x + w > cfg.size or y + h > cfg.size:
                self._roi = None  # the ROI no longer fits the sensor
        self._cfg = cfg
        self._exposure_ms = min(self._exposure_ms, 1000.0 / cfg.fps)

    def set_exposure(self, exposure: float) -> None:
        super().set_exposure(exposure)
        if self._exposure_ms > 1000.0 / self._cfg.fps:
            self._cfg = replace(self._cfg, fps=1000.0 / self._exposure_ms)

    def _register_sim_properties(self) -> None:
        self.register_property("FPS", property_type=float, limits=(0.1, 10_000.0),
                               getter=lambda _d: self._cfg.fps,
                               setter=lambda _d, v: self.update_config(fps=float(v)))
        for name, p in _SIM_PROPS.items():
            self.register_property(
                name,
                property_type=p.type,
                limits=p.limits,
                allowed_values=p.allowed,
                getter=self._sim_getter(p),
                setter=self._sim_setter(p),
            )

    def _sim_getter(self, p: _SimProp) -> Callable[[object], Any]:
        return lambda _d: p.type(self._get_sim(p.attr))

    def _sim_setter(self, p: _SimProp) -> Callable[[object, Any], None]:
        return lambda _d, v: self._set_sim(p.attr, p.type(v))

    def _get_sim(self, attr: str) -> Any:
        c = self._cfg
        if attr == "drift_x":
            return c.drift_px_per_frame[1]
        if attr == "drift_y":
            return c.drift_px_per_frame[0]
        if attr == "camera":
            return c.camera.kind
        if attr == "seed":
            return -1 if c.seed is None else c.seed
        return getattr(c, attr)

    def _set_sim(self, attr: str, value: Any) -> None:
        dy, dx = self._cfg.drift_px_per_frame
        if attr == "drift_x":
            self.update_config(drift_px_per_frame=(dy, float(value)))
        elif attr == "drift_y":
            self.update_config(drift_px_per_frame=(float(value), dx))
        elif attr == "camera":
            self.update_config(camera=CAMERA_MODELS[str(value)]())
        else:
            self.update_config(**{attr: value})

    # -- Interval_ms (standard) maps onto FPS ---------------------------------------------
    def get_interval_ms(self) -> float:
        return 1000.0 / self._cfg.fps

    def set_interval_ms(self, value: float) -> None:
        if not float(value) > 0:
            raise ValueError(f"interval must be > 0 ms, got {value}")
        self.update_config(fps=1000.0 / float(value))

    # -- camera ---------------------------------------------------------------------------
    def sensor_shape(self) -> tuple[int, int]:
        size = self._running_size or self._cfg.size
        return (size, size)

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def frame_period_s(self) -> float:
        return 1.0 / self._cfg.fps

    def on_sequence_start(self, n: int | None) -> None:
        self._running_size = self._cfg.size
        with self._scene_lock:  # build before the pacer starts its clock
            self._ensure_scene(self._running_size)

    def on_sequence_end(self) -> None:
        self._running_size = None

    def _ensure_scene(self, size: int) -> BlinkingScene:
        """The scene for the current settings; rebuilt (same seed: same structure) after a
        change. Comparing config identity cannot miss a change made while building."""
        cfg = self._cfg
        if self._scene is None or self._scene_cfg is not cfg or self._scene.cfg.size != size:
            self._scene = BlinkingScene(replace(cfg, size=size))
            self._scene_cfg = cfg
        return self._scene

    def next_image(self, buffer: np.ndarray) -> Mapping[str, Any]:
        with self._scene_lock:
            scene = self._ensure_scene(buffer.shape[0])
            frame = scene.next_frame()
            index = scene.frame_index - 1
        buffer[...] = frame
        return {"SimFrame": str(index)}


# --------------------------------------------------------------------------- replay camera
@dataclass
class ReplayStack:
    """A movie loaded for replay and what its file says about how it was recorded."""

    frames: np.ndarray  # (T, H, W) unsigned integers
    fps: float | None  # recorded frame rate, when the file says
    fps_source: str  # where `fps` came from ("ImageJ finterval", "OME TimeIncrement", ...)
    pixel_size_um: float | None
    path: str


_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.uint32)


def load_replay_stack(path: str | Path) -> ReplayStack:
    """Read a TIFF movie fully, or raise one `ReplayFileError` saying what is wrong with it."""
    import tifffile

    p = Path(path)
    if not p.exists():
        raise ReplayFileError(p, "file not found")
    if p.is_dir():
        raise ReplayFileError(p, "is a directory, not a TIFF file")
    if p.stat().st_size == 0:
        raise ReplayFileError(p, "file is empty (0 bytes)")

    # tifffile logs (rather than raises) most structural damage and returns what it can:
    # a truncated movie would silently replay 1 of 100 frames. Treat its errors as fatal.
    problems: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(record.getMessage())

    handler = _Collect(level=logging.ERROR)
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(handler)
    try:
        with tifffile.TiffFile(p) as tf:
            if not tf.pages or not tf.series:
                raise ReplayFileError(p, "TIFF contains no images")
            series = tf.series[0]
            axes, shape = series.axes, series.shape
            data = series.asarray()
            ij = tf.imagej_metadata or {}
            ome = tf.ome_metadata if tf.is_ome else None
            mm = tf.micromanager_metadata if tf.is_micromanager else None
            xres = tf.pages.first.tags.get("XResolution")
            xres = xres.value if xres is not None else None
            resunit = tf.pages.first.tags.get("ResolutionUnit")
            resunit = int(resunit.value) if resunit is not None else 1
            n_pages = len(tf.pages)
    except ReplayFileError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise ReplayFileError(p, f"not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    finally:
        tlog.removeHandler(handler)
    if problems:
        raise ReplayFileError(p, f"corrupted or truncated TIFF ({problems[0]})")

    if "S" in axes:
        raise ReplayFileError(p, f"colour/multi-sample images are not supported (shape {shape}, "
                                 f"axes {axes!r}); expected single-channel (frames, height, width)")
    # drop singleton leading axes (e.g. T=1, C=1), then expect (T, H, W) or (H, W)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise ReplayFileError(p, f"wrong dimensions: shape {shape} (axes {axes!r}); expected a "
                                 "single-channel time series (frames, height, width)")
    if data.shape[0] == 0 or data.shape[1] == 0 or data.shape[2] == 0:
        raise ReplayFileError(p, f"contains no pixels (shape {data.shape})")
    expected = ij.get("images")
    if isinstance(expected, int) and expected > data.shape[0] and n_pages < expected:
        raise ReplayFileError(p, f"truncated: the ImageJ header says {expected} images, "
                                 f"only {data.shape[0]} are readable")

    if data.dtype.kind == "i" and data.dtype.itemsize <= 2:
        lo = int(data.min())
        if lo < 0:
            raise ReplayFileError(p, f"signed pixels with negative values (min {lo}) cannot "
                                     "be replayed as camera counts")
        data = data.astype(np.uint16)
    if data.dtype.type not in _SUPPORTED_DTYPES:
        raise ReplayFileError(p, f"unsupported pixel type {data.dtype} (a camera delivers "
                                 "uint8/uint16/uint32 counts)")

    fps, source = _recorded_fps(ij, ome, mm)
    return ReplayStack(frames=np.ascontiguousarray(data), fps=fps, fps_source=source,
                       pixel_size_um=_pixel_size_um(ij, ome, xres, resunit), path=str(p))


_TIMESTAMP = re.compile(r"timestamp #\d+\s*=\s*([0-9.eE+-]+)")


def _recorded_fps(ij: Mapping[str, Any], ome: str | None,
                  mm: Mapping[str, Any] | None) -> tuple[float | None, str]:
    """The rate the movie was recorded at, from whatever metadata the file carries."""
    finterval = ij.get("finterval")
    if isinstance(finterval, (int, float)) and finterval > 0:
        return 1.0 / float(finterval), "ImageJ finterval"
    fps = ij.get("fps")
    if isinstance(fps, (int, float)) and fps > 0:
        return float(fps), "ImageJ fps"
    if ome:
        m = re.search(r'TimeIncrement="([0-9.eE+-]+)"', ome)
        unit = re.search(r'TimeIncrementUnit="([^"]+)"', ome)
        if m and float(m.group(1)) > 0:
            scale = {"ms": 1e-3, "µs": 1e-6, "us": 1e-6, "min": 60.0}.get(
                unit.group(1) if unit else "s", 1.0)
            return 1.0 / (float(m.group(1)) * scale), "OME TimeIncrement"
        deltas = [float(x) for x in re.findall(r'DeltaT="([0-9.eE+-]+)"', ome)]
        if len(deltas) > 2 and np.median(np.diff(deltas)) > 0:
            return 1.0 / float(np.median(np.diff(deltas))), "OME Plane DeltaT"
    info = ij.get("Info")
    if isinstance(info, str):
        stamps = [float(x) for x in _TIMESTAMP.findall(info)]  # NIS-Elements, in seconds
        if len(stamps) > 2 and np.median(np.diff(stamps)) > 0:
            return 1.0 / float(np.median(np.diff(stamps))), "NIS-Elements timestamps"
        m = re.search(r"Interval_ms\s*[=:]\s*([0-9.]+)", info)
        if m and float(m.group(1)) > 0:
            return 1000.0 / float(m.group(1)), "Micro-Manager Interval_ms"
    if isinstance(mm, Mapping):
        summary = mm.get("Summary", mm)
        interval = summary.get("Interval_ms") if isinstance(summary, Mapping) else None
        if isinstance(interval, (int, float)) and interval > 0:
            return 1000.0 / float(interval), "Micro-Manager Interval_ms"
    return None, "none"


def _pixel_size_um(ij: Mapping[str, Any], ome: str | None,
                   xres: tuple[int, int] | None, resunit: int) -> float | None:
    """Pixel size from OME, or from the TIFF resolution when ImageJ says microns or the
    TIFF says centimetres (inches are the 72-dpi default of non-microscopy files)."""
    if ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        if m and float(m.group(1)) > 0:
            scale = {"nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm", 1.0)
            return float(m.group(1)) * scale
    if xres is None or xres[0] <= 0:
        return None
    if str(ij.get("unit", "")).lower() in ("micron", "microns", "um", "µm", "\\u00b5m"):
        return xres[1] / xres[0]
    if resunit == 3:  # centimetre
        return 1e4 * xres[1] / xres[0]
    return None


class ReplayCamera(PacedCamera):
    """Plays a TIFF movie as if a camera were acquiring it, at its recorded or a chosen rate.

    The file is read and checked fully at construction (`ReplayFileError`), so a bad file
    fails before any acquisition starts. Each sequence starts from the first frame; with
    ``loop=False`` the sequence ends after the last frame, as a finite acquisition would.
    """

    DEFAULT_FPS = 100.0

    def __init__(self, path: str | Path | ReplayStack, *, fps: float | None = None,
                 loop: bool = True, crop: tuple[int, int, int, int] | None = None) -> None:
        self._stack = path if isinstance(path, ReplayStack) else load_replay_stack(path)
        super().__init__()
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self._fps = float(fps or self._stack.fps or self.DEFAULT_FPS)
        self._loop = bool(loop)
        self._index = 0
        self._exposure_ms = 1000.0 / self._fps
        self.register_property("FPS", property_type=float, limits=(0.1, 10_000.0),
                               getter=lambda _d: self._fps, setter=lambda _d, v: self._set_fps(v))
        self.register_property("Loop", property_type=str, allowed_values=("Yes", "No"),
                               getter=lambda _d: "Yes" if self._loop else "No",
                               setter=lambda _d, v: setattr(self, "_loop", v == "Yes"))
        self.register_property("Frames", property_type=int, is_read_only=True,
                               getter=lambda _d: int(self._stack.frames.shape[0]))
        self.register_property("File", property_type=str, is_read_only=True,
                               getter=lambda _d: self._stack.path)
        if crop is not None:
            x, y, w, h = (int(v) for v in crop)
            self.set_roi(x, y, w, h)

    @classmethod
    def from_array(cls, frames: np.ndarray, *, fps: float, loop: bool = True,
                   pixel_size_um: float | None = None) -> ReplayCamera:
        """Replay frames held in memory (benchmarks: a source that is never the bottleneck)."""
        data = np.ascontiguousarray(frames)
        if data.ndim != 3 or data.dtype.type not in _SUPPORTED_DTYPES or 0 in data.shape:
            raise ValueError(f"need (T, H, W) unsigned camera counts, got {data.dtype} {data.shape}")
        stack = ReplayStack(frames=data, fps=fps, fps_source="given", pixel_size_um=pixel_size_um,
                            path="<memory>")
        return cls(stack, fps=fps, loop=loop)

    @property
    def stack(self) -> ReplayStack:
        return self._stack

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def loop(self) -> bool:
        return self._loop

    @property
    def pixel_size_um(self) -> float | None:  # type: ignore[override]
        return self._stack.pixel_size_um

    def _set_fps(self, value: float) -> None:
        if not float(value) > 0:
            raise ValueError(f"fps must be > 0, got {value}")
        self._fps = float(value)

    def get_interval_ms(self) -> float:
        return 1000.0 / self._fps

    def set_interval_ms(self, value: float) -> None:
        self._set_fps(1000.0 / float(value))

    def sensor_shape(self) -> tuple[int, int]:
        _, h, w = self._stack.frames.shape
        return (h, w)

    def dtype(self) -> np.dtype:
        return self._stack.frames.dtype

    def frame_period_s(self) -> float:
        return 1.0 / self._fps

    def on_sequence_start(self, n: int | None) -> None:
        # a sequence plays from the first frame; successive snaps step through the movie
        if n != 1 or self._index >= self._stack.frames.shape[0]:
            self._index = 0

    def next_image(self, buffer: np.ndarray) -> Mapping[str, Any] | None:
        n = self._stack.frames.shape[0]
        if self._index >= n:
            if not self._loop:
                return None
            self._index = 0
        i = self._index
        buffer[...] = self._stack.frames[i]
        self._index += 1
        return {"ReplayFrame": str(i)}


# --------------------------------------------------------------------------- factory
def _set_pixel_size(core: CMMCorePlus, um: float | None) -> None:
    """Declare the pixel size so `getPixelSizeUm()` reports it (an empty pixel config);
    a camera that does not know it removes the previous camera's, rather than inherit it."""
    if not um:
        if PIXEL_CONFIG in core.getAvailablePixelSizeConfigs():
            core.deletePixelSizeConfig(PIXEL_CONFIG)
        return
    if PIXEL_CONFIG not in core.getAvailablePixelSizeConfigs():
        core.definePixelSizeConfig(PIXEL_CONFIG)
    core.setPixelSizeUm(PIXEL_CONFIG, float(um))
    core.setPixelSizeConfig(PIXEL_CONFIG)


def _load_python_camera(core: CMMCorePlus | None, label: str, camera: PacedCamera) -> UniMMCore:
    if core is None:
        core = UniMMCore()
    if not isinstance(core, UniMMCore):
        raise TypeError(f"Python cameras need a UniMMCore, got {type(core).__name__}; "
                        "pass mmcore=UniMMCore() or leave mmcore=None")
    if label in core.getLoadedDevices():
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
        core.unloadDevice(label)
    core.loadPyDevice(label, camera)
    core.initializeDevice(label)
    core.setCameraDevice(label)
    _set_pixel_size(core, camera.pixel_size_um)
    return core


def make_core(source: str | Path | np.ndarray = "sim", *, size: int = 256,
              fps: float | None = 100.0, loop: bool = True,
              crop: int | tuple[int, int, int, int] | None = None,
              mmcore: CMMCorePlus | None = None, **sim_opts: Any) -> CMMCorePlus:
    """A core with its camera set: ``"sim"``, a ``.tif``/``.tiff`` movie, a ``.cfg`` file, or
    a (T, H, W) array replayed from memory (``pixel_size_um=`` may go with it).

    `sim_opts` are `SimulationConfig` fields (``on_ms=...``, ``camera="emccd"`` or a
    `CameraNoise`, ...). For a movie, ``fps=None`` plays it at its recorded rate (100 fps
    when the file does not say). `crop` sets the camera ROI: ``(x, y, width, height)``, or
    an int for a centred square of that side.
    """
    cam: SimulatedCamera | ReplayCamera
    core: CMMCorePlus
    if isinstance(source, np.ndarray):
        cam = ReplayCamera.from_array(source, fps=float(fps or ReplayCamera.DEFAULT_FPS),
                                      loop=loop, pixel_size_um=sim_opts.pop("pixel_size_um", None))
        if sim_opts:
            raise TypeError(f"options {sorted(sim_opts)} do not apply to a replay")
        core = _load_python_camera(mmcore, REPLAY_LABEL, cam)
        if crop is not None:
            core.setROI(*_crop_rect(crop, core.getImageWidth(), core.getImageHeight()))
        return core
    src = str(source)
    suffix = Path(src).suffix.lower()
    if src == "sim":
        cam_opt = sim_opts.pop("camera", None)
        if isinstance(cam_opt, str):
            if cam_opt not in CAMERA_MODELS:
                raise ValueError(f"unknown camera model {cam_opt!r}; "
                                 f"choose from {sorted(CAMERA_MODELS)}")
            sim_opts["camera"] = CAMERA_MODELS[cam_opt]()
        elif cam_opt is not None:
            sim_opts["camera"] = cam_opt
        cfg = SimulationConfig(size=size, fps=float(fps or 100.0), **sim_opts)
        cam = SimulatedCamera(cfg)
        core = _load_python_camera(mmcore, SIM_LABEL, cam)
    elif suffix in (".tif", ".tiff"):
        if sim_opts:
            raise TypeError(f"simulation options {sorted(sim_opts)} do not apply to a replay")
        cam = ReplayCamera(src, fps=fps if fps else None, loop=loop)
        core = _load_python_camera(mmcore, REPLAY_LABEL, cam)
    elif suffix == ".cfg":
        if sim_opts:
            raise TypeError(f"simulation options {sorted(sim_opts)} do not apply to a .cfg")
        core = _load_micromanager_config(src, mmcore)
    else:
        raise ValueError(f"unknown source {src!r}: use 'sim', a .tif/.tiff movie or a "
                         "Micro-Manager .cfg file")
    if crop is not None:
        core.setROI(*_crop_rect(crop, core.getImageWidth(), core.getImageHeight()))
    return core


def _crop_rect(crop: int | Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` from a rectangle or a centred square of side `crop`."""
    if isinstance(crop, (int, np.integer)):
        side = int(crop)
        if not 1 <= side <= min(width, height):
            raise ValueError(f"crop {side} does not fit the {width}x{height} frame")
        return ((width - side) // 2, (height - side) // 2, side, side)
    if len(crop) != 4:
        raise ValueError("crop must be an int (centred square) or (x, y, width, height), "
                         f"got {crop!r}")
    x, y, w, h = (int(v) for v in crop)
    return (x, y, w, h)


def _load_micromanager_config(path: str, mmcore: CMMCorePlus | None) -> CMMCorePlus:
    from pymmcore_plus import find_micromanager

    p = Path(path).expanduser()
    if not p.is_file():
        raise MicroManagerConfigError(f"Micro-Manager config {str(p)!r} not found")
    if mmcore is None and find_micromanager() is None:
        raise MicroManagerConfigError(
            f"cannot load {str(p)!r}: no Micro-Manager installation was found. "
            "Install the device adapters with `mmcore install` (pymmcore-plus), "
            "or try livesr without a microscope: `livesr demo` (simulated camera) or "
            "`livesr replay MOVIE.tif`."
        )
    core = mmcore or CMMCorePlus()
    try:
        core.loadSystemConfiguration(str(p))
    except Exception as exc:
        raise MicroManagerConfigError(
            f"cannot load Micro-Manager config {str(p)!r}: {' '.join(str(exc).split())}") from exc
    if not core.getCameraDevice():
        raise MicroManagerConfigError(f"Micro-Manager config {str(p)!r} sets no camera device")
    return core
