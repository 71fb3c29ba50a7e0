"""What to compare a network's image with: the raw window's mean and SOFI of the same frames.

A single blinking frame says little about the sample; what a 20-frame output should be held
against is the mean of those 20 frames (the widefield image) and what SOFI makes of the frames.
`CompareView` is the raw / super-resolved pair of `SideBySideView` plus a third panel, the
trust check's reference (the worker's companion SOFI over the last frames, a few times a
second), and the raw panel can show the rolling mean of the engine's window instead of the
newest frame (`RollingMean`, fed on the pipeline thread: O(pixels) per frame, a lock, no Qt).
"""

from __future__ import annotations

import threading

import numpy as np
from qtpy import QtCore, QtWidgets

from gui.image_views import ImagePanel, SideBySideView

RAW_NEWEST, RAW_MEAN = "newest frame", "window mean"


class RollingMean:
    """Mean of the newest ``window`` frames (running sum over a ring). Thread-safe: ``add`` on
    the pipeline thread, ``mean`` on the Qt thread. A shape change or a sequence gap restarts it."""

    def __init__(self, window: int = 20) -> None:
        self._lock = threading.Lock()
        self.window = max(1, int(window))
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._ring: np.ndarray | None = None
            self._sum: np.ndarray | None = None
            self._n = 0
            self._head = 0
            self._first = self._last = -1

    def set_window(self, window: int) -> None:
        if max(1, int(window)) != self.window:
            self.window = max(1, int(window))
            self.clear()

    def add(self, seq: int, frame: np.ndarray) -> None:
        f = np.asarray(frame, dtype=np.float64)
        with self._lock:
            if self._ring is None or self._ring.shape[1:] != f.shape or seq != self._last + 1:
                self._ring = np.zeros((self.window, *f.shape))
                self._sum = np.zeros(f.shape)
                self._n = self._head = 0
                self._first = seq
            assert self._sum is not None
            if self._n == self.window:
                self._sum -= self._ring[self._head]
                self._first += 1
            else:
                self._n += 1
            self._ring[self._head] = f
            self._sum += f
            self._head = (self._head + 1) % self.window
            self._last = seq

    def mean(self) -> tuple[np.ndarray, int, int] | None:
        """(mean image float32, first seq, last seq) of the frames held, or None."""
        with self._lock:
            if self._sum is None or self._n == 0:
                return None
            return (self._sum / self._n).astype(np.float32), self._first, self._last


class CompareView(SideBySideView):
    """Raw (newest frame or window mean) | super-resolved | SOFI reference, linked zoom/pan.

    The reference panel is shown while the "SOFI next to it" box is ticked and a reference has
    arrived (only learned engines send one).
    """

    rawModeChanged = QtCore.Signal(str)

    def __init__(self, parent: QtWidgets.QWidget | None = None, upsample: int = 2) -> None:
        super().__init__(parent, upsample=upsample)
        self.reference = ImagePanel("SOFI reference", scale=1 / upsample)
        self.reference.view.setXLink(self.raw.view)
        self.reference.view.setYLink(self.raw.view)
        self.reference.widget.hide()
        self.layout().addWidget(self.reference.widget, 1)
        self.raw_mode = QtWidgets.QComboBox(objectName="raw_mode")
        self.raw_mode.addItems([RAW_NEWEST, RAW_MEAN])
        self.raw_mode.setToolTip("raw panel: the newest camera frame, or the mean of the frames of the "
                                 "engine's window (what the super-resolved image was made from)")
        self.raw_mode.currentTextChanged.connect(self.rawModeChanged)
        self.show_reference = QtWidgets.QCheckBox("SOFI next to it", objectName="show_reference")
        self.show_reference.setChecked(True)
        self.show_reference.setToolTip("show the SOFI image a network's output is checked against "
                                       "(the trust reference: SOFI of the last frames)")
        self.show_reference.toggled.connect(self._reference_toggled)
        self._has_reference = False

    def options(self) -> QtWidgets.QWidget:
        """The two display choices, as one row for the window's layout."""
        w = QtWidgets.QWidget()
        row = QtWidgets.QHBoxLayout(w)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QtWidgets.QLabel("raw panel:"))
        row.addWidget(self.raw_mode)
        row.addWidget(self.show_reference)
        row.addStretch(1)
        return w

    @property
    def mean_mode(self) -> bool:
        return self.raw_mode.currentText() == RAW_MEAN

    def set_reference(self, img: np.ndarray, title: str) -> None:
        self._has_reference = True
        self.reference.set_image(img)
        self.reference.label.setText(title)
        if self.show_reference.isChecked() and self.reference.widget.isHidden():
            self.reference.widget.show()

    def _reference_toggled(self, on: bool) -> None:
        self.reference.widget.setVisible(on and self._has_reference)

    def set_origin(self, x: float, y: float) -> None:
        super().set_origin(x, y)
        self.reference.set_origin(x, y)

    def refresh_histograms(self) -> None:
        super().refresh_histograms()
        if self._has_reference:
            self.reference.refresh_histogram()

    def set_colormap(self, name: str) -> None:
        super().set_colormap(name)
        if hasattr(self, "reference"):  # (the base constructor sets the colour map first)
            from gui.image_views import get_colormap

            self.reference.set_colormap(get_colormap(name))

    def set_auto_levels(self, on: bool) -> None:
        super().set_auto_levels(on)
        self.reference.set_auto_levels(on)

    def clear(self) -> None:
        super().clear()
        self.reference.clear()
        self.reference.widget.hide()
        self._has_reference = False
