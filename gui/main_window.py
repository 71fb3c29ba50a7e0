"""The livesr main window: live raw + super-resolved views, plots, controls, messages.

Threading model (why the GUI never blocks): the pipeline runs on its own threads and
emits psygnal signals there. Handlers only drop the newest item into a `LatestSlot`; a
QTimer on the Qt thread (~50 Hz) shows whatever is newest. Starting and stopping the
pipeline (camera setup, engine load, joining threads, finishing a recording) run on a
short-lived helper thread, so the window stays responsive even when they take seconds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
from qtpy import QtCore, QtWidgets

from engines.registry import DEFAULT_ENGINE, ENGINES, REFERENCE_ENGINE
from gui import bridge
from gui.adapt import AdaptPanel, WeightsNote
from gui.compare_view import CompareView, RollingMean
from gui.controls import ControlPanel, add_shortcuts
from gui.image_views import COLORMAPS
from gui.naming import named
from gui.plots import CountersWidget, FpsPlot, LatencyPlot
from gui.relay import LatestSlot, MessageQueue, RateMeter, RollingLatency
from gui.trust_panel import TrustPanel

if TYPE_CHECKING:  # (names only: the window imports the pipeline when a run starts)
    from pymmcore_plus import CMMCorePlus

    from realtime.config import PipelineConfig
    from realtime.metrics import PipelineMetrics
    from realtime.pipeline import Pipeline
    from realtime.protocol import ReferenceHeader, ResultHeader

log = logging.getLogger(__name__)

PipelineFactory = Callable[["PipelineConfig", "CMMCorePlus | None"], "Pipeline"]

_T = TypeVar("_T")

IDLE, STARTING, RUNNING, STOPPING = "idle", "starting", "running", "stopping"


class MainWindow(QtWidgets.QMainWindow):
    """Main window; `config` is a `realtime.config.PipelineConfig` (or None for defaults).

    `pipeline_factory(config, mmcore)` builds the pipeline (default
    `realtime.pipeline.Pipeline`); `mmcore` (a CMMCorePlus/UniMMCore) is the core the
    pipeline loads its camera into (None: a new core per run);
    `error_dialogs` pops a non-modal message box for errors besides the message area.
    """

    #: emitted on the Qt thread whenever the run state changes ("idle", "running", ...)
    stateChanged = QtCore.Signal(str)

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        pipeline_factory: PipelineFactory | None = None,
        mmcore: CMMCorePlus | None = None,
        refresh_hz: float = 50.0,
        plot_hz: float = 4.0,
        histogram_hz: float = 2.0,
        error_dialogs: bool = True,
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("livesr - live super-resolution")
        self.config = config if config is not None else bridge.default_config()
        self._factory = pipeline_factory or bridge.default_pipeline_factory
        self.mmcore = mmcore
        self.error_dialogs = error_dialogs
        self.state = IDLE
        self.pipeline: Pipeline | None = None
        self._helper: threading.Thread | None = None
        self._close_when_stopped = False
        self._restart_when_stopped = False  # "Switch to SOFI" during a run: stop, then start SOFI
        self._dialogs: list[QtWidgets.QMessageBox] = []
        self.errors: list[str] = []  # every error shown in this window (for tests/logs)

        # ---- cross-thread slots (written by pipeline threads, read by the timer) ----
        self._frame = LatestSlot[tuple[int, np.ndarray]]()
        self._result = LatestSlot[tuple["ResultHeader", np.ndarray]]()
        self._metrics = LatestSlot["PipelineMetrics"]()
        self._reference = LatestSlot[tuple["ReferenceHeader", np.ndarray]]()  # a network's trust reference (SOFI)
        engine = ENGINES.get(str(getattr(self.config, "engine", DEFAULT_ENGINE)), ENGINES[DEFAULT_ENGINE])
        self._raw_mean = RollingMean(int(getattr(self.config, "window", None) or engine.default_window))
        self._mean_on = False  # read by the pipeline thread: feed the rolling mean only when shown
        self._shown_span: tuple[int, int] | None = None  # frames of the output on screen
        self._raw_title = ""
        self._messages: MessageQueue[str] = MessageQueue()
        self._statuses: MessageQueue[str] = MessageQueue()  # progress notes from the pipeline ("compiling ...")
        self._notes: MessageQueue[str] = MessageQueue()  # warnings and check reports: the message area
        # (kind, error text or None): "started", "start_failed", "stopped", "finished"
        self._lifecycle: MessageQueue[tuple[str, str | None]] = MessageQueue()
        self.acq_rate = RateMeter()
        self.out_rate = RateMeter()
        self.disp_rate = RateMeter()
        self.latency = RollingLatency(200)
        self.n_frames_seen = 0
        self.seq_gaps = 0  # breaks in the frame sequence numbers reported by the pipeline
        self._last_seq: int | None = None
        self.n_displayed = 0
        self.last_metrics: PipelineMetrics | None = None
        self._last_header: ResultHeader | None = None
        self._t0 = time.monotonic()

        # ---- widgets ----
        self.views = CompareView(upsample=2)
        self.trust_panel = TrustPanel()
        # the engine list comes from `engines`, whose import loads torch (seconds): it is
        # read on a helper thread and filled in by the timer; until then the config's one
        self.controls = ControlPanel(
            [str(getattr(self.config, "engine", DEFAULT_ENGINE))], bridge.backend_names(), list(COLORMAPS)
        )
        self._engine_list = LatestSlot[list[str]]()
        self._engine_lister = threading.Thread(
            target=lambda: self._engine_list.put(bridge.engine_names()),
            name="livesr-gui-engines", daemon=True,
        )
        self._engine_lister.start()
        self.latency_plot = LatencyPlot()
        self.fps_plot = FpsPlot()
        self.counters = CountersWidget()
        # what the engine used (PSF, lag, bleaching) and, when the data cannot support it, a warning
        self.blinking_banner = named(QtWidgets.QLabel(), "blinking_banner")
        self.blinking_banner.setWordWrap(True)
        self.blinking_banner.setStyleSheet("background: #b71c1c; color: white; padding: 4px; font-weight: bold;")
        self.blinking_banner.hide()
        self.engine_info_label = named(QtWidgets.QLabel(), "engine_info")
        self.engine_info_label.setWordWrap(True)
        self.engine_info_label.setStyleSheet("color: #9e9e9e;")
        self._last_info: dict | None = None
        self.message_area = named(QtWidgets.QPlainTextEdit(), "messages")
        self.message_area.setReadOnly(True)
        self.message_area.setMaximumBlockCount(500)
        self.message_area.setPlaceholderText("status and error messages appear here")

        plots = QtWidgets.QWidget()
        prow = QtWidgets.QHBoxLayout(plots)
        prow.setContentsMargins(0, 0, 0, 0)
        prow.addWidget(self.latency_plot, 1)
        prow.addWidget(self.fps_plot, 1)
        plots.setMinimumHeight(180)

        view_box = QtWidgets.QWidget()
        vcol = QtWidgets.QVBoxLayout(view_box)
        vcol.setContentsMargins(0, 0, 0, 0)
        vcol.addWidget(self.blinking_banner)
        vcol.addWidget(self.trust_panel)
        vcol.addWidget(self.views.options())
        vcol.addWidget(self.views, 1)
        vcol.addWidget(self.engine_info_label)

        left = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        left.addWidget(view_box)
        left.addWidget(plots)
        left.addWidget(self.message_area)
        left.setStretchFactor(0, 5)
        left.setStretchFactor(1, 2)
        left.setStretchFactor(2, 1)

        # fine-tuning on the last recording (its own module: gui/adapt.py)
        self.adapt = AdaptPanel()
        self.weights_note = WeightsNote()
        self.controls.insert_below_weights(self.weights_note)

        side = QtWidgets.QWidget()
        scol = QtWidgets.QVBoxLayout(side)
        scol.addWidget(self.controls)
        scol.addWidget(self.counters)
        scol.addWidget(self.adapt)
        scol.addStretch(1)
        side.setFixedWidth(300)

        central = QtWidgets.QWidget()
        row = QtWidgets.QHBoxLayout(central)
        row.addWidget(left, 1)
        row.addWidget(side)
        self.setCentralWidget(central)
        self.status_label = QtWidgets.QLabel("idle")
        self.statusBar().addWidget(self.status_label, 1)
        self._error_colour_timer = QtCore.QTimer(self, singleShot=True)
        self._error_colour_timer.timeout.connect(lambda: self.status_label.setStyleSheet(""))
        self.resize(1280, 800)

        # ---- wiring ----
        self.controls.set_values(bridge.controls_from_config(self.config))
        self.controls.startRequested.connect(self.start)
        self.controls.stopRequested.connect(self.stop)
        self.controls.colormapChanged.connect(self.views.set_colormap)
        self.controls.autoContrastChanged.connect(self.views.set_auto_levels)
        self.controls.roiToggled.connect(self.views.show_roi)
        self.trust_panel.fallbackRequested.connect(self.switch_to_sofi)
        self.views.rawModeChanged.connect(self._raw_mode_changed)
        self._shortcuts = add_shortcuts(self, self.controls)
        self.controls.weights.textChanged.connect(self.weights_note.show_for)
        self.weights_note.show_for(self.controls.weights.text())
        self.adapt.useWeights.connect(self.use_weights)
        self.stateChanged.connect(self._offer_adaptation)
        self._restart_when_idle = False
        self._offer_adaptation(self.state)

        self._timer = QtCore.QTimer(self)
        self._timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self._timer.timeout.connect(self._refresh)
        self._timer.start(max(1, int(1000 / refresh_hz)))
        self._plot_period = 1.0 / plot_hz
        self._last_plot = 0.0
        self._hist_period = 1.0 / histogram_hz
        self._last_hist = 0.0

    # ================================================================= run control
    def start(self) -> None:
        """Build a pipeline from the controls and start it on a helper thread."""
        if self.state != IDLE:
            return
        try:
            values = self.controls.values(self.views.roi_rect())
            cfg = bridge.apply_controls(self.config, values)
        except (ValueError, TypeError) as exc:
            self.show_error(f"Invalid settings: {exc}")
            return
        self.config = cfg
        self._reset_stats()
        self.views.clear()
        roi = values.roi
        self.views.set_origin(*(roi[:2] if roi is not None else (0, 0)))
        self._set_state(STARTING)
        self.show_status(f"Starting {values.engine} ({values.backend}): loading the engine ...")
        mmcore = self.mmcore if self.mmcore is not None else bridge.qt_thread_core(cfg)
        self._run_helper(self._start_in_helper, (cfg, mmcore), "livesr-gui-start")

    def stop(self) -> None:
        """Stop acquisition and finish the recording, on a helper thread."""
        if self.state not in (STARTING, RUNNING):
            return
        self._set_state(STOPPING)
        self.show_status("Stopping: finishing the engine queue and the recording ...")
        self._run_helper(self._stop_in_helper, None, "livesr-gui-stop")

    def switch_to_sofi(self) -> None:
        """The fallback of the trust panel: run SOFI (computed from the data alone) instead."""
        if self.controls.engine.findText(REFERENCE_ENGINE) < 0:
            self.controls.engine.addItem(REFERENCE_ENGINE)
        self.controls.engine.setCurrentText(REFERENCE_ENGINE)
        if self.state in (STARTING, RUNNING):
            self._restart_when_stopped = True
            self.show_status("Switching to SOFI: stopping the network ...")
            self.stop()
        else:
            self.show_status("SOFI selected: press Start")

    def _raw_mode_changed(self, _mode: str) -> None:
        self._mean_on = self.views.mean_mode
        self._raw_mean.clear()
        self._raw_title = ""
        self._shown_span = None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Blocking stop for application exit (not called from normal GUI actions)."""
        helper = self._helper
        if helper is not None:
            helper.join(timeout)
        if self.pipeline is not None:
            self._stop_in_helper(None)
        self._drain_lifecycle()

    def use_weights(self, engine: str, weights: str) -> None:
        """Switch the live engine to `engine` with `weights` (a running view restarts)."""
        if self.controls.engine.findText(engine) < 0:
            self.controls.engine.addItem(engine)
        self.controls.engine.setCurrentText(engine)
        self.controls.weights.setText(weights)
        if self.controls.record.isChecked():  # a restart must never overwrite the recording
            self.controls.record.setChecked(False)  # the weights were learned from
            self._append_message("recording turned off: the recording the weights came from is kept")
        if self.state in (STARTING, RUNNING):
            self._restart_when_idle = True
            self.stop()
        else:
            self.show_status(f"{engine} will use {weights}: press Start")

    def _offer_adaptation(self, state: str) -> None:
        """After a run: the recording it made is what 'Adapt to this sample' learns from."""
        if state != IDLE:
            return
        self.adapt.set_recording(getattr(self.config, "record", None))
        engine = str(getattr(self.config, "engine", ""))
        self.adapt.set_model(engine)
        if self._restart_when_idle:
            self._restart_when_idle = False
            QtCore.QTimer.singleShot(0, self.start)

    def _run_helper(self, fn: Callable[[_T], None], arg: _T, name: str) -> None:
        previous = self._helper

        def run() -> None:
            if previous is not None:
                previous.join()  # a stop waits for the start it cancels
            fn(arg)

        self._helper = threading.Thread(target=run, name=name, daemon=True)
        self._helper.start()

    # ---- helper-thread bodies (no Qt calls in here) ----
    def _start_in_helper(self, arg: tuple[PipelineConfig, CMMCorePlus | None]) -> None:
        """Open the camera/movie and recording, spawn the engine worker (fast failures)."""
        cfg, mmcore = arg
        pipe = None
        # never import on two threads at once: the lister's `import engines` (torch,
        # pydantic...) raced with the camera setup's imports ("partially initialized module")
        self._engine_lister.join()
        try:
            pipe = self._factory(cfg, mmcore)
            bridge.connect_pipeline(pipe, self)
            self.pipeline = pipe
            pipe.start()
        except Exception as exc:  # bad file, camera failure, recording file, engine spawn
            log.debug("start failed:\n%s", traceback.format_exc())
            self.pipeline = None
            if pipe is not None:
                bridge.disconnect_pipeline(pipe, self)
            self._lifecycle.put(("start_failed", bridge.describe_error(exc)))

    def _stop_in_helper(self, _: None) -> None:
        """Stop and wait until the recording is closed and the worker has ended."""
        pipe, err = self.pipeline, None
        if pipe is not None:
            try:
                final = pipe.stop()
                self._metrics.put(final if final is not None else bridge.final_metrics(pipe))
            except Exception as exc:
                log.debug("stop failed:\n%s", traceback.format_exc())
                err = bridge.describe_error(exc)
            finally:
                bridge.disconnect_pipeline(pipe, self)
        self._lifecycle.put(("stopped", err))

    # ---- pipeline signal handlers: run on pipeline threads, only store ----
    def on_started(self) -> None:
        self._lifecycle.put(("started", None))

    def on_finished(self, metrics: PipelineMetrics | None = None) -> None:
        """The run is over: by Stop, or by itself (end of a replay, camera/engine failure)."""
        if metrics is not None:
            self._metrics.put(metrics)
        self._lifecycle.put(("finished", None))

    def on_frame(self, seq: int, image: np.ndarray) -> None:
        last = self._last_seq
        if last is not None and seq != last + 1:
            self.seq_gaps += 1  # a frame the GUI never heard of: shown in the counters
        self._last_seq = seq
        if self._mean_on:
            self._raw_mean.add(seq, image)
        self._frame.put((seq, image))
        self.acq_rate.tick()

    def on_result(self, header: ResultHeader, image: np.ndarray) -> None:
        self._result.put((header, image))
        self.out_rate.tick()

    def on_reference(self, header: ReferenceHeader, image: np.ndarray) -> None:
        self._reference.put((header, image))

    def on_metrics(self, metrics: PipelineMetrics) -> None:
        self._metrics.put(metrics)

    def on_error(self, message: str) -> None:
        self._messages.put(str(message))

    def on_status(self, message: str) -> None:
        self._statuses.put(str(message))
    def on_warning(self, message: str) -> None:
        self._notes.put(f"Warning: {message}")

    def on_blinking_checked(self, check: object) -> None:
        self._notes.put(f"Blinking check: {check.get('message') if isinstance(check, dict) else check}")

    # ================================================================ Qt-thread side
    def _refresh(self) -> None:
        """Timer tick: show the newest frame/result, messages, and (slower) plots."""
        names = self._engine_list.take()
        if names is not None:
            self.controls.set_engines(names)
        self._drain_lifecycle()
        for msg in self._messages.drain():
            self.show_error(msg)
        for msg in self._statuses.drain():
            self.show_status(msg)
        for msg in self._notes.drain():
            self._append_message(msg)
        res = self._result.take()
        if res is not None:
            header, img = res
            self.views.set_sr(img)
            self.n_displayed += 1
            self.disp_rate.tick()
            t_acq = getattr(header, "t_acq_ns", None)
            if t_acq:
                self.latency.add((time.time_ns() - int(t_acq)) / 1e6)
            self._last_header = header
            self._last_info = getattr(header, "info", None) or self._last_info
            first, last = getattr(header, "seq_first", None), getattr(header, "seq_last", None)
            if isinstance(first, int) and isinstance(last, int):
                self._raw_mean.set_window(last - first + 1)  # the mean of the engine's window ...
                self._shown_span = (first, last)  # ... of the very frames the shown output used
        item = self._frame.take()  # after the result: the mean is of the frames of the output just shown
        if item is not None:
            seq, img = item
            self.n_frames_seen += 1
            span = self._shown_span if self._mean_on else None
            mean = self._raw_mean.mean(*span) if span is not None else (
                self._raw_mean.mean() if self._mean_on else None)
            if mean is not None:
                img = mean[0]
                self._raw_title = f"raw: mean of frames {mean[1]}-{mean[2]}"
            else:
                self._raw_title = "raw camera frame"
            self.views.set_raw(img)
        ref = self._reference.take()
        if ref is not None:
            rh, rimg = ref
            a = (getattr(rh, "info", None) or {}).get("trust.agreement")
            self.views.set_reference(rimg, f"SOFI, frames {rh.seq_first}-{rh.seq_last}"
                                           + (f" (trust r = {a:.2f})" if isinstance(a, (int, float)) else ""))
        m = self._metrics.take()
        if m is not None:
            self.last_metrics = m
        now = time.monotonic()
        if now - self._last_plot >= self._plot_period:
            self._last_plot = now
            self._update_plots(now)

    def _update_plots(self, now: float) -> None:
        if now - self._last_hist >= self._hist_period:
            self._last_hist = now
            self.views.refresh_histograms()
        if self._raw_title and self._raw_title != self.views.raw.label.text:
            self.views.set_titles(raw=self._raw_title)
        if self._last_header is not None:  # a title change re-lays out: only at plot rate
            self.views.set_titles(sr=bridge.result_title(self._last_header))
            self._last_header = None
            self._show_info(self._last_info)
        p50, p99 = self.latency.percentiles()
        running = self.state == RUNNING
        t = now - self._t0
        if running:
            self.latency_plot.append(t, p50=p50, p99=p99)
            self.fps_plot.append(
                t, acquired=self.acq_rate.rate(now), output=self.out_rate.rate(now),
                displayed=self.disp_rate.rate(now),
            )
        c = bridge.counters(self.last_metrics)
        acquired = c.get("acquired", self.acq_rate.count)
        self.counters.set_value("acquired", acquired)
        self.counters.set_value("recorded", c.get("recorded", "-"))
        # the metrics snapshot lags the results this window already took: never show fewer
        # results received than displayed
        self.counters.set_value("results", max(c.get("results", 0), self.out_rate.count))
        self.counters.set_value("displayed", self.n_displayed)
        dropped = c.get("dropped", 0)
        self.counters.set_value("dropped", dropped)
        self.counters.set_value("gaps", self.seq_gaps, warn=bool(self.seq_gaps))
        malformed = c.get("malformed", 0)
        self.counters.set_value("malformed", malformed, warn=bool(malformed))
        self.counters.set_value(
            "latency", "-" if math.isnan(p50) else f"{p50:.0f} / {p99:.0f} ms"
        )
        if running:
            self.show_status(
                f"running: {self.acq_rate.rate(now):.0f} fps acquired, "
                f"{self.disp_rate.rate(now):.0f} fps displayed, latency p50 "
                + ("-" if math.isnan(p50) else f"{p50:.0f} ms"),
                log_it=False,
            )

    def _show_info(self, info: dict | None) -> None:
        """The engine-info line under the views and the blinking warning banner over them."""
        engine, check = bridge.split_info(info)
        text = bridge.engine_info_text(engine)
        if text != self.engine_info_label.text():
            self.engine_info_label.setText(text)
        self.trust_panel.show_info(info)
        banner = bridge.blinking_banner_text(check)
        if banner is None:
            self.blinking_banner.hide()
        elif banner != self.blinking_banner.text() or self.blinking_banner.isHidden():
            self.blinking_banner.setText(banner)
            self.blinking_banner.show()

    def _drain_lifecycle(self) -> None:
        for kind, info in self._lifecycle.drain():
            if kind == "started" and self.state == STARTING:
                self._reset_stats()  # rates and plots count from the first frame
                self._set_state(RUNNING)
                core = getattr(self.pipeline, "core", None)
                if core is not None:
                    self.controls.timing.setMMCore(core)  # exposure changes apply live
                self.show_status("Acquiring")
            elif kind == "start_failed":
                self.show_error(f"Could not start: {info}")
                self._to_idle()
            elif kind == "finished" and self.state in (STARTING, RUNNING):
                # ended by itself; everything is closed already: release the pipeline
                pipe, self.pipeline = self.pipeline, None
                if pipe is not None:
                    bridge.disconnect_pipeline(pipe, self)
                self._to_idle()
                self.show_status("Run ended: " + self._summary())
            elif kind == "stopped" and self.state == STOPPING:
                self.pipeline = None
                if info:
                    self.show_error(f"Error while stopping: {info}")
                self._to_idle()
                if not info:
                    self.show_status("Stopped: " + self._summary())

    def _to_idle(self) -> None:
        self.controls.timing.setMMCore(None)
        self._set_state(IDLE)
        self._refresh_counters_once()
        if self._close_when_stopped:
            self.close()
        elif self._restart_when_stopped:
            self._restart_when_stopped = False
            QtCore.QTimer.singleShot(0, self.start)  # the same run settings, engine SOFI

    def _refresh_counters_once(self) -> None:
        m = self._metrics.take()
        if m is not None:
            self.last_metrics = m
        self._update_plots(time.monotonic())

    def _summary(self) -> str:
        c = bridge.counters(self.last_metrics)
        parts = [f"{c.get('acquired', self.acq_rate.count)} frames acquired"]
        if "recorded" in c:
            parts.append(f"{c['recorded']} recorded")
        parts.append(f"{self.n_displayed} outputs displayed")
        return ", ".join(parts)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.controls.set_running(state == RUNNING, busy=state in (STARTING, STOPPING))
        self.stateChanged.emit(state)

    def _reset_stats(self) -> None:
        for slot in (self._frame, self._result, self._metrics, self._reference):
            slot.clear()
        self._raw_mean.clear()
        self._shown_span = None
        for meter in (self.acq_rate, self.out_rate, self.disp_rate):
            meter.reset()
        self.latency.reset()
        self.latency_plot.clear_data()
        self.fps_plot.clear_data()
        self.n_frames_seen = self.n_displayed = self.seq_gaps = 0
        self._last_seq = None
        self._last_info = None
        self._show_info(None)
        self.last_metrics = None
        self._t0 = time.monotonic()

    # ================================================================== messages
    def show_status(self, text: str, log_it: bool = True) -> None:
        self.status_label.setText(text)
        if log_it:
            self._append_message(text)

    def show_error(self, text: str) -> None:
        """Error in the status bar, the message area and (optionally) a non-modal dialog."""
        self.errors.append(text)
        self.status_label.setText(f"Error: {text}")
        self.status_label.setStyleSheet("color: #e53935;")
        self._append_message(f"ERROR: {text}")
        self._error_colour_timer.start(8000)
        if self.error_dialogs:
            self._show_dialog(text)

    def _show_dialog(self, text: str) -> None:
        """One non-modal box at a time: later errors are appended to it, never stacked."""
        if self._dialogs:
            box = self._dialogs[0]
            box.setText(box.text() + "\n\n" + text)
            return
        box = QtWidgets.QMessageBox(
            QtWidgets.QMessageBox.Icon.Warning, "livesr", text,
            QtWidgets.QMessageBox.StandardButton.Ok, self,
        )
        box.setWindowModality(QtCore.Qt.WindowModality.NonModal)
        box.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        box.finished.connect(lambda _r, b=box: self._dialogs.remove(b) if b in self._dialogs else None)
        self._dialogs.append(box)
        box.show()

    def _append_message(self, text: str) -> None:
        self.message_area.appendPlainText(time.strftime("%H:%M:%S  ") + text)

    # ===================================================================== close
    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        """Closing stops acquisition and finishes the recording before the window goes."""
        if self.state == IDLE:
            if self._helper is not None:
                self._helper.join(5.0)  # it has already reported; only returning now
            self._engine_lister.join(10.0)  # exiting in the middle of `import torch` fails
            self._timer.stop()
            self.adapt.shutdown()
            for box in list(self._dialogs):
                box.close()
            event.accept()
            return
        event.ignore()
        self._close_when_stopped = True
        self.stop()  # on "stopped", _to_idle() closes the window
