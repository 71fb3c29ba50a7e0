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

import os
import sys
from typing import Annotated

import typer

from engines.registry import DEFAULT_ENGINE
from realtime.cli import Refused, run_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help=__doc__.splitlines()[0])
def screenshot(
    out: Annotated[str, typer.Option(help="PNG to write")] = "docs/screenshot.png",
    seconds: Annotated[float, typer.Option(help="acquire this long before the grab")] = 6.0,
    size: Annotated[int, typer.Option(help="simulated camera size (pixels)")] = 128,
    fps: Annotated[float, typer.Option(help="camera frame rate")] = 100.0,
    engine: Annotated[str, typer.Option()] = DEFAULT_ENGINE,
    weights: Annotated[str | None, typer.Option(help="weights file of a network engine")] = None,
    source: Annotated[str, typer.Option(help="'sim' or a movie (TIFF) to replay, looped")] = "sim",
    trust_window: Annotated[int, typer.Option(help="frames of a network's trust reference")] = 100,
    raw_mode: Annotated[str, typer.Option(help="newest frame | window mean")] = "newest frame",
    colormap: Annotated[str, typer.Option()] = "inferno",
    worker_mode: Annotated[str, typer.Option(help="process | thread")] = "process",
) -> int:
    """Run the demo in the real window and grab it after ``seconds``."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from gui.app import run_gui
    from gui.compare_view import RAW_MEAN, RAW_NEWEST
    from realtime.config import Addresses, PipelineConfig

    if raw_mode not in (RAW_NEWEST, RAW_MEAN):
        raise Refused(f"--raw-mode must be {RAW_NEWEST!r} or {RAW_MEAN!r}, got {raw_mode!r}")
    try:
        cfg = PipelineConfig(
            source=source, size=size, fps=fps, engine=engine, weights=weights,
            loop=source != "sim", seconds=None, worker_mode=worker_mode, trust_window=trust_window,
            addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),  # free ports
        ).validate()
    except ValueError as e:
        raise Refused(str(e)) from None
    rc = run_gui(cfg, screenshot=out, seconds=seconds, colormap=colormap, raw_mode=raw_mode)
    print(f"wrote {out}" if rc == 0 else f"errors shown; screenshot {out}")
    return int(rc)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, sys.argv[1:] if argv is None else argv, "python -m gui.screenshot")


if __name__ == "__main__":
    sys.exit(main())
