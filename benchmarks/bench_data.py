"""Training-data generation speed: samples/s of engines.data.make_sample, overall and per class.

Why: the trainer's data process must keep up with its torch thread (a ConvGRU step at batch 4
takes ~1 s on one core), and dense classes (diffuse, textures, filled membranes) are the
expensive ones. One process, seeded samples, so two runs on the same machine compare.

    python -m benchmarks.bench_data --patch 32 --frames 20 --n 120
    python -m benchmarks.bench_data --patch 32 --frames 32 --per-frame --n 120   # ConvLSTM
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

from engines.data import DataConfig, make_sample, scene_for_seed


def run(patch: int, frames: int, per_frame: bool, n: int, seed0: int = 0) -> dict:
    cfg = DataConfig(size=patch, frames=frames, per_frame_targets=per_frame,
                     target_from=min(8, frames - 1) if per_frame else 0)
    by_class: dict[str, list[float]] = defaultdict(list)
    zero = 0
    for k in range(seed0, seed0 + n):
        structure = scene_for_seed(k, cfg).cfg.structure  # cheap: the parameters only...
        t = time.perf_counter()
        with threadpool_limits(1, user_api="blas"):  # as engines.data.make_batch runs it
            _, y = make_sample(k, cfg)  # ... the sample is what is timed
        by_class["mixture" if "+" in structure else structure].append(time.perf_counter() - t)
        zero += not y.any()
    sample_s = sum(sum(v) for v in by_class.values())
    return {
        "patch": patch, "frames": frames, "per_frame_targets": per_frame, "n": n,
        "samples_per_s": n / sample_s,
        "zero_target_share": zero / n,
        "ms_per_class": {k: round(1e3 * float(np.mean(v)), 1) for k, v in sorted(by_class.items())},
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--per-frame", action="store_true", help="ConvLSTM samples (a target per frame)")
    p.add_argument("--n", type=int, default=120)
    a = p.parse_args(argv)
    if a.n < 1 or a.patch < 4 or a.frames < 2:
        p.error("need --n >= 1, --patch >= 4, --frames >= 2")
    print(json.dumps(run(a.patch, a.frames, a.per_frame, a.n), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
