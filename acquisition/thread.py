"""Drains the camera's sequence buffer: every frame, in order, to the sinks.

Micro-Manager has no per-frame callback for sequence acquisition, so a thread polls
`getRemainingImageCount()` and pops with `popNextImageAndMD()` until the buffer is empty,
then sleeps briefly. Each frame goes to the sinks (`acquisition.sinks`) in their order:
the recorder first (it never refuses and never waits: the recording is the primary data),
then the frame publisher (the engine's feed, `realtime.publisher`) and the raw view. No
sink can stall the camera buffer: every ``append`` only queues.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalInstance
from pymmcore_plus import CMMCorePlus

if TYPE_CHECKING:
    from useq import MDASequence

from acquisition.sinks import FrameMeta, FrameSink, SinkSet, StreamInfo

__all__ = ["AcquisitionThread", "stream_info"]

log = logging.getLogger(__name__)


def stream_info(core: CMMCorePlus, *, name: str = "", sequence: MDASequence | None = None,
                settings: Mapping[str, Any] | None = None) -> StreamInfo:
    """What the sinks need to know about the frames `core`'s camera is about to deliver."""
    cam = core.getCameraDevice()
    bpp = int(core.getBytesPerPixel())
    dtype = {1: "uint8", 2: "uint16", 4: "uint32"}.get(bpp, "uint16")
    py_cam = _python_camera(core, cam)
    period = getattr(py_cam, "frame_period_s", None)
    interval = float(period()) if callable(period) else None
    if interval is None and sequence is not None:
        t_plan = getattr(sequence, "time_plan", None)
        step = getattr(t_plan, "interval", None)
        secs = getattr(step, "total_seconds", None)
        interval = float(secs()) if callable(secs) and secs() > 0 else None
    return StreamInfo(
        shape=(int(core.getImageHeight()), int(core.getImageWidth())),
        dtype=dtype,
        camera=cam,
        exposure_ms=float(core.getExposure()),
        pixel_size_um=pixel_size_um(core),
        frame_interval_s=interval,
        name=name,
        sequence=sequence,
        settings=dict(settings or {}),
    )


def pixel_size_um(core: CMMCorePlus) -> float | None:
    """The core's pixel size (its pixel-size configuration), else the Python camera's."""
    try:
        um = float(core.getPixelSizeUm())
    except Exception:
        um = 0.0
    if um > 0:
        return um
    cam_um = getattr(_python_camera(core, core.getCameraDevice()), "pixel_size_um", None)
    return float(cam_um) if cam_um else None


def _python_camera(core: CMMCorePlus, label: str) -> object | None:
    """The Python camera object behind `label` (UniMMCore), else None."""
    getter = getattr(core, "_py_camera", None)
    if getter is None:
        return None
    try:
        return getter(label or None)
    except Exception:
        return None


class AcquisitionThread:
    """Runs a continuous (or `max_frames`-long) sequence acquisition into sinks.

    Signals (emitted from the acquisition thread; relay to Qt before touching widgets):
    ``stopped(frames_acquired)``: once, when the thread ends for any reason;
    ``error(message)``: the camera failed or stopped unexpectedly, or a sink failed.

    `start()` sets every sink up (``StreamInfo`` from the core) and starts the camera.
    `stop()` stops the sequence, drains what the camera buffer still holds and closes the
    sinks, so a recording is complete when `stop()` returns.
    """

    stopped = Signal(int)
    error = Signal(str)

    def __init__(
        self,
        mmcore: CMMCorePlus | None = None,
        *,
        sinks: Iterable[FrameSink] = (),
        max_frames: int | None = None,
        poll_interval_s: float = 0.001,
        name: str = "",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        self._core = mmcore or CMMCorePlus.instance()
        self.sinks = SinkSet(sinks, on_error=self._sink_failed)
        self.max_frames = max_frames
        self._poll_s = float(poll_interval_s)
        self._name = name
        self._settings = dict(settings or {})
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

        # counters (read from any thread; written only by the acquisition thread)
        self.frames_acquired = 0
        self.gaps = 0  # frames missing in the camera's ImageNumber sequence
        self.end_reason: str | None = None
        self.error_message: str | None = None
        self.info: StreamInfo | None = None

        self._camera = ""
        self._exposure_ms = 0.0
        self._pixel_um: float | None = None
        self._next_seq = 0
        self._last_image_number: int | None = None

    # ------------------------------------------------------------------ public API
    @property
    def camera(self) -> str:
        return self._camera

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        """Was ``start()`` called (the thread may have ended since)?"""
        return self._thread is not None

    def start(self) -> None:
        """Set the sinks up and start the sequence; raises at once if either cannot happen."""
        if self._thread is not None:
            raise RuntimeError("AcquisitionThread can only be started once")
        core = self._core
        self._camera = core.getCameraDevice()
        if not self._camera:
            raise RuntimeError("no camera device is set in the core (setCameraDevice)")
        if core.isSequenceRunning():
            raise RuntimeError(f"a sequence acquisition is already running on {self._camera!r}; "
                               "stop it first")
        if core.getNumberOfComponents() != 1:
            raise RuntimeError(f"camera {self._camera!r} delivers multi-component (RGB) images; "
                               "livesr needs single-channel frames")
        self.info = stream_info(core, name=self._name, settings=self._settings)
        self._exposure_ms = float(self.info.exposure_ms or 0.0)
        self._pixel_um = self.info.pixel_size_um
        try:
            self.sinks.setup(self.info)
        except Exception as e:
            self.sinks.close()
            raise RuntimeError(f"cannot start: {e}") from e
        try:
            if self.max_frames is not None:
                core.startSequenceAcquisition(self.max_frames, 0, False)
            else:
                core.startContinuousSequenceAcquisition(0)
        except Exception as e:
            self.sinks.close()
            raise RuntimeError(f"camera {self._camera!r} could not start acquiring: {e}") from e

        self._thread = threading.Thread(target=self._run, name="livesr-acquisition", daemon=True)
        self._thread.start()
        atexit.register(self._stop_at_exit)

    def stop(self, timeout: float | None = 30.0) -> int:
        """Stop, drain, close the sinks; returns frames acquired. Safe to call repeatedly."""
        self._stop_event.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return self.frames_acquired

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end by itself (a finite replay, max_frames, an error)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.is_alive()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        reason, err = "stopped", None
        next_exposure_check = time.monotonic() + 1.0
        try:
            core = self._core
            while True:
                if self._stop_event.is_set():
                    break
                n = core.getRemainingImageCount()
                if n > 0:
                    for _ in range(n):
                        self._pop_one()
                    continue
                if not core.isSequenceRunning():
                    self._drain_camera_buffer()
                    reason, err = self._why_camera_stopped()
                    break
                now = time.monotonic()
                if now >= next_exposure_check:  # setExposure emits no signal: poll it
                    self._exposure_ms = float(core.getExposure())
                    next_exposure_check = now + 1.0
                time.sleep(self._poll_s)
        except Exception as e:
            reason = "error"
            err = f"acquisition from {self._camera!r} failed: {type(e).__name__}: {e}"
            log.exception("acquisition failed")
        finally:
            self._shutdown(reason, err)

    def _pop_one(self) -> None:
        img, md = self._core.popNextImageAndMD()
        t_acq = time.time_ns()
        missing = self._count_gap(md.get("ImageNumber"))
        if missing:
            self.sinks.skip(frames=missing)
        seq = self._next_seq + missing
        self._next_seq = seq + 1
        meta = FrameMeta(
            seq=seq,
            t_acq_ns=t_acq,
            frame=self.frames_acquired,
            camera=self._camera,
            exposure_ms=self._exposure_ms,
            pixel_size_um=self._pixel_um,
            elapsed_ms=_as_float(md.get("ElapsedTime-ms")),
        )
        self.frames_acquired += 1
        self.sinks.append(np.ascontiguousarray(img), meta)

    def _count_gap(self, image_number: Any) -> int:
        """Frames the camera numbered but we never saw (overwritten in its buffer)."""
        try:
            num = int(image_number)
        except (TypeError, ValueError):
            return 0
        last, self._last_image_number = self._last_image_number, num
        if last is None or num <= last:
            return 0
        missing = num - last - 1
        if missing:
            self.gaps += missing
            log.warning("camera %r: %d frame(s) lost before ImageNumber %d (buffer overflow?)",
                        self._camera, missing, num)
        return missing

    def _drain_camera_buffer(self) -> None:
        while self._core.getRemainingImageCount() > 0:
            self._pop_one()

    # ------------------------------------------------------------------ ending
    def _why_camera_stopped(self) -> tuple[str, str | None]:
        cam = _python_camera(self._core, self._camera)
        n = self.frames_acquired
        failure = getattr(cam, "sequence_error", None)
        if failure:
            return "error", f"camera {self._camera!r} failed after {n} frames: {failure}"
        if getattr(cam, "sequence_end", None) == "end of source":
            return "end of source", None
        if self.max_frames is not None and n >= self.max_frames:
            return "max_frames", None
        try:
            if self._core.isBufferOverflowed():
                return "error", (f"camera {self._camera!r} stopped: its sequence buffer "
                                 f"overflowed after {n} frames")
        except Exception:
            pass
        return "error", f"camera {self._camera!r} stopped acquiring on its own after {n} frames"

    def _shutdown(self, reason: str, err: str | None) -> None:
        core = self._core
        try:
            if core.isSequenceRunning():
                core.stopSequenceAcquisition()
            self._drain_camera_buffer()  # frames acquired before the stop are kept
        except Exception as e:
            err = err or f"stopping camera {self._camera!r} failed: {type(e).__name__}: {e}"
        self.end_reason = reason
        for sink in self.sinks.sinks:  # the publisher tells the engine why the stream ended
            note = getattr(sink, "set_end_reason", None)
            if callable(note):
                note(reason)
        if err:
            log.error("%s", err)
        for msg in self.sinks.close():  # listeners of `error` report these
            err = err or msg
        atexit.unregister(self._stop_at_exit)
        if err:
            self.error_message = err
            self._emit(self.error, err)
        self._emit(self.stopped, self.frames_acquired)

    def _sink_failed(self, message: str) -> None:
        self._emit(self.error, message)

    def _stop_at_exit(self) -> None:
        self.stop(timeout=10.0)

    # ------------------------------------------------------------------ helpers
    def _emit(self, signal: SignalInstance, *args: object) -> None:
        try:
            signal.emit(*args)
        except Exception:  # a broken listener must not stop the acquisition
            log.exception("a %s listener raised", getattr(signal, "name", "signal"))


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None
