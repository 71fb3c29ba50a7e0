"""Read a recording back as livesr wrote it: frames plus what the file says about them.

Why one reader for both formats: `livesr finetune` (and anything else that learns from a
recording) needs the frames, the pixel size (for SOFI's PSF width in pixels), the frame rate
and a fingerprint of the file (size, SHA-256) for provenance, whether the run recorded
OME-TIFF (`acquisition.ome_tiff`) or OME-Zarr (`acquisition.ome_zarr`). TIFF reading and its
checks are `cameras.load_replay_stack`'s; OME-Zarr is read with zarr-python. numpy only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.cameras import ReplayFileError, load_replay_stack
from acquisition.formats import recording_format

__all__ = ["Recording", "RecordingError", "file_fingerprint", "read_recording", "write_recording"]


class RecordingError(ValueError):
    """A recording that cannot be read as a single (T, H, W) movie; the text says why."""


@dataclass(frozen=True)
class Recording:
    """A movie read fully into memory, and where its numbers came from."""

    path: str
    frames: np.ndarray  # (T, H, W) unsigned integers, as recorded
    pixel_size_um: float | None
    fps: float | None
    format: str  # "ome-tiff" (any TIFF) | "ome-zarr"
    bytes: int  # on disk (a Zarr: all its files)
    sha256: str  # of the file (a Zarr: of its files, in path order)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.frames.shape)  # type: ignore[return-value]

    def provenance(self) -> dict[str, Any]:
        """What a weights file records about this source (JSON-ready)."""
        return {"path": str(Path(self.path).resolve()), "name": Path(self.path).name,
                "format": self.format, "bytes": self.bytes, "sha256": self.sha256,
                "frames": self.shape[0], "height": self.shape[1], "width": self.shape[2],
                "pixel_size_um": self.pixel_size_um, "fps": self.fps}


def file_fingerprint(path: str | Path) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of a file, or of every file under a folder in sorted path order."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h, total = hashlib.sha256(), 0
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                total += len(block)
    return total, h.hexdigest()


def read_recording(path: str | Path) -> Recording:
    """Read an OME-TIFF / TIFF or a livesr OME-Zarr (t, y, x); RecordingError says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise RecordingError(f"{p}: no such recording")
    try:
        fmt = recording_format(p)
    except ValueError:
        raise RecordingError(f"{p}: not a recording livesr reads (.ome.tif, .tif or .ome.zarr)") from None
    if fmt == "ome-zarr":
        frames, um, fps = _read_zarr(p)
    else:
        try:
            stack = load_replay_stack(p)
        except ReplayFileError as e:
            raise RecordingError(str(e)) from None
        frames, um, fps = stack.frames, stack.pixel_size_um, stack.fps
    nbytes, sha = file_fingerprint(p)
    return Recording(path=str(p), frames=frames, pixel_size_um=um, fps=fps, format=fmt,
                     bytes=nbytes, sha256=sha)


def _read_zarr(p: Path) -> tuple[np.ndarray, float | None, float | None]:
    import zarr

    try:
        group = zarr.open_group(str(p), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)  # JSON from the file: checked key by key below
    except Exception as e:  # zarr raises many types for a damaged store
        raise RecordingError(f"{p}: not a readable OME-Zarr ({type(e).__name__}: {e})") from None
    ome = attrs.get("ome", attrs)
    scales = ome.get("multiscales") or []
    if not scales:
        raise RecordingError(f"{p}: an OME-Zarr of several images (a plate or positions); "
                             "fine-tuning reads one (t, y, x) movie: record one position")
    axes = [a.get("name") for a in scales[0].get("axes", [])]
    if axes != ["t", "y", "x"]:
        raise RecordingError(f"{p}: axes {axes}; only a (t, y, x) movie of one stream can be "
                             "read (record one channel, one z plane)")
    ds = scales[0]["datasets"][0]
    arr = group[ds["path"]]
    if not isinstance(arr, zarr.Array):
        raise RecordingError(f"{p}: {ds['path']!r} is a group, not the movie's array")
    data = np.asarray(arr[:])
    scale = next((t["scale"] for t in ds.get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    units = {a.get("name"): a.get("unit") for a in scales[0]["axes"]}
    um = float(scale[2]) if scale and units.get("x") == "micrometer" else None
    livesr = attrs.get("livesr") or {}
    interval = livesr.get("frame_interval_s_measured") or (float(scale[0]) if scale else None)
    fps = 1.0 / float(interval) if interval else None
    if data.ndim != 3 or 0 in data.shape:
        raise RecordingError(f"{p}: holds no frames (shape {data.shape})")
    if data.dtype.kind not in "u":
        raise RecordingError(f"{p}: pixels of type {data.dtype}; a camera recording holds "
                             "unsigned integer counts")
    return data, um, fps



def write_recording(path: str | Path, frames: np.ndarray, *, pixel_size_um: float | None = None,
                    fps: float | None = None, camera: str = "", overwrite: bool = False,
                    settings: dict[str, Any] | None = None) -> Path:
    """Write a (T, H, W) movie through the `Recorder`, the sink a live run records with, so the
    file and its metadata are what a run would have written (simulations, crops, tests)."""
    import time

    from acquisition.recorder import Recorder
    from acquisition.sinks import FrameMeta, StreamInfo

    frames = np.asarray(frames)
    rec = Recorder(path, overwrite=overwrite)
    rec.setup(StreamInfo(shape=tuple(frames.shape[1:]), dtype=frames.dtype.name, camera=camera,
                         pixel_size_um=pixel_size_um,
                         frame_interval_s=1.0 / fps if fps else None, settings=settings or {}))
    dt_ms = 1000.0 / fps if fps else None
    t0 = time.time_ns()
    for i, frame in enumerate(frames):
        rec.append(frame, FrameMeta(seq=i, t_acq_ns=t0 + i * int((dt_ms or 0) * 1e6), frame=i,
                                    camera=camera, pixel_size_um=pixel_size_um,
                                    elapsed_ms=None if dt_ms is None else i * dt_ms))
    rec.close()
    return Path(path)
