"""livesr's Qt window: raw and super-resolved views, latency/fps plots, run controls.

`run_gui(config)` (gui.app) is what `livesr demo|replay|live` calls; `MainWindow` can be
embedded or driven from tests. Names are imported lazily so that `import gui` does not
load Qt until a window is wanted.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MainWindow", "run_gui"]


def __getattr__(name: str) -> Any:
    if name == "run_gui":
        from gui.app import run_gui

        return run_gui
    if name == "MainWindow":
        from gui.main_window import MainWindow

        return MainWindow
    raise AttributeError(f"module 'gui' has no attribute {name!r}")
