"""Typed configuration shared by the CLI, the GUI and the pipeline (stdlib and the torch-free
engine registry only).

The defaults run the embedded demo: a simulated 256x256 camera at 100 frames/s streamed to
second-order SOFI on loopback sockets. The CLI maps its flags onto these dataclasses and
nothing else; the GUI edits the same objects.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# the backend lists live in the torch-free engine registry; re-exported here for the callers
from engines.registry import (
    ANY_ENGINE_MIN_WINDOW,
    BACKEND_ALIASES,
    BACKEND_CHOICES,
    BACKENDS,
    DEFAULT_ENGINE,
    ENGINES,
    PRECISIONS,
    EngineSpec,
    canonical_backend,
    default_window,
)

__all__ = [
    "Addresses",
    "BACKENDS",
    "BACKEND_ALIASES",
    "BACKEND_CHOICES",
    "DEFAULT_FRAMES_ADDR",
    "DEFAULT_RESULTS_ADDR",
    "PipelineConfig",
    "available_memory_bytes",
    "canonical_backend",
    "SofiOptions",
    "free_tcp_address",
    "memory_problem",
    "output_problem",
]

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")

#: frames per output assumed for the memory estimate when --window is not given (the
#: largest default of the registered engines)
ASSUMED_WINDOW = default_window()


def available_memory_bytes() -> int | None:
    """MemAvailable (Linux), else free physical pages; None when this OS does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_problem(height: int, width: int, window: int | None, *, rendered_px: int = 0,
                   available: int | None = None) -> str | None:
    """Why a run with (H, W) frames and this window would not fit in memory (None: it fits).

    A rough lower bound: the engine holds `window` frames as float64 (window x H x W x 8
    bytes), works on a few full-size float images (x 16), and frames in flight between
    camera, recorder and engine take up to 64 raw frames; a simulated camera renders its
    ``rendered_px`` pixels in float64 too (x 10). Refused above 80 % of the memory available.
    """
    px = int(height) * int(width)
    w = int(window or ASSUMED_WINDOW)
    need = w * px * 8 + 16 * px * 8 + 64 * px * 2 + 10 * int(rendered_px) * 8
    have = available_memory_bytes() if available is None else available
    if have is None or need <= 0.8 * have:
        return None
    return (f"{width}x{height} frames with {w} frames per output need about {need / 1e9:.1f} GB "
            f"of memory ({w} x {height} x {width} x 8 bytes in the engine, plus working images "
            f"and frames in flight); {have / 1e9:.1f} GB are available: use a smaller --window, "
            "--size or --crop")


def output_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be written as the run's ``what`` output (None: it can)."""
    if path.is_dir():
        return f"{what} {path} is a folder, not a file"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders that would be created
    if not parent.is_dir():
        return f"{what} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{what} {path} cannot be written (no write permission in {parent})"
    return None

DEFAULT_FRAMES_ADDR = "tcp://127.0.0.1:0"  # camera frames: PUSH (bind) -> PULL (connect)
DEFAULT_RESULTS_ADDR = "tcp://127.0.0.1:0"  # results: SUB (bind) <- PUB (connect)


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` whose port was free a moment ago (TESTS ONLY).

    Racy by nature (bind, close, hope nobody takes the port before it is bound again), so
    livesr itself never uses it: it binds port 0 and reads the endpoint back from ZeroMQ.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


@dataclass
class Addresses:
    """ZeroMQ endpoints, both bound by the pipeline's own process. Loopback by default:
    nothing listens on the network unless asked.

    Port 0 (the default, ``tcp://127.0.0.1:0``) lets the OS pick a free port at bind time;
    the pipeline reads the real endpoint back (``Pipeline.endpoints``), so two runs on one
    machine never share a port. A fixed port that is taken is a clear start-up error.
    """

    frames: str = DEFAULT_FRAMES_ADDR
    results: str = DEFAULT_RESULTS_ADDR


@dataclass
class SofiOptions:
    """What SOFI needs to know about the microscope and the camera (see ``engines.psf``, ``engines.sofi``).

    Every field is optional: without them SOFI uses NA 1.4 / 600 nm, the pixel size the camera
    (Micro-Manager pixel-size configuration, or the movie's metadata) reports, else 0.1 um, lag
    "auto" and a quadratic bleaching correction, and says so in every result's ``info``.
    """

    psf_fwhm_nm: float | None = None  # PSF FWHM in the sample; excludes na / wavelength_nm
    na: float | None = None  # objective numerical aperture (FWHM = 0.51 lambda / NA)
    wavelength_nm: float | None = None  # emission wavelength
    pixel_size_um: float | None = None  # overrides what the camera reports
    lag: int | str = "auto"  # time lag of the cumulants in frames, or "auto"
    bleach_order: int = 2  # per-pixel polynomial trend removed in each window; 0 = no correction

    def problems(self) -> list[str]:
        out = []
        for name, lo, hi in (("psf_fwhm_nm", 0.0, 10_000.0), ("na", 0.0, 1.7), ("wavelength_nm", 150.0, 2_000.0),
                             ("pixel_size_um", 0.0, 100.0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or not lo < v <= hi):
                positive = lo == 0 and isinstance(v, (int, float)) and v <= 0
                out.append(f"{name} must be a positive number, got {v!r}" if positive
                           else f"{name} must be in ({lo:g}, {hi:g}], got {v!r}")
        if self.psf_fwhm_nm is not None and (self.na is not None or self.wavelength_nm is not None):
            out.append("give --psf-fwhm-nm or --na/--wavelength-nm, not both")
        if self.lag != "auto" and (isinstance(self.lag, bool) or not isinstance(self.lag, int)
                                   or self.lag < 0):
            out.append(f"lag must be 'auto' or an integer >= 0 frames, got {self.lag!r}")
        if (isinstance(self.bleach_order, bool) or not isinstance(self.bleach_order, int)
                or not 0 <= self.bleach_order <= 3):
            out.append(f"bleach_order must be 0 (off) .. 3, got {self.bleach_order!r}")
        return out

    def engine_options(self, pixel_size_um: float | None = None,
                       pixel_size_source: str | None = None) -> dict[str, Any]:
        """Keyword arguments for the sofi engine; ``pixel_size_um`` is what the camera reported
        (used unless this config overrides it)."""
        if self.pixel_size_um is not None:
            pixel_size_um, pixel_size_source = self.pixel_size_um, "--pixel-size-um"
        optics = {"psf_fwhm_nm": self.psf_fwhm_nm, "na": self.na, "wavelength_nm": self.wavelength_nm,
                  "pixel_size_um": pixel_size_um, "pixel_size_source": pixel_size_source if pixel_size_um else None}
        return {"optics": {k: v for k, v in optics.items() if v is not None},
                "lag": self.lag, "bleach_order": self.bleach_order}


@dataclass
class PipelineConfig:
    """Everything one live run needs: source, engine, outputs.

    ``source`` is what ``acquisition.cameras.make_core`` understands: "sim" for the simulated
    camera, a TIFF path to replay a recorded movie, or a Micro-Manager ``.cfg`` path; or
    "core" for the core given to the pipeline, as it is (an MDA run the caller drives).
    ``mode`` "live" acquires continuously; "mda" takes its frames from a pymmcore-plus MDA
    run: of ``sequence`` (a useq-schema YAML/JSON file) when given, else of whatever MDA
    the caller runs with the listener connected (`realtime.mda.LiveSR`).
    """

    # source
    source: str = "sim"
    mode: str = "live"  # "live" | "mda"
    sequence: Path | None = None  # useq MDASequence file (mode "mda")
    size: int = 256  # simulated camera: H = W = size pixels
    fps: float | None = 100.0  # simulated / replay frame rate; None = the movie's own rate
    loop: bool = False  # replay: loop the movie instead of stopping at its end
    crop: int | None = None  # centre crop to crop x crop pixels (camera ROI)
    roi: tuple[int, int, int, int] | None = None  # explicit camera ROI (x, y, width, height)
    exposure_ms: float | None = None  # None = the camera's default
    seconds: float | None = 10.0  # run length; None = until stopped (or the replay ends)
    # engine
    engine: str = DEFAULT_ENGINE
    window: int | None = None  # frames per output; None = the engine's default
    stride: int = 1  # one output every `stride` frames
    backend: str = "eager"
    device: str = "cpu"
    precision: str = "fp32"
    weights: str | None = None
    worker_mode: str = "process"  # "process" (default, own GIL) | "thread" (tests)
    threads: int | None = None  # engine compute threads; None = half the cores (1..4)
    # outputs
    record: Path | None = None  # every acquired frame: *.ome.tif (OME-TIFF) or *.ome.zarr
    save_sr: Path | None = None  # every super-resolved image, same formats
    # when the recording cannot be written (full disk, ...): "stop" the run, or "continue"
    # acquiring and reconstructing without recording (the live view goes on)
    recording_failure: str = "stop"
    json: Path | None = None  # metrics summary
    overwrite: bool = False  # replace an existing recording file
    headless: bool = False
    addresses: Addresses = field(default_factory=Addresses)
    # remote engine(s) (`livesr engine` on a GPU machine) instead of a local worker
    engine_at: tuple[str, ...] = ()  # frames endpoints, e.g. ("tcp://gpu-box:5570",)
    server_key: Path | None = None  # the engines' public server.key (CURVE)
    client_key: Path | None = None  # this PC's .key_secret (CURVE)
    # timeouts
    engine_ready_timeout_s: float = 120.0  # loading torch + weights in a fresh process
    # SOFI optics and corrections (for an engine that takes optics, and the trust check's companion)
    sofi: SofiOptions = field(default_factory=SofiOptions)
    # a network's outputs are checked against a companion SOFI of this many frames (engines.trust)
    trust: bool = True
    trust_window: int = 100

    def __post_init__(self) -> None:
        for k in ("record", "save_sr", "sequence"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, Path):
                setattr(self, k, Path(v))
        if self.json is not None and not isinstance(self.json, Path):
            self.json = Path(self.json)
        if self.roi is not None and not isinstance(self.roi, tuple):
            self.roi = tuple(self.roi)
        if not isinstance(self.engine_at, tuple):
            self.engine_at = tuple(self.engine_at or ())
        for k in ("server_key", "client_key"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, Path):
                setattr(self, k, Path(v))

    def validate(self) -> PipelineConfig:
        """Raise ValueError with a readable message for absurd values; return self."""
        problems = []
        if not isinstance(self.size, int) or self.size < 4:
            problems.append(f"size must be an integer >= 4 pixels, got {self.size!r}")
        if self.fps is not None and (not (self.fps > 0) or self.fps > 100_000):
            problems.append(f"fps must be > 0 (and sane), got {self.fps!r}")
        if self.seconds is not None and not (0 <= self.seconds < math.inf):
            problems.append(f"seconds must be >= 0 (and finite), got {self.seconds!r}")
        if self.window is not None and (not isinstance(self.window, int)
                                        or self.window < ANY_ENGINE_MIN_WINDOW):
            problems.append(f"window must be an integer >= {ANY_ENGINE_MIN_WINDOW} frames, got {self.window!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            problems.append(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 4):
            problems.append(f"crop must be an integer >= 4 pixels, got {self.crop!r}")
        if self.roi is not None and (
            len(self.roi) != 4 or any(not isinstance(v, int) for v in self.roi)
            or self.roi[0] < 0 or self.roi[1] < 0 or self.roi[2] < 4 or self.roi[3] < 4
        ):
            problems.append("roi (crop X,Y,W,H) must have x, y >= 0 and width, height >= 4 pixels, "
                            f"got {self.roi!r}")
        if self.roi is not None and self.crop is not None:
            problems.append("give either crop or roi, not both")
        if self.exposure_ms is not None and not (0 < self.exposure_ms < math.inf):
            problems.append(f"exposure_ms must be > 0 (and finite), got {self.exposure_ms!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            problems.append(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.worker_mode not in ("process", "thread"):
            problems.append(f"worker_mode must be 'process' or 'thread', got {self.worker_mode!r}")
        if not self.engine:
            problems.append("engine name is empty")
        if self.mode not in ("live", "mda"):
            problems.append(f"mode must be 'live' or 'mda', got {self.mode!r}")
        if self.sequence is not None and self.mode != "mda":
            problems.append("a sequence needs mode 'mda'")
        if self.mode == "mda" and len(self.engine_at) > 1:
            problems.append("an MDA run cannot be shared between several remote engines "
                            "(one --engine-at)")
        if self.recording_failure not in ("stop", "continue"):
            problems.append(f"recording_failure must be 'stop' or 'continue', got "
                            f"{self.recording_failure!r}")
        for k in ("record", "save_sr"):
            path = getattr(self, k)
            if path is not None:
                from acquisition.formats import recording_format  # stdlib only

                try:
                    recording_format(path)
                except ValueError as e:
                    problems.append(str(e))
        for ep in self.engine_at:
            if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://")):
                problems.append(f"engine_at entries must look like tcp://HOST:PORT, got {ep!r}")
        if (self.server_key is None) != (self.client_key is None):
            problems.append("server_key and client_key go together (CURVE needs both)")
        if canonical_backend(str(self.backend)) not in BACKEND_CHOICES:
            problems.append(f"unknown backend {self.backend!r}: choose one of "
                            f"{', '.join(BACKEND_CHOICES)}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            problems.append(f"unknown device {self.device!r}: use cpu, cuda, cuda:N or auto")
        if self.precision not in PRECISIONS:
            problems.append(f"unknown precision {self.precision!r}: "
                            f"use {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
        if self.engine_at:
            defaults = {f.name: f.default for f in fields(self)}
            chosen = [k for k in ("engine", "backend", "device", "precision", "weights", "threads")
                      if getattr(self, k) != defaults[k]]
            if self.sofi != SofiOptions():
                chosen.append("SOFI optics/corrections")
            if chosen:
                flags = ", ".join(k if " " in k else "--" + k for k in chosen)
                problems.append(f"{flags} cannot be sent to a remote engine (--engine-at): the "
                                "remote runs what `livesr engine` was started with; leave them "
                                "out here, or restart the remote with them")
        for path, what in ((self.json, "--json"), (self.record, "--record")):
            why = output_problem(path, what) if path is not None else None
            if why:
                problems.append(why)
        if self.source == "sim" and not problems:
            side = min(self.crop or self.size, self.size)
            h, w = (self.roi[3], self.roi[2]) if self.roi else (side, side)
            why = memory_problem(h, w, self.window, rendered_px=self.size * self.size)
            if why:
                problems.append(why)
        problems += self.sofi.problems()
        if isinstance(self.trust_window, bool) or not isinstance(self.trust_window, int) or self.trust_window < 10:
            problems.append(f"trust_window must be an integer >= 10 frames, got {self.trust_window!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def source_kind(self) -> str:
        """"sim", "replay" (a TIFF movie), "mm" (a Micro-Manager .cfg) or "core" (as given)."""
        if self.source in ("sim", "core"):
            return self.source
        return "mm" if self.source.lower().endswith(".cfg") else "replay"

    def engine_spec(self, pixel_size_um: float | None = None,
                    pixel_size_source: str | None = None) -> EngineSpec:
        """The engine this run asks for, whole (``engines.load_engine(spec)``, the worker).

        An engine that takes optics (SOFI) gets the optics and corrections; ``pixel_size_um``
        is the camera's (the pipeline reads it from the core before the engine starts). The
        trust check's companion SOFI gets the same optics.
        """
        sofi = self.sofi.engine_options(pixel_size_um, pixel_size_source)
        info = ENGINES.get(self.engine)
        return EngineSpec(
            self.engine, window=self.window, backend=self.backend, device=self.device,
            precision=self.precision, weights=self.weights,
            options=sofi if info is not None and info.takes_optics else {},
            trust=None if self.trust else False,
            trust_options={"window": self.trust_window, "sofi": sofi},
        )

    def replace(self, **changes: Any) -> PipelineConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # (sofi becomes a nested dict)
        for k in ("record", "save_sr", "sequence", "json", "server_key", "client_key"):
            d[k] = None if d[k] is None else str(d[k])
        d["engine_at"] = list(self.engine_at)
        return d
