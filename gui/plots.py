"""Rolling plots of latency and frame rates, and the frame counters.

These are what a microscopist watches to see whether the reconstruction keeps up with the
camera: end-to-end latency (p50/p99) and acquisition vs output vs displayed frame rate.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pyqtgraph as pg
from qtpy import QtWidgets


def nice_ceil(v: float) -> float:
    """The next round step (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above v."""
    if not v > 0 or not math.isfinite(v):
        return 1.0
    exp = math.floor(math.log10(v))
    for m in (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if v <= m * 10**exp:
            return m * 10**exp
    return 10.0 ** (exp + 1)


class RollingPlot(pg.PlotWidget):
    """A few named curves over the last `history_s` seconds.

    x is "seconds before now" on a fixed axis and y is fixed to a round step above the
    data: the axes are re-drawn only when that step changes, not at every update (axis
    drawing was the largest single cost of the window).
    """

    def __init__(
        self,
        title: str,
        y_label: str,
        curves: dict[str, str],
        history_s: float = 30.0,
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent=parent, title=title)
        self.history_s = history_s
        self.setLabel("left", y_label)
        self.setLabel("bottom", "seconds ago")
        self.showGrid(x=True, y=True, alpha=0.3)
        self.addLegend(offset=(5, 5))
        self.setMouseEnabled(x=False, y=False)
        self.setMenuEnabled(False)
        self.disableAutoRange()
        self.setXRange(-history_s, 0, padding=0)
        self._y_top = 1.0
        self.setYRange(0, self._y_top, padding=0)
        self._t: deque[float] = deque()
        self._y: dict[str, deque[float]] = {name: deque() for name in curves}
        self._curves = {
            name: self.plot([], [], name=name, pen=pg.mkPen(color, width=2))
            for name, color in curves.items()
        }
        self.n_points = 0

    def append(self, t: float, **values: float) -> None:
        """Add one sample; missing or non-finite values are drawn as gaps (NaN)."""
        self._t.append(t)
        for name, ys in self._y.items():
            v = values.get(name, math.nan)
            ys.append(float(v) if v is not None and math.isfinite(v) else math.nan)
        while self._t and self._t[0] < t - self.history_s:
            self._t.popleft()
            for ys in self._y.values():
                ys.popleft()
        self.n_points += 1
        x = np.fromiter(self._t, float, len(self._t)) - t
        top = 0.0
        for name, curve in self._curves.items():
            y = np.fromiter(self._y[name], float, len(self._y[name]))
            curve.setData(x, y, connect="finite")
            if np.isfinite(y).any():
                top = max(top, float(np.nanmax(y)))
        top = nice_ceil(1.05 * top)
        # grow at once, shrink only when the data fell well below (no flicker of the axis)
        if top > self._y_top or top < 0.5 * self._y_top:
            self._y_top = top
            self.setYRange(0, top, padding=0)

    def last(self, name: str) -> float:
        ys = self._y[name]
        return ys[-1] if ys else math.nan

    def clear_data(self) -> None:
        self._t.clear()
        for ys in self._y.values():
            ys.clear()
        for curve in self._curves.values():
            curve.setData([], [])


class LatencyPlot(RollingPlot):
    def __init__(self, parent: QtWidgets.QWidget | None = None, history_s: float = 30.0) -> None:
        super().__init__(
            "end-to-end latency (camera buffer -> screen)",
            "ms",
            {"p50": "#4fc3f7", "p99": "#ff8a65"},
            history_s,
            parent,
        )


class FpsPlot(RollingPlot):
    def __init__(self, parent: QtWidgets.QWidget | None = None, history_s: float = 30.0) -> None:
        super().__init__(
            "frame rate",
            "frames / s",
            {"acquired": "#aed581", "output": "#ba68c8", "displayed": "#fff176"},
            history_s,
            parent,
        )


class CountersWidget(QtWidgets.QGroupBox):
    """Frame counters: a dropped or malformed count above zero must be visible at a glance."""

    FIELDS = {
        "acquired": "frames acquired",
        "recorded": "frames recorded",
        "results": "outputs received",
        "displayed": "outputs displayed",
        "dropped": "dropped by engine",
        "gaps": "gaps in frame numbers",
        "malformed": "malformed messages",
        "latency": "latency p50 / p99",
    }

    TIPS = {
        "dropped": "outputs the engine skipped to keep up with the camera (it always "
                   "computes the newest window; no camera frame is lost)",
        "gaps": "breaks in the camera frame numbers reaching the window (should stay 0)",
        "malformed": "messages on the sockets that broke the wire protocol (ignored, counted)",
    }

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__("counters", parent)
        form = QtWidgets.QFormLayout(self)
        self.labels: dict[str, QtWidgets.QLabel] = {}
        for key, text in self.FIELDS.items():
            lab = QtWidgets.QLabel("-")
            lab.setObjectName(f"counter_{key}")
            lab.setToolTip(self.TIPS.get(key, ""))
            self.labels[key] = lab
            form.addRow(text + ":", lab)

    def set_value(self, key: str, value: object, warn: bool = False) -> None:
        lab = self.labels[key]
        lab.setText(str(value))
        lab.setStyleSheet("color: #e53935; font-weight: bold;" if warn else "")

    def value(self, key: str) -> str:
        return self.labels[key].text()
