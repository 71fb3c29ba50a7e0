"""What the live trust check costs next to the network it checks (engines.trust in the worker).

    python -m benchmarks.bench_trust [--sizes 64,128,256] [--reps 40] [--json PATH]
                                     [--weights convlstm=PATH ...]

Per frame size, interleaved in rounds (one torch thread, medians over ``--reps``):

* ``network_ms``: one ``push`` of each network (ConvLSTM: one frame and its output; ConvGRU:
  one frame, i.e. its 20-frame window);
* ``companion_ms``: ``TrustMonitor.add``: the companion SOFI's running sums (no image) plus,
  every 10th frame, the SNR proxy: what every frame costs;
* ``measure_ms``: one agreement (the companion's image, two blurs, a Pearson), at most every
  0.5 s (``TrustConfig.every_s``);
* ``overhead``: (companion_ms + measure_ms / outputs per 0.5 s) / network_ms, the share the check
  adds to the network path at the network's own output rate.

``--pipeline S`` also runs the live pipeline (simulated camera, engine in its own process) for
S seconds per run with the check on and off, alternately (``--runs`` each), and prints the
outputs per second and the latency p50 of each: the check's cost where it matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.registry import parse_weights_arg


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def bench(size: int, reps: int, weights: dict[str, str], engines: Sequence[str], window: int) -> dict[str, Any]:
    from acquisition.simulation import BlinkingScene, SimulationConfig
    from engines import load_engine
    from engines.trust import TrustMonitor

    frames = BlinkingScene(SimulationConfig(size=size, seed=1)).frames(window + 40).astype(np.float32)
    nets = {}
    for name in engines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nets[name] = load_engine(name, weights=weights.get(name))
        for f in frames[:20]:
            nets[name].push(f)
    mon = TrustMonitor({"window": window, "every_s": 0.0})
    for k, f in enumerate(frames[:window]):
        mon.add(f, k)
    out = np.asarray(nets[next(iter(nets))].push(frames[0]))
    i = {"k": 0}

    def nxt() -> np.ndarray:
        i["k"] = (i["k"] + 1) % len(frames)
        return frames[i["k"]]

    rows: dict[str, list[float]] = {**{n: [] for n in nets}, "companion": [], "measure": []}
    rounds = max(1, reps // 5)
    for _ in range(rounds):  # interleaved: the machine's load hits every column alike
        for n, eng in nets.items():
            rows[n].append(_median_ms(lambda e=eng: e.push(nxt()), 5))
        rows["companion"].append(_median_ms(lambda: mon.add(nxt()), 5))
        rows["measure"].append(_median_ms(lambda: mon.assess(out, force=True), 5))
    res: dict[str, Any] = {"size": size, "trust_window": window}
    comp, meas = float(np.median(rows["companion"])), float(np.median(rows["measure"]))
    res["companion_ms"], res["measure_ms"] = comp, meas
    for n in nets:
        net = float(np.median(rows[n]))
        per_half_second = max(1.0, 500.0 / net)  # outputs in one every_s at the network's rate
        res[f"{n}_ms"] = net
        res[f"{n}_overhead"] = (comp + meas / per_half_second) / net
    return res


def pipeline_runs(engine: str, weights: str | None, size: int, fps: float, seconds: float,
                  runs: int) -> dict[str, Any]:
    """outputs/s and latency p50 with the trust check on and off, alternating runs."""
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    res: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(runs):
        for mode in ("on", "off"):
            cfg = PipelineConfig(source="sim", size=size, fps=fps, engine=engine, weights=weights,
                                 seconds=seconds, threads=1, trust=mode == "on",
                                 addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")).validate()
            m = Pipeline(cfg).run_for(seconds)
            res[mode].append({"outputs_per_s": m.outputs / max(m.duration_s, 1e-9),
                              "latency_p50_ms": m.latency_ms["p50"], "errors": len(m.errors)})
    return {mode: {"outputs_per_s": float(np.median([r["outputs_per_s"] for r in v])),
                   "latency_p50_ms": float(np.median([r["latency_p50_ms"] for r in v])),
                   "runs": v} for mode, v in res.items()}




def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_trust", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--engines", default="convlstm,convgru")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--trust-window", type=int, default=100)
    p.add_argument("--weights", action="append", type=parse_weights_arg, default=[], metavar="ENGINE=PATH")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--pipeline", type=float, default=0.0, metavar="S",
                   help="also time the live pipeline for S seconds per run, trust on vs off")
    p.add_argument("--runs", type=int, default=3, help="pipeline runs per mode (default %(default)s)")
    p.add_argument("--fps", type=float, default=50.0, help="pipeline camera rate (default %(default)s)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = []
    print("size  " + "  ".join(f"{e} ms" for e in args.engines.split(",")) + "  companion ms/frame  "
          "measure ms  " + "  ".join(f"{e} overhead" for e in args.engines.split(",")))
    for size in (int(s) for s in args.sizes.split(",")):
        r = bench(size, args.reps, dict(args.weights), args.engines.split(","), args.trust_window)
        out.append(r)
        names = args.engines.split(",")
        print(f"{size:4d}  " + "  ".join(f"{r[f'{e}_ms']:9.2f}" for e in names)
              + f"  {r['companion_ms']:17.3f}  {r['measure_ms']:10.2f}  "
              + "  ".join(f"{100 * r[f'{e}_overhead']:10.1f} %" for e in names), flush=True)
    result: dict[str, Any] = {"micro": out}
    if args.pipeline > 0:
        w = dict(args.weights)
        for name in args.engines.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                r = pipeline_runs(name, w.get(name), size, args.fps, args.pipeline, args.runs)
                result.setdefault("pipeline", []).append({"engine": name, "size": size, "fps": args.fps, **r})
                on, off = r["on"], r["off"]
                print(f"pipeline {name} {size} px at {args.fps:g} fps: outputs/s {on['outputs_per_s']:.1f} with "
                      f"the check, {off['outputs_per_s']:.1f} without; latency p50 {on['latency_p50_ms']:.0f} / "
                      f"{off['latency_p50_ms']:.0f} ms (medians of {args.runs} alternating runs)", flush=True)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            print(f"bench_trust: error: {args.json} NOT written: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
