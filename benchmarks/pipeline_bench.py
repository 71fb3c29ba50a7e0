"""`livesr bench --pipeline`: the whole chain, end to end, at a given camera rate and size.

Why separate from the latency benchmark: an engine that needs 5 ms in isolation can still lag
live (ZeroMQ transit, queueing behind a busy engine, the GIL, the result hop back to the
viewer). This runs the real :class:`realtime.pipeline.Pipeline` (simulated UniMMCore camera ->
acquisition thread -> PUSH/PULL -> engine worker -> PUB/SUB -> collector) and reports what a
microscopist would see: frames acquired vs received, outputs, frames the engine skipped to
keep up, and latency percentiles from frame acquisition to result *received* by the collector,
split into stages from the result header's timestamps.

``--capacity`` also times the engine's own ``push`` in this process (one compute thread, as
in the worker; its CPU time, which a busy shared machine does not inflate) and reports
outputs/s against that capacity: a camera slower than it should
get an output per frame, a faster one should still get close to the capacity (a stateful
engine such as the ConvLSTM keeps its state and skips outputs instead of re-warming).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import machine_info, machine_line
from engines.registry import DEFAULT_ENGINE

STAGES = ("transit", "queue", "compute", "publish", "delivery")


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def engine_capacity(engine: str, size: int, *, backend: str = "eager", precision: str = "fp32",
                    device: str = "cpu", threads: int | None = None, weights: str | None = None,
                    reps: int = 40) -> dict[str, float]:
    """Median cost of one streaming push (after the warm-up), wall and CPU time of this thread,
    and the outputs/s the CPU time allows (on a shared machine wall time also counts waiting
    for a core; the CPU time is the engine's own cost)."""
    import torch

    from engines import EngineSpec, load_engine
    from engines.backends import simulated_stack
    from realtime.worker import default_compute_threads

    torch.set_num_threads(threads or default_compute_threads())
    eng = load_engine(EngineSpec(engine, backend=backend, precision=precision, device=device,
                                 weights=None if weights is None else str(weights)))
    frames = simulated_stack(size, eng.window + reps + 3, seed=2)
    wall, cpu = [], []
    for i, f in enumerate(frames):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = eng.push(f)
        if i >= eng.window + 2 and out is not None:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    push_ms, cpu_ms = 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))
    return {"push_ms": push_ms, "push_cpu_ms": cpu_ms, "capacity_per_s": 1e3 / cpu_ms}


def run_pipeline(*, engine: str = DEFAULT_ENGINE, size: int = 128, fps: float = 100.0,
                 seconds: float = 10.0, backend: str = "eager", precision: str = "fp32",
                 device: str = "cpu", worker_mode: str = "process", stride: int = 1,
                 threads: int | None = None, weights: str | None = None,
                 engine_override: Any = None) -> dict[str, Any]:
    """Run one live pipeline for `seconds`; return metrics + end-to-end latency percentiles."""
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    cfg = PipelineConfig(
        source="sim", size=size, fps=fps, seconds=seconds, engine=engine, stride=stride,
        backend=backend, device=device, precision=precision, weights=weights,
        worker_mode=worker_mode, threads=threads, headless=True,
        addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    pipe = Pipeline(cfg, engine=engine_override)
    lock = threading.Lock()
    e2e: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    errors: list[str] = []

    def on_result(header: Any, img: Any) -> None:
        t_recv = time.time_ns()
        t = dict(header.timings_ns)
        with lock:
            e2e.append((t_recv - header.t_acq_ns) / 1e6)
            marks = [header.t_acq_ns, t.get("received"), t.get("start"), t.get("done"),
                     t.get("published"), t_recv]
            for name, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True):
                if a is not None and b is not None:
                    stages[name].append((b - a) / 1e6)

    pipe.resultReady.connect(on_result)
    pipe.error.connect(errors.append)
    t0 = time.perf_counter()
    metrics = pipe.run_for(seconds)
    wall = time.perf_counter() - t0
    m = metrics.to_dict()
    with lock:
        result = {
            "engine": engine, "backend": backend, "precision": precision, "device": device,
            "size": size, "camera_fps": fps, "seconds": seconds, "stride": stride,
            "worker_mode": worker_mode, "wall_s": wall,
            "frames_acquired": m["frames_acquired"], "frames_received": m["frames_received"],
            "frames_lost_in_transit": m["frames_published"] - m["frames_received"],
            "outputs": m["outputs"], "outputs_received": m["outputs_received"],
            "outputs_skipped": m["outputs_skipped"],
            "fps_acquired": m["fps_acquired"], "fps_output": m["fps_output"],
            "latency_acq_to_received_ms": _pcts(e2e),
            "latency_acq_to_published_ms": m["latency_ms"],
            "stages_ms": {k: _pcts(v) for k, v in stages.items()},
            "errors": list(m.get("errors", [])) + errors,
        }
    return result


def print_result(r: dict[str, Any]) -> None:
    lat = r["latency_acq_to_received_ms"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{r['engine']} {r['backend']} {r['precision']} {r['size']}px @ {r['camera_fps']:g} fps, "
          f"{r['seconds']:g} s ({r['worker_mode']} worker)")
    print(f"  frames acquired {r['frames_acquired']}, received by engine {r['frames_received']} "
          f"(lost in transit {r['frames_lost_in_transit']})")
    print(f"  outputs {r['outputs']} ({r['fps_output']:.1f}/s), received {r['outputs_received']}, "
          f"frames skipped by the engine to keep up {r['outputs_skipped']}")
    print(f"  latency acquisition -> result received: p50 {fmt(lat['p50'])} ms, p90 "
          f"{fmt(lat['p90'])} ms, p99 {fmt(lat['p99'])} ms, max {fmt(lat['max'])} ms")
    parts = [f"{k} p50 {fmt(v['p50'])}" for k, v in r["stages_ms"].items()]
    print("  stages (ms): " + ", ".join(parts))
    if r["errors"]:
        print("  errors: " + "; ".join(r["errors"][:5]))


def run_cli(a: Any) -> int:
    """`livesr bench --pipeline` (realtime/cli_tools.py holds the flags): ``a`` has one attribute per flag."""
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    sizes = [int(x) for x in split(a.sizes)]
    rates = [float(x) for x in split(a.camera_fps)]
    seconds, worker = a.seconds, a.worker_mode
    if a.quick:
        sizes, seconds, worker = [min(s, 32) for s in sizes] or [16], min(seconds, 1.5), "thread"
    machine = machine_info(a.device)
    print(machine_line(machine), flush=True)
    results = []
    for eng in split(a.engines):
        for be in split(a.backends):
            for pr in split(a.precisions):
                for size in sizes:
                    cap = None
                    if a.capacity:
                        cap = engine_capacity(eng, size, backend=be, precision=pr,
                                              device=a.device, threads=a.threads)
                        print(f"{eng} {be} {pr} {size}px: push {cap['push_ms']:.1f} ms wall, "
                              f"{cap['push_cpu_ms']:.1f} ms CPU alone -> capacity "
                              f"{cap['capacity_per_s']:.1f} outputs/s", flush=True)
                    for fps in rates:
                        try:
                            r = run_pipeline(engine=eng, size=size, fps=fps, seconds=seconds,
                                             backend=be, precision=pr, device=a.device,
                                             worker_mode=worker, stride=a.stride,
                                             threads=a.threads)
                        except Exception as e:  # noqa: BLE001 - report and go on
                            r = {"engine": eng, "backend": be, "precision": pr, "size": size,
                                 "camera_fps": fps, "status": f"error: {type(e).__name__}: {e}"}
                            print(f"{eng} {be} {pr} {size}px @ {fps:g} fps: {r['status']}")
                        else:
                            if cap is not None:
                                r.update(cap, output_share_of_capacity=r["fps_output"]
                                         / cap["capacity_per_s"])
                            print_result(r)
                        results.append(r)
    if a.capacity:
        print("\noutputs/s vs camera fps (share of the engine's own capacity):")
        for r in results:
            if "capacity_per_s" in r:
                print(f"  {r['engine']:9s} {r['size']:4d} px  camera {r['camera_fps']:6.1f} fps -> "
                      f"{r['fps_output']:6.1f} outputs/s  (capacity {r['capacity_per_s']:.1f}/s, "
                      f"{100 * r['output_share_of_capacity']:.0f} %; frames skipped "
                      f"{r['outputs_skipped']})")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.stem or f"pipeline_{a.device.split(':')[0]}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps({"machine": machine, "runs": results}, indent=2, default=str) + "\n")
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w") as f:
        f.write(f"# {machine_line(machine)}\n")
        f.write("engine,backend,precision,size,camera_fps,seconds,frames_acquired,frames_received,"
                "outputs,outputs_skipped,fps_output,lat_p50_ms,lat_p90_ms,lat_p99_ms,"
                "lat_max_ms,errors\n")
        for r in results:
            lat = r.get("latency_acq_to_received_ms", {})
            vals = [r.get("engine"), r.get("backend"), r.get("precision"), r.get("size"),
                    r.get("camera_fps"), r.get("seconds"), r.get("frames_acquired"),
                    r.get("frames_received"), r.get("outputs"), r.get("outputs_skipped"),
                    r.get("fps_output"), lat.get("p50"), lat.get("p90"), lat.get("p99"),
                    lat.get("max"), len(r.get("errors", [])) if "errors" in r else r.get("status")]
            f.write(",".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                             for v in vals) + "\n")
    print(f"\nwrote {path}, {csv_path}")
    return 0 if all("status" not in r for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.pipeline_bench ARGS` = `livesr bench --pipeline ARGS`."""
    from realtime.cli import main as livesr

    return livesr(["bench", "--pipeline", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
