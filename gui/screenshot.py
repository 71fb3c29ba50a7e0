"""Reproducible screenshot of the running demo (used for docs/screenshot.png).

    QT_QPA_PLATFORM=offscreen python -m gui.screenshot --out docs/screenshot.png --seconds 6
    # a network with its trust signal, and the static donut that must trigger the warning:
    QT_QPA_PLATFORM=offscreen python -m gui.screenshot --engine convlstm --size 64 --seconds 10 \
        --weights convlstm.pt --raw-mode "window mean" --out docs/screenshot_trust.png
    QT_QPA_PLATFORM=offscreen python -m gui.screenshot --engine convlstm --weights convlstm.pt \
        --source ../shared/data/real-static-donut-100f.tif --fps 20 --seconds 6 --out docs/screenshot_donut.png

Runs the embedded demo (simulated filaments -> SOFI, or the engine and movie asked for) in the
real window, waits until acquisition has run for `--seconds`, grabs the window and closes it.
"""

from __future__ import annotations

import argparse
import os
import sys

from engines.registry import DEFAULT_ENGINE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/screenshot.png", help="PNG to write")
    p.add_argument("--seconds", type=float, default=6.0, help="acquire this long before the grab")
    p.add_argument("--size", type=int, default=128, help="simulated camera size (pixels)")
    p.add_argument("--fps", type=float, default=100.0, help="camera frame rate")
    p.add_argument("--engine", default=DEFAULT_ENGINE)
    p.add_argument("--weights", default=None, help="weights file of a network engine")
    p.add_argument("--source", default="sim", help="'sim' or a movie (TIFF) to replay, looped")
    p.add_argument("--trust-window", type=int, default=100, help="frames of a network's trust reference")
    p.add_argument("--raw-mode", default="newest frame", choices=["newest frame", "window mean"])
    p.add_argument("--colormap", default="inferno")
    p.add_argument("--worker-mode", default="process", choices=["process", "thread"])
    args = p.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from gui.app import run_gui
    from realtime.config import Addresses, PipelineConfig

    cfg = PipelineConfig(
        source=args.source, size=args.size, fps=args.fps, engine=args.engine, weights=args.weights,
        loop=args.source != "sim", seconds=None, worker_mode=args.worker_mode, trust_window=args.trust_window,
        addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),  # free ports
    ).validate()
    rc = run_gui(cfg, screenshot=args.out, seconds=args.seconds, colormap=args.colormap, raw_mode=args.raw_mode)
    print(f"wrote {args.out}" if rc == 0 else f"errors shown; screenshot {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
