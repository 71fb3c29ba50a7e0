r"""Live super-resolution on any pymmcore-plus MDA run.

pymmcore-plus leaves on-the-fly processing to listeners: an object whose methods are
named like the MDA signals (``sequenceStarted``, ``frameReady(img, event, meta)``,
``sequenceFinished``) is connected with ``mda_listeners_connected(...,
asynchronous=True)``, which calls it from a relay thread, so the MDA never waits for it.
`LiveSR` is such a listener. It feeds every frame to the same sinks as the continuous live
mode (recorder first, then the engine's ZeroMQ feed, then the raw view) and delivers the
super-resolved images as psygnal signals (``resultReady``).

Streams: every position / channel / z plane of the sequence is its own stream
(``FrameMeta.stream_key``, e.g. ``"p0/c1/z0"``) whose ``seq`` is the time index; the
engine keeps one window (and one streaming state) per stream, so a window never mixes
frames of different positions, channels or z planes.

    core = CMMCorePlus(); core.loadSystemConfiguration("MMConfig_demo.cfg")
    with LiveSR(core, engine="sofi", record="run.ome.zarr") as sr, \
            mda_listeners_connected(sr, mda_events=core.mda.events):
        core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 300}))
    print(sr.metrics().outputs)

`MDASource` is the frame source the `Pipeline` uses in ``mode="mda"`` (``livesr mda``): it
runs the sequence itself on a thread, connected exactly as above.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from acquisition.sinks import FrameMeta, FrameSink, SinkSet, StreamInfo
from engines.registry import DEFAULT_ENGINE

from .config import PipelineConfig

__all__ = ["LiveSR", "MDASource", "load_sequence", "stream_key"]

log = logging.getLogger(__name__)

#: the axes that make a stream, in the order the key names them ("t" is the window axis)
STREAM_AXES = ("p", "g", "c", "z")


def stream_key(index: Mapping[str, int]) -> str:
    """``"p0/c1/z0"`` for an event index (axes the event has, in STREAM_AXES order)."""
    return "/".join(f"{ax}{int(index[ax])}" for ax in STREAM_AXES if ax in index)


def load_sequence(path: str | Path) -> Any:
    """A useq ``MDASequence`` from a YAML/JSON file, or ValueError saying what is wrong."""
    import useq

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such MDA sequence file: {p}")
    try:
        return useq.MDASequence.from_file(p)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read the MDA sequence {p}: {first}") from None


class MDASource:
    """Frames of an MDA run into sinks; an MDA listener (``frameReady(img, event, meta)``).

    With ``sequence`` it runs that sequence itself (`start`, on a thread, listeners
    connected asynchronously); without, it waits for the MDA the caller runs. Signals, as
    `AcquisitionThread`: ``stopped(frames_acquired)`` (after the sinks are closed) and
    ``error(message)``.
    """

    stopped = Signal(int)
    error = Signal(str)

    def __init__(self, mmcore: Any, *, sinks: Iterable[FrameSink | None] = (),
                 sequence: Any = None, name: str = "",
                 settings: Mapping[str, Any] | None = None) -> None:
        self._core = mmcore
        self.sinks = SinkSet([s for s in sinks if s is not None], on_error=self._emit_error)
        self.sequence = sequence
        self._name = name
        self._settings = dict(settings or {})
        self._lock = threading.Lock()
        self._state = "idle"  # idle -> armed -> running -> closed
        self._thread: threading.Thread | None = None
        self._seqs: dict[str, int] = {}
        self.frames_acquired = 0
        self.frames_after_close = 0  # frames of an MDA that went on after stop()
        self.end_reason: str | None = None
        self.error_message: str | None = None
        self.info: StreamInfo | None = None

    # ------------------------------------------------------------------ source API
    def start(self) -> None:
        """Arm (and, with a sequence, run it). Raises if the sinks cannot be set up."""
        with self._lock:
            if self._state != "idle":
                raise RuntimeError("an MDASource runs once")
            self._state = "armed"
        if self.sequence is None:
            return
        if self._core.mda.is_running():
            raise RuntimeError("an MDA is already running on this core")
        self._setup(self.sequence)  # fail before the MDA starts (file exists, bad format)
        self._thread = threading.Thread(target=self._run_sequence, name="livesr-mda", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> int:
        """Cancel the MDA we run (the caller's MDA goes on, unrecorded), close the sinks."""
        if self._thread is not None:
            if self._core.mda.is_running():
                self._core.mda.cancel()
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)
        self._close("stopped")
        return self.frames_acquired

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._state == "closed"

    def is_alive(self) -> bool:
        return self._state in ("armed", "running")

    def _run_sequence(self) -> None:
        from pymmcore_plus.mda import mda_listeners_connected

        try:
            with mda_listeners_connected(self, mda_events=self._core.mda.events,
                                         asynchronous=True):
                self._core.mda.run(self.sequence)
        except Exception as e:
            self._emit_error(f"the MDA run failed: {type(e).__name__}: {e}")
            self._close("error")
        finally:
            self._close(self.end_reason or "end of sequence")

    # ------------------------------------------------------------------ MDA listener
    def sequenceStarted(self, sequence: Any, meta: Mapping[str, Any] | None = None) -> None:
        if self._state == "armed" and self.info is None:
            try:
                self._setup(sequence)
            except Exception as e:
                self._emit_error(f"cannot record this MDA run: {e}")
                self._close("error")
                return
        with self._lock:
            if self._state == "armed":
                self._state = "running"

    def frameReady(self, img: np.ndarray, event: Any, meta: Mapping[str, Any] | None = None) -> None:
        if self._state not in ("armed", "running"):
            self.frames_after_close += 1
            return
        if self.info is None:  # connected after sequenceStarted: set up from this frame
            self.sequenceStarted(getattr(event, "sequence", None), None)
            if self._state == "closed":
                return
        info = self.info
        assert info is not None  # (set by sequenceStarted, which did not close)
        meta = meta or {}
        index = dict(getattr(event, "index", {}) or {})
        key = stream_key(index)
        seq = int(index["t"]) if "t" in index else self._seqs.get(key, -1) + 1
        self._seqs[key] = seq
        runner_ms = meta.get("runner_time_ms")
        fm = FrameMeta(
            seq=seq,
            # latency counts from the frame's arrival here: runner_time_ms mixes the camera's
            # and the runner's clocks (fine for frame intervals: elapsed_ms, not for latency)
            t_acq_ns=time.time_ns(),
            frame=self.frames_acquired,
            camera=str(meta.get("camera_device") or info.camera),
            exposure_ms=_num(meta.get("exposure_ms")) or info.exposure_ms,
            pixel_size_um=_num(meta.get("pixel_size_um")) or info.pixel_size_um,
            elapsed_ms=None if runner_ms is None else float(runner_ms),
            stream_key=key,
            index=index,
        )
        self.frames_acquired += 1
        self.sinks.append(np.ascontiguousarray(img), fm)

    def sequenceCanceled(self, sequence: Any = None) -> None:
        self.end_reason = "canceled"

    def sequenceFinished(self, sequence: Any = None) -> None:
        self._close(self.end_reason or "end of sequence")

    # ------------------------------------------------------------------ helpers
    def _setup(self, sequence: Any) -> None:
        from acquisition.thread import stream_info

        info = stream_info(self._core, name=self._name, sequence=sequence,
                           settings=self._settings)
        self.sinks.setup(info)
        self.info = info

    def _close(self, reason: str) -> None:
        with self._lock:
            if self._state == "closed":
                return
            started = self.info is not None
            self._state = "closed"
        self.end_reason = self.end_reason or reason
        for sink in self.sinks.sinks:
            note = getattr(sink, "set_end_reason", None)
            if callable(note):
                note(self.end_reason)
        errors = self.sinks.close() if started else []
        for msg in errors:
            self._emit_error(msg)
        try:
            self.stopped.emit(self.frames_acquired)
        except Exception:
            log.exception("a stopped listener raised")

    def _emit_error(self, message: str) -> None:
        self.error_message = self.error_message or message
        log.debug("%s", message)  # the pipeline reports it
        try:
            self.error.emit(message)
        except Exception:
            log.exception("an error listener raised")


class LiveSR:
    """Live super-resolution for an MDA run you drive: connect it as an MDA listener.

    ``with LiveSR(core, engine="sofi") as sr, mda_listeners_connected(sr, mda_events=...)``:
    entering loads the engine (in its own process) and returns once it is ready; the
    listener records (``record=``), streams every frame to the engine and emits
    ``resultReady(ResultHeader, image)`` per super-resolved image (``header.stream``
    says which position/channel/z); leaving waits for the last result and closes files.
    One `LiveSR` serves one MDA run. Keyword options are `PipelineConfig` fields
    (``window``, ``stride``, ``backend``, ``device``, ``save_sr``, ``json``, ...).
    """

    def __init__(self, mmcore: Any = None, *, engine: str | Any = DEFAULT_ENGINE,
                 record: str | Path | None = None, **options: Any) -> None:
        from pymmcore_plus import CMMCorePlus

        from .pipeline import Pipeline

        self.core = mmcore or CMMCorePlus.instance()
        engine_obj = None if isinstance(engine, str) else engine
        cfg = PipelineConfig(source="core", mode="mda", engine=engine if engine_obj is None
                             else str(getattr(engine, "name", "custom")),
                             record=None if record is None else Path(record),
                             seconds=None, headless=True, **options)
        cfg.addresses.frames = cfg.addresses.results = "tcp://127.0.0.1:0"
        self.pipeline = Pipeline(cfg, mmcore=self.core, engine=engine_obj)

    # psygnal signals of the run (emitted from pipeline threads)
    @property
    def resultReady(self) -> Any:
        return self.pipeline.resultReady

    @property
    def metricsUpdated(self) -> Any:
        return self.pipeline.metricsUpdated

    @property
    def error(self) -> Any:
        return self.pipeline.error

    @property
    def finished(self) -> Any:
        return self.pipeline.finished

    def start(self, timeout: float | None = None) -> None:
        """Start the engine and wait until it is ready for frames."""
        self.pipeline.start()
        limit = self.pipeline.config.engine_ready_timeout_s + 30.0 if timeout is None else timeout
        if not self.pipeline.wait_started(limit):
            self.pipeline.stop(wait=True)
            raise RuntimeError("; ".join(self.pipeline.metrics().errors)
                               or "the engine did not start")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the MDA run is over and every result has arrived."""
        return self.pipeline.wait(timeout)

    def stop(self) -> Any:
        return self.pipeline.stop(wait=True)

    def metrics(self) -> Any:
        return self.pipeline.metrics()

    def __enter__(self) -> LiveSR:
        self.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # the MDA ended (sequenceFinished closed the sinks) or the block raised: finish
        if exc_type is None:
            self.pipeline.wait(60.0)
        self.pipeline.stop(wait=True)

    # MDA listener methods (mda_listeners_connected finds them by name)
    def sequenceStarted(self, sequence: Any, meta: Any = None) -> None:
        self._source.sequenceStarted(sequence, meta)

    def frameReady(self, img: np.ndarray, event: Any, meta: Any = None) -> None:
        self._source.frameReady(img, event, meta)

    def sequenceCanceled(self, sequence: Any = None) -> None:
        self._source.sequenceCanceled(sequence)

    def sequenceFinished(self, sequence: Any = None) -> None:
        self._source.sequenceFinished(sequence)

    @property
    def _source(self) -> MDASource:
        src = self.pipeline.acquisition
        if src is None:
            raise RuntimeError("LiveSR is not started: use `with LiveSR(...)` or call start()")
        return src


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None
