"""Where acquired frames go: one small sink contract shared by the live and the MDA modes.

In the spirit of pymmcore-plus's ``SinkProtocol`` (``mda/_sink.py``): a source (the
continuous `AcquisitionThread`, or an MDA run through `realtime.mda`) calls ``setup`` once,
``append`` for every frame in acquisition order, ``skip`` for frames it knows it lost, and
``close`` at the end. The recorder, the ZeroMQ frame publisher and the GUI's raw view are
sinks; a source only ever talks to a `SinkSet`.

Two rules make a slow or broken sink harmless:

* ``append`` must return at once (queue the work): the recorder queues to its own thread,
  the publisher to its own socket thread; `ThreadedSink` gives any other sink a thread.
* `SinkSet` feeds the sinks in order (the recorder first) and isolates them: a sink that
  raises is reported once and taken out; the others, and the acquisition, go on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from psygnal import Signal

if TYPE_CHECKING:
    from useq import MDASequence

__all__ = [
    "FrameClock",
    "FrameMeta",
    "FrameSink",
    "SignalSink",
    "SinkSet",
    "StreamInfo",
    "ThreadedSink",
    "is_multi_stream",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamInfo:
    """What every sink learns before the first frame (from the core and the source).

    ``sequence`` is the useq ``MDASequence`` of an MDA run (None for continuous live
    acquisition: an unbounded time axis). ``settings`` are the livesr settings of the run,
    written into recordings as annotations.
    """

    shape: tuple[int, int]
    dtype: str
    camera: str = ""
    exposure_ms: float | None = None
    pixel_size_um: float | None = None
    frame_interval_s: float | None = None  # nominal; recordings also keep measured times
    name: str = ""
    sequence: MDASequence | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameMeta:
    """One frame's metadata, as a source hands it to every sink.

    ``seq`` counts frames of one stream (consecutive unless the camera lost some);
    ``stream_key`` names the stream in an MDA run (position / channel / z, e.g.
    ``"p0/c1/z0"``; empty in live mode): frames of different keys never share an
    engine window. ``index`` is the MDA event index (``{"t": 3, "c": 1}``).
    ``frame`` counts every frame of the run in acquisition order.
    """

    seq: int
    t_acq_ns: int
    frame: int = 0
    camera: str = ""
    exposure_ms: float | None = None
    pixel_size_um: float | None = None
    elapsed_ms: float | None = None
    stream_key: str = ""
    index: Mapping[str, int] = field(default_factory=dict)
    source_range: tuple[int, int] | None = None  # super-resolved images: input seq range


class FrameClock:
    """Seconds since a stream's first frame, for recordings.

    The source's own clock (``elapsed_ms``: the camera's ElapsedTime-ms, pymmcore-plus's
    runner_time_ms) when the first frame has one; else the time livesr received the frame
    (``t_acq_ns``). An MDA listener receives frames in bursts from a relay thread, so only
    the source's clock gives true frame intervals there.
    """

    def __init__(self) -> None:
        self._first: tuple[str, float] | None = None

    def seconds(self, meta: FrameMeta) -> float:
        if self._first is None:
            self._first = (("elapsed", float(meta.elapsed_ms)) if meta.elapsed_ms is not None
                           else ("acq", float(meta.t_acq_ns)))
        kind, t0 = self._first
        if kind == "elapsed" and meta.elapsed_ms is not None:
            return (float(meta.elapsed_ms) - t0) / 1000.0
        if kind == "acq":
            return (meta.t_acq_ns - t0) / 1e9
        return float("nan")  # a frame without the clock the stream started on


def is_multi_stream(sequence: MDASequence | None) -> bool:
    """Does an MDA sequence have more than one position, grid point, channel or z plane?"""
    sizes = getattr(sequence, "sizes", {}) or {}
    return any(int(sizes.get(k, 0) or 0) > 1 for k in ("p", "c", "z", "g"))


@runtime_checkable
class FrameSink(Protocol):
    """A consumer of acquired frames. Called from the source's thread, in this order:

    ``setup(info)`` once before the first frame (may raise: the run does not start);
    ``append(frame, meta)`` per frame, in acquisition order; it must return at once and
    must not modify ``frame`` (other sinks share it); ``skip(frames=n)`` when the source
    knows it lost n frames; ``close()`` once at the end (finish files, send end-of-stream).
    """

    def setup(self, info: StreamInfo) -> None: ...
    def append(self, frame: np.ndarray, meta: FrameMeta) -> None: ...
    def skip(self, *, frames: int = 1) -> None: ...
    def close(self) -> None: ...


def _sink_name(sink: FrameSink) -> str:
    return str(getattr(sink, "name", type(sink).__name__))


class SinkSet:
    """Feeds frames to sinks in order and keeps one broken sink from hurting the others.

    ``on_error(message)`` is called (from the source's thread) the first time a sink
    raises; that sink then gets no more frames but is still closed at the end.
    """

    def __init__(self, sinks: Iterable[FrameSink] = (),
                 on_error: Callable[[str], None] | None = None) -> None:
        self.sinks: list[FrameSink] = [s for s in sinks if s is not None]
        self._on_error = on_error
        self._failed: dict[int, str] = {}  # id(sink) -> why

    def failed(self, sink: FrameSink) -> str | None:
        return self._failed.get(id(sink))

    def _call(self, sink: FrameSink, what: str, *args: object, **kwargs: object) -> None:
        if id(sink) in self._failed:
            return
        try:
            getattr(sink, what)(*args, **kwargs)
        except Exception as e:
            msg = f"{_sink_name(sink)} failed in {what}: {type(e).__name__}: {e}"
            self._failed[id(sink)] = msg
            log.error("%s (it gets no more frames)", msg)
            if self._on_error is not None:
                try:
                    self._on_error(msg)
                except Exception:
                    log.exception("the sink error handler raised")

    def setup(self, info: StreamInfo) -> None:
        """Set every sink up; a sink that raises here aborts the run (nothing is lost yet)."""
        for sink in self.sinks:
            sink.setup(info)

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        for sink in self.sinks:
            self._call(sink, "append", frame, meta)

    def skip(self, *, frames: int = 1) -> None:
        for sink in self.sinks:
            self._call(sink, "skip", frames=frames)

    def close(self) -> list[str]:
        """Close every sink (even failed ones: their files must be finished); returns errors."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # the caller reports these
                errors.append(f"{_sink_name(sink)} failed to close: {e}")
        return errors


class SignalSink:
    """The raw view: re-emits every frame as a psygnal signal ``frameReady(seq, image)``.

    Emitted from the source's thread: a GUI relays it to its own thread and keeps only the
    newest frame, so a listener must return at once (store, do not draw).
    """

    frameReady = Signal(int, object)
    frameMeta = Signal(object, object)  # (image, FrameMeta) for listeners that need the stream

    name = "raw view"

    def setup(self, info: StreamInfo) -> None:
        pass

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        for sig, args in ((self.frameReady, (meta.seq, frame)), (self.frameMeta, (frame, meta))):
            try:
                sig.emit(*args)
            except Exception:  # a broken viewer must not take the sink out for everyone
                log.exception("a raw-view listener raised")

    def skip(self, *, frames: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadedSink:
    """Runs a sink that may be slow on its own thread, with a bounded queue.

    When the queue is full the oldest queued frame is given up (the inner sink's ``skip``
    is called before its next ``append``; ``frames_skipped`` counts them): the source never
    waits. Not for the recorder, which must never give up a frame (it has its own
    unbounded queue and thread).
    """

    def __init__(self, sink: FrameSink, maxsize: int = 64) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.inner = sink
        self.name = f"{_sink_name(sink)} (threaded)"
        self.maxsize = maxsize
        self._items: deque[tuple[np.ndarray, FrameMeta]] = deque()
        self._cv = threading.Condition()
        self._pending_skips = 0
        self._closing = False
        self.frames_skipped = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"livesr-sink-{_sink_name(sink)}",
                                        daemon=True)

    def setup(self, info: StreamInfo) -> None:
        self.inner.setup(info)
        self._thread.start()

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        if self.error is not None:
            raise RuntimeError(self.error)
        with self._cv:
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.frames_skipped += 1
                self._pending_skips += 1
            self._items.append((frame, meta))
            self._cv.notify()

    def skip(self, *, frames: int = 1) -> None:
        with self._cv:
            self._pending_skips += frames
            self.frames_skipped += frames

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closing:
                    self._cv.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                skips, self._pending_skips = self._pending_skips, 0
            try:
                if skips:
                    self.inner.skip(frames=skips)
                self.inner.append(*item)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                log.error("%s failed: %s", self.name, self.error)
                return

    def close(self) -> None:
        """Deliver what is queued, then close the inner sink."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self.inner.close()
