"""Drains the camera's sequence buffer: every frame, in order, to the recorder and the engine.

Micro-Manager has no per-frame callback for sequence acquisition, so a thread polls
`getRemainingImageCount()` and pops with `popNextImageAndMD()` until the buffer is empty,
then sleeps briefly. Each frame goes, in this order:

1. to the recorder (never refused, never waits: the recording is the primary data);
2. to the engine over a ZeroMQ PUSH socket, without blocking: when the engine is slow and
   the socket's queue is full the message waits in a bounded backlog here, and only beyond
   that bound are the oldest unsent frames given up (counted in `publish_drops`; the seq
   gap tells the engine to restart its window rather than mix non-consecutive frames);
3. to `frameReady` listeners (the GUI's raw view).

So a slow (or absent) engine can never stall the camera buffer or the recording.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from psygnal import Signal
from pymmcore_plus import CMMCorePlus

from realtime.protocol import EndOfStream, FrameHeader, encode_eos, encode_frame

__all__ = ["AcquisitionThread"]

log = logging.getLogger(__name__)

SocketSetup = Callable[[zmq.Socket], None]


class AcquisitionThread:
    """Runs a continuous (or `max_frames`-long) sequence acquisition and publishes each frame.

    Signals (emitted from the acquisition thread; relay to Qt before touching widgets):
    ``frameReady(seq, image)``: every frame (do not modify `image`: the recorder and the
    socket share it); ``stopped(frames_acquired)``: once, when the thread ends for any
    reason; ``error(message)``: the camera failed or stopped unexpectedly, or recording or
    publishing failed.

    `stop()` stops the sequence, drains what the camera buffer still holds, flushes the
    publish backlog (up to `linger_ms`), sends an `EndOfStream`, and closes the recorder,
    so the file is complete when `stop()` returns.
    """

    frameReady = Signal(int, object)
    stopped = Signal(int)
    error = Signal(str)

    def __init__(
        self,
        mmcore: CMMCorePlus | None = None,
        *,
        address: str,
        recorder: Any | None = None,
        max_frames: int | None = None,
        sndhwm: int = 1000,
        publish_backlog: int = 1000,
        linger_ms: int = 2000,
        poll_interval_s: float = 0.001,
        context: zmq.Context | None = None,
        socket_setup: SocketSetup | None = None,
        stream: str = "",
    ) -> None:
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        if publish_backlog < 1 or sndhwm < 1:
            raise ValueError("sndhwm and publish_backlog must be >= 1")
        self._core = mmcore or CMMCorePlus.instance()
        self.address = address
        self.recorder = recorder
        self.max_frames = max_frames
        self._sndhwm = int(sndhwm)
        self._backlog_max = int(publish_backlog)
        self._linger_ms = int(linger_ms)
        self._poll_s = float(poll_interval_s)
        self._own_context = context is None
        self._context = context
        self._socket_setup = socket_setup
        self.stream = stream  # the run's stream id, stamped on every frame and the EOS

        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._backlog: deque[tuple[list, Any]] = deque()

        # counters (read from any thread; written only by the acquisition thread)
        self.frames_acquired = 0
        self.frames_published = 0
        self.publish_drops = 0
        self.gaps = 0  # frames missing in the camera's ImageNumber sequence
        self.end_reason: str | None = None
        self.error_message: str | None = None

        self._camera = ""
        self._exposure_ms = 0.0
        self._pixel_um: float | None = None
        self._next_seq = 0
        self._last_image_number: int | None = None

    # ------------------------------------------------------------------ public API
    @property
    def frames_recorded(self) -> int:
        """Frames on disk (final once `stop()` returned: the recorder is then closed)."""
        return int(getattr(self.recorder, "frames_recorded", 0)) if self.recorder else 0

    @property
    def publish_backlog(self) -> int:
        """Frames waiting here for the engine's socket to accept them."""
        return len(self._backlog)

    @property
    def camera(self) -> str:
        return self._camera

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind the socket and start the sequence; raises at once if either cannot happen."""
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
        self._exposure_ms = float(core.getExposure())
        self._pixel_um = self._pixel_size()
        if self._sock is None:
            self.bind()
        sock = self._sock
        assert sock is not None

        try:
            if self.max_frames is not None:
                core.startSequenceAcquisition(self.max_frames, 0, False)
            else:
                core.startContinuousSequenceAcquisition(0)
        except Exception as e:
            sock.close(linger=0)
            self._sock = None
            self._term_context()
            raise RuntimeError(f"camera {self._camera!r} could not start acquiring: {e}") from e

        self._thread = threading.Thread(target=self._run, name="livesr-acquisition", daemon=True)
        self._thread.start()
        atexit.register(self._stop_at_exit)

    def bind(self) -> str:
        """Bind the frame socket now (before `start`) and return the real endpoint.

        With port 0 (``tcp://127.0.0.1:0``) the OS picks a free port; the endpoint read back
        from ZeroMQ is what engines must connect to (no bind-close-rebind race).
        """
        if self._sock is not None:
            return self.address
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.PUSH)
        try:
            if self._socket_setup is not None:
                self._socket_setup(sock)
            sock.setsockopt(zmq.SNDHWM, self._sndhwm)
            sock.setsockopt(zmq.LINGER, self._linger_ms)
            sock.bind(self.address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._term_context()
            raise RuntimeError(f"cannot bind the frame socket at {self.address}: {e.strerror}") from e
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        return self.address

    def stop(self, timeout: float | None = 30.0) -> int:
        """Stop, drain, flush, close; returns frames acquired. Safe to call repeatedly."""
        self._stop_event.set()
        if self._thread is None and self._sock is not None:  # bound but never started
            self._sock.close(linger=0)
            self._sock = None
            self._term_context()
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
                    self._flush_backlog()
                    continue
                self._flush_backlog()
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
        seq = self._next_seq + self._count_gap(md.get("ImageNumber"))
        self._next_seq = seq + 1
        self.frames_acquired += 1
        img = np.ascontiguousarray(img)
        elapsed = md.get("ElapsedTime-ms")
        header = FrameHeader(
            seq=seq,
            t_acq_ns=t_acq,
            shape=(int(img.shape[0]), int(img.shape[1])),
            dtype=img.dtype.name,
            camera=self._camera,
            exposure_ms=self._exposure_ms,
            pixel_size_um=self._pixel_um,
            elapsed_ms=_as_float(elapsed),
            stream=self.stream,
        )
        if self.recorder is not None:  # first: the recording must hold every frame
            self.recorder.put(img, seq, t_acq)
        self._publish(encode_frame(header, img), img)
        self._emit(self.frameReady, seq, img)

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

    # ------------------------------------------------------------------ publishing
    def _publish(self, parts: list, img: np.ndarray) -> None:
        self._backlog.append((parts, img))
        self._flush_backlog()
        while len(self._backlog) > self._backlog_max:
            self._backlog.popleft()  # oldest first: the engine wants the newest frames
            self.publish_drops += 1
            if self.publish_drops == 1 or self.publish_drops % 1000 == 0:
                log.warning("engine too slow: %d frame(s) not published (recording keeps them)",
                            self.publish_drops)

    def _flush_backlog(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._backlog:
            parts, _img = self._backlog[0]
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._backlog.popleft()
            self.frames_published += 1

    def _flush_until(self, deadline: float) -> None:
        while self._backlog and time.monotonic() < deadline:
            self._flush_backlog()
            if self._backlog:
                wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
                self._sock.poll(min(wait_ms, 50), zmq.POLLOUT)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ ending
    def _why_camera_stopped(self) -> tuple[str, str | None]:
        cam = self._python_camera()
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

        deadline = time.monotonic() + self._linger_ms / 1000.0
        try:
            self._flush_until(deadline)
            if self._backlog:
                log.warning("%d frame(s) never reached an engine before the stop",
                            len(self._backlog))
                self.publish_drops += len(self._backlog)
                self._backlog.clear()
            eos = encode_eos(EndOfStream(frames_sent=self.frames_acquired, reason=reason,
                                       stream=self.stream))
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if self._sock.poll(remaining_ms, zmq.POLLOUT):  # type: ignore[union-attr]
                self._sock.send_multipart(eos, flags=zmq.NOBLOCK)  # type: ignore[union-attr]
            else:
                log.warning("end-of-stream not delivered: no engine is reading %s", self.address)
        except Exception as e:
            err = err or f"publishing to {self.address} failed: {type(e).__name__}: {e}"
        finally:
            if self._sock is not None:
                self._sock.close(linger=self._linger_ms)  # queued frames still go out
            self._term_context()

        if self.recorder is not None:
            try:
                self.recorder.close()
            except Exception as e:
                err = err or f"recording failed: {type(e).__name__}: {e}"
        atexit.unregister(self._stop_at_exit)

        if err:
            self.error_message = err
            log.error("%s", err)
            self._emit(self.error, err)
        self._emit(self.stopped, self.frames_acquired)

    def _term_context(self) -> None:
        if self._own_context and self._context is not None:
            self._context.term()  # returns once linger has delivered or expired
            self._context = None

    def _stop_at_exit(self) -> None:
        self.stop(timeout=self._linger_ms / 1000.0 + 5.0)

    # ------------------------------------------------------------------ helpers
    def _emit(self, signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except Exception:  # a broken listener must not stop the acquisition
            log.exception("a %s listener raised", getattr(signal, "name", "signal"))

    def _pixel_size(self) -> float | None:
        try:
            um = float(self._core.getPixelSizeUm())
        except Exception:
            um = 0.0
        if um > 0:
            return um
        cam_um = getattr(self._python_camera(), "pixel_size_um", None)
        return float(cam_um) if cam_um else None

    def _python_camera(self) -> Any | None:
        """The Python camera object behind the current label (UniMMCore), else None."""
        getter = getattr(self._core, "_py_camera", None)
        if getter is None:
            return None
        try:
            return getter(self._camera or None)
        except Exception:
            return None


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None
