"""Does the window keep up with the camera? Displayed output fps and dropped frames.

    QT_QPA_PLATFORM=offscreen python -m benchmarks.bench_gui --size 256 --fps 100 --seconds 20

Runs the real main window (offscreen) on the real pipeline (simulated camera -> engine
worker -> results) and reports, after a warm-up:
  * displayed output fps: new super-resolved images handed to the screen per second,
  * painted fps: paint events of the super-resolved view per second (what reached pixels),
  * acquisition: frames acquired vs the camera's rate, sequence gaps seen by the GUI,
    and frames published / received by the engine (all equal = no frame lost),
  * end-to-end latency (camera buffer -> display) p50 / p99,
  * CPU per thread of this process, of the engine worker process, the Qt thread's CPU per
    displayed output, and the machine's load average (other programs share the cores).
Target (issue 5): 256x256 at 100 fps with SOFI, displayed >= 30 fps, no frame dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engines.registry import DEFAULT_ENGINE


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process (Linux /proc), by name."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        name = names.get(int(tid), comm)
        out[name] = out.get(name, 0.0) + cpu
    return out


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by a whole process (Linux /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--fps", type=float, default=100.0)
    p.add_argument("--engine", default=DEFAULT_ENGINE)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="measured time after warm-up")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--worker-mode", default="process", choices=["process", "thread"])
    p.add_argument("--refresh-hz", type=float, default=50.0)
    p.add_argument("--json", default=None, help="write the numbers here too")
    p.add_argument("--profile", action="store_true", help="cProfile the Qt thread, print top 25")
    args = p.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from qtpy import QtCore

    from gui.app import get_app
    from gui.main_window import MainWindow
    from realtime.config import Addresses, PipelineConfig

    _app = get_app()  # the QApplication must exist (and stay referenced) before any widget
    cfg = PipelineConfig(source="sim", size=args.size, fps=args.fps, engine=args.engine,
                         stride=args.stride, seconds=None, worker_mode=args.worker_mode,
                         addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    win = MainWindow(cfg, refresh_hz=args.refresh_hz, error_dialogs=False)
    painted = [0]

    class PaintCounter(QtCore.QObject):
        def eventFilter(self, obj, ev):  # noqa: N802
            if ev.type() == QtCore.QEvent.Type.Paint:
                painted[0] += 1
            return False

    counter = PaintCounter()
    win.views.sr.widget.viewport().installEventFilter(counter)
    win.show()

    def pump(until: float, cond=lambda: False) -> None:
        """Run the Qt event loop (as app.exec() would) until `until` or `cond()`."""
        loop = QtCore.QEventLoop()
        check = QtCore.QTimer()
        check.timeout.connect(lambda: loop.quit() if time.monotonic() >= until or cond() else None)
        check.start(50)
        loop.exec()
        check.stop()

    win.start()
    t_start = time.monotonic()
    pump(t_start + cfg.engine_ready_timeout_s, lambda: win.state == "running" or win.errors)
    if win.state != "running":
        print("pipeline did not start:", win.errors, file=sys.stderr)
        return 2
    startup_s = time.monotonic() - t_start
    pump(time.monotonic() + args.warmup)

    def snapshot() -> dict[str, float | int]:
        return {"t": time.monotonic(), "displayed": win.n_displayed, "painted": painted[0],
                "frames": win.acq_rate.count, "results": win.out_rate.count}

    runner = getattr(getattr(win.pipeline, "worker", None), "_runner", None)
    worker_pid = getattr(runner, "pid", None)  # None in thread mode
    a = snapshot()
    cpu_a = thread_cpu_s()
    wcpu_a = process_cpu_s(worker_pid) if worker_pid else None
    load_a = os.getloadavg()[0]
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    pump(a["t"] + args.seconds)
    if prof is not None:
        import pstats

        prof.disable()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(20)
        st.sort_stats("cumulative").print_stats(30)
    b = snapshot()
    cpu_b = thread_cpu_s()
    wcpu_b = process_cpu_s(worker_pid) if worker_pid else None
    dt = b["t"] - a["t"]
    p50, p99 = win.latency.percentiles()
    pipe = win.pipeline  # kept to read the acquisition's own counters after the stop
    win.stop()
    pump(time.monotonic() + 60, lambda: win.state == "idle")
    m = win.last_metrics
    win.close()
    pump(time.monotonic() + 10, lambda: not win.isVisible())

    res = {
        "size": args.size, "camera_fps": args.fps, "engine": args.engine, "stride": args.stride,
        "worker_mode": args.worker_mode, "startup_s": round(startup_s, 2),
        "measured_s": round(dt, 2),
        "displayed_fps": round((b["displayed"] - a["displayed"]) / dt, 1),
        "painted_fps": round((b["painted"] - a["painted"]) / dt, 1),
        "acquired_fps": round((b["frames"] - a["frames"]) / dt, 1),
        "results_fps": round((b["results"] - a["results"]) / dt, 1),
        "latency_to_display_ms": {"p50": round(p50, 1), "p99": round(p99, 1)},
        "gui_seq_gaps": win.seq_gaps,
        "cpu_percent_by_thread": {k: round(100 * (v - cpu_a.get(k, 0.0)) / dt, 1)
                                  for k, v in sorted(cpu_b.items(), key=lambda kv: -kv[1])
                                  if v - cpu_a.get(k, 0.0) > 0.005 * dt},
        "gui_process_cpu_percent": round(100 * (sum(cpu_b.values()) - sum(cpu_a.values())) / dt, 1),
        "worker_process_cpu_percent": (round(100 * (wcpu_b - wcpu_a) / dt, 1)
                                       if wcpu_a is not None and wcpu_b is not None else None),
        # Qt-thread CPU per displayed output (raw + SR image, plots, counters): the GUI's
        # own cost, independent of how busy the rest of the machine is
        "qt_thread_cpu_ms_per_displayed": round(
            1000 * (cpu_b.get("MainThread", 0) - cpu_a.get("MainThread", 0))
            / max(1, b["displayed"] - a["displayed"]), 2),
        "load_average_1min": [round(load_a, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "errors": win.errors,
    }
    if m is not None:
        res.update({
            "frames_acquired": m.frames_acquired, "frames_published": m.frames_published,
            "frames_received_by_engine": m.frames_received,
            "outputs": m.outputs, "outputs_skipped_by_engine": m.outputs_skipped,
            "pipeline_latency_ms": m.latency_ms,
        })
        res["frames_lost"] = int(m.frames_acquired - m.frames_received)
    acq = getattr(pipe, "acquisition", None)
    if acq is not None and pipe is not None:
        res["camera_buffer_gaps"] = int(acq.gaps)  # frames overwritten before being popped
        res["publish_drops"] = int(pipe.publisher.publish_drops)
        res["frames_lost"] = res.get("frames_lost", 0) + res["camera_buffer_gaps"] + res["publish_drops"]
    print(json.dumps(res, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    checks = {
        "displayed >= 30 fps": res["displayed_fps"] >= 30,
        "no frame lost (camera buffer, sockets, engine input)": res.get("frames_lost", 1) == 0,
        "no gap in frame numbers at the window": res["gui_seq_gaps"] == 0,
        f"camera kept >= 95% of {args.fps:g} fps": res["acquired_fps"] >= 0.95 * args.fps,
    }
    for name, passed in checks.items():
        print("PASS" if passed else "FAIL", name)
    ok = all(checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
