"""Acquisition and reconstruction controls: what to run, and Start / Stop.

The panel only describes the user's choice (`ControlValues`); the main window maps it onto
the pipeline configuration. Exposure changes go straight to the camera through `mmcore`
(pymmcore-plus convention) when a core is attached, so they apply while acquiring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qtpy import QtCore, QtGui, QtWidgets

from engines.registry import BACKEND_CHOICES, DEFAULT_ENGINE, ENGINES
from gui.naming import named

log = logging.getLogger(__name__)


@dataclass
class ControlValues:
    """The user's choice in the control panel (units in the names)."""

    engine: str = DEFAULT_ENGINE
    backend: str = "eager"
    window: int | None = None  # frames per output; None = the engine's default
    stride: int = 1
    exposure_ms: float | None = None  # None = the camera's default
    fps: float | None = 100.0  # None = the source's own rate (a replayed movie)
    record: bool = False
    record_path: str = ""
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height (raw pixels)
    weights: str = ""  # trained network file; "" = the engine's default weights
    overwrite: bool = False  # the user confirmed replacing an existing recording file


#: engines computed from the data alone (no weights file to choose)
ENGINES_WITHOUT_WEIGHTS = frozenset(n for n, e in ENGINES.items() if not e.needs_weights)


class ExposureFpsWidget(QtWidgets.QWidget):
    """Exposure (ms) and camera frame rate (frames/s).

    With `mmcore=` a change of exposure is applied to the core's current camera at once;
    a Python camera paces itself, so the frame rate takes effect at the next Start.
    """

    valueChanged = QtCore.Signal()

    def __init__(self, parent: QtWidgets.QWidget | None = None, *, mmcore=None) -> None:
        super().__init__(parent)
        self._mmcore = None
        # the minimum (0) of each box means "not set": shown as a word, mapped to None
        self.exposure = named(QtWidgets.QDoubleSpinBox(), "exposure_ms")
        self.exposure.setRange(0.0, 10000.0)
        self.exposure.setDecimals(2)
        self.exposure.setSuffix(" ms")
        self.exposure.setSpecialValueText("camera default")
        self.exposure.setKeyboardTracking(False)
        self.fps = named(QtWidgets.QDoubleSpinBox(), "fps")
        self.fps.setRange(0.0, 10000.0)
        self.fps.setDecimals(1)
        self.fps.setSuffix(" fps")
        self.fps.setSpecialValueText("source rate")
        self.fps.setValue(100.0)
        self.fps.setKeyboardTracking(False)
        lay = QtWidgets.QFormLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addRow("exposure:", self.exposure)
        lay.addRow("camera rate:", self.fps)
        self.exposure.valueChanged.connect(self._on_exposure)
        self.fps.valueChanged.connect(lambda _v: self.valueChanged.emit())
        self.setMMCore(mmcore)

    def exposure_ms(self) -> float | None:
        v = self.exposure.value()
        return v if v > 0 else None

    def frame_rate(self) -> float | None:
        v = self.fps.value()
        return v if v > 0 else None

    def set_values(self, exposure_ms: float | None, fps: float | None) -> None:
        with QtCore.QSignalBlocker(self.exposure):  # showing a value must not set the camera
            self.exposure.setValue(exposure_ms or 0.0)
        self.fps.setValue(fps or 0.0)

    def setMMCore(self, mmcore) -> None:  # noqa: N802 (pymmcore-widgets naming)
        """Attach a (running) core; its current exposure becomes the widget's value."""
        self._mmcore = mmcore
        if mmcore is None:
            return
        try:
            if mmcore.getCameraDevice():
                with QtCore.QSignalBlocker(self.exposure):
                    self.exposure.setValue(float(mmcore.getExposure()))
        except Exception as exc:  # a core without a camera is fine here
            log.debug("no exposure from core: %s", exc)

    def _on_exposure(self, value: float) -> None:
        core = self._mmcore
        if core is not None and value > 0:
            try:
                if core.getCameraDevice():
                    core.setExposure(float(value))
            except Exception as exc:
                log.warning("could not set exposure to %s ms: %s", value, exc)
        self.valueChanged.emit()


class ControlPanel(QtWidgets.QWidget):
    """Start / Stop, camera timing, engine, window, stride, recording and ROI crop."""

    startRequested = QtCore.Signal()
    stopRequested = QtCore.Signal()
    colormapChanged = QtCore.Signal(str)
    autoContrastChanged = QtCore.Signal(bool)
    roiToggled = QtCore.Signal(bool)

    def __init__(
        self,
        engines: list[str],
        backends: list[str] | None = None,
        colormaps: list[str] | None = None,
        parent: QtWidgets.QWidget | None = None,
        *,
        mmcore=None,
    ) -> None:
        super().__init__(parent)
        # --- run ---
        self.start_btn = named(QtWidgets.QPushButton("Start"), "start")
        self.start_btn.setToolTip("Start acquisition and reconstruction (Ctrl+R or Space)")
        self.stop_btn = named(QtWidgets.QPushButton("Stop"), "stop")
        self.stop_btn.setToolTip("Stop acquisition (Ctrl+. or Space)")
        self.stop_btn.setEnabled(False)
        self.start_btn.clicked.connect(self.startRequested)
        self.stop_btn.clicked.connect(self.stopRequested)
        run_row = QtWidgets.QHBoxLayout()
        run_row.addWidget(self.start_btn)
        run_row.addWidget(self.stop_btn)

        # --- camera ---
        self.timing = ExposureFpsWidget(mmcore=mmcore)
        self.crop = named(QtWidgets.QCheckBox("crop to ROI"), "roi_crop")
        self.crop.setToolTip("Drag the cyan rectangle on the raw view, then Start")
        self.crop.toggled.connect(self.roiToggled)

        # --- reconstruction ---
        self.engine = named(QtWidgets.QComboBox(), "engine")
        self.engine.addItems(engines)
        self.backend = named(QtWidgets.QComboBox(), "backend")
        # the registry's choices (torch-free: the Qt thread must not import torch); an
        # unavailable choice is reported by the engine worker as a clear error in the window
        self.backend.addItems(backends or list(BACKEND_CHOICES))
        self.window_frames = named(QtWidgets.QSpinBox(), "window")
        self.window_frames.setRange(1, 500)  # 1 is shown as "engine default" (None)
        self.window_frames.setSpecialValueText("engine default")
        self.window_frames.setSuffix(" frames")
        self.stride = named(QtWidgets.QSpinBox(), "stride")
        self.stride.setRange(1, 500)
        self.stride.setToolTip("one output every `stride` frames")
        self.weights = named(QtWidgets.QLineEdit(), "weights")
        self.weights.setPlaceholderText("default weights")
        self.weights_browse = named(QtWidgets.QToolButton(), "weights_browse")
        self.weights_browse.setText("...")
        self.weights_browse.clicked.connect(self._choose_weights)
        w_row = QtWidgets.QHBoxLayout()
        w_row.addWidget(self.weights)
        w_row.addWidget(self.weights_browse)
        self.engine.currentTextChanged.connect(self._engine_changed)

        # --- recording ---
        self.record = named(QtWidgets.QCheckBox("record to file"), "record")
        self.record_path = named(QtWidgets.QLineEdit(), "record_path")
        self.record_path.setPlaceholderText("movie.ome.tif")
        self.browse = named(QtWidgets.QToolButton(), "browse")
        self.browse.setText("...")
        self.browse.clicked.connect(self._choose_file)
        self._confirmed_overwrite = ""  # a path the file dialog already asked about
        rec_row = QtWidgets.QHBoxLayout()
        rec_row.addWidget(self.record_path)
        rec_row.addWidget(self.browse)

        # --- display ---
        self.colormap = named(QtWidgets.QComboBox(), "colormap")
        self.colormap.addItems(colormaps or ["grey"])
        self.colormap.currentTextChanged.connect(self.colormapChanged)
        self.auto_contrast = named(QtWidgets.QCheckBox("auto contrast"), "auto_contrast")
        self.auto_contrast.setChecked(True)
        self.auto_contrast.setToolTip("off: set levels by dragging the histogram handles")
        self.auto_contrast.toggled.connect(self.autoContrastChanged)

        form = QtWidgets.QFormLayout()
        form.addRow(run_row)
        form.addRow(self.timing)
        form.addRow("", self.crop)
        form.addRow("engine:", self.engine)
        form.addRow("backend:", self.backend)
        form.addRow("weights:", w_row)
        self._weights_row = form.rowCount() - 1
        form.addRow("window:", self.window_frames)
        form.addRow("output stride:", self.stride)
        form.addRow(self.record)
        form.addRow(rec_row)
        form.addRow("colour map:", self.colormap)
        form.addRow("", self.auto_contrast)
        self.setLayout(form)
        self._form = form
        # widgets that must not change while the pipeline runs
        self._setup_widgets = [
            self.timing.fps, self.crop, self.engine, self.backend, self.window_frames,
            self.stride, self.record, self.record_path, self.browse,
        ]
        self._running = False
        self._engine_changed(self.engine.currentText())

    def insert_below_weights(self, widget: QtWidgets.QWidget) -> None:
        """Add a widget (e.g. a note on the chosen file) under the weights chooser."""
        self._form.insertRow(self._weights_row + 1, "", widget)

    # ------------------------------------------------------------------ values
    def values(self, roi: tuple[int, int, int, int] | None = None) -> ControlValues:
        return ControlValues(
            engine=self.engine.currentText(),
            backend=self.backend.currentText(),
            window=self.window_frames.value() if self.window_frames.value() > 1 else None,
            stride=self.stride.value(),
            exposure_ms=self.timing.exposure_ms(),
            fps=self.timing.frame_rate(),
            record=self.record.isChecked(),
            record_path=self.record_path.text().strip(),
            roi=roi if self.crop.isChecked() else None,
            weights=self.weights.text().strip() if self.weights.isEnabled() else "",
            overwrite=bool(self._confirmed_overwrite)
            and self.record_path.text().strip() == self._confirmed_overwrite,
        )

    def set_values(self, v: ControlValues) -> None:
        """Show a configuration (e.g. the one the CLI built) in the widgets."""
        for combo, text in ((self.engine, v.engine), (self.backend, v.backend)):
            if combo.findText(text) < 0:
                combo.addItem(text)
            combo.setCurrentText(text)
        self.window_frames.setValue(int(v.window) if v.window else 1)
        self.stride.setValue(int(v.stride))
        self.timing.set_values(v.exposure_ms, v.fps)
        self.record.setChecked(bool(v.record))
        self.record_path.setText(v.record_path or "")
        self.weights.setText(v.weights or "")

    def set_engines(self, names: list[str]) -> None:
        """Replace the engine choices, keeping the current one selected."""
        current = self.engine.currentText()
        with QtCore.QSignalBlocker(self.engine):
            self.engine.clear()
            self.engine.addItems(names)
            if current and self.engine.findText(current) < 0:
                self.engine.addItem(current)
            self.engine.setCurrentText(current)
        self._engine_changed(self.engine.currentText())

    def set_running(self, running: bool, busy: bool = False) -> None:
        """Enable what makes sense: setup widgets only while idle; Stop only while running."""
        self.start_btn.setEnabled(not running and not busy)
        self.stop_btn.setEnabled(running and not busy)
        for w in self._setup_widgets:
            w.setEnabled(not running and not busy)
        self._running = running or busy
        self._engine_changed(self.engine.currentText())

    def _engine_changed(self, name: str) -> None:
        uses_weights = name not in ENGINES_WITHOUT_WEIGHTS and not self._running
        self.weights.setEnabled(uses_weights)
        self.weights_browse.setEnabled(uses_weights)

    def _choose_weights(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, f"Weights for {self.engine.currentText()}", self.weights.text(),
            "PyTorch weights (*.pt *.pth);;All files (*)",
        )
        if path:
            self.weights.setText(path)

    def _choose_file(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Record raw frames to", self.record_path.text() or "movie.ome.tif",
            "OME-TIFF (*.ome.tif *.ome.tiff);;TIFF (*.tif *.tiff)",
        )
        if path:
            if not path.lower().endswith((".tif", ".tiff")):
                path = str(Path(path).with_suffix(".ome.tif"))
            # the dialog asked "replace?" for an existing file; a typed name is never replaced
            self._confirmed_overwrite = path if Path(path).exists() else ""
            self.record_path.setText(path)
            self.record.setChecked(True)


def add_shortcuts(widget: QtWidgets.QWidget, panel: ControlPanel) -> list[QtGui.QShortcut]:
    """Ctrl+R start, Ctrl+. stop, Space toggles (window-wide)."""

    def toggle() -> None:
        if panel.stop_btn.isEnabled():
            panel.stopRequested.emit()
        elif panel.start_btn.isEnabled():
            panel.startRequested.emit()

    out = []
    for seq, slot in (("Ctrl+R", panel.startRequested.emit), ("Ctrl+.", panel.stopRequested.emit),
                      ("Space", toggle)):
        sc = QtGui.QShortcut(QtGui.QKeySequence(seq), widget)
        sc.setContext(QtCore.Qt.ShortcutContext.WindowShortcut)
        sc.activated.connect(slot)
        out.append(sc)
    return out
