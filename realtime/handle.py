"""The engine-handle contract: what the pipeline may do with whatever runs its engine.

Three classes run an engine for a pipeline: ``EngineWorker`` (a thread, or one process),
``SupervisedWorker`` (a worker process restarted when it dies) and ``RemoteEngineClient``
(engines on other machines). The pipeline talks to each through this Protocol only, so
none of them impersonates another and nothing outside a class touches its private fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["EngineHandle", "EngineReport"]


@dataclass(frozen=True)
class EngineReport:
    """What the engine really runs with, as the engine itself said when it was ready (its
    window is the engine's, not the configuration's guess: ``window=None`` means "default")."""

    engine: str  # the engine's name
    window: int  # frames per output (a stateful engine: its warm-up)
    stateful: bool = False  # output depends on every frame since reset (ConvLSTM)


@runtime_checkable
class EngineHandle(Protocol):
    """A running engine as the pipeline sees it.

    Call order: ``start()`` once (returns at once); ``wait_ready()`` until the engine is
    loaded (or it died: False); then frames flow over the sockets, not through the handle.
    ``stop()`` asks it to finish (it still answers the EndOfStream); ``join()`` waits for the
    end; ``terminate()`` ends one that did not stop when asked. ``report()`` is None until
    the engine is ready; ``startup_error()`` says why it could not start, ``failure()`` why it
    ended abnormally (None while running, after a clean end, and when it cannot tell).
    """

    def start(self) -> None:
        """Start serving (a thread or a process); returns at once."""
        ...

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine is loaded and its sockets are up; False if it ended or timed out."""
        ...

    def stop(self) -> None:
        """Ask the engine to finish (without waiting for an EndOfStream)."""
        ...

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine to end; True if it did."""
        ...

    def terminate(self) -> None:
        """End an engine that did not stop when asked (a thread cannot be ended: no-op)."""
        ...

    def is_alive(self) -> bool:
        """Still serving (or, supervised, about to be restarted)."""
        ...

    def startup_error(self) -> str | None:
        """Why the engine could not start (a busy address, an engine that failed to load)."""
        ...

    def failure(self) -> str | None:
        """Why the engine ended abnormally (a crash, a refused key); None otherwise."""
        ...

    def report(self) -> EngineReport | None:
        """What the engine runs with, once ready (None before)."""
        ...
