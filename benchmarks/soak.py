"""Soak test: run the live pipeline for a long time and watch memory, latency and losses.

    python -m benchmarks.soak --seconds 3600            # the issue's one-hour run
    python -m benchmarks.soak --seconds 600 --size 256 --fps 100 --engine sofi

A leak or an unbounded queue shows up only after minutes, not in a unit test. Every
`--interval` seconds this samples the resident memory (RSS) of this process and of the
engine worker process, the recorder's backlog, the acquisition and output rates, and the
latency percentiles of the outputs received in that interval (acquisition time of the
newest frame -> the result reaching the collector). It writes a CSV row per sample, a PNG
of the curves and a JSON summary, and at the end checks that the recording holds every
acquired frame (counting the TIFF pages on disk). Not part of CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.registry import DEFAULT_ENGINE


def rss_mib(pid: int | None = None) -> float:
    """Resident set size in MiB (Linux /proc; elsewhere the peak of this process)."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if pid is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024.0 if sys.platform != "darwin" else 2**20)
    return float("nan")


@dataclass
class Interval:
    """Latencies (ms) of the outputs received since the last sample (bounded by rate)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    outputs: int = 0

    def add(self, ms: float) -> None:
        with self.lock:
            self.latencies.append(ms)
            self.outputs += 1

    def take(self) -> tuple[np.ndarray, int]:
        with self.lock:
            lat, n = np.asarray(self.latencies, dtype=np.float64), self.outputs
            self.latencies, self.outputs = [], 0
        return lat, n


COLUMNS = [
    "t_s",
    "rss_main_mib",
    "rss_worker_mib",
    "frames_acquired",
    "frames_recorded",
    "recorder_backlog",
    "publish_backlog",
    "publish_drops",
    "outputs_received",
    "fps_acquired",
    "fps_output",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "skipped_by_engine",
    "load_avg_1m",
]


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def _worker_pid(pipe: Any) -> int | None:
    runner = getattr(getattr(pipe, "worker", None), "_runner", None)
    return getattr(runner, "pid", None)


def _count_tiff_pages(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return len(tf.pages)


def _slope_per_hour(t: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[ok], y[ok], 1)[0] * 3600.0)


def plot(rows: list[dict[str, float]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r["t_s"] for r in rows]) / 60.0
    col = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(t, col("rss_main_mib"), label="pipeline process")
    ax[0].plot(t, col("rss_worker_mib"), label="engine worker process")
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(loc="best")
    ax[1].plot(t, col("latency_p50_ms"), label="p50")
    ax[1].plot(t, col("latency_p99_ms"), label="p99")
    ax[1].set_ylabel("latency (ms)")
    ax[1].set_yscale("log")
    ax[1].legend(loc="best")
    ax[2].plot(t, col("fps_acquired"), label="acquired fps")
    ax[2].plot(t, col("fps_output"), label="output fps")
    ax2 = ax[2].twinx()
    ax2.plot(t, col("recorder_backlog"), "k:", label="recorder backlog (frames)")
    ax2.set_ylabel("recorder backlog (frames)")
    ax[2].set_ylabel("frames / s")
    ax[2].set_xlabel("time (min)")
    ax[2].legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3600.0, help="run length (default: one hour)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--fps", type=float, default=100.0)
    p.add_argument("--engine", default=DEFAULT_ENGINE)
    p.add_argument("--threads", type=int, default=None, help="engine compute threads")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=Path("soak"),
                   help="output prefix (default ./soak: soak.csv/.json/.png in the current folder)")
    p.add_argument("--record", type=Path, default=None, help="recording path (default: temp)")
    p.add_argument("--keep-recording", action="store_true", help="do not delete the temp recording")
    p.add_argument("--no-record", action="store_true", help="do not record (no loss check)")
    p.add_argument("--min-free-gb", type=float, default=10.0,
                   help="stop early when the recording disk has less free space than this")
    args = p.parse_args(argv)
    if not (args.seconds > 0 and args.interval > 0 and args.size >= 4 and args.fps > 0):
        p.error("--seconds, --interval, --fps must be > 0 and --size >= 4")

    from tqdm import tqdm

    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    tmpdir = None
    record: Path | None = None
    if not args.no_record:
        if args.record is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="livesr-soak-")
            record = Path(tmpdir.name) / "soak.ome.tif"
        else:
            record = args.record
    cfg_kwargs: dict[str, Any] = dict(
        source="sim",
        size=args.size,
        fps=args.fps,
        engine=args.engine,
        seconds=None,
        record=record,
        headless=True,
        worker_mode="process",
        addresses=Addresses(frames="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0"),
    )
    if args.threads is not None:
        cfg_kwargs["threads"] = args.threads
    cfg = PipelineConfig(**cfg_kwargs)
    pipe = Pipeline(cfg)
    interval = Interval()

    def on_result(header: Any, _img: Any) -> None:
        interval.add((time.time_ns() - header.t_acq_ns) / 1e6)

    errors: list[str] = []
    pipe.resultReady.connect(on_result)
    pipe.error.connect(errors.append)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = args.out.with_suffix(".csv")
    rows: list[dict[str, float]] = []
    conditions = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "size": args.size,
        "fps": args.fps,
        "engine": args.engine,
        "seconds_requested": args.seconds,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"soak: {args.engine} {args.size}x{args.size} @ {args.fps:g} fps for {args.seconds:g} s; "
          f"recording {'off' if record is None else record}")
    pipe.start()
    if not pipe.wait_started(cfg.engine_ready_timeout_s + 30):
        print("soak: the pipeline did not start:", "; ".join(errors), file=sys.stderr)
        pipe.stop()
        return 1
    t0 = time.monotonic()
    last = {"t": t0, "acq": 0}
    stopped_early = ""
    with open(csv_path, "w", newline="") as f, tqdm(total=int(args.seconds), unit="s", desc="soak") as bar:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        next_sample = t0 + args.interval
        while True:
            now = time.monotonic()
            if pipe.wait(max(0.0, min(next_sample, t0 + args.seconds) - now)):
                break  # the run ended by itself (an error): sample once more below
            now = time.monotonic()
            m = pipe.metrics()
            lat, n_out = interval.take()
            dt = now - last["t"]
            row = {
                "t_s": round(now - t0, 2),
                "rss_main_mib": round(rss_mib(), 1),
                "rss_worker_mib": round(rss_mib(_worker_pid(pipe)), 1) if _worker_pid(pipe) else float("nan"),
                "frames_acquired": m.frames_acquired,
                "frames_recorded": m.frames_recorded if m.frames_recorded is not None else -1,
                "recorder_backlog": getattr(pipe.recorder, "backlog", 0) if pipe.recorder else 0,
                "publish_backlog": getattr(pipe.publisher, "publish_backlog", 0),
                "publish_drops": getattr(pipe.publisher, "publish_drops", 0),
                "outputs_received": m.outputs_received,
                "fps_acquired": round((m.frames_acquired - last["acq"]) / dt, 2) if dt > 0 else 0.0,
                "fps_output": round(n_out / dt, 2) if dt > 0 else 0.0,
                "latency_p50_ms": round(_pct(lat, 50), 2),
                "latency_p99_ms": round(_pct(lat, 99), 2),
                "latency_max_ms": round(float(lat.max()), 2) if lat.size else float("nan"),
                "skipped_by_engine": m.outputs_skipped,
                "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan"),
            }
            last = {"t": now, "acq": m.frames_acquired}
            rows.append(row)
            w.writerow(row)
            f.flush()
            bar.n = min(int(now - t0), int(args.seconds))
            bar.set_postfix(rss=f"{row['rss_main_mib']:.0f}+{row['rss_worker_mib']:.0f}MiB",
                            p99=f"{row['latency_p99_ms']:.0f}ms", out=f"{row['fps_output']:.0f}fps")
            bar.refresh()
            next_sample += args.interval
            if now - t0 >= args.seconds:
                break
            if record is not None:
                free_gb = shutil.disk_usage(record.parent).free / 1e9
                if free_gb < args.min_free_gb:
                    stopped_early = f"disk nearly full ({free_gb:.1f} GB free) after {now - t0:.0f} s"
                    print(f"soak: stopping early: {stopped_early}", file=sys.stderr)
                    break
    final = pipe.stop(wait=True, timeout=120)
    duration = time.monotonic() - t0

    pages = None
    if record is not None and record.exists():
        print("soak: counting TIFF pages on disk ...")
        pages = _count_tiff_pages(record)
    t = np.array([r["t_s"] for r in rows], dtype=float)
    warm = t >= min(60.0, t[-1] / 4) if t.size else t.astype(bool)
    main_rss = np.array([r["rss_main_mib"] for r in rows], dtype=float)
    worker_rss = np.array([r["rss_worker_mib"] for r in rows], dtype=float)
    p99 = np.array([r["latency_p99_ms"] for r in rows], dtype=float)
    summary = {
        "conditions": conditions,
        "duration_s": round(duration, 1),
        "frames_acquired": final.frames_acquired,
        "frames_recorded": final.frames_recorded,
        "tiff_pages_on_disk": pages,
        "recorded_frames_lost": (final.frames_acquired - pages) if pages is not None else None,
        "outputs_received": final.outputs_received,
        "skipped_by_engine": final.outputs_skipped,
        "publish_drops": getattr(pipe.publisher, "publish_drops", None),
        "latency_ms_overall": final.latency_ms,
        "latency_p99_ms_first_last_sample": [float(p99[warm][0]), float(p99[-1])] if warm.any() else None,
        "latency_p99_ms_max_sample": float(np.nanmax(p99)) if np.isfinite(p99).any() else None,
        "rss_main_mib_start_end": [float(main_rss[warm][0]), float(main_rss[-1])] if warm.any() else None,
        "rss_worker_mib_start_end": [float(worker_rss[warm][0]), float(worker_rss[-1])] if warm.any() else None,
        "rss_main_growth_mib_per_hour": _slope_per_hour(t[warm], main_rss[warm]),
        "rss_worker_growth_mib_per_hour": _slope_per_hour(t[warm], worker_rss[warm]),
        "load_avg_mean": float(np.mean([r["load_avg_1m"] for r in rows])) if rows else None,
        "errors": errors + [e for e in final.errors if e not in errors],
        "stopped_early": stopped_early,
    }
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if rows:
        plot(rows, args.out.with_suffix(".png"),
             f"livesr soak: {args.engine} {args.size}px @ {args.fps:g} fps, {duration / 60:.1f} min, "
             f"{os.cpu_count()} CPUs (load {summary['load_avg_mean']:.1f})")
    if tmpdir is not None and not args.keep_recording:
        tmpdir.cleanup()
    print(json.dumps(summary, indent=2, default=str))
    print(f"soak: wrote {csv_path}, {json_path}, {args.out.with_suffix('.png')}")
    lost = summary["recorded_frames_lost"]
    return 0 if (lost in (0, None) and final.frames_recorded in (None, final.frames_acquired)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
