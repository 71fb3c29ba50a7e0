"""The trust signal of a network's output, in colour and one plain sentence, and the way out.

Shown with every network output (the ``trust.*`` keys of ``ResultHeader.info``, see
``engines.trust``): green when the image agrees with SOFI of the last frames, red when it does
not or the input is outside what the network was trained on, grey while it is being checked.
"Switch to SOFI" asks the window to run SOFI instead (``fallbackRequested``). Hidden for SOFI.
"""

from __future__ import annotations

from typing import Any

from qtpy import QtCore, QtWidgets

from engines.trust import TRUST_PREFIX
from gui.naming import named

STYLE = {
    True: "background: #1b5e20; color: white; padding: 4px;",
    False: "background: #b71c1c; color: white; padding: 4px; font-weight: bold;",
    None: "background: #424242; color: #eeeeee; padding: 4px;",
}


def trust_of(info: dict[str, Any] | None) -> dict[str, Any]:
    """The trust verdict in a ResultHeader.info, prefix removed ({} when there is none)."""
    return {k[len(TRUST_PREFIX):]: v for k, v in (info or {}).items() if k.startswith(TRUST_PREFIX)}


def trust_text(t: dict[str, Any]) -> str:
    """'Trust 0.82: <sentence>' (the number first: it is what the user compares over time)."""
    a = t.get("agreement")
    number = f"{a:.2f}" if isinstance(a, (int, float)) else "-"
    sentence = t.get("message") or t.get("reason") or "checking"
    return f"Trust {number}: {sentence}"


class TrustPanel(QtWidgets.QWidget):
    """One line over the views: the verdict for the newest network output, and the fallback."""

    fallbackRequested = QtCore.Signal()

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.label = named(QtWidgets.QLabel(), "trust_label")
        self.label.setWordWrap(True)
        self.label.setToolTip("agreement (Pearson r) of the network's image with SOFI of the last frames, "
                              "and whether the input is what the network was trained on (README: "
                              "Can I trust the network?)")
        self.button = named(QtWidgets.QPushButton("Switch to SOFI"), "switch_to_sofi")
        self.button.setToolTip("run SOFI instead: computed from the data alone, no learned prior")
        self.button.clicked.connect(self.fallbackRequested)
        row = QtWidgets.QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.label, 1)
        row.addWidget(self.button)
        self.ok: bool | None = None
        self.hide()

    def show_info(self, info: dict[str, Any] | None) -> None:
        """Show the verdict of a ResultHeader.info; hide the panel when it carries none (SOFI)."""
        t = trust_of(info)
        if not t:
            self.hide()
            return
        ok = t.get("ok") if t.get("ok") in (True, False) else None
        text = trust_text(t)
        if text != self.label.text() or ok is not self.ok:
            self.label.setText(text)
            self.label.setStyleSheet(STYLE[ok])
            self.ok = ok
        if self.isHidden():
            self.show()

    def clear(self) -> None:
        self.label.setText("")
        self.ok = None
        self.hide()
