"""The main window driven like a user would, on the real pipeline (offscreen Qt).

Real components: simulated UniMMCore camera -> acquisition thread -> ZeroMQ -> engine worker
(thread mode, to keep the suite fast) -> results -> the window. Small frames (32 px).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
pytest.importorskip("pyqtgraph")
from qtpy import QtCore, QtWidgets  # noqa: E402

from gui.bridge import apply_controls  # noqa: E402
from gui.controls import ControlValues  # noqa: E402
from gui.image_views import get_colormap, robust_levels  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from gui.relay import LatestSlot, RateMeter, RollingLatency  # noqa: E402
from realtime.config import Addresses, PipelineConfig  # noqa: E402

SIZE = 32
START_TIMEOUT_MS = 60_000  # first engine load imports torch in this process
LIVE_TIMEOUT_MS = 20_000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def small_config(**kw) -> PipelineConfig:
    base = dict(
        source="sim", size=SIZE, fps=100.0, engine="sofi", window=8, seconds=None,
        worker_mode="thread",
        addresses=Addresses(frames="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0"),
    )
    base.update(kw)
    return PipelineConfig(**base)


@pytest.fixture
def make_window(qtbot):
    made: list[MainWindow] = []

    def factory(cfg: PipelineConfig | None = None, **kw) -> MainWindow:
        win = MainWindow(cfg or small_config(), error_dialogs=kw.pop("error_dialogs", False), **kw)
        qtbot.addWidget(win)
        win.show()
        made.append(win)
        return win

    yield factory
    for win in made:  # never leave a pipeline running after a failed assertion
        if win.state != "idle" or win.isVisible():
            win.close()
            qtbot.waitUntil(lambda w=win: not w.isVisible() and w.state == "idle", timeout=30_000)


def start_and_wait_results(qtbot, win: MainWindow, n: int = 3) -> None:
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "running" or bool(win.errors), timeout=START_TIMEOUT_MS)
    assert not win.errors, win.errors
    qtbot.waitUntil(lambda: win.n_displayed >= n, timeout=LIVE_TIMEOUT_MS)


def stop_and_wait(qtbot, win: MainWindow) -> None:
    qtbot.mouseClick(win.controls.stop_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "idle", timeout=30_000)


# ------------------------------------------------------------------ small pieces
def test_latest_slot_keeps_only_newest():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.take() is None
    for i in range(5):
        slot.put(i)
    assert slot.take() == 4
    assert slot.take() is None  # taken once
    assert slot.n_put == 5


def test_rate_meter_and_latency_percentiles():
    meter = RateMeter(window_s=1.0)
    for k in range(101):
        meter.tick(now=10.0 + k * 0.01)  # 100 events/s over one second
    assert meter.rate(now=11.0) == pytest.approx(100, rel=0.05)
    lat = RollingLatency(size=100)
    for v in range(1, 101):
        lat.add(v)
    p50, p99 = lat.percentiles()
    assert p50 == pytest.approx(50.5) and p99 == pytest.approx(99.01)


def test_robust_levels_ignore_a_hot_pixel():
    img = np.full((64, 64), 100.0, np.float32)
    img[:, 32:] = 200.0
    img[5, 5] = 65535.0
    lo, hi = robust_levels(img)
    assert lo == pytest.approx(100.0) and hi == pytest.approx(200.0)


def test_apply_controls_maps_onto_pipeline_config():
    cfg = small_config()
    v = ControlValues(engine="sofi", backend="eager", window=12, stride=3, exposure_ms=5.0,
                      fps=50.0, record=True, record_path="/tmp/x.ome.tif")
    new = apply_controls(cfg, v)
    assert (new.window, new.stride, new.fps, new.seconds) == (12, 3, 50.0, None)
    assert new.record == Path("/tmp/x.ome.tif")
    with pytest.raises(ValueError, match="does not fit"):
        apply_controls(cfg, ControlValues(exposure_ms=30.0, fps=100.0))
    with pytest.raises(ValueError, match="no file"):
        apply_controls(cfg, ControlValues(record=True, record_path=""))


def test_views_share_raw_pixel_coordinates(make_window):
    """The 2x output is drawn at half scale, so both views show the same sample region."""
    win = make_window()
    raw = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE)
    win.views.set_raw(raw)
    win.views.set_sr(np.zeros((2 * SIZE, 2 * SIZE), np.float32))
    r_raw = win.views.raw.item.mapRectToView(win.views.raw.item.boundingRect())
    r_sr = win.views.sr.item.mapRectToView(win.views.sr.item.boundingRect())
    assert (r_raw.width(), r_raw.height()) == (SIZE, SIZE)
    assert r_sr == r_raw
    win.views.raw.view.setRange(xRange=(4, 12), yRange=(4, 12), padding=0)
    (x0, x1), (y0, y1) = win.views.sr.view.viewRange()
    assert x0 == pytest.approx(4, abs=0.5) and x1 == pytest.approx(12, abs=0.5)


def test_invalid_settings_are_reported_not_raised(make_window, qtbot):
    win = make_window()
    win.controls.timing.fps.setValue(100.0)
    win.controls.timing.exposure.setValue(50.0)  # 50 ms cannot fit in a 10 ms frame
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    assert win.state == "idle"
    assert any("does not fit" in e for e in win.errors)
    assert "Error" in win.status_label.text()
    assert "does not fit" in win.message_area.toPlainText()


# ------------------------------------------------------------------ live pipeline
def test_start_shows_frames_and_sr_then_stop(make_window, qtbot):
    win = make_window()
    start_and_wait_results(qtbot, win, n=5)
    raw = win.views.raw.item.image
    sr = win.views.sr.item.image
    assert raw is not None and raw.shape == (SIZE, SIZE)
    assert sr is not None and sr.shape == (2 * SIZE, 2 * SIZE) and sr.dtype == np.float32
    assert np.isfinite(sr).all() and sr.std() > 0  # a real reconstruction, not a blank
    qtbot.waitUntil(lambda: win.latency_plot.n_points >= 2 and win.fps_plot.n_points >= 2,
                    timeout=LIVE_TIMEOUT_MS)
    assert np.isfinite(win.latency_plot.last("p50"))
    assert win.fps_plot.last("acquired") > 0
    qtbot.waitUntil(lambda: win.counters.value("acquired") not in ("-", "0"), timeout=5000)
    # exposure applies to the running camera at once (pymmcore-plus core of the pipeline)
    assert win.controls.timing.exposure.isEnabled()
    win.controls.timing.exposure.setValue(5.0)
    assert win.pipeline.core.getExposure() == pytest.approx(5.0)
    stop_and_wait(qtbot, win)
    m = win.last_metrics
    assert m is not None and m.frames_acquired > 0
    assert m.frames_received == m.frames_acquired  # nothing lost between camera and engine
    assert win.seq_gaps == 0
    assert win.counters.value("acquired") == str(m.frames_acquired)
    assert "Stopped" in win.status_label.text()
    assert win.controls.start_btn.isEnabled() and not win.controls.stop_btn.isEnabled()


def test_keyboard_shortcuts_start_and_stop(make_window, qtbot):
    win = make_window()
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=5000)  # shortcuts go to the active window
    qtbot.keyClick(win, QtCore.Qt.Key.Key_R, QtCore.Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: win.state == "running" or bool(win.errors), timeout=START_TIMEOUT_MS)
    assert win.state == "running", win.errors
    qtbot.waitUntil(lambda: win.n_displayed >= 1, timeout=LIVE_TIMEOUT_MS)
    qtbot.keyClick(win, QtCore.Qt.Key.Key_Period, QtCore.Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: win.state == "idle", timeout=30_000)


def test_manual_contrast_keeps_levels(make_window, qtbot):
    win = make_window()
    assert win.controls.auto_contrast.isChecked()
    win.controls.auto_contrast.setChecked(False)
    win.views.sr.hist.setLevels(0.0, 1234.0)  # as a drag of the histogram handles does
    start_and_wait_results(qtbot, win, n=3)
    n = win.n_displayed
    qtbot.waitUntil(lambda: win.n_displayed > n + 2, timeout=LIVE_TIMEOUT_MS)
    assert tuple(win.views.sr.item.levels) == pytest.approx((0.0, 1234.0))
    win.controls.colormap.setCurrentText("inferno")
    assert not win.controls.auto_contrast.isChecked()  # a colour map keeps manual levels
    shown = win.views.sr.hist.gradient.colorMap().map(np.array([0.0, 0.5, 1.0]), mode="byte")
    wanted = get_colormap("inferno").map(np.array([0.0, 0.5, 1.0]), mode="byte")
    assert np.abs(shown.astype(int) - wanted.astype(int)).max() <= 2
    stop_and_wait(qtbot, win)


def _random_weights(tmp_path: Path, name: str) -> Path:
    """A freshly initialised network saved in the real weights format (no training needed)."""
    import importlib

    from engines.nn_common import save_weights

    model, norm = importlib.import_module(f"engines.{name}").build_model()
    return save_weights(tmp_path / f"{name}.pt", model, model_name=name, arch=model.cfg, norm=norm)


def test_change_engine_between_runs(make_window, qtbot, tmp_path):
    win = make_window()
    start_and_wait_results(qtbot, win, n=2)
    assert win._result.peek()[0].engine == "sofi"
    stop_and_wait(qtbot, win)
    qtbot.waitUntil(lambda: win.controls.engine.count() > 1, timeout=30_000)  # listed off-thread
    other = next((e for e in ("convlstm", "convgru") if win.controls.engine.findText(e) >= 0), None)
    if other is None:
        pytest.skip("unavailable: no network engine registered besides sofi")
    win.controls.engine.setCurrentText(other)
    assert win.controls.weights.isEnabled()
    win.controls.weights.setText(str(_random_weights(tmp_path, other)))
    win.controls.window_frames.setValue(4)
    start_and_wait_results(qtbot, win, n=2)
    header, img = win._result.peek()
    assert header.engine == other
    assert img.shape == (2 * SIZE, 2 * SIZE)
    stop_and_wait(qtbot, win)


def test_record_to_file_is_read_back_complete(make_window, qtbot, tmp_path):
    import tifffile

    path = tmp_path / "movie.ome.tif"
    win = make_window()
    win.controls.record_path.setText(str(path))
    win.controls.record.setChecked(True)
    start_and_wait_results(qtbot, win, n=3)
    stop_and_wait(qtbot, win)
    m = win.last_metrics
    assert m.frames_recorded == m.frames_acquired > 0
    assert win.counters.value("recorded") == str(m.frames_acquired)
    data = tifffile.imread(path)
    assert data.shape == (m.frames_acquired, SIZE, SIZE) and data.dtype == np.uint16
    assert not np.all(data == 0)


def test_bad_replay_file_shows_error_in_window(make_window, qtbot, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 20)
    win = make_window(small_config(source=str(bad)), error_dialogs=True)
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(win.errors), timeout=START_TIMEOUT_MS)
    qtbot.waitUntil(lambda: win.state == "idle", timeout=30_000)
    text = win.errors[-1]
    assert "broken.tif" in text and "Traceback" not in text
    assert "broken.tif" in win.status_label.text()
    assert "broken.tif" in win.message_area.toPlainText()
    boxes = [w for w in QtWidgets.QApplication.topLevelWidgets()
             if isinstance(w, QtWidgets.QMessageBox) and w.isVisible()]
    assert boxes and not boxes[0].isModal() and "broken.tif" in boxes[0].text()
    assert win.controls.start_btn.isEnabled()  # the user can fix the input and retry


def test_close_while_running_stops_cleanly(qtbot, tmp_path):
    """Engine worker in its own process (the default): no thread or process survives."""
    import tifffile

    threads_before = set(threading.enumerate())
    path = tmp_path / "closing.ome.tif"
    win = MainWindow(small_config(record=path, worker_mode="process"), error_dialogs=False)
    qtbot.addWidget(win)
    win.show()
    start_and_wait_results(qtbot, win, n=2)
    win.close()  # while acquiring: must stop, finish the file, then close
    qtbot.waitUntil(lambda: not win.isVisible() and win.state == "idle", timeout=30_000)

    def leftovers():
        return [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]

    qtbot.waitUntil(lambda: not leftovers(), timeout=10_000)
    assert multiprocessing.active_children() == []
    m = win.last_metrics
    assert tifffile.imread(path).shape[0] == m.frames_acquired > 0


def test_engine_that_fails_to_load_is_reported(make_window, qtbot, tmp_path):
    """A corrupt weights file: the run ends by itself and the window says why."""
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file")
    win = make_window(small_config(engine="convgru", weights=str(bad)))
    assert win.controls.weights.text() == str(bad)
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(win.errors) and win.state == "idle", timeout=START_TIMEOUT_MS)
    assert any("corrupt.pt" in e for e in win.errors), win.errors
    assert "Traceback" not in win.message_area.toPlainText()
    assert win.controls.start_btn.isEnabled()


def test_roi_crop_acquires_only_the_roi(make_window, qtbot):
    win = make_window()
    win.views.set_raw(np.zeros((SIZE, SIZE), np.uint16))  # the ROI is drawn on a frame
    win.controls.crop.setChecked(True)
    assert win.views.roi.isVisible()
    win.views.roi.setPos([4, 8])
    win.views.roi.setSize([16, 12])
    start_and_wait_results(qtbot, win, n=2)
    assert win.config.roi == (4, 8, 16, 12)
    assert win.views.raw.item.image.shape == (12, 16)
    assert win.views.sr.item.image.shape == (24, 32)
    # both images sit at the ROI's place on the sensor (raw-pixel coordinates)
    r = win.views.sr.item.mapRectToView(win.views.sr.item.boundingRect())
    assert (r.x(), r.y(), r.width(), r.height()) == (4, 8, 16, 12)
    stop_and_wait(qtbot, win)


def test_file_chooser_sets_recording_path(make_window, qtbot, tmp_path, monkeypatch):
    chosen = str(tmp_path / "chosen")
    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (chosen, "")))
    win = make_window()
    assert not win.controls.record.isChecked()
    qtbot.mouseClick(win.controls.browse, QtCore.Qt.MouseButton.LeftButton)
    assert win.controls.record_path.text() == chosen + ".ome.tif"
    assert win.controls.record.isChecked()


def test_camera_failure_is_reported_and_run_ends(make_window, qtbot, monkeypatch):
    """A camera that fails mid-acquisition (fault injected into the simulated sensor)."""
    from acquisition import cameras

    real_next = cameras.SimulatedCamera.next_image
    count = {"n": 0}

    def failing_next(self, buffer):
        count["n"] += 1
        if count["n"] > 30:
            raise RuntimeError("sensor disconnected")
        return real_next(self, buffer)

    monkeypatch.setattr(cameras.SimulatedCamera, "next_image", failing_next)
    win = make_window()
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(win.errors), timeout=START_TIMEOUT_MS)
    qtbot.waitUntil(lambda: win.state == "idle", timeout=30_000)
    assert any("sensor disconnected" in e for e in win.errors), win.errors
    assert "sensor disconnected" in win.message_area.toPlainText()
    assert win.controls.start_btn.isEnabled()


def test_run_gui_makes_a_screenshot_and_exits_cleanly(qtbot, tmp_path):
    """The entry point the CLI calls: start, run `seconds`, grab the window, close."""
    from qtpy import QtGui

    from gui.app import run_gui

    shot = tmp_path / "shot.png"
    rc = run_gui(small_config(), screenshot=shot, seconds=0.5, colormap="viridis")
    assert rc == 0
    img = QtGui.QImage(str(shot))
    assert not img.isNull() and img.width() >= 800 and img.height() >= 500


def test_another_runs_results_are_never_displayed(make_window, qtbot, monkeypatch):
    """Issue 15: a convlstm window once showed "sofi (2x), frames 511-530" of another run."""
    import time

    import zmq

    from realtime.protocol import ResultHeader, StatsMessage, encode_result, encode_stats, new_run_id

    win = make_window()
    titles: list[str] = []
    real_set_titles = win.views.set_titles
    monkeypatch.setattr(win.views, "set_titles",
                        lambda raw=None, sr=None: (titles.append(sr or ""), real_set_titles(raw, sr)))
    start_and_wait_results(qtbot, win, n=2)
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.PUB)
    intruder.connect(win.pipeline.endpoints.results)
    other = new_run_id()
    foreign_img = np.full((2 * SIZE, 2 * SIZE), 12345.0, np.float32)
    header = ResultHeader(seq_first=511, seq_last=530, t_acq_ns=time.time_ns(),
                          shape=foreign_img.shape, engine="other-run", run_id=other)
    counts = []
    try:
        for _ in range(60):
            intruder.send_multipart(encode_result(header, foreign_img))
            intruder.send_multipart(encode_stats(StatsMessage(engine="other-run", final=True,
                                                              state="final", run_id=other)))
            qtbot.wait(30)
            counts.append((win.counters.value("displayed"), win.counters.value("results")))
            assert not np.array_equal(win.views.sr.item.image, foreign_img)
        assert win.state == "running"
    finally:
        intruder.close(0)
        ctx.term()
    stop_and_wait(qtbot, win)
    assert not any("other-run" in t or "511-530" in t for t in titles), titles
    assert win.last_metrics.malformed_messages.get("results:foreign", 0) > 0
    numeric = [(int(d), int(r)) for d, r in counts if d.isdigit() and r.isdigit()]
    assert numeric and all(d <= r for d, r in numeric), numeric


def test_existing_recording_advice_names_controls_that_exist(make_window, qtbot, tmp_path, monkeypatch):
    """Issue 15: the dialog told the user to 'allow overwrite', a control the window lacks."""
    path = tmp_path / "old.ome.tif"
    path.write_bytes(b"an earlier recording")
    win = make_window()
    win.controls.record_path.setText(str(path))
    win.controls.record.setChecked(True)
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(win.errors) and win.state == "idle", timeout=START_TIMEOUT_MS)
    msg = win.errors[-1]
    assert "exists" in msg and "'...' button" in msg and "allow overwrite" not in msg
    assert win.controls.browse.text() == "..." and path.read_bytes() == b"an earlier recording"
    # doing what it says works: choose the file with the button (the dialog confirmed it)
    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(path), "")))
    qtbot.mouseClick(win.controls.browse, QtCore.Qt.MouseButton.LeftButton)
    win.errors.clear()
    start_and_wait_results(qtbot, win, n=2)
    stop_and_wait(qtbot, win)
    assert path.read_bytes()[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00")  # a TIFF now


def test_an_mda_sequence_runs_in_the_window_to_its_end(make_window, qtbot, tmp_path):
    """`livesr mda SEQ.yaml` with the window: frames and SR shown, the run ends by itself
    when the sequence does, and the recording holds every frame."""
    import tifffile

    seq = tmp_path / "seq.yaml"
    seq.write_text("time_plan: {interval: 0, loops: 60}\n")
    rec = tmp_path / "mda.ome.tif"
    win = make_window(small_config(mode="mda", sequence=seq, record=rec))
    qtbot.mouseClick(win.controls.start_btn, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.state == "idle" and win.last_metrics is not None,
                    timeout=START_TIMEOUT_MS)
    assert not win.errors, win.errors
    m = win.last_metrics
    assert m.frames_acquired == m.frames_recorded == 60 and m.outputs_received > 0
    assert win.views.raw.item.image is not None and win.views.sr.item.image is not None
    assert tifffile.imread(rec).shape == (60, SIZE, SIZE)
# ------------------------------------------------------------------ what SOFI used, and the blinking check
def test_sr_view_shows_engine_info_and_no_banner_on_blinking_data(make_window, qtbot):
    win = make_window(small_config(size=64, window=20))
    start_and_wait_results(qtbot, win, n=3)
    qtbot.waitUntil(lambda: "PSF 2.19 px" in win.engine_info_label.text(), timeout=LIVE_TIMEOUT_MS)
    text = win.engine_info_label.text()
    assert "default NA 1.4 / 600 nm" in text and "from core pixel-size config" in text
    assert "lag 0 (auto)" in text and "bleaching correction quadratic" in text
    assert win.blinking_banner.isHidden()
    stop_and_wait(qtbot, win)


def test_banner_warns_when_the_data_do_not_blink(make_window, qtbot, shared_data):
    """The real static donut: a visible red warning over the views, in plain words."""
    donut = shared_data / "real-static-donut-100f.tif"
    if not donut.exists():
        pytest.skip(f"unavailable: {donut} not present")
    win = make_window(small_config(source=str(donut), fps=50.0, window=20))
    start_and_wait_results(qtbot, win, n=2)
    qtbot.waitUntil(lambda: win.blinking_banner.isVisible(), timeout=LIVE_TIMEOUT_MS)
    assert "noise or static fluorescence, not resolved structure" in win.blinking_banner.text()
    assert "lag 1 (auto)" in win.engine_info_label.text()
    messages = win.message_area.toPlainText()
    assert "Blinking check: No independent blinking" in messages and "pixel size is unknown" in messages
    assert not win.errors  # a warning, not an error
    win.close()
    qtbot.waitUntil(lambda: not win.isVisible() and win.state == "idle", timeout=30_000)
