"""'Adapt to this sample' in the GUI (issue 11): the fine-tuning runs in a background process,
the Qt thread keeps running, the numbers are shown, and the live engine switches to the new
weights. Real QProcess running the real `engines.finetune` (a few steps on small patches),
real main window and pipeline (offscreen Qt).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import time

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from qtpy import QtCore  # noqa: E402

from gui.adapt import AdaptPanel  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from realtime.config import Addresses, PipelineConfig  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton


def test_adapt_runs_in_a_background_process_and_reports_without_blocking(
        qtbot, tmp_path, fixed_sample_recording, tiny_convgru_weights):
    panel = AdaptPanel(out_dir=tmp_path / "adapted", extra_args=(
        "--from", str(tiny_convgru_weights), "--steps", "3", "--patch", "16", "--eval-windows", "1",
        "--no-forgetting-check", "--threads", "1"))
    qtbot.addWidget(panel)
    panel.show()
    assert not panel.run_btn.isEnabled()  # nothing recorded yet
    panel.set_recording(fixed_sample_recording)
    assert panel.run_btn.isEnabled() and not panel.use_btn.isEnabled()

    ticks: list[float] = []
    progress: list[int] = []
    timer = QtCore.QTimer(interval=20)
    timer.timeout.connect(lambda: (ticks.append(time.monotonic()), progress.append(panel.progress.value())))
    timer.start()
    with qtbot.waitSignal(panel.finished, timeout=240_000) as done:
        t0 = time.monotonic()
        qtbot.mouseClick(panel.run_btn, LEFT)
        click_s = time.monotonic() - t0
        assert panel.running and panel.cancel_btn.isEnabled()
    timer.stop()
    result = done.args[0]
    assert "error" not in result, result
    assert click_s < 0.5  # starting the process returns at once
    gaps = np.diff(ticks)
    assert len(ticks) > 50 and gaps.max() < 1.0, gaps.max()  # the event loop never stalled
    assert max(progress) > 0  # progress was shown while it trained
    text = panel.status.text()
    assert f"{result['before']:.3f} -> {result['after']:.3f}" in text and "held-out agreement" in text
    assert panel.use_btn.isEnabled() and not panel.running
    assert os.path.isfile(result["weights"]) and str(tmp_path / "adapted") in result["weights"]
    with qtbot.waitSignal(panel.useWeights) as use:
        qtbot.mouseClick(panel.use_btn, LEFT)
    assert use.args == ["convgru", result["weights"]]


def test_adapt_reports_a_refused_recording(qtbot, tmp_path):
    from acquisition.recordings import write_recording

    short = write_recording(tmp_path / "short.ome.tif", np.zeros((30, 16, 16), np.uint16))
    panel = AdaptPanel(out_dir=tmp_path / "adapted")
    qtbot.addWidget(panel)
    panel.set_recording(short)
    with qtbot.waitSignal(panel.finished, timeout=120_000) as done:
        panel.start()
    assert "has 30 frames" in done.args[0]["error"]
    assert panel.status.text().startswith("fine-tuning failed: short.ome.tif has 30 frames")
    assert not panel.use_btn.isEnabled() and panel.run_btn.isEnabled()


def test_the_window_offers_adaptation_after_a_recording_and_switches_the_live_engine(
        qtbot, tmp_path, tiny_convgru_weights):
    rec = tmp_path / "run.ome.tif"
    cfg = PipelineConfig(source="sim", size=32, fps=100.0, engine="sofi", window=8, seconds=None,
                         worker_mode="thread", record=rec,
                         addresses=Addresses(frames="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0"))
    win = MainWindow(cfg, error_dialogs=False)
    qtbot.addWidget(win)
    win.show()
    assert not win.adapt.run_btn.isEnabled()  # the recording does not exist yet
    qtbot.mouseClick(win.controls.start_btn, LEFT)
    qtbot.waitUntil(lambda: win.state == "running" and win.n_displayed >= 2, timeout=60_000)
    # switching while running: the view stops and restarts with the new weights
    win.use_weights("convgru", str(tiny_convgru_weights))
    qtbot.waitUntil(lambda: win.state == "idle" or win.config.engine == "convgru", timeout=60_000)
    assert win.adapt.recording == rec and win.adapt.run_btn.isEnabled()  # offered after the run
    qtbot.waitUntil(lambda: win.state == "running" and win.config.engine == "convgru", timeout=60_000)
    assert str(win.config.weights) == str(tiny_convgru_weights) and not win.errors
    assert not win.controls.record.isChecked() and win.config.record is None  # kept, not overwritten
    assert rec.stat().st_size > 0
    qtbot.waitUntil(lambda: "weights tiny_convgru.pt" in win.engine_info_label.text(), timeout=60_000)
    qtbot.waitUntil(lambda: "trained on simulations" in win.weights_note.text(), timeout=60_000)
    win.close()
    qtbot.waitUntil(lambda: not win.isVisible() and win.state == "idle", timeout=30_000)
