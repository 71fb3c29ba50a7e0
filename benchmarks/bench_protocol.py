"""Per-message cost of the wire protocol: encode + decode, old module against the current one.

    python -m benchmarks.bench_protocol --before /tmp/protocol_before.py [--repeats 15] [--n 2000]

Times, interleaved in one run (old, new, old, new, ...) so that a busy machine slows both
alike, ``decode(encode(...))`` of a 512 x 512 uint16 frame message, a 1024 x 1024 float32
result message (with a typical ``info``) and a stats message. Prints the median over the
repeats of the mean per message (µs) and the new/old ratio. Issue 12 asks that the
per-frame cost does not grow. Without ``--before`` only the current module is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from realtime import protocol as current

RUN_ID = "0123456789abcdef"


def load_module(path: Path) -> ModuleType:
    """Import a protocol.py from a file under a private name (it must not replace ours)."""
    spec = importlib.util.spec_from_file_location("livesr_protocol_before", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _field_names(cls: type) -> set[str]:
    names = getattr(cls, "__struct_fields__", None)  # msgspec
    if names is None:
        names = tuple(getattr(cls, "__dataclass_fields__", {}))
    return set(names)


def _ids(cls: type, stream: str) -> dict[str, str]:
    """The run id and the MDA stream under whatever names this protocol version uses."""
    names = _field_names(cls)
    if "run_id" in names:  # protocol 3: run_id = the run, stream = the MDA stream
        return {"run_id": RUN_ID, "stream": stream}
    return {"stream": RUN_ID, "stream_key": stream}  # protocol 2


def _skipped(cls: type, n: int) -> dict[str, int]:
    return {"outputs_skipped": n} if "outputs_skipped" in _field_names(cls) else {"frames_dropped": n}


def cases(p: ModuleType) -> dict[str, Callable[[], object]]:
    """name -> one encode + decode round trip with protocol module ``p``."""
    frame = np.random.default_rng(0).integers(0, 4000, (512, 512), dtype=np.uint16)
    fh = p.FrameHeader(seq=12345, t_acq_ns=time.time_ns(), shape=frame.shape, dtype="uint16",
                       camera="Camera", exposure_ms=10.0, pixel_size_um=0.16, elapsed_ms=1234.5,
                       **_ids(p.FrameHeader, "p0/c1/z0"))
    out = np.random.default_rng(1).random((1024, 1024), dtype=np.float32)
    info = {"psf_fwhm_px": 2.19, "psf_source": "default NA 1.4 / 600 nm", "lag": 1,
            "bleach_correction": "none", "blinking_check.ok": True, "blinking_check.message": "ok",
            "blinking_check.fraction": 0.42, "pixel_size_um": 0.16, "pixel_size_source": "camera"}
    rh = p.ResultHeader(seq_first=12326, seq_last=12345, t_acq_ns=1, shape=out.shape, engine="sofi",
                        timings_ns={"received": 1, "start": 2, "done": 3, "published": 4},
                        info=info, **_skipped(p.ResultHeader, 7), **_ids(p.ResultHeader, "p0/c1/z0"))
    sh = _stats(p)

    def frame_rt() -> object:
        parts = p.encode_frame(fh, frame)
        return p.decode([bytes(parts[0]), parts[1]])

    def result_rt() -> object:
        parts = p.encode_result(rh, out)
        return p.decode([bytes(parts[0]), parts[1]])

    def stats_rt() -> object:
        return p.decode(p.encode_stats(sh))

    return {"frame 512x512 uint16": frame_rt, "result 1024x1024 float32": result_rt, "stats": stats_rt}


def _stats(p: ModuleType) -> object:
    counts = {"frames_received": 100_000, "outputs": 99_000, "engine_errors": 1,
              "malformed": {"json": 2, "foreign": 1}, "last_error": "ValueError: x"}
    cls = p.StatsMessage
    names = _field_names(cls)
    ids = {"run_id": RUN_ID} if "run_id" in names else {"stream": RUN_ID}
    if "counts" in names:  # protocol 3: the shared EngineCounts
        return cls(engine="sofi", state="running", counts=p.EngineCounts(outputs_skipped=981, **counts),
                   window=20, **ids)
    return cls(engine="sofi", state="running", frames_dropped=981, window=20, **counts, **ids)


def time_per_call(fn: Callable[[], object], n: int) -> float:
    """Mean µs per call over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_protocol", description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="the old realtime/protocol.py to compare with")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved repeats (median is printed)")
    ap.add_argument("--n", type=int, default=2000, help="round trips per repeat and message")
    args = ap.parse_args(argv)
    if args.before is not None and not args.before.is_file():
        print(f"bench_protocol: error: --before {args.before}: no such file", file=sys.stderr)
        return 2
    mods = {"new": current}
    if args.before is not None:
        mods = {"old": load_module(args.before), "new": current}
    runs = {label: cases(m) for label, m in mods.items()}
    samples: dict[tuple[str, str], list[float]] = {}
    for fn_map in runs.values():  # warm-up
        for fn in fn_map.values():
            time_per_call(fn, 50)
    for _ in range(args.repeats):
        for case in runs["new"]:
            for label, fn_map in runs.items():
                samples.setdefault((label, case), []).append(time_per_call(fn_map[case], args.n))
    print(f"encode + decode, median of {args.repeats} interleaved repeats x {args.n} round trips (µs per message)")
    header = f"{'message':28s}" + "".join(f"{label:>10s}" for label in mods)
    print(header + ("   new/old" if "old" in mods else ""))
    for case in runs["new"]:
        med = {label: statistics.median(samples[(label, case)]) for label in mods}
        line = f"{case:28s}" + "".join(f"{med[label]:10.1f}" for label in mods)
        if "old" in med:
            line += f"   {med['new'] / med['old']:7.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
