"""The engine's feed: a frame sink that sends every frame over a ZeroMQ PUSH socket.

`append` never blocks the acquisition: it puts the frame on a bounded backlog that the
publisher's own thread sends (PUSH/PULL, so nothing is dropped in transit). When the
engine is slow and the socket's queue is full, frames wait in the backlog (a
``DropOldestQueue``), and only beyond its bound are the oldest unsent frames given up
(``publish_drops``; the seq gap tells the engine to restart its window rather than mix
non-consecutive frames). The recorder is a separate sink fed before this one, so a given-up frame is still recorded.
`close` flushes the backlog (up to ``linger_ms``) and sends an `EndOfStream`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from acquisition.sinks import FrameMeta, StreamInfo

from .protocol import EndOfStream, FrameHeader, encode_eos, encode_frame
from .send_queue import DropOldestQueue

__all__ = ["FramePublisher"]

log = logging.getLogger(__name__)

SocketSetup = Callable[[zmq.Socket], None]


class FramePublisher:
    """Binds `address` (PUSH) at construction, so a taken port fails before the camera starts.

    With port 0 (``tcp://127.0.0.1:0``) the OS picks a free port; ``address`` is then the real
    endpoint read back from ZeroMQ, which engines must connect to (no bind-close-rebind race).
    ``run_id`` is the run's id, stamped on every frame and on the EndOfStream.
    """

    name = "frame publisher"

    def __init__(self, address: str, *, sndhwm: int = 1000, backlog: int = 1000,
                 linger_ms: int = 2000, socket_setup: SocketSetup | None = None,
                 context: zmq.Context | None = None, run_id: str = "") -> None:
        if backlog < 1 or sndhwm < 1:
            raise ValueError("sndhwm and backlog must be >= 1")
        self.address = address
        self.run_id = run_id
        self._linger_ms = int(linger_ms)
        self._own_context = context is None
        self._context = context or zmq.Context()
        sock = self._context.socket(zmq.PUSH)
        try:
            if socket_setup is not None:
                socket_setup(sock)
            sock.setsockopt(zmq.SNDHWM, int(sndhwm))
            sock.setsockopt(zmq.LINGER, self._linger_ms)
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._term()
            raise RuntimeError(f"cannot bind the frame socket at {address}: {e.strerror}") from e
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock: zmq.Socket | None = sock
        self._backlog: DropOldestQueue[tuple[np.ndarray, FrameMeta]] = DropOldestQueue(max_items=int(backlog))
        self._cv = threading.Condition()
        self._closing = False
        self._end_reason = "stopped"
        self._info: StreamInfo | None = None
        self._thread: threading.Thread | None = None
        self.frames_appended = 0
        self.frames_published = 0
        self.error: str | None = None

    @property
    def publish_backlog(self) -> int:
        """Frames waiting here for the engine's socket to accept them."""
        return len(self._backlog)

    @property
    def publish_drops(self) -> int:
        """Frames given up: the backlog was full, or they never reached an engine before the stop."""
        return self._backlog.dropped

    # ------------------------------------------------------------------ sink API
    def setup(self, info: StreamInfo) -> None:
        self._info = info
        self._thread = threading.Thread(target=self._run, name="livesr-frame-publisher",
                                        daemon=True)
        self._thread.start()

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        if self.error is not None:
            raise RuntimeError(self.error)
        with self._cv:
            self.frames_appended += 1
            if self._backlog.put((frame, meta)):  # the oldest went (the engine wants the newest)
                if self.publish_drops == 1 or self.publish_drops % 1000 == 0:
                    log.warning("engine too slow: %d frame(s) not published (the recording "
                                "keeps them)", self.publish_drops)
            self._cv.notify()

    def skip(self, *, frames: int = 1) -> None:
        pass  # the seq gap in the next header tells the engine

    def set_end_reason(self, reason: str) -> None:
        """Why the stream ends (sent in the EndOfStream): "stopped", "end of source", ..."""
        self._end_reason = reason

    def close(self) -> None:
        """Flush the backlog (up to linger), send the EndOfStream, close the socket."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(self._linger_ms / 1000.0 + 10.0)
        else:  # never set up (the run did not start): no stream to end, nobody to tell
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close(linger=0)
            self._term()

    # ------------------------------------------------------------------ sending thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._backlog and not self._closing:
                        self._cv.wait()
                    if not self._backlog:
                        break
                    frame, meta = self._backlog.peek()
                    self._backlog.head_in_flight = True
                if not self._send(frame, meta, deadline=None):
                    break
        except Exception as e:
            self.error = f"publishing to {self.address} failed: {type(e).__name__}: {e}"
            log.error("%s", self.error)
        finally:
            self._finish()

    def _send(self, frame: np.ndarray, meta: FrameMeta, deadline: float | None) -> bool:
        """Send the oldest backlog frame once the socket takes it; False if closing ran out."""
        sock = self._sock
        assert sock is not None
        parts = encode_frame(_header(frame, meta, self.run_id), frame)
        while True:
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                pass
            if self._closing:
                if deadline is None:
                    deadline = time.monotonic() + self._linger_ms / 1000.0
                if time.monotonic() >= deadline:
                    return False
            sock.poll(50, zmq.POLLOUT)
        with self._cv:
            self._backlog.pop()  # the in-flight frame is never given up, so it is the head
            self.frames_published += 1
        return True

    def _finish(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            with self._cv:
                unsent = self._backlog.clear()
            if unsent:
                log.warning("%d frame(s) never reached an engine before the stop", unsent)
            eos = encode_eos(EndOfStream(frames_sent=self.frames_appended, reason=self._end_reason,
                                         run_id=self.run_id))
            if sock.poll(self._linger_ms, zmq.POLLOUT):
                sock.send_multipart(eos, flags=zmq.NOBLOCK)
            else:
                log.warning("end-of-stream not delivered: no engine is reading %s", self.address)
        except Exception as e:
            self.error = self.error or f"publishing to {self.address} failed: {type(e).__name__}: {e}"
        finally:
            sock.close(linger=self._linger_ms)  # queued frames still go out
            self._term()

    def _term(self) -> None:
        if self._own_context and self._context is not None:
            self._context.term()  # returns once linger has delivered or expired
            self._context = None  # type: ignore[assignment]


def _header(frame: np.ndarray, meta: FrameMeta, run_id: str) -> FrameHeader:
    return FrameHeader(
        seq=meta.seq,
        t_acq_ns=meta.t_acq_ns,
        shape=(int(frame.shape[0]), int(frame.shape[1])),
        dtype=frame.dtype.name,  # checked against the known dtypes when encoded
        camera=meta.camera,
        exposure_ms=float(meta.exposure_ms or 0.0),
        pixel_size_um=meta.pixel_size_um,
        elapsed_ms=meta.elapsed_ms,
        run_id=run_id,
        stream=meta.stream_key,
    )
