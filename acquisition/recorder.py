"""Lossless OME-TIFF recording of every acquired frame, on its own thread.

The acquisition loop must never wait on the disk, and the recording must never lose a
frame, so `put` only appends to an unbounded in-memory queue (a 256 x 256 uint16 frame is
128 kB: a minute at 100 fps is 0.8 GB, far more than a disk stall lasts) and a writer
thread drains it.

Each frame is written as its own TIFF page (IFD) straight away, so a process that dies
mid-recording still leaves a readable multi-page TIFF of everything written so far. The
OME-XML (frame count, pixel size, per-frame timestamps, sequence gaps) is written into the
first page's ImageDescription on `close()`; tifffile's contiguous OME mode cannot grow a
series whose length is unknown, hence this two-step write. `close()` is also registered
with `atexit`, so Ctrl-C or a normal interpreter exit finishes the file.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OmeTiffRecorder", "RecorderError"]

log = logging.getLogger(__name__)

_PLACEHOLDER = b'{"livesr": "recording in progress; OME-XML is written on close"}'
_STOP = object()


class RecorderError(RuntimeError):
    """The recording cannot take or write frames (closed, disk error, bad frame)."""


@dataclass
class _Segment:
    """Consecutive frames of one shape and dtype: one OME Image."""

    shape: tuple[int, int]
    dtype: np.dtype
    # compact typed arrays: 16 bytes per frame instead of ~70 for Python floats/ints in lists
    # (hours at 100 fps would otherwise grow the process by tens of MB per hour)
    delta_t_s: array = field(default_factory=lambda: array("d"))
    seqs: array = field(default_factory=lambda: array("q"))


class OmeTiffRecorder:
    """Writes every frame it is given to a BigTIFF OME-TIFF, losslessly and in order.

    ``metadata`` keys: ``pixel_size_um``, ``frame_interval_s`` (or ``fps``), ``name``,
    ``description``; any other key is passed to tifffile's OME-XML as an Image/Pixels
    attribute (e.g. ``{"Description": ...}``). A frame whose shape or dtype differs from
    the previous one starts a new OME Image (series) instead of being refused.
    """

    def __init__(self, path: str | Path, *, metadata: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        import tifffile

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._meta = dict(metadata or {})
        self._pixel_um = self._meta.pop("pixel_size_um", None)
        self._writer = tifffile.TiffWriter(self.path, bigtiff=True, ome=False, shaped=False)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._segments: list[_Segment] = []
        self._t0_ns: int | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.frames_queued = 0
        self.frames_recorded = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"OmeTiffRecorder({self.path.name})",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # ------------------------------------------------------------------ producer side
    @property
    def backlog(self) -> int:
        """Frames handed over but not yet on disk."""
        return self.frames_queued - self.frames_recorded

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: np.ndarray, seq: int | None = None, t_ns: int | None = None) -> None:
        """Queue one (H, W) frame; never blocks. The recorder keeps a reference: do not
        write into `frame` afterwards. `t_ns` (time.time_ns) dates the frame in the OME
        metadata (default: now); `seq` lets the metadata list any gaps in the sequence."""
        if self.error is not None:
            raise RecorderError(f"recording to {self.path} failed: {self.error}")
        arr = np.asarray(frame)
        if arr.ndim != 2 or arr.size == 0:
            raise RecorderError(f"can only record 2-D images, got shape {arr.shape}")
        if arr.dtype.kind not in "uif":
            raise RecorderError(f"cannot record pixels of type {arr.dtype}")
        with self._lock:
            if self._closed:
                raise RecorderError(f"recorder for {self.path} is closed")
            self.frames_queued += 1
            self._queue.put((arr, seq, time.time_ns() if t_ns is None else int(t_ns)))

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then the OME-XML; the file is complete when this returns.

        Idempotent. Raises RecorderError if writing failed (the frames written before the
        failure stay readable).
        """
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RecorderError(f"recorder for {self.path} did not finish within {timeout} s "
                                f"({self.backlog} frames still queued)")
        atexit.unregister(self._close_at_exit)
        if self.error is not None:
            raise RecorderError(f"recording to {self.path} failed: {self.error}")

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as e:  # at exit there is nobody left to raise to
            log.error("%s", e)

    def __enter__(self) -> OmeTiffRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                if self.error is None:
                    try:
                        self._write(*item)
                    except Exception as e:
                        self.error = f"{type(e).__name__}: {e}"
                        log.error("recording to %s failed: %s", self.path, self.error)
                if self._queue.empty() and self.error is None:
                    self._writer.filehandle.flush()  # keep the file readable as we go
        finally:
            self._finish()

    def _write(self, frame: np.ndarray, seq: int | None, t_ns: int) -> None:
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.shape != shape or seg.dtype != frame.dtype:
            seg = _Segment(shape=shape, dtype=frame.dtype)
            self._segments.append(seg)
        first_page = self.frames_recorded == 0
        if self._t0_ns is None:
            self._t0_ns = t_ns
        kwargs: dict[str, Any] = {}
        if self._pixel_um:
            kwargs = {"resolution": (1.0 / self._pixel_um, 1.0 / self._pixel_um),
                      "resolutionunit": "MICROMETER"}
        self._writer.write(
            np.ascontiguousarray(frame),
            contiguous=False,
            photometric="minisblack",
            description=_PLACEHOLDER if first_page else None,
            metadata=None,
            **kwargs,
        )
        seg.delta_t_s.append((t_ns - self._t0_ns) / 1e9)
        if seq is not None:
            seg.seqs.append(int(seq))
        self.frames_recorded += 1

    def _finish(self) -> None:
        """Write the OME-XML over the placeholder and close; remove a file with no frames."""
        try:
            if self.frames_recorded:
                self._writer.overwrite_description(self._ome_xml())
            self._writer.close()
        except Exception as e:
            if self.error is None:
                self.error = f"finishing the file failed: {type(e).__name__}: {e}"
            log.error("recording to %s: %s", self.path, self.error)
        if self.frames_recorded == 0:
            self.path.unlink(missing_ok=True)  # a TIFF with no image is not a valid file

    def _ome_xml(self) -> bytes:
        import tifffile

        meta = dict(self._meta)
        interval = meta.pop("frame_interval_s", None)
        fps = meta.pop("fps", None)
        if interval is None and fps:
            interval = 1.0 / float(fps)
        name = meta.pop("name", self.path.name)
        desc = meta.pop("description", None)
        omexml = tifffile.OmeXml()
        for i, seg in enumerate(self._segments):
            n = len(seg.delta_t_s)
            h, w = seg.shape
            image: dict[str, Any] = {
                "axes": "TYX",
                "Name": name if len(self._segments) == 1 else f"{name} #{i}",
                "Plane": {"DeltaT": [round(t, 6) for t in seg.delta_t_s],
                          "DeltaTUnit": ["s"] * n},
                **meta,
            }
            if self._pixel_um:
                um = float(self._pixel_um)
                image.update(PhysicalSizeX=um, PhysicalSizeY=um)
            if interval:
                image.update(TimeIncrement=float(interval), TimeIncrementUnit="s")
            if desc:
                image["Description"] = str(desc)
            if seg.seqs:
                image["MapAnnotation"] = {
                    "Namespace": "livesr/sequence",
                    "first_seq": str(seg.seqs[0]),
                    "last_seq": str(seg.seqs[-1]),
                    "missing_seq": _missing_ranges(seg.seqs),
                }
            omexml.addimage(dtype=seg.dtype, shape=(n, h, w), storedshape=(n, 1, 1, h, w, 1),
                            **image)
        return omexml.tostring(declaration=True).encode("utf-8")


def _missing_ranges(seqs: list[int]) -> str:
    """'5-7,12' for the sequence numbers absent between consecutive recorded frames."""
    out = []
    for a, b in zip(seqs, seqs[1:]):
        if b > a + 1:
            out.append(f"{a + 1}" if b == a + 2 else f"{a + 1}-{b - 1}")
    return ",".join(out) or "none"
