"""Entry point used by `livesr demo|replay|live` when not --headless."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, cast

from qtpy import QtCore, QtWidgets


def get_app() -> QtWidgets.QApplication:
    app = QtWidgets.QApplication.instance()
    if app is None:
        app = QtWidgets.QApplication(sys.argv[:1])
        app.setApplicationName("livesr")
    return cast(QtWidgets.QApplication, app)  # a widget program: the instance is a QApplication


def run_gui(
    config: Any = None,
    *,
    autostart: bool = True,
    screenshot: str | Path | None = None,
    seconds: float | None = None,
    colormap: str | None = None,
    raw_mode: str | None = None,
) -> int:
    """Open the main window for `config` (a PipelineConfig) and run the Qt event loop.

    autostart: press Start as soon as the window is shown.
    screenshot/seconds: after `seconds` of acquisition, save a grab of the window to
    `screenshot` and close (reproducible documentation images); `seconds` alone closes
    the window after that long. colormap: initial colour map name (see COLORMAPS); raw_mode: what
    the raw panel shows ("newest frame" or "window mean", gui.compare_view).
    Returns 0 on a clean close, 1 if an error was shown.
    """
    from gui.main_window import MainWindow

    app = get_app()
    win = MainWindow(config)
    if colormap:
        win.controls.colormap.setCurrentText(colormap)
    if raw_mode:
        win.views.raw_mode.setCurrentText(raw_mode)
    win.show()
    if autostart:
        QtCore.QTimer.singleShot(0, win.start)

    if seconds is not None or screenshot is not None:
        duration_ms = int(1000 * (seconds if seconds is not None else 5.0))

        def finish() -> None:
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                win.grab().save(str(screenshot))
            win.close()

        def arm(state: str) -> None:
            # count `seconds` from the moment acquisition runs, or from a failed start
            # (the error stays readable in the window, and in the screenshot, meanwhile)
            if state in ("running", "idle"):
                win.stateChanged.disconnect(arm)
                QtCore.QTimer.singleShot(duration_ms, finish)

        win.stateChanged.connect(arm)

    # Ctrl+C, SIGTERM and SIGHUP (terminal closed) close the window cleanly (stop, finish
    # the recording)
    stops = [s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
             if s is not None]
    prev = {s: signal.signal(s, lambda *_: win.close()) for s in stops}
    wake = QtCore.QTimer()
    wake.start(200)  # let the Python interpreter run signal handlers
    wake.timeout.connect(lambda: None)
    try:
        app.exec()
    finally:
        wake.stop()
        for s, handler in prev.items():
            signal.signal(s, handler)
        win.shutdown()
    return 1 if win.errors else 0
