"""How well can any engine that sees N frames agree with what a long acquisition shows?

    python -m benchmarks.information_ceiling [--n 4] [--windows 20,100,500]
                                             [--results runs/evaluate/results.csv] [--out DIR]

On the held-out scenes of `livesr evaluate` (same seeds, same classes), for each static scene
and window N it scores `BlinkingScene.oracle_cumulant(N)` against the target
(`expected_cumulant`, what infinitely many frames show) with the evaluation's own Pearson
(`engines.metrics.pearson`, the Pearson `evaluate_image` reports). The oracle knows every emitter's true on/off state in
those N frames and sees no photon or camera noise: it is SOFI of N perfect frames. An engine
limited to the data of N frames cannot know an emitter that did not switch in them, so its
Pearson lies near or below this ceiling; a score above it can only come from a learned prior,
which is what draws structure the data do not show. Engines are compared on the thesis set
only (evaluate's wide set also holds moving scenes, which have no oracle). ``detect-N`` is a stronger oracle: every
emitter that switched in the window, drawn with its true expected weight (it knows each
emitter's rates), i.e. the best a perfect detector of switching emitters could draw. With ``--results`` (an evaluation's
results.csv) each engine's Pearson is printed next to the ceiling of its window, and as a
share of it.

Prints a table; with ``--out`` also writes ``information_ceiling.json`` there, and with
``--results`` a bar chart ``information_ceiling.png`` (per thesis class: the ceiling-20 and
each 20-frame engine's Pearson).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from acquisition.simulation import BlinkingScene
from engines.evaluation import EvaluationConfig, parse_scored_engine
from engines.metrics import pearson


def engine_window(label: str) -> int:
    """Frames an evaluated row sees in `livesr evaluate`: N for a windowed row ('sofi100'),
    else the evaluation's --frames (the networks and the widefield mean)."""
    return parse_scored_engine(label).window or EvaluationConfig.frames


def ceiling_scores(cfg: EvaluationConfig, windows: Sequence[int]) -> list[dict]:
    """One row per (static) scene: set, class, seed and the oracle Pearson for each window."""
    rows = []
    scenes = [s for s in cfg.scenes() if s["set"] != "zero"]
    for sc in tqdm(scenes, desc="oracle", file=sys.stderr):
        sim = sc["cfg"]
        if sim.moves or "diffusing" in sim.structure:
            continue  # the oracle needs a static scene (moving ones blur any long window)
        row = {"set": sc["set"], "class": sc["cls"], "seed": sc["seed"]}
        for n in windows:
            for key, known in (("ceiling", False), ("detect", True)):
                scene = BlinkingScene(sim)
                oracle = scene.oracle_cumulant(n, known_rates=known)
                gt = scene.expected_cumulant()
                row[f"{key}{n}"] = pearson(oracle, gt)
        rows.append(row)
    return rows


def engine_pearson(results_csv: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(set, class) -> {engine: mean Pearson} from an evaluation's results.csv."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    with open(results_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok" and r["pearson_mean"]:
                out[(r["set"], r["class"])][r["engine"]] = float(r["pearson_mean"])
    return out


def summary(rows: list[dict], windows: Sequence[int]) -> dict[str, dict[str, float]]:
    """(set/class and set/all) -> mean ceiling per window, with the scene count."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[f"{r['set']}/{r['class']}"].append(r)
        groups[f"{r['set']}/all"].append(r)
    return {g: {"n": len(rs), **{f"{k}{n}": float(np.mean([r[f'{k}{n}'] for r in rs]))
                                 for n in windows for k in ("ceiling", "detect")}}
            for g, rs in sorted(groups.items())}


def format_table(summ: dict[str, dict[str, float]], windows: Sequence[int],
                 engines: dict[tuple[str, str], dict[str, float]] | None) -> str:
    head = ["set/class", "n"] + [f"{k}-{n}" for n in windows for k in ("ceiling", "detect")]
    seen = {e for d in (engines or {}).values() for e in d}
    names = sorted(seen, key=lambda e: (engine_window(e), e))
    head += [f"{e} (share of ceiling-{engine_window(e)})" for e in names]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for g, s in summ.items():
        cells = [g, str(s["n"])] + [f"{s[f'{k}{n}']:.3f}" for n in windows
                                    for k in ("ceiling", "detect")]
        set_name, cls = g.split("/")
        if engines is not None:
            per = _thesis_row(engines, cls) if set_name == "thesis" else {}
            for e in names:
                w = engine_window(e)
                if e in per and f"ceiling{w}" in s:
                    cells.append(f"{per[e]:.3f} ({per[e] / s[f'ceiling{w}']:.0%})")
                else:
                    cells.append("—")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _thesis_row(engines: dict[tuple[str, str], dict[str, float]], cls: str) -> dict[str, float]:
    """{engine: Pearson} of one thesis class; for "all" the mean over the classes (each has the
    same scene count). Only the thesis set is like for like: evaluate's wide set also scores
    moving scenes, which have no oracle here."""
    if cls != "all":
        return engines.get(("thesis", cls), {})
    per: dict[str, list[float]] = defaultdict(list)
    for (s, _), d in engines.items():
        if s == "thesis":
            for e, v in d.items():
                per[e].append(v)
    return {e: float(np.mean(v)) for e, v in per.items()}


def write_figure(path: Path, summ: dict[str, dict[str, float]],
                 engines: dict[tuple[str, str], dict[str, float]]) -> None:
    """Per thesis class: ceiling-20 / detect-20 bars with each 20-frame engine next to them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in summ if g.startswith("thesis/") and g != "thesis/all"] + ["thesis/all"]
    names = sorted({e for (s, _), d in engines.items() if s == "thesis" for e in d
                    if engine_window(e) == EvaluationConfig.frames})
    series = [("ceiling-20 (perfect frames)", [summ[g]["ceiling20"] for g in groups])]
    for e in names:
        per = [_thesis_row(engines, g.split("/")[1]).get(e, np.nan) for g in groups]
        series.append((e, per))
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (label, vals) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label,
               color="0.75" if i == 0 else None, edgecolor="0.3" if i == 0 else None)
    ax.axhline(0.85, color="crimson", lw=1, ls="--", label="issue-14 target 0.85")
    ax.set_xticks(x, [g.split("/")[1] for g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Pearson with the long-acquisition target")
    ax.set_title("Thesis SNR, 20 frames: what the frames carry (grey) and what each engine draws")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.information_ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="scenes per thesis class (as evaluate)")
    p.add_argument("--n-wide", type=int, default=16, help="wide-domain scenes (as evaluate)")
    p.add_argument("--seed", type=int, default=1234, help="evaluate's --seed")
    p.add_argument("--windows", default="20,100,500", help="frames, comma-separated")
    p.add_argument("--results", type=Path, help="an evaluation's results.csv to compare with")
    p.add_argument("--out", type=Path, help="folder for information_ceiling.json")
    a = p.parse_args(argv)
    try:
        windows = [int(w) for w in a.windows.split(",") if w.strip()]
        if not windows or min(windows) < 2:
            raise ValueError(f"--windows must be integers >= 2, got {a.windows!r}")
        cfg = EvaluationConfig(n=a.n, n_wide=a.n_wide, n_zero=0, seed=a.seed,
                               sets=("thesis", "wide"), engines=("sofi20",), figure=False)
        engines = engine_pearson(a.results) if a.results else None
    except (ValueError, OSError, KeyError) as e:
        print(f"information_ceiling: {e}", file=sys.stderr)
        return 2
    rows = ceiling_scores(cfg, windows)
    summ = summary(rows, windows)
    print(format_table(summ, windows, engines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / "information_ceiling.json"
        path.write_text(json.dumps({"windows": windows, "summary": summ, "scenes": rows,
                                    "seed": a.seed}, indent=1))
        print(f"wrote {path}")
        if engines:
            fig = a.out / "information_ceiling.png"
            write_figure(fig, summ, engines)
            print(f"wrote {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
