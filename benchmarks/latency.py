"""`livesr bench`: latency of every engine x backend x precision x frame size, on this machine.

Why a script and not a test: speed depends on the machine and on what else runs on it, so the
targets (convgru window >= 10x the per-frame cost of the streaming engines; best backend >= 2x
eager at 128 px) are shown by numbers this prints and writes, with the machine named in every
output, never by a timed assertion.

Two costs per engine are measured:
- ``window``: ``reconstruct(stack)`` on ``engine.window`` frames (the thesis' T_latency, eq. 2);
- ``push``: the per-new-frame cost in streaming (ConvGRU with its cached encoder, ConvLSTM's
  one step, SOFI's running sums), after the window is full.

Real-time temporal resolution (thesis methods 3.5, eq. 2): R = 1 / (W/N + T) with W the frames
one output depends on (``engine.window``), N the camera rate and T the measured latency.
For push rows ``update_hz`` = min(N, 1/T) is how often the display can refresh.

``--pipeline`` measures the whole chain instead (camera -> ZeroMQ -> engine -> result received):
see :mod:`benchmarks.pipeline_bench`.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import machine_info, machine_line
from engines.registry import DEFAULT_NETWORK, ENGINES, REFERENCE_ENGINE, neural_engines

#: where the project keeps its committed results (benchmarks/results/); runs never write here
#: unless asked with --out-dir: by default they write into the current folder
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = (128, 256, 512)
DEFAULT_ENGINES = tuple(ENGINES)
TARGET_STREAM_RATIO = 10.0   # convgru 20-frame window vs a streaming engine's per-frame cost
TARGET_BACKEND_RATIO = 2.0   # best backend vs eager fp32, convgru window at 128 px


@dataclass
class BenchConfig:
    """What to measure; the CLI maps flags onto these fields and nothing else."""

    engines: tuple[str, ...] = DEFAULT_ENGINES
    backends: tuple[str, ...] = ("eager",)
    precisions: tuple[str, ...] = ("fp32",)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    modes: tuple[str, ...] = ("window", "push")
    threads: tuple[int, ...] = ()          # () = leave torch's default
    reps: int = 500
    warmup: int = 10
    max_seconds: float | None = None       # cap per measurement: fewer reps, N used is reported
    device: str = "cpu"
    camera_fps: tuple[float, ...] = (100.0, 1000.0)
    weights: dict[str, str] = field(default_factory=dict)
    check: bool = True                     # compare every non-eager-fp32 output with eager fp32
    interleave: bool = False               # time backends round-robin (fair on a busy CPU)
    out_dir: Path = Path(".")              # the current folder, never the installed package
    stem: str | None = None                # file stem; default latency_<device>
    plot: bool = True
    progress: bool = True

    def validate(self) -> BenchConfig:
        """Raise ValueError for what cannot be measured; return self."""
        bad = [m for m in self.modes if m not in ("window", "push")]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}: use window,push")
        if self.reps < 1 or any(s < 4 for s in self.sizes):
            raise ValueError("--reps must be >= 1 and every size >= 4")
        return self


# --------------------------------------------------------------------------- engines


def _untrained(name: str, device: str, precision: str) -> Any:
    """The engine with freshly initialised weights (latency does not depend on weight values)."""
    import torch

    from engines import engine_module

    mod = engine_module(name)
    torch.manual_seed(0)
    model, norm = mod.build_model()
    return mod.engine_from_model(model, norm, device=device, precision=precision)


def make_engine(name: str, backend: str, precision: str, device: str,
                weights: str | None = None, **backend_options: Any) -> tuple[Any, str]:
    """(engine, weights description). Falls back to untrained weights if none can be loaded."""
    from engines import EngineSpec, load_engine
    from engines.backends import apply_backend

    try:
        engine = load_engine(EngineSpec(name, device=device, precision=precision, weights=weights))
        desc = f"trained ({weights or 'default weights'})" if ENGINES[name].needs_weights else "n/a"
    except Exception as e:  # noqa: BLE001 - WeightsError & co: measure latency untrained
        if type(e).__name__ != "WeightsError" or not ENGINES[name].needs_weights:
            raise
        engine = _untrained(name, device, precision)
        desc = f"UNTRAINED (random init; {str(e).splitlines()[0][:120]})"
    apply_backend(engine, backend, precision, **backend_options)
    return engine, desc


# --------------------------------------------------------------------------- timing


def _percentile(ms: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms, dtype=float), q))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def summarise(times_ms: Sequence[float], window: int, camera_fps: Sequence[float],
              mode: str) -> dict[str, float]:
    med = statistics.median(times_ms)
    row: dict[str, float] = {
        "n": len(times_ms), "median_ms": med, "p90_ms": _percentile(times_ms, 90),
        "p99_ms": _percentile(times_ms, 99), "mean_ms": statistics.fmean(times_ms),
        "min_ms": min(times_ms), "outputs_per_s": 1e3 / med if med > 0 else float("inf"),
    }
    t_s = med / 1e3
    for n in camera_fps:
        row[f"R_{int(n)}fps"] = 1.0 / (window / n + t_s)       # thesis eq. 2
        if mode == "push":
            row[f"update_hz_{int(n)}fps"] = min(n, 1.0 / t_s) if t_s > 0 else n
    return row


def _frames(size: int, n: int) -> np.ndarray:
    from engines.backends import simulated_stack

    return simulated_stack(size, n, seed=0)


def _build(cfg: BenchConfig, name: str, backend: str, precision: str, base: dict
           ) -> tuple[Any, str] | dict:
    try:
        return make_engine(name, backend, precision, cfg.device, cfg.weights.get(name))
    except Exception as e:  # noqa: BLE001 - an unavailable combination is a row, not a crash
        msg = str(e).splitlines()[0][:200]
        return {"status": msg if msg.startswith("unavailable") else f"unavailable: {msg}"}


def _caller(engine: Any, mode: str, pool: np.ndarray) -> Any:
    """fn(i) doing one timed unit of work: reconstruct(window) or push(next frame)."""
    window = int(engine.window)
    if mode == "window":
        stack = pool[:window]
        return lambda i: engine.reconstruct(stack)
    engine.reset()
    for f in pool[:window - 1]:
        engine.push(f)
    n_pool = len(pool)
    return lambda i: engine.push(pool[(window - 1 + i) % n_pool])


def measure_group(cfg: BenchConfig, name: str, size: int, threads: int | None,
                  configs: list[tuple[str, str]], reference: dict[tuple, np.ndarray]
                  ) -> list[dict[str, Any]]:
    """All (backend, precision) configs of one engine x size x threads, every mode.

    With ``cfg.interleave`` the configs are timed round-robin, one call each in turn, so a
    neighbour's job slowing the shared CPU hits every backend alike (fair ratios); otherwise
    each config is timed in one block.
    """
    import torch

    from engines.backends import TOLERANCE, backend_calls, backend_reports, compare

    if threads:
        torch.set_num_threads(threads)
    th = torch.get_num_threads()
    built: list[tuple[str, str, Any, str, list]] = []
    rows: list[dict[str, Any]] = []
    for backend, precision in configs:
        base = {"engine": name, "backend": backend, "precision": precision, "size": size,
                "threads": th, "device": cfg.device}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            got = _build(cfg, name, backend, precision, base)
        if isinstance(got, dict):
            rows.extend({**base, "mode": m, **got} for m in cfg.modes)
            continue
        built.append((backend, precision, got[0], got[1], list(caught)))
    if not built:
        return rows
    window = int(built[0][2].window)
    pool = _frames(size, window + 16)
    for mode in cfg.modes:
        states = []
        for backend, precision, engine, wdesc, caught in built:
            row = {"engine": name, "backend": backend, "precision": precision, "size": size,
                   "threads": th, "device": cfg.device, "mode": mode, "window": window,
                   "weights": wdesc}
            st = {"row": row, "engine": engine, "times": [], "caught": caught, "out": None}
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always", RuntimeWarning)
                    if mode == "window":
                        st["out"] = engine.reconstruct(pool[:window])
                    fn = _caller(engine, mode, pool)
                    t0 = time.perf_counter()
                    fn(0)  # first call: builds/compiles the fast path for this signature
                    _sync(cfg.device)
                    row["first_call_s"] = time.perf_counter() - t0
                    for i in range(cfg.warmup):
                        fn(i + 1)
                    _sync(cfg.device)
                st["caught"] = caught + list(w)
                st["fn"] = fn
            except Exception as e:  # noqa: BLE001
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                continue
            states.append(st)
        # timing: round-robin (interleave) or block by block
        order = ([[s] for s in states] if not cfg.interleave else [states])
        for block in order:
            t_end = (None if cfg.max_seconds is None
                     else time.perf_counter() + cfg.max_seconds * len(block))
            for i in range(cfg.reps):
                for st in block:
                    if "error" in st:
                        continue
                    try:
                        c = time.process_time()
                        t = time.perf_counter()
                        st["fn"](i)
                        _sync(cfg.device)
                        st["times"].append((time.perf_counter() - t) * 1e3)
                        st.setdefault("cpu", []).append((time.process_time() - c) * 1e3)
                    except Exception as e:  # noqa: BLE001
                        st["error"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if t_end is not None and time.perf_counter() > t_end and i + 1 >= 5:
                    break
        for st in states:
            row, engine = st["row"], st["engine"]
            if "error" in st or not st["times"]:
                row["status"] = st.get("error", "error: no timing")
                rows.append(row)
                continue
            row.update(summarise(st["times"], window, cfg.camera_fps, mode))
            # CPU time of the process per call (all torch threads): on a shared machine the
            # wall time also counts waiting for a core, the CPU time is the engine's own cost
            if cfg.device == "cpu" and st.get("cpu"):
                row["cpu_median_ms"] = statistics.median(st["cpu"])
            row["status"] = "ok"
            refused = [str(w.message) for w in st["caught"] if "REFUSED" in str(w.message)]
            if refused:
                row["status"] = "fallback: " + refused[0][:200]
            out, backend, precision = st["out"], row["backend"], row["precision"]
            if mode == "window" and cfg.check and out is not None:
                key = (name, size)
                if backend == "eager" and precision == "fp32":
                    reference[key] = out
                elif key in reference:
                    max_abs, max_rel = compare(torch.from_numpy(out),
                                               torch.from_numpy(reference[key]))
                    tol = TOLERANCE.get(precision, 1e-3)
                    row.update(check_max_abs=max_abs, check_max_rel=max_rel, check_tol=tol)
                    if max_rel > tol:
                        row["status"] = f"MISMATCH vs eager fp32: max rel {max_rel:.3g} > {tol:g}"
            calls = backend_calls(engine)
            if calls:
                row["backend_calls"] = json.dumps(calls)
                reports = backend_reports(engine)
                row["backend_used"] = ";".join(sorted({r["used"] for r in reports}))
                row["module_max_rel"] = max((r["max_rel"] for r in reports),
                                            default=float("nan"))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- ratios


def _min_of(rows: list[dict], column: str = "median_ms", **match: Any) -> float | None:
    """The smallest ``column`` among the ok rows matching ``match`` (best of the runs), or None."""
    vals = [r[column] for r in rows if r.get("status", "").startswith("ok")
            and column in r and all(r.get(k) == v for k, v in match.items())]
    return min(vals) if vals else None


def compute_ratios(rows: list[dict]) -> dict[str, Any]:
    """The headline ratios, per size and thread count present."""
    out: dict[str, Any] = {}
    for size in sorted({r["size"] for r in rows}):
        for th in sorted({r["threads"] for r in rows}):
            tag = f"{size}px_t{th}"
            # every ratio is against the windowed network's full-window cost (eager fp32)
            net = DEFAULT_NETWORK
            gru_win = _min_of(rows, engine=net, mode="window", backend="eager",
                              precision="fp32", size=size, threads=th)
            r: dict[str, Any] = {}
            for other in neural_engines():
                if ENGINES[other].stateful:
                    push = _min_of(rows, engine=other, mode="push", backend="eager",
                                   precision="fp32", size=size, threads=th)
                    if gru_win and push:
                        r[f"{net}_window_over_{other}_push"] = gru_win / push
            ref_push = _min_of(rows, engine=REFERENCE_ENGINE, mode="push", size=size, threads=th)
            if gru_win and ref_push:
                r[f"{net}_window_over_{REFERENCE_ENGINE}_push"] = gru_win / ref_push
            gru_push = _min_of(rows, engine=net, mode="push", backend="eager",
                               precision="fp32", size=size, threads=th)
            if gru_win and gru_push:
                r[f"{net}_window_over_{net}_cached_push"] = gru_win / gru_push
            gru_win_cpu = _min_of(rows, "cpu_median_ms", engine=net, mode="window",
                                  backend="eager", precision="fp32", size=size, threads=th)
            cand = [x for x in rows if x["engine"] == net and x.get("mode") == "window"
                    and x["size"] == size and x["threads"] == th and x.get("status") == "ok"
                    and "median_ms" in x]
            if gru_win and len(cand) > 1:
                best = min(cand, key=lambda x: x["median_ms"])
                r["eager_fp32_over_best_backend"] = gru_win / best["median_ms"]
                r["best_backend"] = f"{best['backend']} {best['precision']} t{best['threads']}"
                cpu = [x for x in cand if "cpu_median_ms" in x]
                if gru_win_cpu and cpu:
                    best_cpu = min(cpu, key=lambda x: x["cpu_median_ms"])
                    r["eager_fp32_over_best_backend_cpu_time"] = gru_win_cpu / best_cpu["cpu_median_ms"]
                    r["best_backend_cpu_time"] = (f"{best_cpu['backend']} {best_cpu['precision']} "
                                                  f"t{best_cpu['threads']}")
                exact = [x for x in cand if x["precision"] == "fp32"]
                if exact:
                    best_fp32 = min(exact, key=lambda x: x["median_ms"])
                    r["eager_fp32_over_best_fp32_backend"] = gru_win / best_fp32["median_ms"]
                    r["best_fp32_backend"] = best_fp32["backend"]
            if r:
                out[tag] = r
    return out


# --------------------------------------------------------------------------- outputs


CSV_FIELDS = ["engine", "mode", "backend", "precision", "size", "threads", "device", "window",
              "n", "median_ms", "cpu_median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "outputs_per_s",
              "R_100fps", "R_1000fps", "update_hz_100fps", "update_hz_1000fps",
              "first_call_s", "check_max_rel", "check_max_abs", "check_tol", "module_max_rel",
              "backend_used", "backend_calls", "weights", "status"]


def write_outputs(cfg: BenchConfig, machine: dict, rows: list[dict], ratios: dict,
                  stem: str) -> dict[str, Path]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": cfg.out_dir / f"{stem}.csv", "json": cfg.out_dir / f"{stem}.json"}
    extra = sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    with open(paths["csv"], "w", newline="") as f:
        f.write(f"# {machine_line(machine)}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    cfg_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    payload = {"machine": machine, "config": cfg_d, "ratios": ratios,
               "targets": {"stream_ratio": TARGET_STREAM_RATIO,
                           "backend_ratio": TARGET_BACKEND_RATIO},
               "formula": "R = 1 / (W/N + T): W = engine.window, N = camera fps, T = median",
               "rows": rows}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str,
                                        allow_nan=True) + "\n")
    if cfg.plot:
        png = plot(rows, machine, cfg.out_dir / f"{stem}.png")
        if png:
            paths["png"] = png
    return paths


def plot(rows: list[dict], machine: dict, path: Path) -> Path | None:
    """Median latency vs frame size (left) and R at 100 fps (right), one line per config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status", "").startswith("ok") and "median_ms" in r]
    if not ok:
        return None
    if len({r["size"] for r in ok}) == 1:
        return _plot_bars(ok, machine, path)
    groups: dict[str, list[dict]] = {}
    for r in ok:
        label = f"{r['engine']} {r['mode']} {r['backend']} {r['precision']} t{r['threads']}"
        groups.setdefault(label, []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["size"])
        xs = [r["size"] for r in rs]
        style = "-" if rs[0]["mode"] == "window" else "--"
        ax1.plot(xs, [r["median_ms"] for r in rs], style, marker="o", label=label)
        ax2.plot(xs, [r.get("R_100fps", float("nan")) for r in rs], style, marker="o")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("frame size (px)")
    ax1.set_ylabel("median latency (ms)")
    ax1.set_title("latency per output (window) / per new frame (push)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("frame size (px)")
    ax2.set_ylabel("R = 1/(W/N + T)  [outputs/s], N = 100 fps")
    ax2.set_title("real-time temporal resolution (thesis eq. 2)")
    ax1.legend(fontsize=6, loc="upper left")
    fig.suptitle(machine_line(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_bars(ok: list[dict], machine: dict, path: Path) -> Path:
    """One frame size: horizontal bars of median wall (and CPU) time per configuration."""
    import matplotlib.pyplot as plt

    ok = sorted(ok, key=lambda r: (r["mode"], -r["median_ms"]))
    labels = [f"{r['engine']} {r['mode']} {r['backend']} {r['precision']} t{r['threads']}"
              for r in ok]
    y = np.arange(len(ok))
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(ok) + 1.8))
    ax.barh(y + 0.2, [r["median_ms"] for r in ok], height=0.4, label="wall median")
    if any("cpu_median_ms" in r for r in ok):
        ax.barh(y - 0.2, [r.get("cpu_median_ms", 0.0) for r in ok], height=0.4,
                label="CPU-time median (own cost on a shared machine)")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("ms per output (window) / per new frame (push)")
    ax.set_title(f"{ok[0]['size']} px; R at 100 fps = 1/(W/N + T)", fontsize=9)
    for yi, r in zip(y, ok, strict=True):
        ax.text(r["median_ms"], yi + 0.2, f" R@100={r['R_100fps']:.2f}", va="center",
                fontsize=6)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(machine_line(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[dict], ratios: dict) -> None:
    hdr = (f"{'engine':9s} {'mode':6s} {'backend':14s} {'prec':4s} {'size':>4s} {'thr':>3s} "
           f"{'N':>4s} {'median':>9s} {'cpu':>9s} {'p90':>9s} {'p99':>9s} {'out/s':>8s} {'R@100':>6s} "
           f"{'R@1000':>6s}  status")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "median_ms" not in r:
            print(f"{r['engine']:9s} {r['mode']:6s} {r['backend']:14s} {r['precision']:4s} "
                  f"{r['size']:>4d} {r.get('threads', 0):>3d} {'':>4s} {'':>9s} {'':>9s} {'':>9s} {'':>9s} "
                  f"{'':>8s} {'':>6s} {'':>6s}  {r.get('status', '')}")
            continue
        st = r["status"]
        if "check_max_rel" in r:
            st += f" (rel err {r['check_max_rel']:.2g})"
        print(f"{r['engine']:9s} {r['mode']:6s} {r['backend']:14s} {r['precision']:4s} "
              f"{r['size']:>4d} {r['threads']:>3d} {r['n']:>4d} {r['median_ms']:>7.2f}ms "
              f"{r.get('cpu_median_ms', float('nan')):>7.2f}ms "
              f"{r['p90_ms']:>7.2f}ms {r['p99_ms']:>7.2f}ms {r['outputs_per_s']:>8.1f} "
              f"{r['R_100fps']:>6.2f} {r['R_1000fps']:>6.2f}  {st}")
    if ratios:
        print("\nratios (targets: window/stream >= "
              f"{TARGET_STREAM_RATIO:g}x, eager/best backend >= {TARGET_BACKEND_RATIO:g}x):")
        for tag, r in ratios.items():
            parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()]
            print(f"  {tag}: " + ", ".join(parts))


# --------------------------------------------------------------------------- run


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything in `cfg`, print, write CSV/JSON/PNG; returns the payload."""
    import torch

    machine = machine_info(cfg.device)
    print(machine_line(machine), flush=True)
    threads_list: list[int | None] = list(cfg.threads) or [None]
    configs = [(be, pr) for be in cfg.backends for pr in cfg.precisions]
    # eager fp32 first: it is the reference the others are checked against
    configs.sort(key=lambda c: not (c == ("eager", "fp32")))
    groups = [(th, size, name) for th in threads_list for size in cfg.sizes
              for name in cfg.engines]
    rows: list[dict] = []
    reference: dict[tuple, np.ndarray] = {}
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(groups), desc="bench", file=sys.stderr)
        except ImportError:
            bar = None
    for th, size, name in groups:
        # an engine without a network (SOFI): other backends/precisions do not apply, measured once
        group_cfgs = configs if ENGINES[name].backend_targets else [("eager", "fp32")]
        if bar:
            bar.set_postfix_str(f"{name} {size}px t{th or torch.get_num_threads()}")
        rows.extend(measure_group(cfg, name, size, th, group_cfgs, reference))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if torch.cuda.is_available():
        machine["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    ratios = compute_ratios(rows)
    print_table(rows, ratios)
    stem = cfg.stem or f"latency_{cfg.device.split(':')[0]}"
    paths = write_outputs(cfg, machine, rows, ratios, stem)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return {"machine": machine, "rows": rows, "ratios": ratios,
            "paths": {k: str(v) for k, v in paths.items()}}


def _csv(text: str, cast: type = str) -> tuple:
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def config_from_flags(flags: dict[str, Any]) -> BenchConfig:
    """The BenchConfig of `livesr bench` (realtime/cli_tools.py); flags not given keep its defaults."""
    d = BenchConfig()
    weights = {}
    for item in flags["weights"] or ():
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--weights expects ENGINE=PATH, got {item!r}")
        weights[k] = v

    def given(name: str, cast: type = str) -> Any:
        v = flags[name]
        return getattr(d, name) if v is None else _csv(v, cast)

    cfg = BenchConfig(
        engines=given("engines"), backends=given("backends"), precisions=given("precisions"),
        sizes=given("sizes", int), modes=given("modes"), threads=given("threads", int),
        reps=d.reps if flags["reps"] is None else flags["reps"],
        warmup=d.warmup if flags["warmup"] is None else flags["warmup"], max_seconds=flags["max_seconds"],
        device=flags["device"] or d.device, camera_fps=given("camera_fps", float), weights=weights,
        check=not flags["no_check"], interleave=flags["interleave"],
        out_dir=Path(flags["out_dir"]) if flags["out_dir"] is not None else d.out_dir,
        stem=flags["stem"], plot=not flags["no_plot"])
    if flags["quick"]:
        cfg.sizes = tuple(s for s in cfg.sizes if s <= 32) or (16, 32)
        cfg.reps, cfg.warmup = min(cfg.reps, 5), min(cfg.warmup, 1)
    return cfg.validate()


def run_cli(flags: dict[str, Any]) -> int:
    """`livesr bench`: ``--list-backends``, or the benchmark of the flags' BenchConfig."""
    if flags["list_backends"]:
        from engines.backends import describe_backends

        print(describe_backends(flags["device"] or BenchConfig.device))
        return 0
    try:
        cfg = config_from_flags(flags)
    except ValueError as e:
        print(f"livesr bench: error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.latency ARGS` = `livesr bench ARGS` (``--pipeline``: end to end)."""
    from realtime.cli import main as livesr

    return livesr(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
