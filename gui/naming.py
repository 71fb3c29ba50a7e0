"""``named(widget, "name")``: a widget with its object name, for tests and style sheets to find.

Why not ``QLabel(objectName="name")``: Qt accepts property keywords, but PySide6's stubs do
not declare them, so the type checker could not check those constructor calls at all.
"""

from __future__ import annotations

from typing import TypeVar

from qtpy import QtCore

__all__ = ["named"]

Obj = TypeVar("Obj", bound=QtCore.QObject)


def named(obj: Obj, name: str) -> Obj:
    """``obj`` with its object name set to ``name``."""
    obj.setObjectName(name)
    return obj
