"""OME-Zarr (v0.5) writing through ome-writers, the writer pymmcore-plus uses.

Live runs get an unbounded time axis (``t, y, x``); an MDA run gets the axes of its useq
sequence (``useq_to_acquisition_settings``: positions, time, channels, z). Pixel size and
frame interval go into the OME-NGFF scale, exposure and timestamps into ome-writers'
per-frame metadata, and camera and livesr settings into the ``livesr`` attributes.

What ome-writers 0.3.2 lacks, and what is done about it here:

* A write error on a full disk surfaces late (tensorstore writes asynchronously; the next
  append fails at the per-frame resize of the time axis) and close then fails to write
  the group metadata. `salvage` therefore checks which chunks are on disk, cuts a 3-D
  ``t, y, x`` array back to the frames that are complete, and writes the ``livesr``
  attributes with zarr-python (the recorder frees its space reserve first).
* An unbounded axis is resized (``zarr.json`` rewritten) on every frame and a time chunk
  of more than one frame fails with an IndexError, so frames are one chunk each; this
  caps OME-Zarr at a few hundred frames/s of 512 x 512 here (see benchmarks/throughput.py).
* An MDA's axes are written as planned: a stopped run would keep its planned time points
  (zeros after the last frame) and an ``interval: 0`` sequence gets a time scale of 0 s.
  `finish` cuts the time axis to the time points acquired and writes the measured
  interval into the scale.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.sinks import FrameClock, FrameMeta, StreamInfo

__all__ = ["OmeZarrWriter"]

log = logging.getLogger(__name__)

NAMESPACE = "livesr"


class OmeZarrWriter:
    """One ome-writers stream; `write` appends in acquisition order."""

    format = "ome-zarr"

    def __init__(self, path: Path, info: StreamInfo, annotations: Mapping[str, Any],
                 *, overwrite: bool = False) -> None:
        from ome_writers import AcquisitionSettings, create_stream

        self.path = path
        self._info = info
        self._annotations = dict(annotations)
        h, w = info.shape
        dims, plate = self._dimensions(info)
        # format: the documented string form ("first available zarr backend"); the stubs declare
        # only the parsed models
        settings = AcquisitionSettings(root_path=str(path), dimensions=tuple(dims), plate=plate,
                                       dtype=info.dtype, overwrite=overwrite,
                                       format="ome-zarr")  # type: ignore[arg-type]
        self._unbounded = settings.is_unbounded
        self._single_image = len(settings.positions) <= 1 and len(dims) == 3
        self._positions = max(1, len(settings.positions))
        self._planned = settings.num_frames  # None for an unbounded time axis
        self._t_first = bool(dims) and dims[0].name == "t"
        self._planned_t = dims[0].count if self._t_first else None
        # the t scale is a real interval (a live camera's nominal rate, a sequence's interval)
        self._t_scale_known = bool(info.frame_interval_s if info.sequence is None
                                   else self._t_first and dims[0].scale)
        self._stream = create_stream(settings)
        self._stream.set_global_metadata(NAMESPACE, self._annotations)
        self._shape = (h, w)
        self._clock = FrameClock()
        self._deltas: list[float] = []
        self._recent_nonzero: deque[tuple[int, bool]] = deque(maxlen=256)
        self.frames_written = 0

    @staticmethod
    def _dimensions(info: StreamInfo) -> tuple[list[Any], Any]:
        from ome_writers import Dimension, useq_to_acquisition_settings

        h, w = info.shape
        um = info.pixel_size_um or None
        if info.sequence is not None:
            try:
                d = useq_to_acquisition_settings(info.sequence, image_width=w, image_height=h,
                                                 pixel_size_um=um)
                return list(d["dimensions"]), d.get("plate")
            except NotImplementedError as e:
                raise ValueError(f"this MDA sequence cannot be stored as OME-Zarr: {e}") from None
        space = {"type": "space", "scale": um, "unit": "micrometer"} if um else {"type": "space"}
        return [
            Dimension(name="t", count=None, chunk_size=1, type="time",
                      scale=info.frame_interval_s or 1.0, unit="second"),
            Dimension(name="y", count=h, chunk_size=h, **space),
            Dimension(name="x", count=w, chunk_size=w, **space),
        ], None

    def write(self, frame: np.ndarray, meta: FrameMeta) -> None:
        if tuple(frame.shape) != self._shape or frame.dtype.name != self._info.dtype:
            raise ValueError(f"frame {meta.frame} is {frame.shape[0]}x{frame.shape[1]} "
                             f"{frame.dtype}, the OME-Zarr holds {self._shape[0]}x{self._shape[1]} "
                             f"{self._info.dtype} (record to .ome.tif to keep a change of "
                             "frame size)")
        dt = self._clock.seconds(meta)
        fm: dict[str, Any] = {"delta_t": round(dt, 6), "seq": int(meta.seq)}
        if meta.exposure_ms:
            fm["exposure_time"] = float(meta.exposure_ms) / 1000.0
        if meta.stream_key:
            fm["stream"] = meta.stream_key
        if meta.source_range is not None:
            fm["source_seq_first"], fm["source_seq_last"] = map(int, meta.source_range)
        self._stream.append(frame, frame_metadata=fm)
        self._deltas.append(dt)
        # an all-zero frame is not stored (zarr fill value): remember which chunks must exist
        self._recent_nonzero.append((self.frames_written, bool(frame.any())))
        self.frames_written += 1

    def finish(self, extra: Mapping[str, Any]) -> None:
        self._stream.close()
        if self.frames_written:
            self._stream.set_global_metadata(NAMESPACE, {**self._annotations, **extra,
                                                         **self._measured()})
            self._match_what_was_acquired()

    def _image_groups(self) -> list[Any]:
        import zarr

        root = zarr.open_group(str(self.path), mode="r+")
        if self._positions == 1:
            return [root]
        return [root[str(p)] for p in range(self._positions) if str(p) in root]

    def _match_what_was_acquired(self) -> None:
        """Make the metadata say what was recorded, where ome-writers says what was planned.

        A stopped MDA leaves its planned time axis (unwritten planes read as zeros): cut it
        to the time points that hold frames. An ``interval: 0`` sequence gets a time scale
        of 0 s, a camera without a nominal rate a placeholder of 1 s: put the measured frame
        interval there.
        """
        measured = self._measured().get("frame_interval_s_measured")
        cut_t = None
        if self._planned and self.frames_written < self._planned and self._planned_t:
            per_t = self._planned // self._planned_t
            cut_t = -(-self.frames_written // per_t)  # time points with at least one frame
        for group in self._image_groups():
            ome = dict(group.attrs.get("ome", {}))
            for ms in ome.get("multiscales", []):
                names = [a.get("name") for a in ms.get("axes", [])]
                if "t" not in names:
                    continue
                ti = names.index("t")
                for ds in ms.get("datasets", []):
                    if cut_t is not None and ti == 0:
                        arr = group[ds["path"]]
                        arr.resize((cut_t, *arr.shape[1:]))
                    for ct in ds.get("coordinateTransformations", []):
                        if (ct.get("type") == "scale" and measured
                                and not (self._t_scale_known and ct["scale"][ti])):
                            ct["scale"][ti] = measured
            group.attrs["ome"] = ome

    def _measured(self) -> dict[str, Any]:
        if len(self._deltas) < 2:
            return {}
        d = np.diff(np.asarray(self._deltas))
        d = d[d > 0]
        return {"frame_interval_s_measured": round(float(np.median(d)), 9)} if d.size else {}

    def salvage(self, extra: Mapping[str, Any]) -> int:
        """After a failed write: keep the complete frames, record why, close. Returns frames kept.

        tensorstore writes chunks asynchronously, so the last frames appended before the
        failure may not be on disk: a frame with signal whose chunk file is missing was
        lost, and the array is cut back to the frames before the first such one.
        """
        try:
            self._stream.close()  # flushes what tensorstore still has; may fail again
        except Exception as e:
            log.warning("closing the OME-Zarr after the failure: %s", e)
        kept = self.frames_written
        import zarr

        group = zarr.open_group(str(self.path), mode="r+")
        if self._single_image and "0" in group:
            arr = group["0"]
            assert isinstance(arr, zarr.Array)  # the single image's array (written by this sink)
            missing = [t for t, nonzero in self._recent_nonzero
                       if nonzero and not _chunk_exists(self.path / "0", t)]
            kept = min([kept, int(arr.shape[0]), *missing])
            if self._unbounded and kept != arr.shape[0]:
                arr.resize((kept, *arr.shape[1:]))
        group.attrs[NAMESPACE] = {**self._annotations, **extra, "frames_saved": kept,
                                  **self._measured()}
        return kept

    def abandon(self) -> None:
        self._stream.close()


def _chunk_exists(array_dir: Path, t: int) -> bool:
    """Is frame t's chunk on disk (zarr v3 default keys ``c/t/0/0``, one frame per chunk)?"""
    return (array_dir / "c" / str(t) / "0" / "0").is_file()
