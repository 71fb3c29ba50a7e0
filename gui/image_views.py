"""Raw camera frame and super-resolved output side by side, on one coordinate system.

Both views use raw-sensor pixels as data coordinates: the raw image is drawn at scale 1
and the 2x output at scale 0.5 (output pixel (2i..2i+1, 2j..2j+1) covers input (i, j)), so
linking the view boxes makes zoom/pan show the same patch of the sample in both.
"""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from qtpy import QtCore, QtWidgets

#: colour maps offered in the selector: name shown -> pyqtgraph colormap name
COLORMAPS: dict[str, str | None] = {
    "grey": None,
    "inferno": "inferno",
    "magma": "magma",
    "viridis": "viridis",
    "cividis": "cividis",
    "fire (CET-L3)": "CET-L3",
}


def get_colormap(name: str) -> pg.ColorMap:
    """A pyqtgraph ColorMap for a name in COLORMAPS (grey is a plain black->white ramp)."""
    key = COLORMAPS.get(name, name)
    if key is None:
        return pg.ColorMap(pos=[0.0, 1.0], color=[(0, 0, 0), (255, 255, 255)], name="grey")
    return pg.colormap.get(key)


def robust_levels(img: np.ndarray, lo: float = 0.5, hi: float = 99.8) -> tuple[float, float]:
    """Percentile contrast on a subsample: one hot pixel must not wash out the image."""
    step = max(1, int(np.sqrt(img.size / 16384)))  # ~16k samples: a few microseconds
    sample = np.asarray(img[::step, ::step], dtype=np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(sample, [lo, hi])
    if not b > a:
        b = a + 1.0
    return float(a), float(b)


class ImagePanel:
    """One image view: its own GraphicsLayoutWidget with a ViewBox, ImageItem and histogram.

    Each panel is a separate QGraphicsView on purpose: a new image then repaints only its
    own rectangle. In one shared scene the update region of two images spans everything
    between them (axes, histograms), which doubled the cost of every displayed frame.
    """

    def __init__(self, title: str, scale: float, hist_left: bool = False) -> None:
        self.scale = scale  # data units (raw pixels) per image pixel
        self.title = title
        self.widget = pg.GraphicsLayoutWidget()
        self.widget.setBackground("k")
        layout = self.widget.ci
        img_col, hist_col = (1, 0) if hist_left else (0, 1)
        self.label = layout.addLabel(title, row=0, col=img_col)
        self.view: pg.ViewBox = layout.addViewBox(row=1, col=img_col, lockAspect=True, invertY=True)
        self.view.setMenuEnabled(False)
        self.item = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.item)
        self.hist = pg.HistogramLUTItem(self.item)
        self.hist.setMinimumWidth(90)
        # the histogram is recomputed on every new image by default (a sort of the whole
        # image plus a redraw); at 50 Hz that costs more than showing the image itself, so
        # it is refreshed at a few Hz by `refresh_histogram()` instead
        self.item.sigImageChanged.disconnect(self.hist.imageChanged)
        layout.addItem(self.hist, row=1, col=hist_col)
        self.auto_levels = True
        self.levels_period_s = 0.1  # auto contrast follows the data at 10 Hz: no flicker
        self._levels_t = -1.0
        self.origin = (0.0, 0.0)  # (x, y) of the image's top-left corner in raw pixels
        self._shape: tuple[int, ...] | None = None

    def set_image(self, img: np.ndarray) -> None:
        """Show `img`; re-fit the view only when the image geometry changes."""
        first = self._shape is None
        kw: dict = {"autoLevels": False}
        now = time.monotonic()
        if self.auto_levels and (first or now - self._levels_t >= self.levels_period_s
                                 or img.shape != self._shape):
            self._levels_t = now
            kw["levels"] = robust_levels(img)
        self.item.setImage(img, **kw)
        if img.shape != self._shape:
            self._shape = img.shape
            self._place()
            self.refresh_histogram()
            if first:
                self.view.autoRange(padding=0.02)

    def refresh_histogram(self) -> None:
        if self.item.image is not None:
            self.hist.imageChanged()

    def set_origin(self, x: float, y: float) -> None:
        self.origin = (float(x), float(y))
        self._place()

    def _place(self) -> None:
        if self._shape is None:
            return
        h, w = self._shape[:2]
        self.item.setRect(
            QtCore.QRectF(self.origin[0], self.origin[1], w * self.scale, h * self.scale)
        )

    def set_auto_levels(self, on: bool) -> None:
        self.auto_levels = on
        img = self.item.image
        if on and img is not None:
            self.item.setLevels(robust_levels(img))

    def set_colormap(self, cmap: pg.ColorMap) -> None:
        self.hist.gradient.setColorMap(cmap)

    def clear(self) -> None:
        self.item.clear()
        self._shape = None


class SideBySideView(QtWidgets.QWidget):
    """Raw (left) and super-resolved (right) panels with linked zoom/pan.

    The ROI rectangle on the raw panel selects a crop in raw pixels (see `roi_rect`).
    Manual contrast: untick auto contrast, then drag the histogram's level handles.
    """

    def __init__(self, parent: QtWidgets.QWidget | None = None, upsample: int = 2) -> None:
        super().__init__(parent)
        self.raw = ImagePanel("raw camera frame", scale=1.0, hist_left=True)
        self.sr = ImagePanel(f"super-resolved ({upsample}x)", scale=1 / upsample)
        self.sr.view.setXLink(self.raw.view)
        self.sr.view.setYLink(self.raw.view)

        self.roi = pg.RectROI([0, 0], [16, 16], pen=pg.mkPen("c", width=1), removable=False)
        self.roi.addScaleHandle([0, 0], [1, 1])
        self.roi.hide()
        self.raw.view.addItem(self.roi)
        self.row = lay = QtWidgets.QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.raw.widget, 1)
        lay.addWidget(self.sr.widget, 1)
        self.set_colormap("grey")

    # ------------------------------------------------------------------ display
    def set_raw(self, img: np.ndarray) -> None:
        self.raw.set_image(img)

    def set_sr(self, img: np.ndarray) -> None:
        self.sr.set_image(img)

    def set_origin(self, x: float, y: float) -> None:
        """Place both images at sensor pixel (x, y), e.g. the corner of a camera ROI."""
        self.raw.set_origin(x, y)
        self.sr.set_origin(x, y)

    def refresh_histograms(self) -> None:
        self.raw.refresh_histogram()
        self.sr.refresh_histogram()

    def set_colormap(self, name: str) -> None:
        cmap = get_colormap(name)
        self.raw.set_colormap(cmap)
        self.sr.set_colormap(cmap)

    def set_auto_levels(self, on: bool) -> None:
        self.raw.set_auto_levels(on)
        self.sr.set_auto_levels(on)

    def set_titles(self, raw: str | None = None, sr: str | None = None) -> None:
        if raw is not None:
            self.raw.label.setText(raw)
        if sr is not None:
            self.sr.label.setText(sr)

    def clear(self) -> None:
        self.raw.clear()
        self.sr.clear()

    # ---------------------------------------------------------------------- ROI
    def show_roi(self, on: bool) -> None:
        if on and self.raw.item.image is not None:
            h, w = self.raw.item.image.shape[:2]
            x0, y0 = self.raw.origin
            self.roi.setPos([x0 + w // 4, y0 + h // 4])
            self.roi.setSize([max(8, w // 2), max(8, h // 2)])
        self.roi.setVisible(on)

    def roi_rect(self) -> tuple[int, int, int, int]:
        """The ROI as integer (x, y, width, height) in raw sensor pixels."""
        x, y = self.roi.pos()
        w, h = self.roi.size()
        return int(round(x)), int(round(y)), max(1, int(round(w))), max(1, int(round(h)))
