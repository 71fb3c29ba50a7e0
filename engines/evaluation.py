"""`livesr evaluate`: score every engine on held-out simulated sets (thesis ch. 5, app. B).

Why fixed, seeded sets: the numbers in the model card, the README and a reviewer's rerun must
be the same numbers. Scenes use seeds >= 10**9 (training seeds are far below for any run that
fits a machine), so no evaluation scene was ever seen in training. Ground truth is what a long
acquisition would show, the expected second-order cumulant image
(`BlinkingScene.expected_cumulant`, ADU^2) at the networks' output frame: zero where nothing
blinks. All engines see the same movie; SOFI runs on 20, 100 and 500 frames of it, the
networks and the widefield mean on its first `frames` frames. Three sets:

- ``thesis``: the thesis's SNR (40-120 photons per emitter per frame, on-ratio 0.4-2 %, PSF
  200-260 nm at 100 nm pixels, 1-frame on-time, sCMOS with pixel maps, signal-to-background
  15) for several structure classes and their mixtures, static scenes;
- ``wide``: the whole training domain (engines/data.py DataConfig at the evaluation size);
- ``zero``: scenes whose target is zero (fully static sample with the mean brightness of its
  blinking twin, empty field, static sample with 3 % global flicker); an engine's "level"
  there is its mean output over its own mean output on the blinking twin (same structure,
  camera and mean brightness, but blinking): 0 invents nothing, 1 cannot tell them apart.

Per scene and engine: Pearson, decorrelation resolution, Li TPR / TNR, and the share of the
output's claimed structure lying >= 1 input pixel from any ground-truth structure
(metrics.invented_structure, also usable on real movies).
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig
from engines import exception_reason, load_engine_for_scoring  # torch-free until an engine loads
from engines.data import DataConfig, random_sim_config
from engines.metrics import decorrelation_resolution, evaluate_image, invented_structure
from engines.registry import ENGINES, REFERENCE_ENGINE, default_window, neural_engines, parse_weights_arg

EVAL_SEED_BASE = 10**9  # training seeds stay far below
SEEDS_PER_BASE_SEED = 10**5  # --seed s uses 10**9 + s * 10**5 + (set, class, candidate)
METRICS = ("pearson", "resolution_nm", "tpr", "tnr", "invented")
REFERENCE_WINDOWS = (default_window(REFERENCE_ENGINE), 100, 500)  # the SOFI rows: live window, longer ones
DEFAULT_ENGINES = tuple(f"{REFERENCE_ENGINE}{w}" for w in REFERENCE_WINDOWS) + neural_engines()
SCORE_BORDER = 3  # evaluate_image's default max_shift: the border left out of the scores
WIDEFIELD = "mean"  # mean of the first --frames frames: the diffraction-limited baseline
SETS = ("thesis", "wide", "zero")
THESIS_CLASSES = ("filaments", "mitochondria", "puncta", "rings", "membranes", "diffuse", "mixed")
ZERO_KINDS = ("static", "empty", "flicker")
MIXED_FROM = ("filaments", "mitochondria", "puncta", "rings", "membranes", "diffuse")
THESIS_SBR = 15.0  # thesis table 5.1: signal-to-background ratio
WIDE_HORIZON = 500  # frames a moving wide-set sample is built to fill the view for (SOFI-500)


@dataclass
class EvaluationConfig:
    """One evaluation run; the defaults take a few minutes on two CPU cores."""

    size: int = 64
    frames: int = 20  # frames given to the neural engines (and averaged for the mean row)
    n: int = 4  # scenes per class of the thesis set
    n_wide: int = 16
    n_zero: int = 6  # cycles through ZERO_KINDS (each also runs its blinking twin)
    seed: int = 1234
    engines: tuple[str, ...] = DEFAULT_ENGINES
    sets: tuple[str, ...] = SETS
    classes: tuple[str, ...] = THESIS_CLASSES
    weights: dict[str, str] = field(default_factory=dict)  # engine name -> weights file
    out: Path = Path("runs/evaluate")
    device: str = "cpu"
    threads: int = 1  # torch threads: on a shared CPU more threads run slower, not faster
    figure: bool = True
    progress: bool = True
    # a scene counts only if this fraction of its ground truth (inside the scored border) is
    # structure (> 0.1 of max): a field of view a filament merely grazes measures nothing
    min_structure: float = 0.005

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        for name in ("n", "n_wide", "n_zero"):
            if not 0 <= getattr(self, name) <= 1000:
                raise ValueError(f"{name} must be in 0..1000, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.seed < 0 or self.seed > 9_000:
            raise ValueError(f"seed must be in 0..9000, got {self.seed}")
        bad = [s for s in self.sets if s not in SETS]
        if bad or not self.sets:
            raise ValueError(f"sets must be among {SETS}, got {self.sets}")
        bad = [c for c in self.classes if c not in THESIS_CLASSES]
        if bad or not self.classes:
            raise ValueError(f"classes must be among {THESIS_CLASSES}, got {self.classes}")
        if not 0.0 <= self.min_structure < 1.0:
            raise ValueError(f"min_structure must be in [0, 1), got {self.min_structure}")
        if not self.engines:
            raise ValueError("no engines to evaluate")
        for spec in self.engines:
            parse_scored_engine(spec)
        if self.n_scenes() == 0:
            raise ValueError("no scenes to evaluate (n, n_wide and n_zero are all 0)")
        self.out = Path(self.out)

    def n_scenes(self) -> int:
        """Scenes scored (each zero-target scene also runs its blinking twin)."""
        return (("thesis" in self.sets) * self.n * len(self.classes)
                + ("wide" in self.sets) * self.n_wide + ("zero" in self.sets) * self.n_zero)

    def scene_seed(self, set_name: str, group: int, k: int) -> int:
        """Seed of candidate k of class `group` in `set_name` (disjoint for all of them)."""
        slot = SETS.index(set_name) * 30 + group
        return EVAL_SEED_BASE + self.seed * SEEDS_PER_BASE_SEED + slot * 1000 + k

    # ------------------------------------------------------------------ the scenes
    def thesis_config(self, structure: str, seed: int) -> SimulationConfig:
        """Thesis SNR (ch. 5): 40-120 photons, on-ratio 0.4-2 %, PSF 200-260 nm, 100 nm px."""
        rng = np.random.default_rng([seed, 0x7E515])
        if structure == "mixed":
            pick = rng.choice(len(MIXED_FROM), size=int(rng.integers(2, 4)), replace=False)
            structure = "+".join(MIXED_FROM[i] for i in sorted(pick))
        photons = float(np.exp(rng.uniform(np.log(40.0), np.log(120.0))))
        rho = float(rng.uniform(0.004, 0.02))
        return SimulationConfig(
            size=self.size, pixel_nm=100.0, fwhm_nm=float(rng.uniform(200.0, 260.0)),
            on_ms=10.0, off_ms=10.0 * (1 - rho) / rho, photons=photons,
            background=photons / THESIS_SBR, structure=structure,
            camera=CameraNoise(per_pixel_maps=True), seed=seed)

    def _with_structure(self, cfgs: Iterator[tuple[int, SimulationConfig]], n: int
                        ) -> Iterator[tuple[int, SimulationConfig]]:
        """The first n candidates whose ground truth has structure in view."""
        used = 0
        for seed, cfg in cfgs:
            if used == n:
                return
            gt = BlinkingScene(cfg).expected_cumulant()
            gt = gt[SCORE_BORDER:-SCORE_BORDER, SCORE_BORDER:-SCORE_BORDER]
            if gt.max() <= 0 or float(np.mean(gt > 0.1 * gt.max())) < self.min_structure:
                continue
            yield seed, cfg
            used += 1
        if used < n:
            raise RuntimeError(f"fewer than {n} scenes with structure among the candidates")

    def scenes(self) -> Iterator[dict[str, Any]]:
        """Every held-out scene: dict(set, cls, seed, cfg, twin) in a fixed order; `twin` is
        the blinking sample a zero-target scene was made from (its target sets the level)."""
        if "thesis" in self.sets:
            for g, cls in enumerate(self.classes):
                g = THESIS_CLASSES.index(cls)
                cands = ((s, self.thesis_config(cls, s))
                         for s in (self.scene_seed("thesis", g, k) for k in range(1000)))
                for seed, cfg in self._with_structure(cands, self.n):
                    yield dict(set="thesis", cls=cls, seed=seed, cfg=cfg, twin=None)
        if "wide" in self.sets:
            data = DataConfig(size=self.size)
            horizon = max(WIDE_HORIZON, self.frames)  # fixed: the scenes never depend on engines

            def wide() -> Iterator[tuple[int, SimulationConfig]]:
                for k in range(1000):
                    s = self.scene_seed("wide", 0, k)
                    yield s, random_sim_config(np.random.default_rng([s, 0x5EED]), data, s,
                                               horizon=horizon)

            for seed, cfg in self._with_structure(wide(), self.n_wide):
                cls = "mixture" if "+" in cfg.structure else cfg.structure
                yield dict(set="wide", cls=cls, seed=seed, cfg=cfg, twin=None)
        if "zero" in self.sets:
            classes = [c for c in MIXED_FROM]
            cands = ((s, self.thesis_config(classes[k % len(classes)], s))
                     for k, s in ((k, self.scene_seed("zero", 0, k)) for k in range(1000)))
            for i, (seed, twin) in enumerate(self._with_structure(cands, self.n_zero)):
                kind = ZERO_KINDS[i % len(ZERO_KINDS)]
                yield dict(set="zero", cls=kind, seed=seed, cfg=zero_target_config(twin, kind),
                           twin=twin)


def zero_target_config(twin: SimulationConfig, kind: str) -> SimulationConfig:
    """A scene whose target is zero, made from a blinking one: its emitters never blink
    (with the same mean brightness), the field is empty, or static with 3 % global flicker."""
    if kind == "empty":
        return replace(twin, structure="empty")
    static = replace(twin, static_fraction=1.0, static_brightness=twin.on_ratio)
    if kind == "static":
        return static
    if kind == "flicker":
        return replace(static, flicker=0.03)
    raise ValueError(f"unknown zero-target kind {kind!r}: {ZERO_KINDS}")


@dataclass(frozen=True)
class ScoredEngine:
    """A row of the table: which engine, its window, and how it is driven (a stateful engine
    is scored as in live use: every frame pushed, the last output kept)."""

    label: str  # "sofi100", "convgru"
    engine: str  # name for load_engine
    window: int | None  # None: the engine's default
    streaming: bool


def parse_scored_engine(spec: str) -> ScoredEngine:
    """'sofi100' -> SOFI with a 100-frame window; 'convlstm' -> streamed; other names as they are."""
    spec = spec.strip().lower()
    m = re.fullmatch(r"([a-z_]+?)(\d+)?", spec)
    if m is None or not spec:
        raise ValueError(f"bad engine name {spec!r}: use e.g. sofi20, sofi100, convgru, convlstm")
    name, window = m.group(1), m.group(2)
    if window is not None and int(window) < 1:
        raise ValueError(f"bad engine window in {spec!r}")
    info = ENGINES.get(name)
    return ScoredEngine(spec, name, int(window) if window else None, info is not None and info.stateful)


# --------------------------------------------------------------------------- running engines
@dataclass
class EngineRun:
    """Per-engine state and per-sample results collected during the run."""

    spec: ScoredEngine
    engine: Any = None
    status: str = "ok"
    n_input: int = 0  # frames fed per sample
    note: str = ""  # e.g. "legacy weights"
    samples: list[dict[str, Any]] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    examples: dict[str, np.ndarray] = field(default_factory=dict)


def _load(spec: ScoredEngine, cfg: EvaluationConfig) -> EngineRun:
    run = EngineRun(spec)
    run.engine, problem = load_engine_for_scoring(spec.engine, device=cfg.device, window=spec.window,
                                                  weights=cfg.weights.get(spec.engine))
    if run.engine is None:
        run.status = problem
        return run
    if getattr(run.engine, "legacy", False):
        run.note = "legacy weights: trained towards the old target, output not in ADU^2"
    window = int(run.engine.window)
    # a network sees every frame of the sample (a stateful one warms up on them); an engine
    # computed from the data alone exactly its window
    learned = spec.engine not in ENGINES or ENGINES[spec.engine].needs_weights
    run.n_input = max(window, cfg.frames) if learned else window
    return run


def _run_engine(run: EngineRun, movie: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """One output for this sample and the time(s) it took, in ms."""
    frames = movie[: run.n_input]
    eng = run.engine
    if not run.spec.streaming:
        t0 = time.perf_counter()
        out = eng.reconstruct(frames)
        return np.asarray(out, dtype=np.float32), [(time.perf_counter() - t0) * 1e3]
    eng.reset()
    out, times = None, []
    for frame in frames:
        t0 = time.perf_counter()
        res = eng.push(frame)
        dt = (time.perf_counter() - t0) * 1e3
        if res is not None:  # warm-up pushes return None and are not outputs
            out = res
            times.append(dt)
    if out is None:
        raise RuntimeError(f"{run.spec.label} gave no output after {len(frames)} frames")
    return np.asarray(out, dtype=np.float32), times


def _crop(img: np.ndarray) -> np.ndarray:
    b = SCORE_BORDER
    return img[b:-b, b:-b]


def score(out: np.ndarray, gt: np.ndarray, pixel_nm: float, twin_out: np.ndarray | None
          ) -> dict[str, float]:
    """All metrics of one output: against the ground truth, or on a zero-target scene (given
    the engine's output `twin_out` on its blinking twin) the relative output level."""
    if twin_out is not None:
        ref = float(_crop(twin_out).mean())
        return {"level": float(_crop(out).mean() / ref) if ref > 0 else float("nan")}
    s = evaluate_image(out, gt, pixel_nm)
    s["invented"] = invented_structure(out, gt, border=SCORE_BORDER)
    return s


def evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    """Run the whole evaluation and return the results dict (also what goes into the JSON)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(cfg.threads)
    with threadpool_limits(cfg.threads, user_api="blas"):  # numpy's BLAS in the simulator too
        return _evaluate(cfg)


def _evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    specs = [parse_scored_engine(s) for s in cfg.engines]
    runs = [_load(s, cfg) for s in specs]
    n_frames = max([cfg.frames] + [r.n_input for r in runs if r.status == "ok"])
    wide = EngineRun(ScoredEngine(WIDEFIELD, WIDEFIELD, cfg.frames, False), n_input=cfg.frames)
    examples_gt: dict[str, np.ndarray] = {}
    scenes_meta: list[dict[str, Any]] = []
    scenes = tqdm(cfg.scenes(), total=cfg.n_scenes(), desc="evaluate", unit="scene",
                  disable=not cfg.progress, file=sys.stderr)
    for sc in scenes:
        scene = BlinkingScene(sc["cfg"])
        head = scene.frames(cfg.frames)
        gt = scene.expected_cumulant(window=cfg.frames)  # at the networks' output frame
        movie = np.concatenate([head, scene.frames(n_frames - cfg.frames)]) \
            if n_frames > cfg.frames else head
        pixel_nm = sc["cfg"].pixel_nm / 2.0  # scores are on the 2x output grid
        twin = BlinkingScene(sc["twin"]).frames(n_frames) if sc["twin"] is not None else None
        key = f"{sc['set']}:{sc['cls']}"
        meta = {"set": sc["set"], "class": sc["cls"], "seed": sc["seed"],
                "structure": sc["cfg"].structure, "fwhm_nm": sc["cfg"].fwhm_nm,
                "gt_resolution_nm": (decorrelation_resolution(gt, pixel_nm)
                                     if twin is None else None)}
        scenes_meta.append(meta)
        first = key not in examples_gt
        if first:
            examples_gt[key] = gt
        mean_img = movie[: cfg.frames].astype(np.float32).mean(axis=0)
        if twin is None:  # the mean of a static sample shows it: no "level" to score
            wide.samples.append({**meta, **score(mean_img, gt, pixel_nm, None)})
        if first:
            wide.examples[key] = mean_img
        for run in runs:
            if run.status != "ok":
                continue
            try:
                out, times = _run_engine(run, movie)
                if out.shape != gt.shape:  # contract: (2H, 2W); never rescale a wrong output silently
                    raise ValueError(f"output shape {out.shape}, expected {gt.shape}")
                twin_out = _run_engine(run, twin)[0] if twin is not None else None
                scores = score(out, gt, pixel_nm, twin_out)
            except Exception as exc:  # one crashing engine must not lose the others' results
                run.status = f"error: {exception_reason(exc)}"
                continue
            run.samples.append({**meta, **scores})
            run.times_ms.extend(times)
            if first:
                run.examples[key] = out

    all_runs = [wide] + runs
    results = {
        "config": _config_dict(cfg),
        "ground_truth": "expected second-order cumulant (ADU^2) at frame "
                        f"{cfg.frames - 1}, BlinkingScene.expected_cumulant",
        "scenes": scenes_meta,
        "engines": [_engine_row(r) for r in all_runs],
        "summary": summarise(all_runs, cfg),
    }
    results["_examples"] = {"gt": examples_gt, "runs": all_runs}
    return results


# --------------------------------------------------------------------------- summaries
def _mean_std(values: Sequence[float | None]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _engine_row(run: EngineRun) -> dict[str, Any]:
    return {
        "engine": run.spec.label,
        "status": run.status,
        "note": run.note,
        "frames": run.n_input,
        "mode": "stream" if run.spec.streaming else "stack",
        "n": len(run.samples),
        "time_ms_median": float(np.median(run.times_ms)) if run.times_ms else float("nan"),
        "samples": run.samples,
    }


def summarise(runs: list[EngineRun], cfg: EvaluationConfig) -> list[dict[str, Any]]:
    """One row per (set, class or 'all', engine): mean ± std of every metric."""
    rows = []
    for set_name in [s for s in SETS if s in cfg.sets]:
        keys = ("level",) if set_name == "zero" else METRICS
        classes = ZERO_KINDS if set_name == "zero" else (
            cfg.classes if set_name == "thesis" else ())
        for cls in (*classes, "all"):
            for run in runs:
                samples = [s for s in run.samples if s["set"] == set_name
                           and (cls == "all" or s["class"] == cls)]
                if not samples:  # (the mean image has no level on zero-target scenes)
                    if run.status != "ok" and cls == "all":
                        rows.append({"set": set_name, "class": cls, "engine": run.spec.label,
                                     "status": run.status, "n": 0})
                    continue
                row = {"set": set_name, "class": cls, "engine": run.spec.label,
                       "status": run.status, "n": len(samples)}
                for k in keys:
                    row[k] = _mean_std([s.get(k) for s in samples])
                rows.append(row)
    return rows


def _config_dict(cfg: EvaluationConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    for k in ("engines", "sets", "classes"):
        d[k] = list(getattr(cfg, k))
    return d


# --------------------------------------------------------------------------- output
def _fmt(ms: dict[str, float] | None, digits: int, pct: bool = False) -> str:
    if not ms or not ms["n"]:
        return "-"
    f = 100.0 if pct else 1.0
    return f"{ms['mean'] * f:.{digits}f}"


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max([len(h)] + [len(row[k]) for row in lines]) for k, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    return out


def format_table(results: dict[str, Any]) -> str:
    """The terminal tables: per set, one row per engine (means over the scenes)."""
    cfg = results["config"]
    summ = results["summary"]
    rows_by = {(r["set"], r["class"], r["engine"]): r for r in summ}
    engines = [e["engine"] for e in results["engines"]]
    status = {e["engine"]: e for e in results["engines"]}
    out: list[str] = []

    def label(e: str) -> str:
        st = status[e]
        extra = "" if st["status"] == "ok" else f" ({st['status']})"
        return e + (" [legacy]" if st.get("note") else "") + extra

    for set_name in cfg["sets"]:
        if set_name == "zero":
            head = ["engine"] + [f"level {k}" for k in ZERO_KINDS] + ["level all"]
            lines = []
            for e in engines:
                if e == WIDEFIELD:
                    continue
                r = [rows_by.get(("zero", k, e)) for k in (*ZERO_KINDS, "all")]
                lines.append([label(e)] + [_fmt(x.get("level") if x else None, 3) for x in r])
            out += ["zero-target scenes (static / empty / flicker): mean output over the same "
                    "engine's on the blinking twin (0 = invents nothing)"] + _table(head, lines)
        else:
            classes = list(cfg["classes"]) if set_name == "thesis" else []
            head = (["engine"] + [f"r {c[:8]}" for c in classes]
                    + ["r all", "invented %", "resolution nm", "TPR", "TNR", "ms/out"])
            lines = []
            for e in engines:
                a = rows_by.get((set_name, "all", e))
                if a is None:
                    continue
                if not a["n"]:
                    lines.append([label(e)] + ["-"] * (len(head) - 1))
                    continue
                per = [_fmt((rows_by.get((set_name, c, e)) or {}).get("pearson"), 3) for c in classes]
                ms = status[e]["time_ms_median"]
                lines.append([label(e)] + per + [
                    _fmt(a["pearson"], 3), _fmt(a["invented"], 1, pct=True),
                    _fmt(a["resolution_nm"], 0), _fmt(a["tpr"], 2), _fmt(a["tnr"], 2),
                    "-" if not math.isfinite(ms) else f"{ms:.1f}"])
            title = ("thesis SNR (40-120 photons, on-ratio 0.4-2 %, PSF 200-260 nm), Pearson per class"
                     if set_name == "thesis" else "wide training domain")
            out += [f"{title}:"] + _table(head, lines)
        out.append("")
    notes = [f"{e['engine']}: {e['note']}" for e in results["engines"] if e.get("note")]
    out += [f"note: {n}" for n in notes]
    n_sc = len(results["scenes"])
    out.append(f"ground truth: {results['ground_truth']}; {n_sc} scenes, {cfg['size']} px, "
               f"networks and mean on {cfg['frames']} frames")
    return "\n".join(out)


def _write_csv(path: Path, results: dict[str, Any]) -> None:
    keys = METRICS + ("level",)
    cols = ["set", "class", "engine", "status", "n"]
    for k in keys:
        cols += [f"{k}_mean", f"{k}_std"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in results["summary"]:
            vals = [row["set"], row["class"], row["engine"], row["status"], row["n"]]
            for k in keys:
                ms = row.get(k)
                vals += [ms["mean"], ms["std"]] if ms else ["", ""]
            w.writerow(vals)


def _write_figure(path: Path, results: dict[str, Any]) -> None:
    """First scene of each class: ground truth, mean, SOFI and the networks, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gts: dict[str, np.ndarray] = results["_examples"]["gt"]
    runs: list[EngineRun] = [r for r in results["_examples"]["runs"] if r.examples]
    keys = list(gts)
    cols = [("ground truth", gts)] + [(r.spec.label if r.spec.label != WIDEFIELD
                                      else f"mean of {r.n_input}", r.examples) for r in runs]
    nrow, ncol = len(keys), len(cols)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.9 * ncol, 2.0 * nrow), squeeze=False)
    for c, (title, imgs) in enumerate(cols):
        for r, key in enumerate(keys):
            ax = axes[r][c]
            ax.set_axis_off()
            img = imgs.get(key)
            if img is None:
                continue
            lo, hi = np.percentile(img, [1, 99.7])
            ax.imshow(img, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(f"{title}\n{key}" if r == 0 or c == 0 else key, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> null, so the file is strict JSON that any tool can read."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_outputs(results: dict[str, Any], out: Path, figure: bool = True) -> dict[str, Path]:
    """results.json (all numbers, per-sample too), results.csv (summary), examples.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    if figure:
        paths["png"] = out / "examples.png"
        _write_figure(paths["png"], results)
        results["figure"] = str(paths["png"])
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    paths["json"].write_text(json.dumps(_json_safe(clean), indent=2, allow_nan=False) + "\n")
    _write_csv(paths["csv"], results)
    return paths


# --------------------------------------------------------------------------- CLI
def _names(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())




def run_cli(flags: dict[str, Any]) -> int:
    """`livesr evaluate` (realtime/cli_tools.py): flags not given keep EvaluationConfig's defaults."""
    given = {k: v for k, v in flags.items() if v is not None}
    for k in ("engines", "sets", "classes"):
        if k in given:
            given[k] = _names(given[k])
    try:
        weights = dict(parse_weights_arg(w) for w in given.pop("weights", None) or ())
        cfg = EvaluationConfig(**{k: v for k, v in given.items() if k not in ("no_figure", "quiet")},
                               weights=weights, figure=not given["no_figure"], progress=not given["quiet"])
    except ValueError as exc:
        print(f"livesr evaluate: error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(cfg)
    paths = write_outputs(results, cfg.out, figure=cfg.figure)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    ok = any(r["status"] == "ok" and r["n"] for r in results["engines"] if r["engine"] != WIDEFIELD)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engines.evaluation ARGS` = `livesr evaluate ARGS` (``--real``: the real-data suite)."""
    from realtime.cli import main as livesr

    return livesr(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
