"""'Adapt to this sample': fine-tune a network on the last recording, in a background process.

Why a process (QProcess running ``python -m engines.finetune ... --events``): fine-tuning is
minutes of torch work; in its own process it can never block the Qt thread or slow the live
pipeline's threads with the GIL, and the window only reads its JSON progress lines as they
arrive (Qt's event loop delivers them; nothing here waits). When it is done the panel shows
the before/after agreement on the held-out part and offers to switch the live engine to the
new weights (a running view restarts with them).

`WeightsNote` shows, under the weights chooser, where the chosen file came from (its
provenance, `engines.nn_common.describe_weights_file`), read on a helper thread because
reading a weights file imports torch.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qtpy import QtCore, QtWidgets

from engines.registry import neural_engines
from gui.naming import named
from gui.relay import LatestSlot

__all__ = ["AdaptPanel", "WeightsNote", "default_out_dir"]

MODELS = neural_engines()


def default_out_dir() -> Path:
    """``<user data dir>/livesr/finetuned``: never the installed package."""
    import platformdirs

    return Path(platformdirs.user_data_dir("livesr")) / "finetuned"


class AdaptPanel(QtWidgets.QGroupBox):
    """Fine-tune on the newest recording; emits `useWeights(model, path)` when asked to switch.

    `extra_args` are appended to the command line (tests: a few steps on small patches).
    """

    useWeights = QtCore.Signal(str, str)
    #: emitted on the Qt thread when a fine-tuning run ends: the "done" event's data, or
    #: {"error": message}
    finished = QtCore.Signal(dict)

    def __init__(self, parent: QtWidgets.QWidget | None = None, *, out_dir: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__("Adapt to this sample", parent)
        self.out_dir = out_dir
        self.extra_args = tuple(extra_args)
        self.recording: Path | None = None
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.messages: list[str] = []
        self._out: Path | None = None
        self._buffer = b""
        self.process = QtCore.QProcess(self)
        self.process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.SeparateChannels)
        self.process.readyReadStandardOutput.connect(self._read_output)
        self.process.finished.connect(self._on_finished)
        self.process.errorOccurred.connect(self._on_process_error)

        self.source = named(QtWidgets.QLabel("record a fixed sample (>= 500 frames) first"), "adapt_source")
        self.source.setWordWrap(True)
        self.model = named(QtWidgets.QComboBox(), "adapt_model")
        self.model.addItems(MODELS)
        self.minutes = named(QtWidgets.QDoubleSpinBox(), "adapt_minutes")
        self.minutes.setRange(0.5, 600.0)
        self.minutes.setValue(5.0)
        self.minutes.setSuffix(" min")
        self.minutes.setToolTip("training time budget (the held-out scoring and the check on "
                                "simulated scenes come on top)")
        self.run_btn = named(QtWidgets.QPushButton("Adapt to this sample"), "adapt_run")
        self.run_btn.setToolTip("fine-tune the network on the last recording (a fixed sample) "
                                "in a background process")
        self.cancel_btn = named(QtWidgets.QPushButton("Cancel"), "adapt_cancel")
        self.progress = named(QtWidgets.QProgressBar(), "adapt_progress")
        self.progress.setRange(0, 1000)
        self.status = named(QtWidgets.QLabel(""), "adapt_status")
        self.status.setWordWrap(True)
        self.use_btn = named(QtWidgets.QPushButton("Use the new weights"), "adapt_use")
        self.use_btn.setToolTip("switch the live engine to the fine-tuned weights")
        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        self.use_btn.clicked.connect(self._use)

        form = QtWidgets.QFormLayout(self)
        form.addRow(self.source)
        form.addRow("network:", self.model)
        form.addRow("training:", self.minutes)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        form.addRow(self.progress)
        form.addRow(self.status)
        form.addRow(self.use_btn)
        self._update_buttons()

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.process.state() != QtCore.QProcess.ProcessState.NotRunning

    def set_recording(self, path: str | Path | None) -> None:
        """The recording to adapt to (None: nothing recorded yet)."""
        p = Path(path) if path else None
        self.recording = p if p is not None and p.exists() else None
        self.source.setText(f"recording: {self.recording.name}" if self.recording
                            else "record a fixed sample (>= 500 frames) first")
        self._update_buttons()

    def set_model(self, name: str) -> None:
        if name in MODELS:
            self.model.setCurrentText(name)

    def _update_buttons(self) -> None:
        self.run_btn.setEnabled(self.recording is not None and not self.running)
        self.cancel_btn.setEnabled(self.running)
        self.progress.setVisible(self.running)
        self.use_btn.setEnabled(self.result is not None and not self.running)

    # ------------------------------------------------------------------ run
    def command(self) -> list[str]:
        """The command line this panel runs (also shown in the message list)."""
        assert self.recording is not None
        model = self.model.currentText()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out_dir = self.out_dir or default_out_dir()
        self._out = out_dir / f"{self.recording.name.split('.')[0]}-{model}-{stamp}.pt"
        return [sys.executable, "-m", "engines.finetune", str(self.recording), "--model", model,
                "--out", str(self._out), "--minutes", f"{self.minutes.value():g}", "--events",
                *self.extra_args]

    def start(self) -> None:
        if self.recording is None or self.running:
            return
        cmd = self.command()
        assert self._out is not None
        self._out.parent.mkdir(parents=True, exist_ok=True)
        self.result, self.error, self._buffer = None, None, b""
        self.messages.append("$ " + " ".join(cmd[1:]))
        self.progress.setValue(0)
        self.status.setText("starting the fine-tuning process ...")
        self.process.start(cmd[0], cmd[1:])
        self._update_buttons()

    def cancel(self) -> None:
        if self.running:
            self.status.setText("cancelling ...")
            self.process.terminate()

    def _read_output(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._event(line.decode(errors="replace").strip())

    def _event(self, line: str) -> None:
        if not line.startswith("{"):
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        kind = ev.get("event")
        if kind == "step":
            self.progress.setValue(int(1000 * float(ev.get("progress") or 0.0)))
            eta = ev.get("eta_s")
            self.status.setText(f"training: step {ev.get('step')}, loss {ev.get('loss')}"
                                + (f", ~{eta / 60:.1f} min left" if eta is not None else ""))
        elif kind == "stage":
            self.status.setText(STAGES.get(ev.get("stage"), str(ev.get("stage"))))
        elif kind in ("log", "warning"):
            self.messages.append(("warning: " if kind == "warning" else "") + str(ev.get("text")))
        elif kind == "done":
            self.result = ev
        elif kind == "error":
            self.error = str(ev.get("message"))

    def _on_finished(self, code: int, _status: Any) -> None:
        self._read_output()
        if self._buffer:
            self._event(self._buffer.decode(errors="replace").strip())
            self._buffer = b""
        if self.result is not None and code == 0:
            r = self.result
            self.status.setText(
                f"held-out agreement with the SOFI of all frames: {r['before']:.3f} -> "
                f"{r['after']:.3f} ({r['gain']:+.3f}); live 20-frame SOFI {r['live_sofi20']:.3f}"
                + _forgetting_text(r.get("forgetting_check")))
            self.finished.emit(dict(r))
        else:
            self.result = None
            err = self.error or self._stderr_line() or f"the fine-tuning process ended with code {code}"
            self.status.setText(f"fine-tuning failed: {err}")
            self.finished.emit({"error": err})
        self._update_buttons()

    def _on_process_error(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart:
            self.error = f"could not start {sys.executable}: {self.process.errorString()}"
            self.status.setText(f"fine-tuning failed: {self.error}")
            self.finished.emit({"error": self.error})
            self._update_buttons()

    def _stderr_line(self) -> str:
        text = bytes(self.process.readAllStandardError().data()).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else ""

    def _use(self) -> None:
        if self.result is not None:
            self.useWeights.emit(str(self.result["model"]), str(self.result["weights"]))

    def shutdown(self, timeout_ms: int = 5000) -> None:
        """Stop a running fine-tuning (window closing); its checkpoint stays for --resume."""
        if self.running:
            self.process.terminate()
            if not self.process.waitForFinished(timeout_ms):
                self.process.kill()
                self.process.waitForFinished(timeout_ms)


STAGES = {
    "reading": "reading the recording, computing the SOFI of all frames ...",
    "before": "scoring the current weights on the held-out part ...",
    "training": "training ...",
    "after": "scoring the new weights on the held-out part ...",
    "forgetting": "checking both weights on simulated scenes ...",
}


def _forgetting_text(fc: dict[str, Any] | None) -> str:
    if not fc:
        return ""
    if fc.get("worse"):
        return "; worse on simulated scenes: use them for this sample only"
    return "; no loss on simulated scenes"


class WeightsNote(QtWidgets.QLabel):
    """Where the chosen weights file came from, read off the Qt thread."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__("", parent)
        self.setObjectName("weights_note")
        self.setWordWrap(True)
        self.setStyleSheet("color: #9e9e9e;")
        self._slot = LatestSlot[tuple[str, str]]()
        self._wanted = ""
        self._timer = QtCore.QTimer(self, interval=100)
        self._timer.timeout.connect(self._poll)

    def show_for(self, path: str) -> None:
        """Describe `path` ("" clears the note)."""
        path = path.strip()
        self._wanted = path
        if not path:
            self.setText("")
            return
        if not Path(path).is_file():
            self.setText("no such file")
            return
        self.setText("reading ...")
        threading.Thread(target=self._describe, args=(path,), daemon=True,
                         name="livesr-gui-weights-note").start()
        self._timer.start()

    def _describe(self, path: str) -> None:
        from engines.nn_common import describe_weights_file

        self._slot.put((path, describe_weights_file(path)))

    def _poll(self) -> None:
        item = self._slot.take()
        if item is None:
            return
        path, text = item
        if path == self._wanted:
            self.setText(text)
            self._timer.stop()
