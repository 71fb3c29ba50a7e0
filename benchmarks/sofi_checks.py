"""Is SOFI right on real cameras? The numbers behind issue 9, from the real and simulated movies.

    python -m benchmarks.sofi_checks [--data ../shared/data] [--realdata /work/realdata] [--json out.json]

Prints, for each movie that is present (absent ones are reported as unavailable):

* blinking check (``engines.assess_blinking``) on 20 / 50 / 100 frames;
* static donut: the automatic lag and the ring criterion ``ring_z`` per live 20-frame window,
  for the default engine and for the former one (zero lag, no bleaching correction);
* nucleus: ``global_share`` of the whole-movie SOFI for bleaching correction off / linear / quadratic;
* simulated filaments and every real filament movie: ``engines.metrics.sublattice_ratio`` for
  20-frame windows and for long windows, with the optics at their defaults or as given.

The criteria are defined once, here (tests/test_sofi.py uses them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parents[1]
DEFAULT_DATA = HERE.parent / "shared" / "data"
DEFAULT_REALDATA = Path("/work/realdata")


# ----------------------------------------------------------------------------- criteria
def ring_z(sr: np.ndarray, mean: np.ndarray) -> float:
    """(mean of SOFI on the ring - mean on the background) / SD of SOFI on the background.

    Ring = input pixels whose mean intensity is in the top 20 %, background = bottom 50 %;
    output pixels without a pair (last row/column) are left out. Use raw values
    (``clip_negative=False``). A ring that stands above the background noise gives z >> 1.
    """
    ring, bg = _ring_masks(mean)
    return float((sr[ring].mean() - sr[bg].mean()) / sr[bg].std())


def ring_sd_ratio(sr: np.ndarray, mean: np.ndarray) -> float:
    """SD of SOFI on the ring / SD on the background (the estimator's noise grows with intensity)."""
    ring, bg = _ring_masks(mean)
    return float(sr[ring].std() / sr[bg].std())


def _ring_masks(mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ring = np.kron(mean > np.percentile(mean, 80), np.ones((2, 2), bool))
    bg = np.kron(mean < np.percentile(mean, 50), np.ones((2, 2), bool))
    for m in (ring, bg):
        m[-1] = m[:, -1] = False
    return ring, bg


def global_share(stack: np.ndarray, order: int) -> float:
    """Fraction of SOFI's neighbour cross-cumulant on the brightest 20 % of pixels that is carried
    by the one time course the whole field shares (its frame-mean fluctuation): the bleaching trend.

    Computed on the residuals SOFI cumulates with this bleaching-correction order
    (``engines.trend.detrend``, the engine's basis). Independent blinking of many emitters gives
    about 1/(T - order - 1) (the global time course is one of T - order - 1 directions).
    """
    from engines.trend import detrend

    r = detrend(stack, order)
    m = np.asarray(stack, dtype=np.float64).mean(0)
    g = r.reshape(len(r), -1).mean(1)
    g /= np.linalg.norm(g)
    a = np.tensordot(g, r, 1)
    mh = 0.5 * (m[:, :-1] + m[:, 1:])
    bright = mh > np.percentile(mh, 80)
    cum = (r[:, :, :-1] * r[:, :, 1:]).sum(0)
    return float((a[:, :-1] * a[:, 1:])[bright].sum() / cum[bright].sum())


# ----------------------------------------------------------------------------- checks
def _read(path: Path) -> np.ndarray | None:
    if not path.exists():
        print(f"  unavailable: {path} not present")
        return None
    import tifffile

    return tifffile.imread(path)


def blinking(stack: np.ndarray, name: str) -> dict[int, dict[str, Any]]:
    from engines import assess_blinking

    out: dict[int, dict[str, Any]] = {}
    for n in sorted({min(len(stack), n) for n in (20, 50, 100)}):
        if n >= 10:
            r = assess_blinking(stack[:n])
            out[n] = {"ok": r.ok, "local_correlation": round(r.local_correlation, 3), "reason": r.reason}
            print(f"  {name} blinking check, {n} frames: ok={r.ok} local={r.local_correlation:.3f} ({r.reason})")
    return out


def donut(stack: np.ndarray) -> dict[str, Any]:
    from engines.sofi import SofiEngine

    mean = stack.astype(np.float64).mean(0)
    res: dict[str, Any] = {}
    options: tuple[tuple[str, dict[str, Any]], ...] = (
        ("default (lag auto, quadratic)", {}),
        ("former (lag 0, no bleaching correction)", {"lag": 0, "bleach_order": 0}))
    for label, kw in options:
        eng = SofiEngine(20, clip_negative=False, **kw)
        outs = [eng.reconstruct(stack[i:i + 20]) for i in range(len(stack) - 19)]
        z = np.array([ring_z(o, mean) for o in outs])
        sd = np.array([ring_sd_ratio(o, mean) for o in outs])
        z_mean = ring_z(np.mean(outs, 0), mean)
        whole = SofiEngine(len(stack), clip_negative=False, **kw)
        z_whole = ring_z(whole.reconstruct(stack), mean)
        res[label] = {"lag": eng.lag, "z_per_window_median": float(np.median(z)), "z_per_window_max": float(z.max()),
                      "z_of_window_average": z_mean, "z_whole_movie": z_whole,
                      "sd_ratio_median": float(np.median(sd))}
        print(f"  donut {label}: lag {eng.lag}; ring z per 20-frame window median {np.median(z):.2f} max {z.max():.2f} "
              f"({len(z)} windows); average of the windows z {z_mean:.2f}; whole {len(stack)}-frame movie z "
              f"{z_whole:.2f}; ring/background SOFI noise SD {np.median(sd):.2f}")
    return res


def nucleus(stack: np.ndarray) -> dict[str, Any]:
    res = {}
    for order, label in ((0, "off"), (1, "linear"), (2, "quadratic (default)")):
        res[label] = global_share(stack, order)
        alone = 1 / (len(stack) - order - 1)
        print(f"  nucleus whole-movie ({len(stack)} frames) SOFI carried by the global time course, bleaching "
              f"correction {label}: {res[label]:.3f}  (independent blinking alone: ~{alone:.3f})")
    return res


def balance(stack: np.ndarray, name: str, windows: tuple[int, ...], **engine_kw: Any) -> dict[int, dict[str, float]]:
    from engines.metrics import sublattice_ratio
    from engines.sofi import SofiEngine

    res: dict[int, dict[str, float]] = {}
    for w in windows:
        if w > len(stack):
            continue
        eng = SofiEngine(w, clip_negative=False, **engine_kw)
        starts = range(0, len(stack) - w + 1, w)
        outs = [eng.reconstruct(stack[i:i + w]) for i in starts]
        per = [sublattice_ratio(o, stack[i:i + w].mean(0)) for o, i in zip(outs, starts, strict=True)]
        avg = sublattice_ratio(np.mean(outs, 0), stack[: starts[-1] + w].mean(0))
        res[w] = {"ratio_of_window_average": avg, "per_window_median": float(np.median(per)), "windows": len(outs)}
        fits = f"; distance factors from {eng.last_fwhm_px:.2f} px ({eng.output_info()['psf_fit']})"
        print(f"  {name}, {w}-frame windows ({len(outs)}), optical PSF {eng.psf_fwhm_px:.2f} px{fits}: "
              f"sub-lattice max/min {avg:.3f} on their average, per window median {np.median(per):.3f}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared movies (default %(default)s)")
    p.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA, help="collected public movies")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    args = p.parse_args(argv)

    import torch

    from acquisition.simulation import BlinkingScene, SimulationConfig

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    print("real static donut (negative control)")
    d = _read(args.data / "real-static-donut-100f.tif")
    if d is not None:
        out["donut"] = {"blinking": blinking(d, "donut"), "sofi": donut(d)}
    print("real EMCCD nucleus (bleaching)")
    n = _read(args.data / "real-emccd-nucleus-100f.tif")
    if n is not None:
        out["nucleus"] = {"blinking": blinking(n, "nucleus"), "global_share": nucleus(n)}
    print("simulated demo and filaments (pixel-integrated 220 nm PSF, 100 nm pixels)")
    demo = BlinkingScene(SimulationConfig(size=256, seed=0)).frames(100)
    out["demo"] = {"blinking": blinking(demo, "demo 256 px")}
    sims = {}
    for seed in (1, 2):
        fr = BlinkingScene(SimulationConfig(size=128, seed=seed)).frames(600)
        for mode in ("data", "psf"):
            label = f"seed {seed}, default optics, distance_factor {mode}"
            sims[label] = balance(fr, f"sim filaments {label}", (20, 300), distance_factor=mode)
    fr = BlinkingScene(SimulationConfig(size=128, seed=1, fwhm_nm=300.0)).frames(600)
    for mode in ("data", "psf"):
        label = f"300 nm PSF, --psf-fwhm-nm 300, distance_factor {mode}"
        sims[label] = balance(fr, f"sim filaments {label}", (20, 300), distance_factor=mode,
                              optics={"psf_fwhm_nm": 300.0, "pixel_size_um": 0.1})
    out["simulated_filaments"] = sims
    print("real filament movies (/work/realdata, see its MANIFEST.md; none has 20 frames)")
    real = {}
    # pixel sizes are not documented for either: 0.1 um assumed (the SMLM-2013 challenge's, and for
    # the Zhuang movie what its measured 2.6 px spot FWHM makes a plausible ~260 nm)
    for name in ("smlm2013-realHD-tubulin-10f.tif", "zhuang-scmos-storm-11f.tif"):
        s = _read(args.realdata / name)
        if s is not None:
            real[name] = {"frames": len(s), "blinking": blinking(s, name)}
            for mode in ("data", "psf"):
                for optics in ({"pixel_size_um": 0.1}, {"pixel_size_um": 0.1, "na": 1.4, "wavelength_nm": 670.0}):
                    key = f"distance_factor {mode}, optics {optics}"
                    real[name][key] = balance(s, f"{name} {key}", (len(s),), distance_factor=mode, optics=optics)
    if not real:
        print("  no real filament movie available")
    out["real_filaments"] = real
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
