"""Keep an engine worker process alive: notice when it dies, say so, start a new one.

The engine runs in its own process so that a crash in torch, a CUDA error or an
out-of-memory kill cannot take the camera or the recorder with it. The supervisor
watches that process, reports a death (`engineDied(reason)`), waits a short backoff
and starts a fresh worker (`engineRestarted(n)`). The fresh worker connects to the same
frame stream and starts with an empty rolling window, so its first output comes from
frames acquired after the restart: outputs resume on fresh windows, never on a window
with a hole in it. A worker that keeps dying is given up on (`gaveUp(reason)`) rather
than restarted in a tight loop.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait as _wait_sentinels
from typing import Any, Protocol

from psygnal import Signal

log = logging.getLogger("livesr.supervisor")


class ProcessLike(Protocol):
    """What the supervisor needs from a worker process (multiprocessing.Process fits)."""

    pid: int | None

    @property
    def exitcode(self) -> int | None: ...
    @property
    def sentinel(self) -> int: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


def describe_exit(exitcode: int | None, pid: int | None = None) -> str:
    """Human words for a process exit code (negative = killed by a signal)."""
    who = f"engine process {pid}" if pid else "engine process"
    if exitcode is None:
        return f"{who} stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"{who} was killed by {name}{hint}"
    if exitcode == 0:
        return f"{who} exited unexpectedly (code 0)"
    return f"{who} crashed with exit code {exitcode}"


class EngineSupervisor:
    """Start a worker process with `start_worker()` and restart it whenever it dies.

    Parameters
    ----------
    start_worker
        Returns a started process (e.g. ``lambda: EngineWorker(...).run_in_process()``).
    max_restarts, restart_window_s
        Give up after `max_restarts` deaths within `restart_window_s` seconds.
    backoff_s
        Pause before each restart, doubling per consecutive quick death up to
        `max_backoff_s` (a worker that lived `restart_window_s` resets it).

    Signals (psygnal; emitted from the supervisor's thread, so a Qt GUI must relay them
    to its own thread): `engineDied(str)`, `engineRestarted(int)`, `gaveUp(str)`.
    """

    engineDied = Signal(str)
    engineRestarted = Signal(int)
    gaveUp = Signal(str)

    def __init__(
        self,
        start_worker: Callable[[], ProcessLike],
        *,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        poll_s: float = 0.1,
        was_ready: Callable[[], bool] | None = None,
    ):
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self._start_worker = start_worker
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self.was_ready = was_ready
        self.process: ProcessLike | None = None
        self.restarts = 0
        self.deaths: list[str] = []
        self.gave_up = False
        self.gave_up_reason = ""
        self._recent: deque[float] = deque()
        self._started_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control
    def start(self) -> ProcessLike:
        """Start the first worker and the watching thread; return the worker."""
        if self._thread is not None:
            raise RuntimeError("supervisor already started")
        self._stop.clear()
        proc = self._spawn()
        self._thread = threading.Thread(target=self._watch, name="livesr-supervisor", daemon=True)
        self._thread.start()
        return proc

    @property
    def alive(self) -> bool:
        p = self.process
        return p is not None and p.is_alive()

    @property
    def watching(self) -> bool:
        """Still watching (a dead worker is about to be restarted) rather than stopped or gone."""
        t = self._thread
        return not self._stop.is_set() and t is not None and t.is_alive()

    def stop_watching(self, timeout: float | None = None) -> None:
        """Stop restarting workers; the current one is left as it is (finishing by itself)."""
        self._stop.set()
        t = self._thread
        if timeout is not None and t is not None and t is not threading.current_thread():
            t.join(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop watching, then end the worker (terminate, then kill); return its exit code.

        A worker that finished by itself (end of stream) is simply joined.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        with self._lock:
            p = self.process
        if p is None:
            return None
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)
        return p.exitcode

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the current worker exits *and* is not restarted (or timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            p = self.process
            if p is not None and not p.is_alive() and (self._stop.is_set() or self.gave_up):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> ProcessLike:
        # The worker must not die of the Ctrl-C meant for the parent (a terminal sends it to
        # the whole process group): the parent stops it in order. A signal mask blocked while
        # spawning is inherited by the child and kept across exec.
        old_mask = None
        if self.shield_sigint and hasattr(signal, "pthread_sigmask"):
            blocked = {signal.SIGINT} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            proc = self._start_worker()
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        with self._lock:
            self.process = proc
        self._started_at = time.monotonic()
        log.info("engine worker started (pid %s)", getattr(proc, "pid", "?"))
        return proc

    def _watch(self) -> None:
        backoff = self.backoff_s
        while not self._stop.is_set():
            proc = self.process
            if proc is None:
                return
            try:
                _wait_sentinels([proc.sentinel], timeout=self.poll_s)
            except (OSError, ValueError):  # sentinel closed under us
                pass
            if self._stop.is_set():
                return
            if proc.is_alive():
                continue
            proc.join(0)
            reason = describe_exit(proc.exitcode, getattr(proc, "pid", None))
            if proc.exitcode == 0 and self._clean_exit_expected():
                log.info("engine worker finished")
                return
            now = time.monotonic()
            lived = now - self._started_at
            self.deaths.append(reason)
            log.error("%s", reason)
            self.engineDied.emit(reason)

            if self.was_ready is not None and not self._safe_was_ready():
                # it died while loading (bad weights, no CUDA, ...): a restart fails the same way
                msg = f"the engine failed to start ({reason}); not restarting"
                log.error("%s", msg)
                self._give_up(msg)
                return
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self.restart_window_s:
                self._recent.popleft()
            if len(self._recent) > self.max_restarts:
                msg = (
                    f"engine died {len(self._recent)} times within "
                    f"{self.restart_window_s:g} s; not restarting (last: {reason})"
                )
                log.error("%s", msg)
                self._give_up(msg)
                return
            backoff = self.backoff_s if lived >= self.restart_window_s else backoff
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                self._spawn()
            except Exception as e:  # cannot even start: report and stop trying
                msg = f"could not restart the engine: {type(e).__name__}: {e}"
                log.exception("%s", msg)
                self._give_up(msg)
                return
            self.restarts += 1
            self.engineRestarted.emit(self.restarts)

    def _give_up(self, msg: str) -> None:
        self.gave_up = True
        self.gave_up_reason = msg
        self.gaveUp.emit(msg)

    def _safe_was_ready(self) -> bool:
        try:
            return bool(self.was_ready())  # type: ignore[misc]
        except Exception:
            return True  # cannot tell: assume it ran, so the restart policy applies

    def _clean_exit_expected(self) -> bool:
        """Whether exit code 0 means 'done' (override; default: the stream ended)."""
        return self.clean_exit_is_done

    #: a worker exits 0 after it received end-of-stream; set False to restart even then
    clean_exit_is_done: bool = True
    #: start workers with SIGINT blocked (Ctrl-C is for the parent, which stops them)
    shield_sigint: bool = True


class SupervisedWorker:
    """An engine handle (``realtime.handle.EngineHandle``) whose worker process is restarted
    when it dies.

    It owns an :class:`EngineSupervisor` and the worker it runs now; ``is_alive()`` stays
    True while a restart is pending and turns False only when the worker finished (end of
    stream, ``stop()``) or the supervisor gave up. Each restart runs a fresh copy of
    ``template`` (new process, empty rolling window); results keep flowing on the same
    address because the new worker connects again and ZeroMQ subscribers reconnect by
    themselves.
    """

    engineDied = Signal(str)
    engineRestarted = Signal(int)
    gaveUp = Signal(str)

    def __init__(self, template: Any, **supervisor_options: Any):
        self._template = template
        self._current: Any = template
        self._supervisor: EngineSupervisor | None = None
        self._options = supervisor_options
        self._stopping = False

    # ------------------------------------------------------------------ starting
    def _spawn(self) -> Any:
        worker = copy.copy(self._template)
        stats = getattr(self._template, "stats", None)
        if stats is not None:  # fresh counters: a restarted worker counts from zero
            worker.stats = type(stats)()
        proc = worker.run_in_process()
        self._current = worker
        return proc

    def start(self) -> None:
        """Start the first worker process and the supervisor that restarts it."""
        options = {"was_ready": self._current_was_ready, **self._options}
        sup = EngineSupervisor(self._spawn, **options)
        # forward through plain functions: psygnal resolves a connected `.emit` of another
        # SignalInstance by name, which mixes up same-named signals on different owners
        def died(reason: str) -> None:
            self.engineDied.emit(reason)

        def restarted(n: int) -> None:
            self.engineRestarted.emit(n)

        def gave_up(reason: str) -> None:
            self.gaveUp.emit(reason)

        sup.engineDied.connect(died)
        sup.engineRestarted.connect(restarted)
        sup.gaveUp.connect(gave_up)
        self._supervisor = sup
        sup.start()

    def _current_was_ready(self) -> bool:
        """Did the worker that just died ever finish loading its engine?"""
        return bool(self._current.wait_ready(0))

    # ------------------------------------------------------------------ what it runs
    @property
    def restarts(self) -> int:
        return self._supervisor.restarts if self._supervisor is not None else 0

    @property
    def stats(self) -> Any:
        """The current worker's running totals (a restarted worker counts from zero)."""
        return self._current.stats

    @property
    def pid(self) -> int | None:
        """The current worker process's id."""
        p = self._supervisor.process if self._supervisor is not None else None
        return getattr(p, "pid", None)

    def report(self) -> Any:
        return self._current.report()

    def startup_error(self) -> str | None:
        return self._current.startup_error()

    def failure(self) -> str | None:
        return self._current.failure()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Finish the current worker gracefully and do not restart it."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.stop_watching()
        self._current.stop()

    def terminate(self) -> None:
        """End a worker that did not stop when asked (terminate, then kill)."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.stop(timeout=5.0)
        else:
            self._current.terminate()

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            worker = self._current
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if worker.wait_ready(0.1 if left is None else min(0.1, left)):
                return True
            if not self.is_alive():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def is_alive(self) -> bool:
        if self._current.is_alive():
            return True
        sup = self._supervisor
        if sup is None or self._stopping or sup.gave_up or not sup.watching:
            return False
        # dead but about to be replaced, unless it finished cleanly (end of stream)
        return not (self._current.exitcode == 0 and sup.clean_exit_is_done)

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._current.join(0.1)
        if self._supervisor is not None:
            self._supervisor.stop_watching(1.0)
        return True


__all__ = ["EngineSupervisor", "ProcessLike", "SupervisedWorker", "describe_exit"]
