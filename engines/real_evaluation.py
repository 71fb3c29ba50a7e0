"""`livesr evaluate --real`: score every engine on real camera movies (no ground truth needed).

Why these numbers: on a real movie nobody knows the truth, but a long acquisition does better
than any 20 frames, so SOFI of *all* frames (the same corrections: bleaching, the lag chosen
on the whole movie, the optics) is the reference each 20-frame output is held against. Over
disjoint 20-frame windows, per engine (rows: ``mean20`` the widefield mean, ``sofi20``,
``sofi100``, ``convgru``, ``convlstm``; any ``sofiN`` / ``meanN`` can be asked for):

* ``agreement``: Pearson with SOFI of all frames (``engines.metrics.pearson``, aligned by at
  most 3 output pixels, as in the simulated evaluation);
* ``consistency``: mean Pearson over all pairs of windows (``metrics.window_consistency``):
  on a static sample every window shows the same thing, so a method that draws a new guess per
  window scores low (meaningful for static samples only; reported for all);
* ``invented``: the share of the output's claimed structure lying >= 1 input pixel from any
  structure of the reference (``metrics.invented_structure``, Li thresholds);
* ``invented_filaments``: the share of the output's claimed structure that is line-like where
  the reference shows no line-like structure (``metrics.invented_filaments``: orientation
  coherence of the structure tensor); the measure for samples without filaments (a nucleus,
  diffusing molecules).

Movies: every TIFF in ``../shared/data`` by default (skipped cleanly when absent) and any given
by path. A movie needs two disjoint windows (40 frames for 20-frame windows); a ``sofiN`` row
whose window is the whole movie is "n/a" (it *is* the reference). Known movies carry their
optics and what the sample is (``KNOWN_MOVIES``); ``--na`` / ``--pixel-size-um`` / ... override.
Outputs (``--out``, default the current folder): ``real_data.json`` (every number, per
window too), ``real_data.csv`` (one row per movie and engine) and ``real_<movie>.png``
(windows side by side: raw mean, SOFI-20, SOFI of all frames, ConvGRU, ConvLSTM).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engines import exception_reason, load_engine_for_scoring  # torch-free until an engine loads
from engines.blinking import assess_blinking
from engines.metrics import invented_filaments, invented_structure, pearson, window_consistency
from engines.registry import ENGINES, REFERENCE_ENGINE, default_window, neural_engines, parse_weights_arg

if TYPE_CHECKING:
    from engines.base import Engine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
WIDEFIELD = "mean"  # the raw mean of the window: the diffraction-limited baseline
_LIVE = default_window(REFERENCE_ENGINE)  # the live SOFI window
DEFAULT_ROWS = (f"{WIDEFIELD}{_LIVE}", f"{REFERENCE_ENGINE}{_LIVE}", f"{REFERENCE_ENGINE}100") + neural_engines()
FIGURE_COLUMNS = (WIDEFIELD, REFERENCE_ENGINE, "reference") + neural_engines()
METRICS = ("agreement", "invented", "invented_filaments")


@dataclass(frozen=True)
class MovieFacts:
    """What is known about a movie's sample and optics (from its source; see /work/shared/data/README.md)."""

    sample: str  # "static", "diffusing" or "unknown": consistency means something for "static" only
    blinking: bool | None  # does the sample blink (None: unknown)
    filaments: bool | None  # does the sample hold filaments (False: any filament is invented)
    optics: dict[str, Any] = field(default_factory=dict)  # engines.psf.Optics fields
    what: str = ""


KNOWN_MOVIES: dict[str, MovieFacts] = {
    "real-emccd-nucleus-100f.tif": MovieFacts(
        "diffusing", True, False, {"na": 1.3, "pixel_size_um": 0.16},
        "dense single molecules in a nucleus, blinking and diffusing, strong bleaching (EMCCD)"),
    "real-static-donut-100f.tif": MovieFacts(
        "static", False, False, {},
        "one static fluorescent ring, shot noise only, no blinking (negative control)"),
    "deepstorm3d-tetrapod-storm-50f.tif": MovieFacts(
        "static", True, None, {"na": 1.45, "wavelength_nm": 670.0, "pixel_size_um": 0.11},
        "fixed-cell STORM with a 4-um Tetrapod PSF (engineered, not Gaussian): a stress test"),
    "smlm2013-realHD-tubulin-10f.tif": MovieFacts(
        "static", True, True, {"pixel_size_um": 0.1}, "SMLM-2013 real high-density tubulin"),
    "zhuang-scmos-storm-11f.tif": MovieFacts("static", True, None, {}, "Zhuang-lab STORM, sCMOS"),
    "sdt-pmhc-af647-smt-10f.tif": MovieFacts("diffusing", True, False, {}, "mobile single AF647 molecules"),
}
UNKNOWN = MovieFacts("unknown", None, None, {}, "")


@dataclass(frozen=True)
class Row:
    """A row of the table: 'mean20' (widefield mean of 20 frames), 'sofi100', 'convgru', ..."""

    label: str
    engine: str  # "mean", "sofi", or a name for load_engine
    window: int | None  # None: the engine's own


def parse_row(spec: str) -> Row:
    spec = spec.strip().lower()
    m = re.fullmatch(r"([a-z_]+?)(\d+)?", spec)
    if not spec or m is None:
        raise ValueError(f"bad engine {spec!r}: use e.g. mean20, sofi20, sofi100, convgru, convlstm")
    name, n = m.group(1), m.group(2)
    if n is not None and int(n) < 2:
        raise ValueError(f"bad window in {spec!r}: at least 2 frames")
    if name == WIDEFIELD and n is None:
        raise ValueError("give the mean's window, e.g. mean20")
    return Row(spec, name, int(n) if n else None)


@dataclass
class RealEvaluationConfig:
    """One run of the real-data suite; the defaults reproduce the model card's table."""

    movies: tuple[Path, ...] = ()  # extra movies (by path)
    data_dir: Path | None = DEFAULT_DATA  # every *.tif here too (None: none)
    engines: tuple[str, ...] = DEFAULT_ROWS
    window: int = default_window()  # frames of the networks' windows (their default) and of the figure's SOFI
    weights: dict[str, str] = field(default_factory=dict)  # engine name -> weights file
    optics: dict[str, Any] = field(default_factory=dict)  # overrides every movie's optics
    out: Path = Path(".")
    device: str = "cpu"
    threads: int = 1
    figure: bool = True
    figure_windows: int = 3  # windows (rows) per figure
    progress: bool = True

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2 frames, got {self.window}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.figure_windows < 1:
            raise ValueError(f"figure_windows must be >= 1, got {self.figure_windows}")
        if not self.engines:
            raise ValueError("no engines to evaluate")
        for spec in self.engines:
            parse_row(spec)
        self.movies = tuple(Path(m) for m in self.movies)
        self.out = Path(self.out)
        if self.optics:
            from engines.psf import Optics

            Optics.coerce(self.optics)  # a bad value is refused before anything runs

    def movie_paths(self) -> list[Path]:
        """The movies to score: the data folder's TIFFs (sorted), then the given ones (once each)."""
        found: list[Path] = []
        if self.data_dir is not None and Path(self.data_dir).is_dir():
            found += sorted(p for p in Path(self.data_dir).iterdir()
                            if p.suffix.lower() in (".tif", ".tiff") and p.is_file())
        for m in self.movies:
            if m.resolve() not in {f.resolve() for f in found}:
                found.append(m)
        return found


# --------------------------------------------------------------------------- engines
@dataclass
class RowRun:
    row: Row
    engine: Engine | None = None  # None for the rows that load none (mean, SOFI) or could not
    status: str = "ok"
    note: str = ""
    window: int = 0


def _load_network(row: Row, cfg: RealEvaluationConfig) -> RowRun:
    run = RowRun(row)
    run.engine, problem = load_engine_for_scoring(row.engine, device=cfg.device, window=row.window,
                                                  weights=cfg.weights.get(row.engine))
    if run.engine is None:
        run.status = problem
        return run
    if getattr(run.engine, "legacy", False):
        run.note = "legacy weights"
    run.window = int(run.engine.window)
    return run


def _output(run: RowRun, frames: np.ndarray, sofi_opts: dict[str, Any]) -> np.ndarray:
    """One output of `run` for one window of frames (exactly the window's frames)."""
    row = run.row
    if row.engine == WIDEFIELD:
        return frames.astype(np.float32).mean(axis=0)
    if row.engine == REFERENCE_ENGINE:
        from engines.sofi import SofiEngine

        return SofiEngine(window=len(frames), **sofi_opts).reconstruct(frames)
    eng = run.engine
    assert eng is not None, row.label  # (rows whose engine could not load are not run)
    # stateful engines are scored as in live use: reset, every frame of the window pushed
    if getattr(ENGINES.get(row.engine), "stateful", False):
        eng.reset()
        out = None
        for f in frames:
            res = eng.push(f)
            out = res if res is not None else out
        if out is None:
            raise RuntimeError(f"{row.label} gave no output after {len(frames)} frames")
        return np.asarray(out, dtype=np.float32)
    return np.asarray(eng.reconstruct(frames), dtype=np.float32)


# --------------------------------------------------------------------------- one movie
def movie_facts(path: Path) -> MovieFacts:
    return KNOWN_MOVIES.get(path.name, UNKNOWN)


def evaluate_movie(path: Path, runs: list[RowRun], cfg: RealEvaluationConfig) -> dict[str, Any]:
    """Every row's per-window scores on one movie, and the images for its figure."""
    from acquisition.cameras import load_replay_stack
    from engines.sofi import SofiEngine

    facts = movie_facts(path)
    res: dict[str, Any] = {"movie": str(path), "name": path.name, "sample": facts.sample,
                           "sample_blinks": facts.blinking, "sample_has_filaments": facts.filaments,
                           "what": facts.what, "rows": [], "status": "ok"}
    try:
        stack = load_replay_stack(path)
    except Exception as exc:
        res["status"] = f"skipped: {exception_reason(exc)}"
        return res
    frames = stack.frames
    t, h, w = frames.shape
    res.update(frames=int(t), height=int(h), width=int(w))
    need = 2 * cfg.window
    if t < need:
        res["status"] = (f"skipped: {t} frames; two disjoint {cfg.window}-frame windows need {need}")
        return res
    optics = dict(facts.optics)
    if stack.pixel_size_um and "pixel_size_um" not in optics:
        optics["pixel_size_um"] = float(stack.pixel_size_um)
    optics.update(cfg.optics)
    if optics.get("pixel_size_um") is not None:
        optics.setdefault("pixel_size_source", "movie facts" if path.name in KNOWN_MOVIES else "file")
    res["optics"] = {k: v for k, v in optics.items()}
    ref_engine = SofiEngine(window=t, optics=optics)
    t0 = time.perf_counter()
    reference = ref_engine.reconstruct(frames)
    res["reference"] = {"what": f"SOFI of all {t} frames", "ms": (time.perf_counter() - t0) * 1e3,
                        **{k: ref_engine.output_info().get(k) for k in
                           ("lag", "lag_reason", "psf_fwhm_px", "distance_fwhm_px", "psf_fit", "bleach_correction")}}
    sofi_opts = {"optics": optics, "lag": ref_engine.lag}  # the same corrections as the reference
    blink = assess_blinking(frames)
    res["blinking_check"] = {"ok": blink.ok, "local_correlation": round(blink.local_correlation, 4),
                             "reason": blink.reason}
    images: dict[str, list[np.ndarray]] = {"reference": [reference]}
    for run in runs:
        row = run.row
        n = row.window or run.window or cfg.window
        entry: dict[str, Any] = {"engine": row.label, "window": n, "status": run.status, "note": run.note}
        res["rows"].append(entry)
        if run.status != "ok":
            continue
        if n >= t:
            entry["status"] = f"n/a: a {n}-frame window is the whole {t}-frame movie (it is the reference)"
            continue
        k_windows = t // n
        outs: list[np.ndarray] = []
        per: list[dict[str, Any]] = []  # one JSON row per window
        times: list[float] = []
        try:
            for k in range(k_windows):
                t1 = time.perf_counter()
                out = _output(run, frames[k * n:(k + 1) * n], sofi_opts)
                times.append((time.perf_counter() - t1) * 1e3)
                per.append({"window": [k * n, (k + 1) * n - 1],
                            "agreement": pearson(out, reference),
                            "invented": invented_structure(out, reference),
                            "invented_filaments": invented_filaments(out, reference)})
                outs.append(out)
        except Exception as exc:  # one failing engine must not lose the others' numbers
            entry["status"] = f"error: {exception_reason(exc)}"
            continue
        entry["windows"] = per
        entry["n_windows"] = len(per)
        for key in METRICS:
            vals = [p[key] for p in per if p[key] is not None and math.isfinite(p[key])]
            entry[key] = float(np.mean(vals)) if vals else None
            entry[key + "_std"] = float(np.std(vals)) if vals else None
        entry["consistency"] = window_consistency(outs) if len(outs) >= 2 else None
        entry["ms_per_output"] = float(np.median(times))
        if n == cfg.window and row.engine in FIGURE_COLUMNS:
            images[row.engine] = outs
    res["_images"] = images
    return res


# --------------------------------------------------------------------------- the run
def evaluate_real(cfg: RealEvaluationConfig) -> dict[str, Any]:
    """The whole suite; the results dict is what goes into the JSON (keys '_...' are not written)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(cfg.threads)
    rows = [parse_row(s) for s in cfg.engines]
    runs = [RowRun(r) if r.engine in (WIDEFIELD, REFERENCE_ENGINE) else _load_network(r, cfg) for r in rows]
    movies = cfg.movie_paths()
    out: dict[str, Any] = {
        "config": {"engines": list(cfg.engines), "window": cfg.window, "weights": dict(cfg.weights),
                   "optics": dict(cfg.optics), "data_dir": None if cfg.data_dir is None else str(cfg.data_dir),
                   "device": cfg.device},
        "reference": "SOFI of all frames (bleaching correction, the lag chosen on the whole movie, "
                     "the movie's optics refined by SOFI's bounded fit)",
        "engines": [{"engine": r.row.label, "status": r.status, "note": r.note} for r in runs],
        "movies": [],
    }
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        out["data_dir_status"] = f"unavailable: {cfg.data_dir} not found (skipped)"
    with threadpool_limits(cfg.threads, user_api="blas"):
        for path in movies:
            if cfg.progress:
                print(f"evaluate --real: {path.name} ...", file=sys.stderr, flush=True)
            out["movies"].append(evaluate_movie(path, runs, cfg))
    return out


def format_table(results: dict[str, Any]) -> str:
    """One block per movie: a line per engine (means over the windows)."""
    lines: list[str] = []
    head = ["engine", "windows", "agreement", "consistency", "invented %", "filaments %", "ms/out"]
    for m in results["movies"]:
        title = f"{m['name']}"
        if "frames" in m:
            title += f" ({m['frames']} x {m['height']} x {m['width']}, sample {m['sample']}"
            bc = m.get("blinking_check")
            if bc:
                title += f", blinking check {'ok' if bc['ok'] else 'FAILED'} ({bc['local_correlation']:.2f})"
            title += ")"
        lines.append(title)
        if m["status"] != "ok":
            lines.append(f"  {m['status']}")
            lines.append("")
            continue
        lines.append(f"  reference: SOFI of all {m['frames']} frames, lag {m['reference'].get('lag')}, "
                     f"PSF {m['reference'].get('distance_fwhm_px') or m['reference'].get('psf_fwhm_px')} px")
        table = []
        for r in m["rows"]:
            label = r["engine"] + (f" [{r['note']}]" if r.get("note") else "")
            if r["status"] != "ok":
                table.append([label, r["status"]])
                continue

            def f(v: Any, pct: bool = False) -> str:
                if v is None or not math.isfinite(v):
                    return "-"
                return f"{100 * v:.1f}" if pct else f"{v:.3f}"

            table.append([label, str(r["n_windows"]), f(r["agreement"]), f(r["consistency"]),
                          f(r["invented"], True), f(r["invented_filaments"], True), f"{r['ms_per_output']:.0f}"])
        widths = [max(len(head[i]), *(len(x[i]) for x in table if len(x) > 2)) if i < len(head) else 0
                  for i in range(len(head))]
        lines.append("  " + "  ".join(h.ljust(wd) for h, wd in zip(head, widths, strict=True)))
        for x in table:
            if len(x) == 2:
                lines.append("  " + x[0].ljust(widths[0]) + "  " + x[1])
            else:
                lines.append("  " + "  ".join(c.ljust(wd) for c, wd in zip(x, widths, strict=False)).rstrip())
        lines.append("")
    lines.append("agreement: Pearson with SOFI of all frames; consistency: mean Pearson between "
                 "windows (static samples); invented: claimed structure >= 1 px from the reference's; "
                 "filaments: line-like structure where the reference has none")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_csv(path: Path, results: dict[str, Any]) -> None:
    cols = ["movie", "sample", "frames", "engine", "status", "window", "n_windows", "agreement",
            "agreement_std", "consistency", "invented", "invented_filaments", "ms_per_output"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for m in results["movies"]:
            if m["status"] != "ok":
                w.writerow([m["name"], m["sample"], m.get("frames", ""), "", m["status"]] + [""] * 8)
                continue
            for r in m["rows"]:
                w.writerow([m["name"], m["sample"], m["frames"]] + [
                    "" if r.get(c) is None else r.get(c) for c in cols[3:]])


def _figure(path: Path, movie: dict[str, Any], cfg: RealEvaluationConfig) -> None:
    """Rows = the first windows, columns = raw mean, SOFI-20, SOFI of all frames, ConvGRU, ConvLSTM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = movie["_images"]
    cols = [c for c in FIGURE_COLUMNS if c in imgs]
    ref = ENGINES[REFERENCE_ENGINE].title
    titles = {WIDEFIELD: f"raw mean ({cfg.window} fr)", REFERENCE_ENGINE: f"{ref}-{cfg.window}",
              "reference": f"{ref} all {movie['frames']} fr", **{n: ENGINES[n].title for n in neural_engines()}}
    n_rows = min(cfg.figure_windows, max(len(imgs[c]) for c in cols if c != "reference"))
    by_row = {r["engine"]: r for r in movie["rows"] if r["status"] == "ok"}
    labels = {WIDEFIELD: f"{WIDEFIELD}{cfg.window}", REFERENCE_ENGINE: f"{REFERENCE_ENGINE}{cfg.window}",
              **{n: n for n in neural_engines()}}
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(1.9 * len(cols), 2.0 * n_rows + 0.3), squeeze=False)
    for j, c in enumerate(cols):
        for i in range(n_rows):
            ax = axes[i][j]
            ax.set_axis_off()
            seq = imgs[c]
            img = seq[0] if c == "reference" else (seq[i] if i < len(seq) else None)
            if img is None:
                continue
            lo, hi = np.percentile(img, [0.5, 99.7])
            ax.imshow(img, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            row = by_row.get(labels.get(c, ""))
            text = titles[c] if i == 0 else ""
            if row is not None and i < len(row.get("windows", [])):
                a = row["windows"][i]["agreement"]
                ws = row["windows"][i]["window"]
                text += ("\n" if text else "") + f"fr {ws[0]}-{ws[1]}" + (f", r {a:.2f}" if a is not None else "")
            ax.set_title(text, fontsize=7)
    fig.suptitle(f"{movie['name']} ({movie['sample']})", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    from PIL import Image  # (matplotlib's own dependency)

    # a 256-colour palette: a third of the bytes, so the figures can live in the docs
    Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)


def write_outputs(results: dict[str, Any], cfg: RealEvaluationConfig) -> list[Path]:
    """real_data.json, real_data.csv and one PNG per evaluated movie, into cfg.out."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if cfg.figure:
        for m in results["movies"]:
            if m["status"] == "ok" and m.get("_images"):
                p = cfg.out / f"real_{Path(m['name']).stem}.png"
                _figure(p, m, cfg)
                m["figure"] = str(p)
                written.append(p)
    js = cfg.out / "real_data.json"
    js.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    written.append(js)
    cs = cfg.out / "real_data.csv"
    _write_csv(cs, results)
    written.append(cs)
    return written


# --------------------------------------------------------------------------- CLI


def run_cli(flags: dict[str, Any]) -> int:
    """`livesr evaluate --real` (realtime/cli_tools.py): flags not given keep RealEvaluationConfig's defaults."""
    d = RealEvaluationConfig()
    try:
        optics = {k: flags[k] for k in ("na", "wavelength_nm", "psf_fwhm_nm", "pixel_size_um")
                  if flags[k] is not None}
        if "pixel_size_um" in optics:
            optics["pixel_size_source"] = "--pixel-size-um"
        given = {k: flags[k] for k in ("window", "out", "device", "threads", "figure_windows")
                 if flags[k] is not None}
        engines = d.engines if flags["engines"] is None else tuple(
            e.strip() for e in flags["engines"].split(",") if e.strip())
        data = flags["data"] if flags["data"] is not None else d.data_dir
        cfg = RealEvaluationConfig(
            movies=tuple(flags["movies"] or ()), data_dir=None if flags["no_data"] else data,
            engines=engines, weights=dict(parse_weights_arg(w) for w in flags["weights"] or ()),
            optics=optics, figure=not flags["no_figure"], progress=not flags["quiet"], **given)
        missing = [str(m) for m in cfg.movies if not m.is_file()]
        if missing:
            raise ValueError(f"no such movie: {', '.join(missing)}")
        if not cfg.movie_paths():
            raise ValueError(f"no movies: {cfg.data_dir} is absent or empty and none were given")
    except ValueError as exc:
        print(f"livesr evaluate --real: error: {exc}", file=sys.stderr)
        return 2
    results = evaluate_real(cfg)
    print(format_table(results))
    try:
        paths = write_outputs(results, cfg)
    except OSError as exc:
        print(f"livesr evaluate --real: error: results NOT written: {exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in paths))
    scored = [r for m in results["movies"] if m["status"] == "ok" for r in m["rows"] if r["status"] == "ok"]
    return 0 if scored else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engines.real_evaluation ARGS` = `livesr evaluate --real ARGS`."""
    from realtime.cli import main as livesr

    return livesr(["evaluate", "--real", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
