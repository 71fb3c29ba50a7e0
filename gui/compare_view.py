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

from engines.registry import DEFAULT_ENGINE, default_window
from gui.image_views import ImagePanel, SideBySideView
from gui.naming import named

RAW_NEWEST, RAW_MEAN = "newest frame", "window mean"


class RollingMean:
    """The mean of a window of recent frames: of the frames a displayed output was made from
    (``mean(first, last)``), or of the newest ``window``. Thread-safe: ``add`` on the pipeline
    thread (one copy into a ring of ``keep`` frames), ``mean`` on the Qt thread (only when the
    window asked for changes). A shape change or a sequence gap restarts it."""

    def __init__(self, window: int = default_window(DEFAULT_ENGINE), keep: int | None = None) -> None:
        self._lock = threading.Lock()
        self.window = max(1, int(window))
        self.keep = max(self.window, int(keep) if keep else 4 * self.window)
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._ring: np.ndarray | None = None
            self._seqs = np.full(self.keep, -1, dtype=np.int64)
            self._last = -2
            self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    def set_window(self, window: int) -> None:
        window = max(1, int(window))
        if window != self.window:
            self.window = window
            if window > self.keep:
                self.keep = 4 * window
            self.clear()

    def add(self, seq: int, frame: np.ndarray) -> None:
        f = np.asarray(frame)
        with self._lock:
            if self._ring is None or self._ring.shape[1:] != f.shape or seq != self._last + 1:
                self._ring = np.empty((self.keep, *f.shape), dtype=np.float32)
                self._seqs[:] = -1
            slot = seq % self.keep
            self._ring[slot] = f
            self._seqs[slot] = seq
            self._last = seq

    def mean(self, first: int | None = None, last: int | None = None) -> tuple[np.ndarray, int, int] | None:
        """(mean image float32, first seq, last seq): of frames first..last when all are held,
        else of the newest `window` frames held; None when none is."""
        with self._lock:
            if self._ring is None or self._last < 0:
                return None
            if first is None or last is None or last > self._last or first > last or \
                    not np.all(self._seqs[np.arange(first, last + 1) % self.keep] == np.arange(first, last + 1)):
                last = self._last
                held = int(np.count_nonzero(self._seqs >= 0))
                first = last - min(self.window, held) + 1
            key = (first, last)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1], first, last
            idx = np.arange(first, last + 1) % self.keep
            img = self._ring[idx].mean(axis=0, dtype=np.float64).astype(np.float32)
            self._cache = (key, img)
            return img, first, last


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
        self.row.addWidget(self.reference.widget, 1)
        self.raw_mode = named(QtWidgets.QComboBox(), "raw_mode")
        self.raw_mode.addItems([RAW_NEWEST, RAW_MEAN])
        self.raw_mode.setToolTip("raw panel: the newest camera frame, or the mean of the frames of the "
                                 "engine's window (what the super-resolved image was made from)")
        self.raw_mode.currentTextChanged.connect(self.rawModeChanged)
        self.show_reference = named(QtWidgets.QCheckBox("SOFI next to it"), "show_reference")
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
