"""How fast is SOFI? Streaming push per frame and batch reconstruct of one window.

    python -m benchmarks.bench_sofi --size 256 --window 20 --frames 400 --threads 1
    python -m benchmarks.bench_sofi --lag 1 --bleach-order 0          # other settings
    git show REV:engines/sofi.py > /tmp/sofi_rev.py
    python -m benchmarks.bench_sofi --baseline /tmp/sofi_rev.py       # side by side with another version

Reports wall time and CPU time of ``push`` per frame (p50 / p99 / max after the window is full)
and of ``reconstruct`` of a (window, size, size) stack. Wall time includes waiting for the CPU
on a shared machine; thread CPU time is what the engine itself costs. Also checks that the last
streamed output equals the batch output. Target (issue 2): push at 256x256 well under 5 ms, so a
live pipeline at 100 fps on 2 shared cores keeps p99 < 50 ms. ``--baseline`` pushes every frame
to both engines in turn, so that both see the same machine load (ratio of medians printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from engines.base import Engine


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--frames", type=int, default=400, help="frames pushed (first `window` are warm-up)")
    p.add_argument("--batch-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 suits a shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the numbers here too")
    p.add_argument("--lag", default="auto", help="sofi lag: auto (default) or an integer")
    p.add_argument("--bleach-order", type=int, default=2, help="sofi bleaching correction order (default 2)")
    p.add_argument("--baseline", default=None, metavar="FILE.py",
                   help="another engines/sofi.py (e.g. from git show): timed interleaved with this one")
    args = p.parse_args(argv)

    import torch

    from acquisition.simulation import BlinkingScene, SimulationConfig
    from engines.sofi import SofiEngine

    torch.set_num_threads(args.threads)
    frames = BlinkingScene(SimulationConfig(size=args.size, seed=0)).frames(args.frames)
    lag = args.lag if args.lag == "auto" else int(args.lag)
    eng = SofiEngine(args.window, device=args.device, lag=lag, bleach_order=args.bleach_order)
    base = _load_baseline(args.baseline, args.window, args.device) if args.baseline else None
    base_cpu: list[float] = []

    def sync() -> None:
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)

    wall, cpu = [], []
    out = None
    for f in tqdm(frames, desc="push", leave=False):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = eng.push(f)
        sync()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
        if base is not None:
            c0 = time.thread_time()
            base.push(f)
            sync()
            base_cpu.append(time.thread_time() - c0)
    steady = slice(args.window, None)
    push_wall = np.array(wall[steady]) * 1e3
    push_cpu = np.array(cpu[steady]) * 1e3

    stack = frames[-args.window:]
    batch = eng.reconstruct(stack)
    b_wall, b_cpu = [], []
    for _ in tqdm(range(args.batch_repeats), desc="batch", leave=False):
        t0, c0 = time.perf_counter(), time.thread_time()
        eng.reconstruct(stack)
        sync()
        b_cpu.append(time.thread_time() - c0)
        b_wall.append(time.perf_counter() - t0)
    max_diff = float(np.abs(out - batch).max() / max(np.abs(batch).max(), 1e-30))

    res = {
        "engine": "sofi",
        "size": args.size,
        "window": args.window,
        "lag": eng.lag,
        "bleach_order": args.bleach_order,
        "threads": args.threads,
        "device": str(eng.device),
        "push_wall_ms": _percentiles(push_wall),
        "push_cpu_ms": _percentiles(push_cpu),
        "batch_wall_ms": _percentiles(np.array(b_wall) * 1e3),
        "batch_cpu_ms": _percentiles(np.array(b_cpu) * 1e3),
        "stream_vs_batch_rel_max_diff": max_diff,
    }
    print(f"SOFI {args.size}x{args.size}, window {args.window}, lag {eng.lag}, bleach order {args.bleach_order}, "
          f"{args.threads} thread(s), {eng.device}")
    for key in ("push_wall_ms", "push_cpu_ms", "batch_wall_ms", "batch_cpu_ms"):
        v = res[key]
        print(f"  {key:14s} p50 {v['p50']:7.2f}  p99 {v['p99']:7.2f}  max {v['max']:7.2f}")
    print(f"  stream vs batch: max |diff| / max |batch| = {max_diff:.2e}")
    if base is not None:
        b = _percentiles(np.array(base_cpu[steady]) * 1e3)
        res["baseline"] = {"file": args.baseline, "push_cpu_ms": b,
                           "ratio_of_medians": res["push_cpu_ms"]["p50"] / b["p50"]}
        print(f"  baseline {args.baseline}: push_cpu_ms p50 {b['p50']:7.2f}  p99 {b['p99']:7.2f}; "
              f"this / baseline (medians) = {res['baseline']['ratio_of_medians']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


def _load_baseline(path: str, window: int, device: str) -> Engine:
    """SofiEngine from another version of engines/sofi.py (imported as engines._sofi_baseline)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engines._sofi_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_sofi: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SofiEngine(window, device=device)


if __name__ == "__main__":
    sys.exit(main())
