"""`livesr evaluate`: score every engine on a held-out simulated set (thesis ch. 5, app. B).

Why a fixed, seeded set: the numbers in the model card, the README and a reviewer's rerun
must be the same numbers. Scenes use seeds >= 10**9 (training uses seeds < 10**6), so no
evaluation scene was ever seen in training. All engines see the same static scenes and are
scored against the same ground truth; SOFI is run at 20, 100 and 500 frames because its
quality depends on the number of frames while the networks use a 20-frame window.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from acquisition.simulation import BlinkingScene, SimulationConfig
from engines.metrics import decorrelation_resolution, evaluate_image

EVAL_SEED_BASE = 10**9  # training seeds are < 10**6: disjoint by construction
SEEDS_PER_BASE_SEED = 10**5  # sample i of --seed s uses 10**9 + s * 10**5 + i
METRICS = ("pearson", "resolution_nm", "tpr", "tnr")
DEFAULT_ENGINES = ("sofi20", "sofi100", "sofi500", "convgru", "convlstm")
STREAMING_ENGINES = {"convlstm"}  # scored as in live use: every frame pushed, last output kept
SCORE_BORDER = 3  # evaluate_image's default max_shift: the border left out of the scores
WIDEFIELD = "widefield"  # mean of the first --frames frames: the diffraction-limited baseline


@dataclass
class EvaluationConfig:
    """One evaluation run; the defaults finish in a few minutes on two CPU cores."""

    size: int = 64
    frames: int = 20  # frames given to the neural engines (and averaged for the widefield row)
    n: int = 50
    seed: int = 1234
    engines: tuple[str, ...] = DEFAULT_ENGINES
    structure: str = "filaments"  # "filaments" | "mitochondria" | "both" (alternating)
    out: Path = Path("runs/evaluate")
    device: str = "cpu"
    figure: bool = True
    progress: bool = True
    # a scene counts only if this fraction of its ground truth (inside the scored border) is
    # structure (> 0.1 of max): a field of view a filament merely grazes measures nothing
    min_structure: float = 0.005
    sim: dict[str, Any] = field(default_factory=dict)  # extra SimulationConfig overrides

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 1 <= self.n <= SEEDS_PER_BASE_SEED:
            raise ValueError(f"n must be in 1..{SEEDS_PER_BASE_SEED}, got {self.n}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.structure not in ("filaments", "mitochondria", "both"):
            raise ValueError(f"structure must be filaments, mitochondria or both, got {self.structure!r}")
        if not 0.0 <= self.min_structure < 1.0:
            raise ValueError(f"min_structure must be in [0, 1), got {self.min_structure}")
        if not self.engines:
            raise ValueError("no engines to evaluate")
        for spec in self.engines:
            parse_engine_spec(spec)
        self.out = Path(self.out)

    def scene_seed(self, k: int) -> int:
        """Seed of candidate scene k (candidates without structure in view are skipped)."""
        return EVAL_SEED_BASE + self.seed * SEEDS_PER_BASE_SEED + k

    def scene_config(self, k: int) -> SimulationConfig:
        structure = self.structure
        if structure == "both":
            structure = "filaments" if k % 2 == 0 else "mitochondria"
        return SimulationConfig(size=self.size, structure=structure, seed=self.scene_seed(k), **self.sim)

    def scenes(self) -> Iterator[tuple[int, BlinkingScene]]:
        """The held-out set: the first `n` candidate scenes with structure in view, in order."""
        used = 0
        for k in range(SEEDS_PER_BASE_SEED):
            scene = BlinkingScene(self.scene_config(k))
            gt = scene.ground_truth()[SCORE_BORDER:-SCORE_BORDER, SCORE_BORDER:-SCORE_BORDER]
            if float(np.mean(gt > 0.1)) < self.min_structure:
                continue
            yield k, scene
            used += 1
            if used == self.n:
                return
        raise RuntimeError(f"fewer than {self.n} scenes with structure among {SEEDS_PER_BASE_SEED} seeds")


@dataclass(frozen=True)
class EngineSpec:
    """A row of the table: which engine, its window, and how it is driven."""

    label: str  # "sofi100", "convgru"
    engine: str  # name for load_engine
    window: int | None  # None: the engine's default
    streaming: bool


def parse_engine_spec(spec: str) -> EngineSpec:
    """'sofi100' -> SOFI with a 100-frame window; 'convlstm' -> streamed; other names as they are."""
    spec = spec.strip().lower()
    m = re.fullmatch(r"([a-z_]+?)(\d+)?", spec)
    if m is None or not spec:
        raise ValueError(f"bad engine name {spec!r}: use e.g. sofi20, sofi100, convgru, convlstm")
    name, window = m.group(1), m.group(2)
    if window is not None and int(window) < 1:
        raise ValueError(f"bad engine window in {spec!r}")
    return EngineSpec(spec, name, int(window) if window else None, name in STREAMING_ENGINES)


# --------------------------------------------------------------------------- running engines
@dataclass
class EngineRun:
    """Per-engine state and per-sample results collected during the run."""

    spec: EngineSpec
    engine: Any = None
    status: str = "ok"
    n_input: int = 0  # frames fed per sample
    samples: list[dict[str, float]] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    examples: list[np.ndarray] = field(default_factory=list)


def _load(spec: EngineSpec, cfg: EvaluationConfig) -> EngineRun:
    run = EngineRun(spec)
    try:
        from engines import load_engine  # torch is imported only when an engine is needed

        kwargs: dict[str, Any] = {"device": cfg.device}
        if spec.window is not None:
            kwargs["window"] = spec.window
        run.engine = load_engine(spec.engine, **kwargs)
    except Exception as exc:  # missing weights, unknown engine, no CUDA: report and go on
        run.status = f"unavailable: {_reason(exc)}"
        return run
    window = int(run.engine.window)
    run.n_input = max(window, cfg.frames) if spec.engine != "sofi" else window
    return run


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    """Run the whole evaluation and return the results dict (also what goes into the JSON)."""
    specs = [parse_engine_spec(s) for s in cfg.engines]
    runs = [_load(s, cfg) for s in specs]
    n_frames = max([cfg.frames] + [r.n_input for r in runs if r.status == "ok"])
    wide = EngineRun(EngineSpec(WIDEFIELD, WIDEFIELD, cfg.frames, False), n_input=cfg.frames)
    gt_res: list[float] = []
    examples_gt: list[np.ndarray] = []
    n_examples = min(2, cfg.n)
    fwhm_nm = cfg.scene_config(0).fwhm_nm
    gt_pixel_nm = cfg.scene_config(0).pixel_nm / 2.0  # scores are on the 2x output grid

    used_seeds: list[int] = []
    scenes = tqdm(cfg.scenes(), total=cfg.n, desc="evaluate", unit="scene", disable=not cfg.progress, file=sys.stderr)
    for i, (k, scene) in enumerate(scenes):
        used_seeds.append(cfg.scene_seed(k))
        movie = scene.frames(n_frames)
        gt = scene.ground_truth()
        gt_res.append(decorrelation_resolution(gt, gt_pixel_nm))
        mean_img = movie[: cfg.frames].astype(np.float32).mean(axis=0)
        wide.samples.append(evaluate_image(mean_img, gt, gt_pixel_nm))
        if i < n_examples:
            examples_gt.append(gt)
            wide.examples.append(mean_img)
        for run in runs:
            if run.status != "ok":
                continue
            try:
                out, times = _run_engine(run, movie)
                if out.shape != gt.shape:  # contract: (2H, 2W); never rescale a wrong output silently
                    raise ValueError(f"output shape {out.shape}, expected {gt.shape}")
                scores = evaluate_image(out, gt, gt_pixel_nm)
            except Exception as exc:  # one crashing engine must not lose the others' results
                run.status = f"error: {_reason(exc)}"
                continue
            run.samples.append(scores)
            run.times_ms.extend(times)
            if i < n_examples:
                run.examples.append(out)

    rows = [_summarise(wide)] + [_summarise(r) for r in runs]
    results = {
        "config": _config_dict(cfg),
        "scene_seeds": used_seeds,
        "skipped_seeds": sorted(set(range(cfg.scene_seed(0), used_seeds[-1] + 1)) - set(used_seeds)),
        "reference": {
            "fwhm_nm": fwhm_nm,
            "half_diffraction_limit_nm": fwhm_nm / 2.0,
            "ground_truth_resolution_nm": _mean_std(gt_res),
            "output_pixel_nm": gt_pixel_nm,
        },
        "engines": rows,
    }
    results["_examples"] = {"gt": examples_gt, "runs": [wide] + runs}
    return results


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _summarise(run: EngineRun) -> dict[str, Any]:
    row: dict[str, Any] = {
        "engine": run.spec.label,
        "status": run.status,
        "frames": run.n_input,
        "n": len(run.samples),
        "mode": "stream" if run.spec.streaming else "stack",
    }
    for key in METRICS:
        row[key] = _mean_std([s[key] for s in run.samples])
    row["time_ms_median"] = float(np.median(run.times_ms)) if run.times_ms else float("nan")
    row["samples"] = run.samples
    return row


def _config_dict(cfg: EvaluationConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    d["engines"] = list(cfg.engines)
    return d


# --------------------------------------------------------------------------- output
def _fmt(ms: dict[str, float], digits: int) -> str:
    if not ms["n"]:
        return "-"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """The terminal table: one row per engine, mean ± std over the scenes."""
    head = ["engine", "frames", "Pearson", "resolution [nm]", "TPR", "TNR", "ms/output"]
    lines = []
    for row in results["engines"]:
        if row["status"] != "ok" and not row["n"]:
            lines.append([row["engine"], "-", row["status"], "", "", "", ""])
            continue
        ms = row["time_ms_median"]
        res = _fmt(row["resolution_nm"], 1)
        if row["resolution_nm"]["n"] < row["n"]:  # some outputs had no measurable cut-off
            res += f" ({row['resolution_nm']['n']}/{row['n']})"
        lines.append([
            row["engine"] + ("" if row["status"] == "ok" else f" ({row['status']})"),
            str(row["frames"]),
            _fmt(row["pearson"], 3),
            res,
            _fmt(row["tpr"], 3),
            _fmt(row["tnr"], 3),
            "-" if not math.isfinite(ms) else f"{ms:.1f}",
        ])
    widths = [max([len(h)] + [len(l[k]) for l in lines if len(l[k]) < 60]) for k, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    ref = results["reference"]
    gtr = ref["ground_truth_resolution_nm"]
    out.append("")
    out.append(
        f"reference: PSF FWHM {ref['fwhm_nm']:.0f} nm, half the diffraction limit (2nd-order SOFI) "
        f"{ref['half_diffraction_limit_nm']:.0f} nm, ground truth measures {_fmt(gtr, 1)} nm; "
        f"{len(results['scene_seeds'])} scenes, seeds {results['scene_seeds'][0]}..{results['scene_seeds'][-1]}"
        f" ({len(results['skipped_seeds'])} without structure in view skipped)"
    )
    return "\n".join(out)


def _write_csv(path: Path, results: dict[str, Any]) -> None:
    cols = ["engine", "status", "frames", "mode", "n"]
    for key in METRICS:
        cols += [f"{key}_mean", f"{key}_std"]
    cols.append("time_ms_median")
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in results["engines"]:
            vals = [row["engine"], row["status"], row["frames"], row["mode"], row["n"]]
            for key in METRICS:
                vals += [row[key]["mean"], row[key]["std"]]
            vals.append(row["time_ms_median"])
            w.writerow(vals)


def _write_figure(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gts: list[np.ndarray] = results["_examples"]["gt"]
    runs: list[EngineRun] = [r for r in results["_examples"]["runs"] if r.examples]
    cols = [("ground truth", gts, None)] + [
        (r.spec.label if r.spec.label != WIDEFIELD else f"mean of {r.n_input} frames", r.examples, r.samples)
        for r in runs
    ]
    nrow, ncol = len(gts), len(cols)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.6 * nrow), squeeze=False)
    for c, (title, imgs, samples) in enumerate(cols):
        for r in range(nrow):
            ax = axes[r][c]
            ax.set_axis_off()
            if r >= len(imgs):
                continue
            img = imgs[r]
            lo, hi = np.percentile(img, [1, 99.7])
            ax.imshow(img, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
            label = title
            if samples is not None and r < len(samples):
                s = samples[r]
                label += f"\nr={s['pearson']:.2f}, {s['resolution_nm']:.0f} nm"
            ax.set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
def build_parser() -> argparse.ArgumentParser:
    d = EvaluationConfig()
    p = argparse.ArgumentParser(
        prog="livesr evaluate",
        description="Score SOFI and the neural engines on a held-out simulated set "
        "(Pearson, decorrelation resolution, Li-thresholded TPR/TNR, time per output).",
    )
    p.add_argument("--size", type=int, default=d.size, help="scene size in camera pixels (default %(default)s)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames for the neural engines (default %(default)s)")
    p.add_argument("--n", type=int, default=d.n, help="number of scenes (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of the held-out set (default %(default)s)")
    p.add_argument("--engines", default=",".join(d.engines),
                   help="comma-separated; sofiN = SOFI on N frames (default %(default)s)")
    p.add_argument("--structure", choices=["filaments", "mitochondria", "both"], default=d.structure)
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG of example reconstructions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = EvaluationConfig(
            size=args.size, frames=args.frames, n=args.n, seed=args.seed,
            engines=tuple(e for e in args.engines.split(",") if e.strip()),
            structure=args.structure, out=args.out, device=args.device,
            figure=not args.no_figure, progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"livesr evaluate: error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(cfg)
    paths = write_outputs(results, cfg.out, figure=cfg.figure)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    ok = any(r["status"] == "ok" and r["n"] for r in results["engines"] if r["engine"] != WIDEFIELD)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
