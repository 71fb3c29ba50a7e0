"""What a live run measured: one dataclass, written as the ``--json`` summary.

Latency is measured from the acquisition timestamp of the newest frame of a window
(``t_acq_ns``, stamped when the frame left the camera buffer) to the moment its result was
published by the engine worker. Both clocks are ``time.time_ns()`` on the same machine.
"""

from __future__ import annotations

import copy
import json
import threading
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .protocol import EngineCounts

__all__ = ["LatencyTracker", "MeanRate", "PipelineMetrics"]


@dataclass
class PipelineMetrics:
    """Summary of a run (all counts are totals since start).

    ``counts`` is what the run's engine(s) counted (``EngineCounts``, summed over restarted
    engine processes; ``outputs`` at least the results received, ``malformed`` also holds
    the collector's own "results:*" counts); its fields read as attributes of the metrics
    and are written flat into the JSON (``malformed`` as ``malformed_messages``).
    """

    frames_acquired: int = 0  # frames popped from the camera
    frames_published: int = 0  # frames the acquisition sent on the frames socket
    counts: EngineCounts = field(default_factory=EngineCounts)
    outputs_received: int = 0  # results that reached the collector (GUI/CLI)
    fps_acquired: float = 0.0
    fps_output: float = 0.0
    latency_ms: dict[str, float] = field(
        default_factory=lambda: {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    )
    frames_recorded: int | None = None  # None when not recording
    frames_not_recorded: int | None = None  # acquired after the recording failed (None: off)
    sr_images_recorded: int | None = None  # --save-sr images on disk (None: off)
    engine: str = ""
    duration_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the run went on, but not as asked
    # the newest result's ResultHeader.info: what the engine used (SOFI: PSF width and source, lag,
    # bleaching correction) and the worker's blinking check ({"ok": bool, statistics, "message"})
    engine_info: dict[str, Any] = field(default_factory=dict)
    blinking_check: dict[str, Any] | None = None
    # a learned engine's trust check over the run (engines.trust.TrustTally.summary): outputs,
    # outputs_flagged, flagged_share, agreement_median / _min, warnings, last; None for SOFI
    trust: dict[str, Any] | None = None

    @property
    def frames_received(self) -> int:
        """Frames the engine worker(s) received."""
        return self.counts.frames_received

    @property
    def outputs(self) -> int:
        """Results published by the engine worker(s)."""
        return self.counts.outputs

    @property
    def outputs_skipped(self) -> int:
        """Outputs that were due but skipped so the engine could keep up."""
        return self.counts.outputs_skipped

    @property
    def engine_errors(self) -> int:
        return self.counts.engine_errors

    @property
    def malformed_messages(self) -> dict[str, int]:
        """Malformed messages by ProtocolError.reason (the collector's as "results:<reason>")."""
        return self.counts.malformed

    def copy(self) -> PipelineMetrics:
        """A snapshot nobody else writes into."""
        return copy.deepcopy(self)

    @property
    def output_fraction(self) -> float:
        """Outputs per acquired frame (1.0 = an output for every frame at stride 1)."""
        return self.outputs / self.frames_acquired if self.frames_acquired else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        counts = msgspec.structs.asdict(d.pop("counts"))
        del counts["last_error"]  # the errors are in "errors"
        counts["malformed_messages"] = dict(counts.pop("malformed"))
        d.update(counts)
        d["malformed_messages_total"] = sum(self.malformed_messages.values())
        d["output_fraction"] = self.output_fraction
        return d

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # NaN is not JSON: percentiles without samples are written as null
        d = _nan_to_none(self.to_dict())
        tmp = path.with_name(path.name + ".tmp")  # atomic: a reader never sees half a file
        tmp.write_text(json.dumps(d, indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
        return path

    def summary(self, errors: bool = True) -> str:
        """A one-screen human summary for headless runs (``errors=False``: count them only,
        for a front end that printed each one as it happened)."""
        lat = self.latency_ms
        rec = "off" if self.frames_recorded is None else f"{self.frames_recorded}"
        if self.frames_not_recorded:
            rec += f"  (NOT recorded: {self.frames_not_recorded})"
        if self.sr_images_recorded is not None:
            rec += f"   super-resolved images saved {self.sr_images_recorded}"
        bad = sum(self.malformed_messages.values())
        lines = [
            f"engine            {self.engine}",
            f"duration          {self.duration_s:.2f} s",
            f"frames acquired   {self.frames_acquired}  ({self.fps_acquired:.1f} fps)",
            f"frames published  {self.frames_published}   received by engine {self.frames_received}",
            f"outputs           {self.outputs}  ({self.fps_output:.1f} fps, "
            f"{100 * self.output_fraction:.1f}% of frames)",
            f"skipped to keep up {self.outputs_skipped}",
            "latency ms        " + "  ".join(f"{k} {_fmt(v)}" for k, v in lat.items()),
            f"frames recorded   {rec}",
            f"malformed msgs    {bad}" + (f"  {self.malformed_messages}" if bad else ""),
            f"engine errors     {self.engine_errors}",
        ]
        info = self.engine_info
        if isinstance(info.get("psf_fwhm_px"), (int, float)):
            lines.append(f"psf               {info['psf_fwhm_px']:.2f} px FWHM ({info.get('psf_source')}; "
                         f"pixel {info.get('pixel_size_um')} um, {info.get('pixel_size_source')})")
            lines.append(f"corrections       lag {info.get('lag')} ({info.get('lag_reason')}), "
                         f"bleaching {info.get('bleach_correction')}")
        if info.get("weights"):
            lines.append(f"weights           {info['weights']}: {info.get('weights_note')}")
        bc = self.blinking_check
        if bc is not None:
            lines.append(f"blinking check    {'ok' if bc.get('ok') else 'FAILED'}: {bc.get('message')}")
        tr = self.trust
        if tr is not None:
            med, lo = tr.get("agreement_median"), tr.get("agreement_min")
            agree = ("not measured (fewer frames than the reference window)" if med is None else
                     f"agreement with SOFI of {tr.get('reference_frames')} frames median {med:.2f}, "
                     f"min {lo:.2f} ({tr.get('agreement_measurements')} checks)")
            lines.append(f"trust             {agree}; {100 * tr.get('flagged_share', 0):.0f} % of "
                         f"{tr.get('outputs')} outputs flagged")
            lines += [f"trust warning     {w}" for w in tr.get("warnings", [])]
        lines += [f"warning           {w}" for w in self.warnings]
        if errors:
            lines += [f"error             {e}" for e in self.errors]
        elif self.errors:
            lines.append(f"errors            {len(self.errors)} (printed above)")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.1f}"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


class LatencyTracker:
    """Latency samples: a short rolling window for live plots plus the full history for percentiles.

    Thread-safe: the collector thread adds, the GUI thread reads.
    """

    def __init__(self, recent: int = 500) -> None:
        self._lock = threading.Lock()
        self._all = array("d")  # 8 bytes per sample (a list of floats costs ~32)
        self._recent: deque[tuple[int, float]] = deque(maxlen=recent)  # (seq_last, ms)

    def add(self, latency_ms: float, seq: int = -1) -> None:
        with self._lock:
            self._all.append(float(latency_ms))
            self._recent.append((int(seq), float(latency_ms)))

    def __len__(self) -> int:
        return len(self._all)

    def recent(self) -> np.ndarray:
        """(n, 2) array of (seq_last, latency_ms) for the newest samples."""
        with self._lock:
            return np.array(self._recent, dtype=float).reshape(-1, 2)

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            data = np.frombuffer(self._all, dtype=float).copy()
        if data.size == 0:
            nan = float("nan")
            return {"p50": nan, "p90": nan, "p99": nan, "max": nan}
        p50, p90, p99 = np.percentile(data, [50, 90, 99])
        return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(data.max())}


class MeanRate:
    """Mean events per second of a whole run: from the first to the last event timestamp
    (the GUI's ``gui.relay.RateMeter`` is the recent rate, over a sliding window)."""

    def __init__(self) -> None:
        self.count = 0
        self.t_first: float | None = None
        self.t_last: float | None = None

    def tick(self, t: float, n: int = 1) -> None:
        if self.t_first is None:
            self.t_first = t
        self.t_last = t
        self.count += n

    @property
    def rate(self) -> float:
        if self.count < 2 or self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return 0.0
        return (self.count - 1) / (self.t_last - self.t_first)
