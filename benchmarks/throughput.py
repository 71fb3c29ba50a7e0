"""Recording throughput: frames/s that acquisition + recording + publishing sustain.

    python -m benchmarks.throughput [--sizes 512,1024,2048] [--mib 1024] [--out-dir DIR]

For each frame size (uint16) and recording format, in one run and on the same disk:

* **disk**: the raw sequential write speed (``os.write`` of the same bytes, then fsync);
  every variant is timed until its data is on disk (fsync), so the numbers compare;
* **writer alone**: the writer livesr records with, fed from a loop (tifffile pages for
  OME-TIFF; ome-writers for OME-Zarr, also ome-writers' own OME-TIFF for reference);
* **pipeline**: a replay camera playing frames from memory as fast as it can (not the
  bottleneck: ``source alone`` is measured too) -> `AcquisitionThread` -> the recorder and
  the ZeroMQ frame publisher (a spawned process drains the socket) until N frames are on
  disk (fsync included), i.e. the rate the recording sustains;
* **paced check**: the camera paced at 90 % of that sustained rate for a few seconds: every
  acquired frame recorded, and how far the recorder's queue grew.

Acceptance (issue 10): nothing lost, and pipeline >= 80 % of min(disk, writer alone).
Writes throughput.{csv,json,png} to --out-dir (default: the current folder).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Event as EventType

    from acquisition.sinks import FrameSink

STEM = "throughput"


# --------------------------------------------------------------------------- helpers
def _fsync_tree(path: Path) -> None:
    """Flush what a writer left in the page cache (a file, or every file of a directory)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _timed(fn: Callable[[Path], Any], path: Path) -> float:
    """Seconds for `fn` to write `path` and for the data to reach the disk (fsync)."""
    t = time.perf_counter()
    fn(path)
    _fsync_tree(path)
    return time.perf_counter() - t


def _frames(size: int, k: int = 8) -> np.ndarray:
    """k distinct camera-like frames (cycled): incompressible noise around an offset."""
    rng = np.random.default_rng(size)
    return rng.integers(90, 4000, size=(k, size, size), dtype=np.uint16)


# --------------------------------------------------------------------------- writers alone
def write_raw(frames: np.ndarray, n: int) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        with open(path, "wb", buffering=0) as fh:
            for i in range(n):
                fh.write(memoryview(frames[i % len(frames)]).cast("B"))
    return run


def write_tifffile(frames: np.ndarray, n: int) -> Callable[[Path], None]:
    """What livesr's OME-TIFF writer does per frame: one BigTIFF page, flushed."""
    import tifffile

    def run(path: Path) -> None:
        with tifffile.TiffWriter(path, bigtiff=True, ome=False, shaped=False) as w:
            for i in range(n):
                w.write(frames[i % len(frames)], contiguous=False, photometric="minisblack")
                w.filehandle.flush()
    return run


def write_ome_writers(frames: np.ndarray, n: int, fmt: str) -> Callable[[Path], None]:
    """ome-writers alone, with the settings livesr's recorder uses (unbounded time axis)."""
    from ome_writers import AcquisitionSettings, Dimension, create_stream

    h, w = frames.shape[1:]

    def run(path: Path) -> None:
        dims = (Dimension(name="t", count=None, chunk_size=1, type="time"),
                Dimension(name="y", count=h, chunk_size=h, type="space"),
                Dimension(name="x", count=w, chunk_size=w, type="space"))
        # format: a backend name (the documented string form; the stubs declare only the models)
        stream = create_stream(AcquisitionSettings(root_path=str(path), dimensions=dims,
                                                   dtype="uint16", format=fmt))  # type: ignore[arg-type]
        for i in range(n):
            stream.append(frames[i % len(frames)], frame_metadata={"delta_t": i * 0.01})
        stream.close()
    return run


# --------------------------------------------------------------------------- the pipeline
def _drain(address: str, counter: Synchronized[int], stop: EventType) -> None:
    """The engine's end of the frame socket, in its own process: receive and count."""
    import zmq

    from realtime.protocol import EndOfStream, decode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        while not stop.is_set():
            if not sock.poll(100):
                continue
            header, _ = decode(sock.recv_multipart(copy=False))
            if isinstance(header, EndOfStream):
                break
            with counter.get_lock():
                counter.value += 1
    finally:
        sock.close()
        ctx.term()


def run_pipeline(frames: np.ndarray, n: int | None, path: Path | None, *, fps: float,
                 seconds: float | None = None) -> dict[str, Any]:
    """Replay camera -> AcquisitionThread -> [recorder, publisher] (+ a draining process).

    With `n`, acquire n frames as fast as the camera goes; with `seconds`, acquire at `fps`
    for that long. Time runs until the recording is closed and fsynced."""
    from acquisition.cameras import make_core
    from acquisition.recorder import Recorder
    from acquisition.thread import AcquisitionThread
    from realtime.config import free_tcp_address
    from realtime.publisher import FramePublisher

    core = make_core(frames, fps=fps, loop=True, pixel_size_um=0.1)
    address = free_tcp_address()
    sinks: list[FrameSink] = []
    rec = Recorder(path) if path is not None else None
    if rec is not None:
        sinks.append(rec)
    pub = FramePublisher(address, backlog=256)
    sinks.append(pub)
    ctx = mp.get_context("spawn")
    counter, stop = ctx.Value("q", 0), ctx.Event()
    drain = ctx.Process(target=_drain, args=(address, counter, stop), daemon=True)
    drain.start()
    time.sleep(1.0)  # let the drain connect (it imports zmq in a fresh interpreter)
    thread = AcquisitionThread(core, sinks=sinks, max_frames=n)
    peak = [0]

    def watch() -> None:
        while thread.is_alive() or not thread.started:  # (until it has run)
            if rec is not None:
                peak[0] = max(peak[0], rec.backlog)
            time.sleep(0.01)

    t0 = time.perf_counter()
    thread.start()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if n is None:
        time.sleep(seconds or 1.0)
        thread.stop(timeout=600)
    else:
        thread.join(600)
    t_acq = time.perf_counter() - t0
    if path is not None:
        _fsync_tree(path)
    elapsed = time.perf_counter() - t0  # the recorder closed inside the thread's shutdown
    stop.set()
    drain.join(10)
    watcher.join(1)
    out = {
        "frames_acquired": thread.frames_acquired,
        "frames_recorded": rec.frames_recorded if rec else None,
        "frames_published": pub.frames_published,
        "frames_received": int(counter.value),
        "publish_drops": pub.publish_drops,
        "camera_gaps": thread.gaps,
        "seconds": elapsed,
        "acquire_seconds": t_acq,
        "recorder_peak_backlog": peak[0],
        "error": thread.error_message or (rec.error if rec else None),
    }
    out["fps"] = thread.frames_acquired / elapsed if elapsed > 0 else 0.0
    return out


def _count_on_disk(path: Path) -> int:
    if path.suffix == ".zarr":
        import zarr

        arr = zarr.open_group(str(path), mode="r")["0"]
        assert isinstance(arr, zarr.Array)
        return int(arr.shape[0])
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return len(tf.pages)


# --------------------------------------------------------------------------- one size
#: format -> (file suffix, unused, the writer it is compared with)
FORMATS = {
    "ome-tiff": (".ome.tif", None, "tifffile (pages)"),
    "ome-zarr": (".ome.zarr", None, "ome-writers (zarr)"),
}


def bench_size(size: int, mib: float, tmp: Path, formats: Sequence[str], reps: int,
               paced_seconds: float, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every variant `reps` times, interleaved (a busy machine slows all alike); medians."""
    frames = _frames(size)
    mb = frames[0].nbytes / 1e6
    n = max(60, int(mib * 2**20 / frames[0].nbytes))

    def clean(p: Path) -> None:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def timed_fps(make: Callable[[np.ndarray, int], Callable[[Path], None]], name: str,
                  count: int = n) -> float:
        p = tmp / name
        s = _timed(make(frames, count), p)
        clean(p)
        return count / s

    writers: dict[str, Callable[[np.ndarray, int], Callable[[Path], None]]] = {
        "disk": write_raw,
        "ome-tiff": write_tifffile,
        "ome-zarr": lambda fr, k: write_ome_writers(fr, k, "ome-zarr"),
        "ome-writers-tiff": lambda fr, k: write_ome_writers(fr, k, "ome-tiff"),
    }
    names = {"disk": "raw.bin", "ome-tiff": "alone.ome.tif", "ome-zarr": "alone.ome.zarr",
             "ome-writers-tiff": "ref.ome.tif"}
    variants = ["disk", *formats] + (["ome-writers-tiff"] if "ome-tiff" in formats else [])
    for v in variants:  # warm-up: imports, thread pools, first-file costs
        timed_fps(writers[v], names[v], count=8)
    run_pipeline(frames, 8, tmp / "warm.ome.tif", fps=100_000.0)
    clean(tmp / "warm.ome.tif")

    got: dict[str, list[float]] = {k: [] for k in [*variants, "source"]}
    pipes: dict[str, list[dict[str, Any]]] = {f: [] for f in formats}
    for _ in range(reps):
        for v in variants:
            got[v].append(timed_fps(writers[v], names[v]))
        got["source"].append(run_pipeline(frames, n, None, fps=100_000.0)["fps"])
        for fmt in formats:
            p = tmp / f"pipe{FORMATS[fmt][0]}"
            res = run_pipeline(frames, n, p, fps=100_000.0)
            res["on_disk"] = _count_on_disk(p)
            clean(p)
            pipes[fmt].append(res)
    med = {k: float(np.median(v)) for k, v in got.items()}
    log(f"{size}^2 ({n} frames x {reps}): disk {med['disk']:.0f} fps "
        f"({med['disk'] * mb:.0f} MB/s); source alone {med['source']:.0f} fps")

    rows = []
    for fmt in formats:
        suffix, _make, writer_name = FORMATS[fmt]
        runs = pipes[fmt]
        claimed = float(np.median([r["fps"] for r in runs]))
        p = tmp / f"paced{suffix}"
        paced = run_pipeline(frames, None, p, fps=0.9 * claimed, seconds=paced_seconds)
        paced_on_disk = _count_on_disk(p)
        clean(p)
        bound = min(med["disk"], med[fmt])
        lost = sum(r["frames_acquired"] - r["on_disk"] for r in runs)
        row = {
            "size": size, "format": fmt, "frame_mb": round(mb, 3), "frames": n, "reps": reps,
            "disk_fps": med["disk"], "disk_mb_s": med["disk"] * mb,
            "writer": writer_name, "writer_alone_fps": med[fmt],
            "ome_writers_tiff_fps": med.get("ome-writers-tiff") if fmt == "ome-tiff" else None,
            "source_alone_fps": med["source"],
            "pipeline_fps": claimed, "pipeline_mb_s": claimed * mb,
            "pipeline_fps_runs": [round(r["fps"], 1) for r in runs],
            "ratio_to_bound": claimed / bound if bound else None,
            "frames_acquired": sum(r["frames_acquired"] for r in runs),
            "frames_on_disk": sum(r["on_disk"] for r in runs), "frames_lost": lost,
            "publish_drops": sum(r["publish_drops"] for r in runs),
            "received_by_drain": sum(r["frames_received"] for r in runs),
            "recorder_peak_backlog": max(r["recorder_peak_backlog"] for r in runs),
            "paced_fps_requested": 0.9 * claimed,
            "paced_fps_achieved": paced["fps"],
            "paced_frames_acquired": paced["frames_acquired"],
            "paced_frames_on_disk": paced_on_disk,
            "paced_frames_lost": paced["frames_acquired"] - paced_on_disk,
            "paced_peak_backlog": paced["recorder_peak_backlog"],
            "error": next((r["error"] for r in runs if r["error"]), None) or paced["error"],
        }
        row["accepted"] = bool(lost == 0 and row["paced_frames_lost"] == 0
                               and row["ratio_to_bound"] >= 0.8 and not row["error"])
        rows.append(row)
        log(f"  {fmt}: writer alone {row['writer_alone_fps']:.0f} fps, pipeline "
            f"{claimed:.0f} fps ({100 * row['ratio_to_bound']:.0f} % of the bound), "
            f"{row['frames_on_disk']}/{row['frames_acquired']} on disk; paced at "
            f"{0.9 * claimed:.0f}: {paced_on_disk}/{paced['frames_acquired']} on disk, peak "
            f"queue {paced['recorder_peak_backlog']}" + ("" if row["accepted"] else "  NOT ACCEPTED"))
    return rows


# --------------------------------------------------------------------------- output
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    from importlib.metadata import version

    info["libraries"] = {k: version(k) for k in ("tifffile", "ome-writers", "tensorstore",
                                                 "zarr", "pyzmq", "pymmcore-plus")
                         if _installed(k)}
    return info


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def write_results(rows: list[dict[str, Any]], info: dict[str, Any], out_dir: Path,
                  tmp_fs: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{STEM}.csv", out_dir / f"{STEM}.json", out_dir / f"{STEM}.png"]
    with open(paths[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(json.dumps({"machine": info, "filesystem": tmp_fs, "rows": rows},
                                   indent=2, default=str) + "\n")
    try:
        plot(rows, info, paths[2])
    except ImportError as e:
        print(f"unavailable: PNG not written ({e})", file=sys.stderr)
        paths.pop()
    return paths


def plot(rows: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["format"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, fmt in zip(axes[0], sorted({r["format"] for r in rows}), strict=True):
        rs = [r for r in rows if r["format"] == fmt]
        x = np.arange(len(rs))
        bars = [("disk_fps", "disk (raw write + fsync)"), ("writer_alone_fps", "writer alone"),
                ("source_alone_fps", "camera + publishing, no recording"),
                ("pipeline_fps", "acquisition + recording + publishing")]
        for j, (key, label) in enumerate(bars):
            ax.bar(x + (j - 1.5) * 0.2, [r[key] for r in rs], 0.2, label=label)
        ax.set_xticks(x, [f"{r['size']}²" for r in rs])
        ax.set_yscale("log")
        ax.set_ylabel("frames / s (uint16)")
        ax.set_title(f"{fmt} ({rs[0]['writer']})")
        ax.legend(fontsize=7)
    fig.suptitle(f"livesr recording throughput — {info['cpu']}, {info['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | format | disk fps (MB/s) | writer alone fps | pipeline fps (MB/s) | "
             "% of bound | frames on disk / acquired | paced at 90 %: lost, peak queue |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['format']} | {r['disk_fps']:.0f} ({r['disk_mb_s']:.0f}) | "
            f"{r['writer_alone_fps']:.0f} | {r['pipeline_fps']:.0f} ({r['pipeline_mb_s']:.0f}) | "
            f"{100 * r['ratio_to_bound']:.0f} % | {r['frames_on_disk']} / {r['frames_acquired']} | "
            f"{r['paced_frames_lost']}, {r['paced_peak_backlog']} frames |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048", help="frame sizes in px (%(default)s)")
    p.add_argument("--formats", default="ome-tiff,ome-zarr", help="%(default)s")
    p.add_argument("--mib", type=float, default=256.0,
                   help="data written per run, MiB (at least 60 frames; default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (%(default)s)")
    p.add_argument("--paced-seconds", type=float, default=3.0,
                   help="length of the paced check (%(default)s s)")
    p.add_argument("--tmp", type=Path, default=None,
                   help="where the files are written (default: the system temp folder)")
    p.add_argument("--out-dir", type=Path, default=Path("."),
                   help="results folder (default: the current folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        print(f"throughput: --sizes must be integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not sizes:
        print(f"throughput: unknown format(s) {bad}; choose from {sorted(FORMATS)}",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="livesr-throughput-", dir=args.tmp))
    fs = subprocess.run(["df", "-hT", str(tmp)], capture_output=True, text=True).stdout.strip()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; writing to {tmp}\n{fs}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            rows += bench_size(size, args.mib, tmp, formats, max(1, args.reps),
                               args.paced_seconds, lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    for p in write_results(rows, info, args.out_dir, fs):
        print(f"written: {p}")
    return 0 if all(r["accepted"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
