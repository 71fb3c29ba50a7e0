"""The window shows a network's trust signal, falls back to SOFI in one click, and lets the user
compare: the raw panel's window mean and SOFI of the same frames (offscreen Qt, real pipeline)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest

pytest.importorskip("pytestqt")
pytest.importorskip("pyqtgraph")
from qtpy import QtCore  # noqa: E402

from conftest import PriorNetwork  # noqa: E402
from gui.compare_view import RAW_MEAN, RollingMean  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from gui.trust_panel import STYLE, TrustPanel, trust_text  # noqa: E402
from realtime.config import Addresses, PipelineConfig  # noqa: E402
from realtime.pipeline import Pipeline  # noqa: E402

SIZE = 32
START_MS, LIVE_MS = 60_000, 30_000


def _config(**kw) -> PipelineConfig:
    base = dict(source="sim", size=SIZE, fps=100.0, engine="prior-net", seconds=None, worker_mode="thread",
                threads=1, trust_window=30,
                addresses=Addresses(frames="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0"))
    base.update(kw)
    return PipelineConfig(**base)


def _factory(cfg, mmcore=None):
    """A 'network' that draws its prior for any engine but SOFI (which is the real one)."""
    return Pipeline(cfg, mmcore=mmcore, engine=None if cfg.engine == "sofi" else PriorNetwork())


@pytest.fixture
def window(qtbot):
    made = []

    def make(cfg: PipelineConfig) -> MainWindow:
        win = MainWindow(cfg, pipeline_factory=_factory, error_dialogs=False)
        qtbot.addWidget(win)
        win.show()
        made.append(win)
        return win

    yield make
    for win in made:
        try:
            busy = win.state != "idle" or win.isVisible()
        except RuntimeError:  # already closed and deleted by qtbot
            continue
        if busy:
            win.close()
            qtbot.waitUntil(lambda w=win: not w.isVisible() and w.state == "idle", timeout=30_000)


def _stop(qtbot, win: MainWindow) -> None:
    if win.state != "idle":
        win.stop()
        qtbot.waitUntil(lambda: win.state == "idle", timeout=30_000)


def test_rolling_mean_of_the_shown_output_frames_or_the_newest_window():
    rm = RollingMean(3, keep=6)
    assert rm.mean() is None
    for s in range(8):
        rm.add(s, np.full((2, 2), float(s)))
    img, first, last = rm.mean()
    assert (first, last) == (5, 7) and np.allclose(img, 6.0)  # the newest window
    img, first, last = rm.mean(3, 5)  # the frames an output on screen was made from
    assert (first, last) == (3, 5) and np.allclose(img, 4.0)
    assert rm.mean(0, 2)[1:] == (5, 7)  # no longer held: the newest window instead
    rm.add(12, np.full((2, 2), 70.0))  # a gap: the mean starts again
    img, first, last = rm.mean()
    assert (first, last) == (12, 12) and np.allclose(img, 70.0)
    rm.set_window(5)
    assert rm.mean() is None


def test_trust_panel_colours_and_sentence(qtbot):
    p = TrustPanel()
    qtbot.addWidget(p)
    p.show_info({"psf_fwhm_px": 2.0})  # SOFI: no verdict, no panel
    assert p.isHidden()
    p.show_info({"trust.ok": False, "trust.agreement": 0.21, "trust.message": "Do not trust this image: x."})
    assert not p.isHidden() and p.ok is False and p.label.styleSheet() == STYLE[False]
    assert p.label.text() == "Trust 0.21: Do not trust this image: x."
    assert trust_text({"ok": None, "reason": "checking"}) == "Trust -: checking"
    with qtbot.waitSignal(p.fallbackRequested, timeout=1000):
        qtbot.mouseClick(p.button, QtCore.Qt.MouseButton.LeftButton)


def test_trust_label_updates_reference_shows_and_fallback_switches_to_sofi(window, qtbot):
    win = window(_config())
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "running" or bool(win.errors), timeout=START_MS)
    assert not win.errors, win.errors
    qtbot.waitUntil(lambda: win.trust_panel.isVisible() and win.trust_panel.label.text().startswith("Trust"),
                    timeout=LIVE_MS)
    # once the 30-frame reference is full, the prior is caught: red, with the reason
    qtbot.waitUntil(lambda: win.trust_panel.ok is False, timeout=LIVE_MS)
    text = win.trust_panel.label.text()
    assert "Do not trust this image" in text and "Switch to SOFI" in text
    qtbot.waitUntil(lambda: win.views.reference.widget.isVisible(), timeout=LIVE_MS)
    assert win.views.reference.label.text.startswith("SOFI, frames")
    assert win.views.reference.item.image.shape == (2 * SIZE, 2 * SIZE)
    qtbot.mouseClick(win.trust_panel.button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "running" and win.controls.engine.currentText() == "sofi"
                    and win._result.peek() is not None and win._result.peek()[0].engine == "sofi",
                    timeout=START_MS)
    assert win.config.engine == "sofi" and not win.errors
    qtbot.waitUntil(lambda: win.trust_panel.isHidden(), timeout=LIVE_MS)  # SOFI carries no verdict
    assert not win.views.reference.widget.isVisible()
    _stop(qtbot, win)


def test_fallback_when_idle_selects_sofi(window, qtbot):
    win = window(_config())
    win.trust_panel.fallbackRequested.emit()
    assert win.controls.engine.currentText() == "sofi" and win.state == "idle"


def test_raw_panel_shows_the_window_mean(window, qtbot, tmp_path):
    import tifffile

    movie = tmp_path / "ramp.tif"  # frame k is k everywhere: the mean of frames a..b is (a + b) / 2
    tifffile.imwrite(movie, np.repeat(np.arange(300, dtype=np.uint16)[:, None, None], SIZE * SIZE, 1)
                     .reshape(300, SIZE, SIZE))
    win = window(_config(source=str(movie), engine="sofi", window=8))
    win.views.raw_mode.setCurrentText(RAW_MEAN)
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "running" or bool(win.errors), timeout=START_MS)
    assert not win.errors, win.errors
    qtbot.waitUntil(lambda: win.n_displayed >= 3 and win.views.raw.label.text.startswith("raw: mean of frames"),
                    timeout=LIVE_MS)
    title = win.views.raw.label.text
    first, last = (int(x) for x in title.rsplit(" ", 1)[1].split("-"))
    assert last - first + 1 == 8  # the engine's window (from the result headers)
    img = win.views.raw.item.image
    assert img.shape == (SIZE, SIZE) and np.ptp(img) == 0
    # the mean of 8 consecutive frames k..k+7 is k + 3.5 (the newest frame alone would be an integer)
    v = float(img[0, 0]) - 3.5
    assert v >= 0 and v == pytest.approx(round(v), abs=1e-3)
    win.views.raw_mode.setCurrentIndex(0)
    qtbot.waitUntil(lambda: win.views.raw.label.text == "raw camera frame" or win.state == "idle",
                    timeout=LIVE_MS)
    _stop(qtbot, win)
