"""Calibrate the live trust signal (engines.trust) on held-out simulations of the training domain.

    python -m benchmarks.trust_calibration [--weights convgru=PATH --weights convlstm=PATH]
                                           [--n 60] [--n-snr 400] [--out .]

Prints, and writes to ``trust_calibration.json`` in ``--out`` (default the current folder):

* the input SNR proxy (``engines.trust.frame_snr``) over frames of the training domain
  (``engines.data.DataConfig`` at 64 px, every class, camera and static / flicker option):
  its 0.5th / 99.5th percentiles are the in-domain range (``engines.trust.SNR_RANGE``);
* the agreement of each network's output with SOFI of the last ``--trust-window`` frames, as
  the live worker measures it (``engines.trust.agreement``), on held-out *static, blinking*
  scenes of the training domain (moving samples blur a long SOFI window; samples that never
  blink or are empty are the blinking check's job): its 5th percentile is the threshold
  over the scenes the input checks let through is the threshold below which an output is
  flagged (``engines.trust.MIN_AGREEMENT``), i.e. about 5 % false alarms on in-domain data
  that passed the input checks. Live SOFI and the mean over the reference engine's default
  window (``engines.registry``: 20 frames, keys ``sofi20`` / ``mean20``) get the same measurement
  for scale (that SOFI shares its frames with the reference: an upper bound, not a fair rival);
* how often the input checks (blinking, PSF, SNR) fire on those in-domain scenes.

The ConvLSTM is streamed over every frame (as live); the ConvGRU sees the last frames of its
own window.
Seeds start at 3 * 10**9: disjoint from training and from `livesr evaluate`.
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

from engines.registry import REFERENCE_ENGINE, default_window, parse_weights_arg

SEED_BASE = 3 * 10**9
#: the live window the networks' rivals (SOFI, widefield mean) use: the reference engine's default
LIVE_WINDOW = default_window(REFERENCE_ENGINE)
LIVE_SOFI, LIVE_MEAN = f"sofi{LIVE_WINDOW}", f"mean{LIVE_WINDOW}"
SNR_FRAMES = 5  # frames per scene for the SNR distribution


def _percentiles(vals: Sequence[float | None]) -> dict[str, float | int]:
    a = np.asarray([v for v in vals if v is not None and np.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    q = np.percentile(a, [0.5, 1, 5, 10, 25, 50, 75, 90, 99, 99.5])
    keys = ("p0.5", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p99", "p99.5")
    return {"n": int(a.size), "mean": float(a.mean()), **{k: float(v) for k, v in zip(keys, q, strict=True)}}


def snr_distribution(n: int, size: int) -> dict[str, Any]:
    """frame_snr over SNR_FRAMES frames of n training-domain scenes."""
    from acquisition.simulation import BlinkingScene
    from engines.data import DataConfig, random_sim_config
    from engines.trust import frame_snr

    d = DataConfig(size=size)
    vals: list[float] = []
    for k in range(n):
        s = SEED_BASE + k
        cfg = random_sim_config(np.random.default_rng([s, 0x5EED]), d, s, horizon=SNR_FRAMES)
        for f in BlinkingScene(cfg).frames(SNR_FRAMES):
            vals.append(frame_snr(f))
    return _percentiles(vals)


def agreement_distribution(n: int, size: int, window: int, weights: dict[str, str],
                           engines: Sequence[str]) -> dict[str, Any]:
    """Agreement with SOFI of the last `window` frames, per engine, on n static blinking scenes."""
    from acquisition.simulation import BlinkingScene
    from engines import load_engine
    from engines.blinking import assess_blinking
    from engines.data import DataConfig, random_sim_config
    from engines.sofi import SofiEngine
    from engines.trust import PSF_RANGE_PX, SNR_RANGE, agreement, frame_snr

    classes = {k: v for k, v in DataConfig().classes.items() if k != "empty"}
    d = DataConfig(size=size, p_moving=0.0, p_fully_static=0.0, classes=classes)
    nets: dict[str, Any] = {}
    status: dict[str, str] = {}
    for name in engines:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nets[name] = load_engine(name, weights=weights.get(name))
            status[name] = "ok" + (" (legacy weights)" if getattr(nets[name], "legacy", False) else "")
        except Exception as exc:
            status[name] = f"unavailable: {type(exc).__name__}: {exc}"
    per: dict[str, list[float | None]] = {k: [] for k in (*nets, LIVE_SOFI, LIVE_MEAN)}
    flags = {"blinking": 0, "psf": 0, "snr": 0}
    scenes: list[dict[str, Any]] = []
    total = window + default_window()  # every engine's window (and ConvLSTM warm-up) fits
    t0 = time.perf_counter()
    for k in range(n):
        s = SEED_BASE + 10**6 + k
        cfg = random_sim_config(np.random.default_rng([s, 0x5EED]), d, s, horizon=total)
        movie = BlinkingScene(cfg).frames(total).astype(np.float32)
        ref = SofiEngine(window=window).reconstruct(movie[-window:])
        last = movie[-LIVE_WINDOW:]
        for name, eng in nets.items():
            if getattr(eng, "stateful", False):
                eng.reset()
                out = None
                for f in movie:
                    r = eng.push(f)
                    out = r if r is not None else out
            else:
                out = eng.reconstruct(movie[-eng.window:])
            assert out is not None  # (the movie is longer than every engine's window)
            per[name].append(agreement(out, ref))
        per[LIVE_SOFI].append(agreement(SofiEngine(window=LIVE_WINDOW).reconstruct(last), ref))
        mean = np.kron(last.mean(0), np.ones((2, 2), np.float32))
        per[LIVE_MEAN].append(agreement(mean, ref))
        fired = {"blinking": not assess_blinking(movie[-24:], max_pixels=4096).ok,
                 "psf": not PSF_RANGE_PX[0] <= cfg.fwhm_nm / cfg.pixel_nm <= PSF_RANGE_PX[1]}
        snr = float(np.median([frame_snr(f) for f in movie[::10]]))
        fired["snr"] = not SNR_RANGE[0] <= snr <= SNR_RANGE[1]
        for key, v in fired.items():
            flags[key] += v
        scenes.append({"seed": s, "structure": cfg.structure, "photons": round(cfg.photons, 1),
                       "on_ratio": round(cfg.on_ratio, 4), "background": round(cfg.background, 1),
                       "snr": round(snr, 2), "input_checks_pass": not any(fired.values()),
                       **{f"fired_{k}": v for k, v in fired.items()},
                       **{k: None if vals[-1] is None else round(vals[-1], 4) for k, vals in per.items()}})
        if (k + 1) % 10 == 0:
            print(f"  {k + 1}/{n} scenes ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    passing = [i for i, sc in enumerate(scenes) if sc["input_checks_pass"]]
    return {
        "engines": status,
        "agreement": {k: _percentiles(v) for k, v in per.items()},
        # what the threshold acts on: outputs the input checks let through
        "agreement_input_checks_pass": {k: _percentiles([v[i] for i in passing]) for k, v in per.items()},
        "per_scene": scenes,
        "values": {k: [None if v is None else round(v, 4) for v in vals] for k, vals in per.items()},
        "input_checks_fired": {k: v / max(1, n) for k, v in flags.items()},
        "scenes": n,
    }




def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trust_calibration", description=__doc__.splitlines()[0])
    p.add_argument("--weights", action="append", type=parse_weights_arg, default=[], metavar="ENGINE=PATH")
    p.add_argument("--engines", default="convgru,convlstm")
    p.add_argument("--n", type=int, default=60, help="static blinking scenes for the agreement (default %(default)s)")
    p.add_argument("--n-snr", type=int, default=400, help="scenes for the SNR range (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="scene size in camera pixels (default %(default)s)")
    p.add_argument("--trust-window", type=int, default=100, help="companion SOFI frames (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("."), help="output folder (default: the current folder)")
    args = p.parse_args(argv)
    if args.n < 1 or args.n_snr < 0 or args.size < 16 or args.trust_window < 10:
        print("trust_calibration: error: need --n >= 1, --n-snr >= 0, --size >= 16, --trust-window >= 10",
              file=sys.stderr)
        return 2
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        snr = snr_distribution(args.n_snr, args.size) if args.n_snr else {"n": 0}
        agr = agreement_distribution(args.n, args.size, args.trust_window, dict(args.weights),
                                     [e.strip() for e in args.engines.split(",") if e.strip()])
    from engines.trust import MIN_AGREEMENT, SNR_RANGE

    res = {"snr": snr, **agr, "trust_window": args.trust_window, "size": args.size,
           "weights": dict(args.weights), "current": {"MIN_AGREEMENT": MIN_AGREEMENT, "SNR_RANGE": list(SNR_RANGE)}}
    cond = agr["agreement_input_checks_pass"]
    nets = [k for k in cond if k not in (LIVE_SOFI, LIVE_MEAN) and cond[k].get("n")]
    p5 = [cond[k]["p5"] for k in nets]
    res["suggested"] = {"MIN_AGREEMENT": round(min(p5), 2) if p5 else None,
                        "SNR_RANGE": [round(snr["p0.5"], 1), round(snr["p99.5"], 1)] if snr.get("n") else None}
    print(f"input SNR proxy over {snr.get('n', 0)} training-domain frames: "
          + (f"p0.5 {snr['p0.5']:.2f}, p50 {snr['p50']:.2f}, p99.5 {snr['p99.5']:.1f}" if snr.get("n") else "-"))
    print(f"agreement with SOFI of the last {args.trust_window} frames, {agr['scenes']} static blinking scenes "
          f"({args.size} px):")
    for title, table in (("all scenes", agr["agreement"]), ("scenes the input checks pass", cond)):
        print(f" {title}:")
        for k, v in table.items():
            if v.get("n"):
                print(f"  {k:9s} p5 {v['p5']:.3f}  p10 {v['p10']:.3f}  p50 {v['p50']:.3f}  p90 {v['p90']:.3f}"
                      f"  (n {v['n']})")
            else:
                print(f"  {k:9s} {agr['engines'].get(k, 'no values')}")
    print("input checks firing on these in-domain scenes: "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in agr["input_checks_fired"].items()))
    print(f"suggested: MIN_AGREEMENT {res['suggested']['MIN_AGREEMENT']}, SNR_RANGE {res['suggested']['SNR_RANGE']} "
          f"(current {MIN_AGREEMENT}, {list(SNR_RANGE)})")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "trust_calibration.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
    except OSError as exc:
        print(f"trust_calibration: error: results NOT written: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0 if nets else 1


if __name__ == "__main__":
    raise SystemExit(main())
