"""Issue 11's "done when": fine-tuning on a simulated fixed sample of a class no network has
seen raises held-out agreement with the long-window SOFI, and the live engine shows it.

    python -m benchmarks.finetune_check --from-convgru W.pt [--model convgru] [--minutes 6]
                                        [--out-dir finetune_check] [--results FILE.json]

1. Simulates a static honeycomb (``acquisition.structures.VALIDATION_STRUCTURES``: never in
   the training mix) of 1000 frames at 128 x 128 and writes it through the Recorder, so its
   metadata (pixel size, frame interval) reach fine-tuning as a real recording's would.
2. Runs ``livesr finetune`` on it on this CPU (wall-clock timed, whole command).
3. Cuts the held-out part out of the recording (the region the weights file's provenance
   names), records it the same way and replays it through the live pipeline
   (``livesr replay --headless --save-sr``) with the base and with the new weights.
4. Scores every super-resolved image the live engine produced against the SOFI of all frames
   of the held-out part (Pearson, border left out, as fine-tuning scores itself): medians.

Writes into ``--out-dir`` (default ./finetune_check), and the numbers into ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.registry import DEFAULT_NETWORK, neural_engines

HERE = Path(__file__).resolve().parents[1]
SCENE: dict[str, Any] = dict(size=128, structure="honeycomb", photons=200.0, background=20.0, on_ms=10.0,
             off_ms=1000.0, emitters_per_um=40.0, bleach_s=0.3, seed=11)
FRAMES = 1000


def simulate(path: Path) -> Path:
    from acquisition.recordings import write_recording
    from acquisition.simulation import BlinkingScene, SimulationConfig

    cfg = SimulationConfig(**SCENE)
    return write_recording(path, BlinkingScene(cfg).frames(FRAMES), pixel_size_um=cfg.pixel_nm / 1000,
                           fps=cfg.fps, camera="SimulatedCamera", overwrite=True,
                           settings={"simulation": {k: str(v) for k, v in SCENE.items()}})


def livesr(*argv: str, log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "realtime.cli", *argv], cwd=HERE,
                            stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return rc, time.perf_counter() - t


def replay_scores(heldout: Path, target: np.ndarray, model: str, weights: Path, out_dir: Path,
                  label: str, fps: float) -> dict[str, Any]:
    """The live pipeline on the held-out movie; every SR image scored against the target."""
    import tifffile

    from engines.finetune_report import score

    sr, js = out_dir / f"sr_{label}.ome.tif", out_dir / f"replay_{label}.json"
    rc, wall = livesr("replay", str(heldout), "--headless", "--engine", model, "--weights",
                      str(weights), "--fps", f"{fps:g}", "--threads", "1", "--save-sr", str(sr),
                      "--json", str(js), "--overwrite", log=out_dir / f"replay_{label}.log")
    if rc != 0 or not sr.is_file():
        return {"status": f"replay failed (exit {rc}); see {out_dir / f'replay_{label}.log'}"}
    images = tifffile.imread(sr)
    images = images[None] if images.ndim == 2 else images
    r = [score(img.astype(np.float32), target) for img in images]
    metrics = json.loads(js.read_text())
    return {"status": "ok", "outputs": len(r), "pearson_median": round(float(np.median(r)), 4),
            "pearson_p10_p90": [round(float(np.percentile(r, q)), 4) for q in (10, 90)],
            "frames_acquired": metrics.get("frames_acquired"),
            "latency_ms_p50": (metrics.get("latency_ms") or {}).get("p50"),
            "weights_note": (metrics.get("engine_info") or {}).get("weights_note"),
            "seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_check", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(neural_engines()), default=DEFAULT_NETWORK)
    p.add_argument("--from", dest="base", type=Path, required=True, help="base weights (copy of the newest)")
    p.add_argument("--minutes", type=float, default=6.0, help="fine-tuning training budget")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--replay-fps", type=float, default=50.0)
    p.add_argument("--out-dir", type=Path, default=Path("finetune_check"))
    p.add_argument("--results", type=Path, default=None, help="write the numbers here (JSON)")
    args = p.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rec = simulate(out / "honeycomb_1000f.ome.tif")
    new = out / f"{args.model}_honeycomb.pt"
    rc, ft_wall = livesr("finetune", str(rec), "--model", args.model, "--from", str(args.base),
                         "--out", str(new), "--minutes", f"{args.minutes:g}", "--steps",
                         str(args.steps), "--patch", str(args.patch), "--threads", "1",
                         log=out / "finetune.log")
    if rc != 0:
        print(f"finetune failed (exit {rc}); see {out / 'finetune.log'}", file=sys.stderr)
        return 1
    report = json.loads(new.with_suffix(".report.json").read_text())

    from acquisition.recordings import read_recording, write_recording
    from engines.finetune_data import long_sofi
    from realtime.config import SofiOptions

    src = read_recording(rec)
    region = report["provenance"]["recordings"][0]["held_out_region"]
    crop = src.frames[:, region["y0"]:region["y1"], region["x0"]:region["x1"]]
    heldout = write_recording(out / "heldout.ome.tif", crop, pixel_size_um=src.pixel_size_um,
                              fps=src.fps, camera="SimulatedCamera", overwrite=True)
    opts = SofiOptions().engine_options(src.pixel_size_um, "from file metadata")
    target, _ = long_sofi(crop.astype(np.float32), opts)
    live = {label: replay_scores(heldout, target, args.model, w, out, label, args.replay_fps)
            for label, w in (("base", args.base), ("new", new))}
    results = {
        "what": "issue 11 done-when: fine-tuning on a simulated fixed honeycomb (a class outside "
                "the training mix), 1000 frames of 128x128, held-out agreement with the SOFI of all "
                "frames; then the live pipeline (livesr replay) on the held-out part",
        "scene": SCENE, "frames": FRAMES, "model": args.model, "base_weights": str(args.base),
        "finetune_wall_s": round(ft_wall, 1), "finetune_report": {k: report[k] for k in (
            "before", "after", "gain", "live_sofi20", "static_twin_level", "steps",
            "train_seconds", "total_seconds", "forgetting_check")},
        "live_replay": live,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }
    text = json.dumps(results, indent=2) + "\n"
    (out / "results.json").write_text(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
    r = results["finetune_report"]
    print(f"livesr finetune ({ft_wall / 60:.1f} min wall, {r['steps']} steps): held-out agreement "
          f"{r['before']:.3f} -> {r['after']:.3f} ({r['gain']:+.3f}); live SOFI-20 {r['live_sofi20']:.3f}")
    for label, v in live.items():
        if v["status"] == "ok":
            print(f"live replay, {label} weights: median Pearson {v['pearson_median']:.3f} over "
                  f"{v['outputs']} outputs (p10-p90 {v['pearson_p10_p90']})")
        else:
            print(f"live replay, {label} weights: {v['status']}")
    print(f"wrote {out / 'results.json'}" + (f" and {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
