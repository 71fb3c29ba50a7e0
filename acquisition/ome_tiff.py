"""OME-TIFF writing, one TIFF page per frame, that survives a crash and a full disk.

Why not ome-writers' OME-TIFF backend (which the OME-Zarr path does use): in ome-writers
0.3.2 its writer thread swallows write errors (a full disk becomes a RuntimeWarning and
the stream goes on accepting frames), it writes one contiguous series whose page
directory is only completed at close (a process that dies, or a disk that fills, leaves
one readable page), and close waits at most 5 s for its queue before writing the
metadata. livesr's guarantees (every frame written stays readable; a failed write names
the frame and leaves a valid file) need the page-per-frame layout kept here:

* every frame is its own page (IFD), flushed as written, so the page chain on disk is
  always valid up to the last completed frame;
* the first page carries a fixed-size placeholder description, overwritten with the
  OME-XML on close (in place when it fits, appended when longer);
* after a failed write (no space, file-size limit, I/O error) `salvage` cuts the file back
  to the last complete page, ends the page chain there and writes the OME-XML; when even
  that cannot grow the file, a compact OME-XML (no per-plane entries) that fits the
  placeholder is written in place, so the file is a valid OME-TIFF of every frame saved.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.sinks import FrameClock, FrameMeta, StreamInfo, is_multi_stream

__all__ = ["OmeTiffWriter", "PLACEHOLDER_BYTES"]

log = logging.getLogger(__name__)

#: Room reserved in the first page for the OME-XML; the compact XML always fits in it.
PLACEHOLDER_BYTES = 16 * 1024
_PLACEHOLDER = (b'{"livesr": "recording in progress; OME-XML is written on close"}'
                .ljust(PLACEHOLDER_BYTES - 1, b" "))


@dataclass
class _Segment:
    """Consecutive frames of one shape and dtype: one OME Image."""

    shape: tuple[int, int]
    dtype: np.dtype
    # typed arrays: ~24 bytes per frame (Python lists of floats would cost ~100)
    delta_t_s: array = field(default_factory=lambda: array("d"))
    exposure_ms: array = field(default_factory=lambda: array("d"))
    seqs: array = field(default_factory=lambda: array("q"))
    first: array = field(default_factory=lambda: array("q"))  # SR: source range per image
    last: array = field(default_factory=lambda: array("q"))
    streams: list[str] = field(default_factory=list)  # one entry per run of equal keys


class OmeTiffWriter:
    """Writes frames as BigTIFF pages; `finish` or `salvage` writes the OME-XML."""

    format = "ome-tiff"

    def __init__(self, path: Path, info: StreamInfo, annotations: Mapping[str, Any]) -> None:
        import tifffile

        if info.sequence is not None and is_multi_stream(info.sequence):
            raise ValueError("OME-TIFF recording of several positions, channels or z planes "
                             "is not supported; record to .ome.zarr (every axis is kept)")
        self.path = path
        self._info = info
        self._annotations = dict(annotations)
        self._writer = tifffile.TiffWriter(path, bigtiff=True, ome=False, shaped=False)
        self._segments: list[_Segment] = []
        self._clock = FrameClock()
        self.frames_written = 0
        self._good_end = 0  # file size after the last complete page
        self._good_ifd_ptr: int | None = None  # where that page's next-IFD offset lives

    # ------------------------------------------------------------------ frames
    def write(self, frame: np.ndarray, meta: FrameMeta) -> None:
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.shape != shape or seg.dtype != frame.dtype:
            seg = _Segment(shape=shape, dtype=frame.dtype)
            self._segments.append(seg)
        kwargs: dict[str, Any] = {}
        um = self._pixel_um
        if um:
            kwargs = {"resolution": (1.0 / um, 1.0 / um), "resolutionunit": "MICROMETER"}
        self._writer.write(
            np.ascontiguousarray(frame),
            contiguous=False,
            photometric="minisblack",
            description=_PLACEHOLDER if self.frames_written == 0 else None,
            metadata=None,
            **kwargs,
        )
        fh = self._writer.filehandle
        fh.flush()  # the page chain on disk stays valid up to this frame
        self._good_end = os.fstat(fh.fileno()).st_size
        self._good_ifd_ptr = getattr(self._writer, "_ifdoffset", None)
        seg.delta_t_s.append(self._clock.seconds(meta))
        seg.exposure_ms.append(float(meta.exposure_ms) if meta.exposure_ms else float("nan"))
        seg.seqs.append(int(meta.seq))
        if meta.source_range is not None:
            seg.first.append(int(meta.source_range[0]))
            seg.last.append(int(meta.source_range[1]))
        if not seg.streams or seg.streams[-1] != meta.stream_key:
            seg.streams.append(meta.stream_key)
        self.frames_written += 1

    @property
    def _pixel_um(self) -> float | None:
        return self._info.pixel_size_um or None

    # ------------------------------------------------------------------ finishing
    def finish(self, extra: Mapping[str, Any]) -> None:
        """Write the OME-XML and close (a file without frames is removed: not valid TIFF)."""
        self._writer.close()
        if self.frames_written == 0:
            self.path.unlink(missing_ok=True)
            return
        _write_description(self.path, self.ome_xml(extra))

    def salvage(self, extra: Mapping[str, Any]) -> int:
        """After a failed write: keep every complete page, end the chain, write the XML.

        The compact OME-XML goes in first (in place, so it always fits); the full one
        replaces it when the file can take it. Returns the number of frames the file holds.
        """
        try:
            self._writer.filehandle.close()  # not writer.close(): it would write more
        except Exception:
            pass
        n = self.frames_written
        if n == 0:
            self.path.unlink(missing_ok=True)
            return 0
        with open(self.path, "r+b") as fh:
            fh.truncate(self._good_end)
            if self._good_ifd_ptr is not None:  # BigTIFF: 8-byte offset; 0 ends the chain
                fh.seek(self._good_ifd_ptr)
                fh.write(struct.pack("<Q", 0))
            fh.flush()
            os.fsync(fh.fileno())
        _write_description(self.path, self.ome_xml(extra, compact=True))
        try:
            _write_description(self.path, self.ome_xml(extra))
        except OSError as e:  # no room for the per-plane entries: the compact XML stays
            log.info("%s keeps the compact OME-XML (the full one does not fit: %s)",
                        self.path, e)
        return n

    def abandon(self) -> None:
        """Close without metadata (a writer that never wrote a frame)."""
        try:
            self._writer.close()
        finally:
            if self.frames_written == 0:
                self.path.unlink(missing_ok=True)

    def ome_xml(self, extra: Mapping[str, Any], *, compact: bool = False) -> bytes:
        import tifffile

        info = self._info
        name = info.name or self.path.name
        omexml = tifffile.OmeXml()
        um = self._pixel_um
        for i, seg in enumerate(self._segments):
            n = len(seg.delta_t_s)
            h, w = seg.shape
            ann: dict[str, Any] = {"Namespace": "livesr", **_strings(self._annotations),
                                   **_strings(extra)}
            if seg.seqs:
                ann["first_seq"] = str(seg.seqs[0])
                ann["last_seq"] = str(seg.seqs[-1])
                ann["missing_seq"] = _missing_ranges(seg.seqs)
            if seg.first and not compact:
                ann["source_seq_first"] = ",".join(map(str, seg.first))
                ann["source_seq_last"] = ",".join(map(str, seg.last))
            if any(seg.streams):
                ann["streams"] = ",".join(seg.streams)
            image: dict[str, Any] = {
                "axes": "TYX",
                "Name": name if len(self._segments) == 1 else f"{name} #{i}",
                "MapAnnotation": ann,
            }
            if um:
                image.update(PhysicalSizeX=um, PhysicalSizeY=um,
                             PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
            interval = _interval(seg.delta_t_s, info.frame_interval_s)
            if interval:
                image.update(TimeIncrement=float(interval), TimeIncrementUnit="s")
            if not compact:
                exp = list(seg.exposure_ms)
                plane: dict[str, Any] = {"DeltaT": [round(t, 6) for t in seg.delta_t_s],
                                         "DeltaTUnit": ["s"] * n}
                if all(e == e for e in exp):  # no NaN: every frame knows its exposure
                    plane.update(ExposureTime=[round(e, 4) for e in exp],
                                 ExposureTimeUnit=["ms"] * n)
                image["Plane"] = plane
            omexml.addimage(dtype=seg.dtype, shape=(n, h, w), storedshape=(n, 1, 1, h, w, 1),
                            **image)
        xml = omexml.tostring(declaration=True).encode("utf-8")
        if compact and len(xml) >= PLACEHOLDER_BYTES:  # settings too long: keep the essentials
            self._annotations = {k: self._annotations[k] for k in ("camera", "exposure_ms")
                                 if k in self._annotations}
            return self.ome_xml({k: extra[k] for k in ("frames_saved", "stopped") if k in extra},
                                compact=True)
        return xml


def _write_description(path: Path, xml: bytes) -> None:
    """Put `xml` into page 0's ImageDescription: in place (padded, so the placeholder's room
    stays usable) when it fits, else appended. An append that fails (no room) is undone:
    the tag points at the old description again and the file is cut back."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        tag = tf.pages.first.tags["ImageDescription"]
        entry, capacity = tag.offset, tag.count
    if len(xml) < capacity:
        tifffile.tiffcomment(path, comment=xml.ljust(capacity - 1, b" "), pageindex=0)
        return
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(entry)
        saved = fh.read(20)  # a BigTIFF tag entry: code, type, count, value offset
    try:
        tifffile.tiffcomment(path, comment=xml, pageindex=0)
    except OSError:
        with open(path, "r+b") as fh:
            fh.seek(entry)
            fh.write(saved)
            fh.truncate(size)
        raise


def _interval(delta_t: array, nominal: float | None) -> float | None:
    """The measured median frame interval (what was recorded), else the nominal one."""
    if len(delta_t) >= 2:
        d = np.diff(np.frombuffer(delta_t, dtype=float))
        d = d[d > 0]
        if d.size:
            return round(float(np.median(d)), 9)
    return nominal


def _strings(d: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


def _missing_ranges(seqs: array) -> str:
    """'5-7,12' for the sequence numbers absent between consecutive recorded frames."""
    out = []
    for a, b in pairwise(seqs):
        if b > a + 1:
            out.append(f"{a + 1}" if b == a + 2 else f"{a + 1}-{b - 1}")
    return ",".join(out) or "none"
