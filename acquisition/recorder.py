"""Lossless recording of every acquired frame, on its own thread: the recording sink.

The acquisition must never wait on the disk and the recording must never lose a frame, so
`append` only puts the frame on an unbounded in-memory queue (a 256 x 256 uint16 frame is
128 kB: a minute at 100 fps is 0.8 GB, far more than a disk stall lasts) and a writer
thread drains it, in order, into the format the file name asks for:

* ``.ome.tif`` / ``.ome.tiff`` / ``.tif``: OME-TIFF, one page per frame (`ome_tiff.py`);
* ``.ome.zarr`` / ``.zarr``: OME-Zarr v0.5 through ome-writers (`ome_zarr.py`).

Pixel size, frame interval, exposure, camera and the livesr settings come from the
`StreamInfo` the source passes to ``setup`` (the core's pixel-size configuration, the
camera) and are written into the file's metadata.

When a write fails (full disk, file-size limit, I/O error) the recorder stops writing,
makes the file a valid OME file of every frame written before the failure (`salvage`),
emits ``failed`` once with one line naming the frame and how many were saved, and counts
every later frame in ``frames_not_recorded``. Whether the run then stops or goes on
without recording is the caller's choice (``PipelineConfig.recording_failure``). A small
space reserve next to the file is freed first, so the metadata still finds room on a full
disk. ``close()`` is also registered with `atexit`, so Ctrl-C and a normal interpreter exit
finish the file.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal

from acquisition.formats import RECORDING_SUFFIXES, recording_format
from acquisition.sinks import FrameMeta, StreamInfo, is_multi_stream

if TYPE_CHECKING:
    from useq import MDASequence

    from acquisition.ome_tiff import OmeTiffWriter
    from acquisition.ome_zarr import OmeZarrWriter

__all__ = ["RECORDING_SUFFIXES", "Recorder", "RecorderError", "recording_format"]

log = logging.getLogger(__name__)

DEFAULT_RESERVE_BYTES = 8 * 1024 * 1024
_STOP = object()


class RecorderError(RuntimeError):
    """The recording cannot take or write frames (closed, disk error, bad frame)."""


class _SpaceReserve:
    """A file of zeros next to the recording, deleted when the metadata needs its room."""

    def __init__(self, target: Path, nbytes: int) -> None:
        self.path = target.parent / f".{target.name}.livesr-reserve"
        self.nbytes = 0
        if nbytes <= 0:
            return
        try:
            free = shutil.disk_usage(target.parent).free
            size = int(min(nbytes, free // 8))
            with open(self.path, "wb") as fh:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fh.fileno(), 0, size)
                else:  # pragma: no cover - not Linux
                    fh.truncate(size)
            self.nbytes = size
        except OSError as e:  # a file-size limit or a full disk: no reserve, still record
            log.info("no space reserve for %s: %s", target, e)
            self.release()

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


class Recorder:
    """Writes every frame it is given to an OME-TIFF or OME-Zarr, losslessly and in order.

    A `FrameSink`: ``setup(info)`` creates the file (raises at once if it cannot),
    ``append`` queues, ``close`` writes what is queued and the metadata. ``annotations``
    (the run's settings) are stored in the file. Signals: ``failed(message)``, once,
    from the writer thread, when writing stopped (see the module docstring).
    """

    failed = Signal(str)

    name = "recording"

    def __init__(self, path: str | Path, *, overwrite: bool = False,
                 annotations: Mapping[str, Any] | None = None,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.format = recording_format(self.path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        self._overwrite = overwrite
        self._annotations = dict(annotations or {})
        self._reserve_bytes = int(reserve_bytes)
        self._reserve: _SpaceReserve | None = None
        self._writer: OmeZarrWriter | OmeTiffWriter | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.frames_queued = 0
        self.frames_recorded = 0
        self.frames_not_recorded = 0  # handed over after writing had stopped
        self.frames_skipped = 0  # the source said it lost them (never reached us)
        self.error: str | None = None  # the one line of `failed`

    # ------------------------------------------------------------------ sink API
    def setup(self, info: StreamInfo) -> None:
        """Create the file for frames described by `info`; start the writer thread."""
        if self._writer is not None:
            raise RecorderError(f"recorder for {self.path} is already set up")
        if self._closed:
            raise RecorderError(f"recorder for {self.path} is closed")
        annotations = {**_info_annotations(info), **self._annotations}
        if self._overwrite and self.path.exists():
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.format == "ome-zarr":
                from acquisition.ome_zarr import OmeZarrWriter

                self._writer = OmeZarrWriter(self.path, info, annotations)
            else:
                from acquisition.ome_tiff import OmeTiffWriter

                self._writer = OmeTiffWriter(self.path, info, annotations)
        except ValueError as e:
            raise RecorderError(str(e)) from None
        except OSError as e:
            raise RecorderError(f"cannot create {self.path}: {e.strerror or e}") from None
        self._reserve = _SpaceReserve(self.path, self._reserve_bytes)
        self._thread = threading.Thread(target=self._run, name=f"livesr-recorder({self.path.name})",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        """Queue one (H, W) frame; never blocks. Do not write into `frame` afterwards."""
        arr = np.asarray(frame)
        if arr.ndim != 2 or arr.size == 0:
            raise RecorderError(f"can only record 2-D images, got shape {arr.shape}")
        if arr.dtype.kind not in "uif":
            raise RecorderError(f"cannot record pixels of type {arr.dtype}")
        with self._lock:
            if self._closed:
                raise RecorderError(f"recorder for {self.path} is closed")
            if self._thread is None:
                raise RecorderError(f"recorder for {self.path} is not set up (call setup first)")
            self.frames_queued += 1
            self._queue.put((arr, meta))

    def skip(self, *, frames: int = 1) -> None:
        self.frames_skipped += int(frames)

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then the metadata; the file is complete when this
        returns. Idempotent. Raises RecorderError if writing failed (the frames written
        before the failure stay readable; the message says how many)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            if first and self._thread is not None:
                self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RecorderError(f"recorder for {self.path} did not finish within {timeout} s "
                                    f"({self.backlog} frames still queued)")
        atexit.unregister(self._close_at_exit)
        if self.error is not None:
            raise RecorderError(self.error)

    # ------------------------------------------------------------------ state
    @property
    def backlog(self) -> int:
        """Frames handed over but not yet written (or given up)."""
        return self.frames_queued - self.frames_recorded - self.frames_not_recorded

    @property
    def closed(self) -> bool:
        return self._closed

    def summary_line(self) -> str:
        """What the user reads at the end of a run (never "written" for a file that is not)."""
        if self.error is not None:
            return self.error
        if self._writer is None or (self.frames_recorded == 0 and not self.path.exists()):
            return f"nothing recorded: {self.path} was not written (no frames)"
        return f"recording written to {self.path} ({self.frames_recorded} frames)"

    def check_sequence(self, sequence: MDASequence | None) -> None:
        """Raise RecorderError now if this format cannot hold an MDA `sequence`."""
        if self.format == "ome-tiff":
            if is_multi_stream(sequence):
                raise RecorderError(f"cannot record this sequence to {self.path.name}: OME-TIFF "
                                    "recording of several positions, channels or z planes is "
                                    "not supported; record to .ome.zarr (every axis is kept)")

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as e:  # at exit there is nobody left to raise to
            log.error("%s", e)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer thread
    def _open_writer(self) -> OmeZarrWriter | OmeTiffWriter:
        assert self._writer is not None, "the writer thread starts after setup() opened the file"
        return self._writer

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                frame, meta = item
                if self.error is not None:
                    self.frames_not_recorded += 1
                    continue
                try:
                    self._open_writer().write(frame, meta)
                    self.frames_recorded += 1
                except Exception as e:
                    self._fail(meta, e)
        finally:
            self._finish()

    def _fail(self, meta: FrameMeta, exc: BaseException) -> None:
        """Stop writing, keep a valid file of what is on disk, say so in one line."""
        self.frames_not_recorded += 1
        why = _why(exc)
        if self._reserve is not None:
            self._reserve.release()
        try:
            saved = self._open_writer().salvage({"stopped": f"write failed at frame {meta.frame}: {why}"})
            if saved < self.frames_recorded:  # accepted, but the backend lost them (async)
                self.frames_not_recorded += self.frames_recorded - saved
                self.frames_recorded = saved
            kept = (f"{self.path} holds the first {saved} frames (0-{saved - 1})" if saved
                    else f"no frame was saved in {self.path}")
        except Exception as e2:
            log.exception("repairing %s failed", self.path)
            kept = f"{self.frames_recorded} frames were written but the file could not be " \
                   f"finished ({_why(e2)})"
        self.error = f"recording stopped at frame {meta.frame} ({why}): {kept}"
        log.info("%s", self.error)  # reported through `failed` and close()
        try:
            self.failed.emit(self.error)
        except Exception:
            log.exception("a recorder-failure listener raised")

    def _finish(self) -> None:
        if self._reserve is not None:
            self._reserve.release()  # its room is for the metadata written now
        if self.error is not None:
            return  # salvage already finished the file
        extra = {"frames_recorded": self.frames_recorded}
        if self.frames_skipped:
            extra["frames_lost_by_source"] = self.frames_skipped
        try:
            self._open_writer().finish(extra)
        except Exception as e:
            log.error("finishing %s failed: %s", self.path, e)
            try:
                saved = self._open_writer().salvage({"stopped": f"finishing failed: {_why(e)}"})
                self.error = (f"recording of {self.path} could not be finished ({_why(e)}); "
                              f"it holds {saved} of {self.frames_recorded} frames")
                if saved < self.frames_recorded:
                    self.frames_not_recorded += self.frames_recorded - saved
                    self.frames_recorded = saved
            except Exception as e2:
                self.error = (f"recording of {self.path} could not be finished: {_why(e)} "
                              f"(repair failed too: {_why(e2)})")


def _why(exc: BaseException) -> str:
    """A short cause: the OS reason when there is one, not a backend's whole message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.rstrip(".") + ("" if exc.errno is None else f" (errno {exc.errno})")
    text = " ".join(str(exc).split())
    for reason in ("No space left on device", "File too large", "Disk quota exceeded"):
        if reason in text:
            return reason
    if re.search(r"\d+ requested and \d+ written", text):  # tifffile's short write
        return "short write: the disk is full or the file reached a size limit"
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _info_annotations(info: StreamInfo) -> dict[str, Any]:
    """The acquisition facts every recording carries (also in the OME fields)."""
    out: dict[str, Any] = {}
    if info.camera:
        out["camera"] = info.camera
    if info.exposure_ms:
        out["exposure_ms"] = float(info.exposure_ms)
    if info.pixel_size_um:
        out["pixel_size_um"] = float(info.pixel_size_um)
    if info.frame_interval_s:
        out["frame_interval_s"] = float(info.frame_interval_s)
    out.update(info.settings)  # the livesr settings of the run, as flat key/values
    return out
