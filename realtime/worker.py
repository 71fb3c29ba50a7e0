"""The engine worker: camera frames in (PULL), reconstructed images out (PUB).

Why it looks like this:

* It runs in its own process by default (``run_in_process``, spawn) so that the engine's
  compute never competes with acquisition for the GIL; tests use ``run_in_thread``.
* When the engine is slower than the camera, frames queue up. The worker then drains every
  queued message first and computes only the *newest* output that is due, counting the
  outputs it skipped (``outputs_skipped``). Frames are never dropped in transit (PUSH/PULL)
  and an output is only ever computed from consecutive frames of one stream: a sequence gap
  or a shape change restarts the window and the engine.
* Every engine's input is also watched by the blinking check (``engines.blinking``): the newest
  ``blinking_frames`` frames are copied into a small ring and, every ``blinking_every`` frames,
  assessed on ``blinking_pixels`` pixels (~5-10 ms) in the loop's first idle moment (no frame
  queued; at the latest ``CHECK_MAX_WAIT_FRAMES`` frames later). Not on a helper thread: its
  many small numpy calls held the GIL against the engine's and made outputs ~10x later. Its
  latest report rides on every result's ``info`` as ``blinking_check.*`` keys next to the
  engine's own ``output_info()``, and is logged at the first report and whenever ``ok`` flips.
* A learned engine (a network, ``engine.learned``) is also checked against the data
  (``engines.trust``): a companion streaming SOFI over the last ``trust_window`` frames eats
  every frame (running sums, O(pixels)); at most every 0.5 s an output is compared with it
  before it is published, and the verdict rides on every result as ``trust.*`` keys. The
  companion's image goes out as a ``ReferenceHeader`` message ("reference"), so a viewer can
  show SOFI next to the network on the same frames.
* Everything on the input socket is untrusted: a malformed message is counted by
  ``ProtocolError.reason`` and reported in the periodic :class:`StatsMessage`; it never
  crashes the worker and never becomes an image. An engine that raises is counted too
  (``engine_errors``) and restarted on the next frame.
* Every frame names its run (``run_id``). A worker started for one run (``run_id=``) counts
  frames of any other run as malformed ("foreign") and drops them; a server worker
  (``run_id=None``) adopts the run of the first frame it gets, and the next client's run
  once the current one ended or fell silent. Results and stats carry the run, so the
  receiver can drop what is not its own. Within a run, frames of different MDA streams
  (``FrameHeader.stream``, e.g. "p0/c1/z0") each get their own window and engine state.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping
from itertools import pairwise
from typing import Any, Callable, Union

import numpy as np
import zmq

from engines.registry import REFERENCE_ENGINE, EngineSpec

from .handle import EngineReport
from .protocol import (
    FOREIGN,
    EndOfStream,
    EngineCounts,
    FrameHeader,
    ProtocolError,
    ReferenceHeader,
    ResultHeader,
    StatsMessage,
    StatsState,
    decode,
    encode_reference,
    encode_result,
    encode_stats,
)
from .window import RollingWindow, StreamContinuity

__all__ = ["EngineLoadError", "EngineWorker", "default_compute_threads", "plan_stateful_feed",
           "plan_window_feed"]

logger = logging.getLogger(__name__)

#: What the worker runs: an EngineSpec (or a bare engine name) for ``engines.load_engine``, an
#: engine object, or a zero-argument factory.
EngineSource = Union[EngineSpec, str, Any, Callable[[], Any]]
SocketSetup = Callable[[zmq.Socket], None]


class EngineLoadError(RuntimeError):
    """The engine could not be loaded or compiled (reported once, through the stats)."""
#: a due blinking check waits for an idle moment at most this many frames
CHECK_MAX_WAIT_FRAMES = 10


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and odd callables: assume the plain form
        return False


def default_compute_threads() -> int:
    """Half the cores (acquisition, recording and display need the rest), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def plan_stateful_feed(queued: int, *, per_frame_s: float | None, per_output_s: float | None,
                       min_output_share: float = 0.8) -> int:
    """How many of the newest ``queued`` frames a stateful engine ingests before its one output.

    A stateful engine (ConvLSTM) is never reset to catch up: it keeps its state and skips
    outputs. Feeding every queued frame keeps the most information in the state, but each
    frame costs ``per_frame_s`` and delays the output. So feed as many as fit while the time
    per output stays within 1 / ``min_output_share`` of the engine's own cost for one frame and
    its output: the output rate then stays >= ``min_output_share`` of the engine's capacity
    whatever the camera rate. Older frames beyond that are skipped (the state jumps over
    them, as if the camera had been slower). Unknown costs (just started): feed everything.
    """
    if queued <= 1 or not per_frame_s or per_frame_s <= 0:
        return max(1, queued)
    if not 0 < min_output_share <= 1:
        raise ValueError(f"min_output_share must be in (0, 1], got {min_output_share}")
    out_s = max(0.0, per_output_s or 0.0)
    budget = (per_frame_s + out_s) / min_output_share - out_s
    return max(1, min(queued, int(budget / per_frame_s + 1e-9)))


def plan_window_feed(queued: int, *, window: int, last_due: int | None, continues: bool) -> list[bool]:
    """Which of a continuous run's ``queued`` frames a streaming windowed engine is fed.

    Only the frames of the newest due output (``last_due``, an index into the run, or None)
    and the last ``window`` frames (the outputs after this batch) are needed; the engine is
    restarted over the gap. But an engine whose state already runs up to the run's first
    frame (``continues``) keeps it when that is no dearer than a restart (``queued <=
    window`` pushes): skipping would cost a full re-warm per output and, for a recurrent net
    near capacity, never catch up.
    """
    if continues and queued <= window:
        return [True] * queued
    return [(last_due - i < window) if last_due is not None and i <= last_due else i >= queued - window
            for i in range(queued)]


class EngineWorker:
    """Pull frames from ``in_addr`` (connect), publish results on ``out_addr`` (bind).

    ``engine`` is an :class:`engines.registry.EngineSpec` (or a bare engine name) for
    ``engines.load_engine`` (imported in the worker, so the spawning process never loads
    torch), an engine object, or a zero-argument factory returning one. Objects and factories
    must be picklable for ``run_in_process``. It implements :class:`realtime.handle.EngineHandle`
    (``start()`` runs it on a thread; a process is started by ``run_in_process``, which the
    supervised worker and the remote server call).

    ``socket_setup`` is applied to both sockets before bind/connect (e.g. CURVE keys).
    With ``exit_on_eos`` the worker finishes after the first EndOfStream; otherwise it resets
    and waits for the next stream until :meth:`stop`.

    ``run_id``: the run's id; frames of other runs are counted "foreign" and dropped
    (None: adopt each client's run in turn, see the module docstring).
    ``connect_results``: connect the result PUB to a subscriber that bound ``out_addr``
    (the pipeline binds every socket in its own process, on port 0 if asked) instead of
    binding it here.
    ``warmup_shape``: the camera's (H, W). An engine running through a compiled backend is
    compiled, checked (and for "auto" timed) for that shape before the worker says "ready",
    publishing "preparing" stats meanwhile, so no frame ever waits for a compiler.
    ``trust``: check the outputs against a companion SOFI (``engines.trust``; None = for
    learned engines only); ``trust_options``: ``engines.trust.TrustConfig`` fields (``window``,
    ``sofi`` = the companion's SOFI options, ...). An EngineSpec carries its own (these
    keywords are for engine objects and factories; given with a spec they are an error).
    """

    def __init__(
        self,
        engine: EngineSource,
        in_addr: str,
        out_addr: str,
        stride: int = 1,
        *,
        exit_on_eos: bool = True,
        stats_interval_s: float = 0.5,
        socket_setup: SocketSetup | None = None,
        max_drain: int = 4096,
        use_push: bool | None = None,
        result_hwm: int = 100,
        threads: int | None = None,
        run_id: str | None = None,
        connect_results: bool = False,
        run_idle_s: float = 1.0,
        warmup_shape: tuple[int, int] | None = None,
        blinking_check: bool = True,
        blinking_frames: int = 24,
        blinking_every: int = 100,
        blinking_pixels: int = 4096,
        trust: bool | None = None,
        trust_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        if isinstance(engine, str):
            engine = EngineSpec(engine)
        if isinstance(engine, EngineSpec):
            if trust is not None or trust_options is not None:
                raise ValueError("an EngineSpec carries its own trust settings: pass them in the spec")
            trust, trust_options = engine.trust, dict(engine.trust_options)
        self.engine_source = engine
        self.in_addr = in_addr
        self.out_addr = out_addr
        self.stride = stride
        self.exit_on_eos = exit_on_eos
        self.stats_interval_s = stats_interval_s
        self.socket_setup = socket_setup
        self.max_drain = max_drain
        self.use_push = use_push
        self.result_hwm = result_hwm
        self.threads = default_compute_threads() if threads is None else int(threads)
        self.expected_run_id = run_id
        self.connect_results = connect_results
        self.warmup_shape = None if warmup_shape is None else (int(warmup_shape[0]), int(warmup_shape[1]))
        self.run_idle_s = run_idle_s
        self._run_id: str | None = run_id  # the run being served now
        self._run_seen = 0.0  # monotonic time of its last frame
        self.blinking_check = bool(blinking_check)
        self.blinking_frames = int(blinking_frames)
        self.blinking_every = int(blinking_every)
        self.blinking_pixels = int(blinking_pixels)  # 16 x 16 tiles spread over the frame: ~8 ms a check
        self.trust = trust  # None: on for learned engines (networks), off for SOFI
        self.trust_options = dict(trust_options or {})  # engines.trust.TrustConfig fields
        self.stats = EngineCounts()  # running totals, sent in every StatsMessage
        self.frames_sent: int | None = None  # from the EndOfStream
        self._stop_event: Any = threading.Event()
        self._ready_event: Any = threading.Event()
        self._failure: Any = queue.SimpleQueue()  # why the worker could not start
        self._reports: Any = queue.SimpleQueue()  # the engine's EngineReport, once ready
        self._report: EngineReport | None = None
        self._crash: str | None = None  # a thread worker that raised: why
        self.log_level = logging.WARNING
        self._runner: threading.Thread | mp.process.BaseProcess | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """EngineHandle: serve on a daemon thread (a process: :meth:`run_in_process`)."""
        self.run_in_thread()

    def run_in_thread(self) -> threading.Thread:
        """Start :meth:`run` on a daemon thread (tests, single-process use)."""
        self._stop_event = threading.Event()
        self._ready_event = threading.Event()
        self._failure = queue.SimpleQueue()
        self._reports = queue.SimpleQueue()
        t = threading.Thread(target=self._run_logged, name="livesr-engine-worker", daemon=True)
        t.start()
        self._runner = t
        return t

    def _run_logged(self) -> None:
        try:
            self.run()
        except EngineLoadError:
            pass  # reported through startup_error() and the final stats
        except Exception as e:
            self._crash = f"engine worker failed: {_first_line(e)}"
            logger.exception("engine worker failed")

    def run_in_process(self) -> mp.process.BaseProcess:
        """Start :meth:`run` in a fresh spawned process (the default in the pipeline)."""
        ctx = mp.get_context("spawn")
        self._stop_event = ctx.Event()
        self._ready_event = ctx.Event()
        self._failure = ctx.SimpleQueue()
        self._reports = ctx.SimpleQueue()
        self.log_level = logging.getLogger().getEffectiveLevel()
        p = ctx.Process(target=_process_main, args=(self,), name="livesr-engine-worker", daemon=True)
        p.start()  # (a script that spawns needs the `if __name__ == "__main__":` guard)
        self._runner = p
        return p

    def stop(self) -> None:
        """Ask the worker to finish now (without waiting for an EndOfStream)."""
        self._stop_event.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine is loaded and the sockets are up (or the worker died)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready_event.wait(0.05):
                return True
            if not self.is_alive() and self._runner is not None:
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False

    def startup_error(self) -> str | None:
        """Why the worker could not start (a busy address, an engine that failed to load)."""
        msg = None
        try:
            while not self._failure.empty():
                msg = self._failure.get()
        except (OSError, EOFError, ValueError):
            pass
        if msg is not None:
            self._last_failure = msg
        return msg or getattr(self, "_last_failure", None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end; True if it did."""
        r = self._runner
        if r is None:
            return True
        r.join(timeout)
        return not r.is_alive()

    def is_alive(self) -> bool:
        return self._runner is not None and self._runner.is_alive()

    def terminate(self) -> None:
        """End a worker process that did not stop when asked (a thread cannot be ended)."""
        r = self._runner
        if isinstance(r, mp.process.BaseProcess) and r.is_alive():
            logger.warning("engine worker did not stop; terminating it")
            r.terminate()

    def failure(self) -> str | None:
        """Why the worker ended abnormally: a process's non-zero exit, a thread's exception."""
        if self.is_alive():
            return None
        code = self.exitcode
        if code not in (0, None):
            from .supervisor import describe_exit

            return describe_exit(code, self.pid)
        return self._crash

    def report(self) -> EngineReport | None:
        """What the engine runs with (its name and window), as it said when ready."""
        if self._report is None:
            try:
                while not self._reports.empty():
                    self._report = self._reports.get()
            except (OSError, EOFError, ValueError):
                pass
        return self._report

    @property
    def exitcode(self) -> int | None:
        """The worker process's exit code (None while it runs, and for a thread)."""
        return getattr(self._runner, "exitcode", None)

    @property
    def pid(self) -> int | None:
        """The worker process's id (None for a thread)."""
        return getattr(self._runner, "pid", None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_runner"] = None  # a Thread/Process handle does not travel to the child
        return state

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        """Serve until an EndOfStream (with ``exit_on_eos``) or :meth:`stop`. Blocking."""
        ctx = zmq.Context()
        # XPUB when connecting: it sees the subscriber's subscription arrive, so "ready" (and a
        # restarted engine's first stats) are not lost to the slow-joiner effect
        pub = ctx.socket(zmq.XPUB if self.connect_results else zmq.PUB)
        pull = ctx.socket(zmq.PULL)
        try:
            for s in (pub, pull):
                if self.socket_setup is not None:
                    self.socket_setup(s)
            pub.setsockopt(zmq.SNDHWM, self.result_hwm)
            pub.setsockopt(zmq.LINGER, 2000)  # let the final stats leave
            pull.setsockopt(zmq.LINGER, 0)
            try:
                if self.connect_results:
                    pub.connect(self.out_addr)
                else:
                    pub.bind(self.out_addr)
            except zmq.ZMQError as e:
                msg = f"cannot publish results on {self.out_addr}: {e}"
                if e.errno == zmq.EADDRINUSE:
                    msg += " (another livesr running? use a free port, e.g. tcp://127.0.0.1:0)"
                self._failure.put(msg)
                raise EngineLoadError(msg) from None
            try:
                engine = self._load_engine()
            except Exception as e:  # report why (once: the receiver prints it), then end
                msg = f"engine {self._engine_label()!r} failed to load: {_first_line(e)}"
                logger.debug(msg, exc_info=True)
                self.stats.engine_errors += 1
                self.stats.last_error = msg
                self._failure.put(msg)
                self._announce_failure(pub)
                raise EngineLoadError(msg) from e
            pull.connect(self.in_addr)
            if self.connect_results:
                self._await_subscriber(pub)
            try:
                self._warm_up(engine, pub)
            except Exception as e:
                msg = (f"engine {self._engine_label()!r} failed while compiling for "
                       f"{self.warmup_shape}: {_first_line(e)}")
                self.stats.engine_errors += 1
                self.stats.last_error = msg
                self._failure.put(msg)
                self._announce_failure(pub)
                raise EngineLoadError(msg) from e
            self._serve(engine, pull, pub)
        finally:
            pull.close()
            pub.close()
            ctx.term()

    def _warm_up(self, engine: Any, pub: zmq.Socket) -> None:
        """Compile / check / time the engine's backend for the camera's frame shape now."""
        if self.warmup_shape is None or not getattr(engine, "backend_modules", None):
            return
        from engines.backends import warm_up  # only engines with backend modules get here

        done = threading.Event()

        def heartbeat() -> None:  # the main thread does not touch `pub` until joined
            while not done.is_set():
                pub.send_multipart(encode_stats(self._stats_message("preparing")))
                done.wait(self.stats_interval_s)

        beat = threading.Thread(target=heartbeat, name="livesr-warmup-heartbeat", daemon=True)
        beat.start()
        try:
            seconds = warm_up(engine, self.warmup_shape)
        finally:
            done.set()
            beat.join()
        logger.info("engine %s compiled for %s in %.1f s", self._engine_label(), self.warmup_shape,
                    seconds)

    def _await_subscriber(self, pub: zmq.Socket, timeout_s: float = 5.0) -> None:
        """Wait (briefly) for the subscriber's subscription to reach our XPUB."""
        deadline = time.monotonic() + timeout_s
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            if pub.poll(50, zmq.POLLIN):
                pub.recv_multipart()
                return
        logger.warning("no subscriber on %s after %.0f s; publishing anyway", self.out_addr, timeout_s)

    def _engine_label(self) -> str:
        src = self.engine_source
        return str(getattr(src, "name", type(src).__name__))

    def _limit_threads(self) -> None:
        """Cap torch's intra-op threads. On a small, busy machine torch's default (one
        thread per core) spin-waits against acquisition and is ~50x slower than one thread
        (measured: SOFI 256x256 push 2.9 ms with 1 thread vs 160 ms with 2 on 2 loaded cores)."""
        if self.threads < 1 or (not isinstance(self.engine_source, EngineSpec) and "torch" not in sys.modules):
            return
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(self.threads)

    def _load_engine(self) -> Any:
        self._limit_threads()
        src = self.engine_source
        if isinstance(src, EngineSpec):
            from engines import load_engine  # lazy: torch loads in the worker only

            return load_engine(src)
        if hasattr(src, "window") and (hasattr(src, "reconstruct") or hasattr(src, "push")):
            return src
        if callable(src):
            return src()
        raise TypeError(f"engine must be an EngineSpec, an engine object or a factory, got {type(src).__name__}")

    def _announce_failure(self, pub: zmq.Socket) -> None:
        """Publish the final stats for ~1 s so that a subscriber that is still joining sees it."""
        for _ in range(10):
            if self._stop_event.is_set():
                break
            pub.send_multipart(encode_stats(self._stats_message("final", final=True)))
            time.sleep(0.1)

    def _stats_message(self, state: StatsState, final: bool = False) -> StatsMessage:
        return StatsMessage(
            engine=self._engine_name,
            state=state,
            counts=self.stats,  # (encoded at once, before the next frame changes it)
            frames_sent=self.frames_sent,
            final=final,
            run_id=self._run_id or "",
            window=int(getattr(self, "window", 0) or 0),
        )

    @property
    def _engine_name(self) -> str:
        eng = getattr(self, "_engine", None)
        return str(getattr(eng, "name", self._engine_label()))

    def _setup_engine(self, engine: Any, pub: Any) -> None:
        """Adopt a loaded engine and the result socket; fresh stream state."""
        self._engine = engine
        self._pub = pub
        self.window = int(engine.window)
        if self.window < 1:
            raise ValueError(f"engine window must be >= 1, got {self.window}")
        has_push = callable(getattr(engine, "push", None)) and callable(getattr(engine, "reset", None))
        self._streaming = has_push if self.use_push is None else (self.use_push and has_push)
        if not self._streaming and not callable(getattr(engine, "reconstruct", None)):
            raise TypeError("engine has neither push()/reset() nor reconstruct()")
        self._continuity = StreamContinuity()
        self._rolling = RollingWindow(self.window)
        self._engine_next_seq: int | None = None
        # an engine whose push(frame, output=False) only updates its sums (SOFI) skips the image
        # of every frame that is not published: catching up then costs sums, not images
        self._push_output_kw = self._streaming and _takes_keyword(engine.push, "output")
        self._stateful = self._streaming and bool(getattr(engine, "stateful", False))
        self._cost_frame_s: float | None = None  # EMA of a stateful engine's cost per frame fed
        self._cost_output_s: float | None = None  # ... and per output
        self._stream = ""  # the MDA stream (FrameHeader.stream) whose window is current
        self._parked: dict[str, dict[str, Any]] = {}  # other streams' window state
        self._info_fn = getattr(engine, "output_info", None)
        self._monitor: Any = None
        self._check_due = False
        self._check_waited = 0
        self._check_info: tuple[Any, dict[str, Any]] = (None, {})
        self._trust_on = bool(getattr(engine, "learned", False)) if self.trust is None else bool(self.trust)
        self._trust_problem = ""
        self._trust: Any = self._new_trust()
        self._trust_info: dict[str, Any] = {}
        if self.blinking_check:
            from engines.blinking import warm_up  # numpy only

            warm_up()
            self._monitor = self._new_monitor()
        self._engine_reset()

    def _new_trust(self) -> Any:
        """The trust check of one stream (None when off, or when it cannot run: said in the info)."""
        if not self._trust_on:
            return None
        try:
            from engines.trust import TrustMonitor

            return TrustMonitor(self.trust_options)
        except Exception as e:  # a bad option must not stop the engine: the outputs say why
            self._trust_problem = f"unavailable: {_first_line(e)}"
            logger.warning("trust check %s", self._trust_problem)
            return None

    def _new_monitor(self) -> Any:
        """A blinking check of one stream (None when checks are off)."""
        if not self.blinking_check:
            return None
        from engines.blinking import BlinkingMonitor

        n = max(self.blinking_frames, 10)
        return BlinkingMonitor(frames=n, every=max(1, self.blinking_every), first=min(20, n),
                               max_pixels=self.blinking_pixels)

    def _serve(self, engine: Any, pull: zmq.Socket, pub: zmq.Socket) -> None:
        self._setup_engine(engine, pub)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        state: StatsState = "ready"
        # the report first: whoever sees "ready" can read it (report())
        self._reports.put(EngineReport(self._engine_name, self.window, self._stateful))
        pub.send_multipart(encode_stats(self._stats_message(state)))
        self._ready_event.set()
        next_stats = time.monotonic() + self.stats_interval_s
        parent = mp.parent_process()  # None in the main process (thread mode)
        ended = False
        while not self._stop_event.is_set() and not ended:
            if poller.poll(timeout=50):
                frames, eos = self._drain(pull)
                if frames:
                    if state != "running":  # say so at once: a short-lived engine counts too
                        state = "running"
                        next_stats = time.monotonic()
                    self._process_batch(frames)
                if self._check_due and eos is None and not poller.poll(0):
                    self._run_check()  # only while no frame waits: it never delays a queued frame
                if eos is not None:
                    self.frames_sent = eos.frames_sent
                    logger.info("end of stream (%s) after %d frames sent", eos.reason, eos.frames_sent)
                    if self.exit_on_eos:
                        ended = True
                    else:
                        pub.send_multipart(encode_stats(self._stats_message("final", final=True)))
                        self._new_run()
                        state = "ready"
            now = time.monotonic()
            if now >= next_stats and not ended:
                pub.send_multipart(encode_stats(self._stats_message(state)))
                next_stats = now + self.stats_interval_s
                if parent is not None and not parent.is_alive():
                    logger.warning("the process that started this worker is gone; exiting")
                    break
        pub.send_multipart(encode_stats(self._stats_message("final", final=True)))

    def _new_run(self) -> None:
        self._parked.clear()
        self._continuity.reset()
        self._rolling.reset()
        self._engine_reset()
        self._run_id = self.expected_run_id
        self._reset_monitor()

    def _own_run(self, run_id: str) -> bool:
        """Does a frame / EndOfStream of run ``run_id`` belong to the run served now?"""
        now = time.monotonic()
        if run_id == self._run_id:
            self._run_seen = now
            return True
        if self.expected_run_id is None and (
            self._run_id is None or now - self._run_seen > self.run_idle_s
        ):
            if self._run_id is not None:
                logger.info("run %s silent for %.1f s: serving run %s now",
                            self._run_id, now - self._run_seen, run_id)
            self._run_id, self._run_seen = run_id, now  # a seq restart resets the window
            return True
        return False

    # ------------------------------------------------------------------ MDA streams
    #: what one stream (an MDA position / channel / z) owns: its window and engine state
    _STREAM_STATE = ("_engine", "_continuity", "_rolling", "_engine_next_seq", "_fed",
                     "_monitor", "_check_due", "_check_waited", "_check_info", "_trust", "_trust_info")

    def _select_stream(self, key: str) -> None:
        """Make `key`'s window the current one (the single-stream code below then runs on
        it unchanged); a stream seen for the first time gets a fresh window and, for a
        streaming engine, its own engine copy, so frames of different streams never mix."""
        if key == self._stream:
            return
        self._parked[self._stream] = {a: getattr(self, a) for a in self._STREAM_STATE}
        state = self._parked.pop(key, None)
        if state is None:
            state = {"_engine": self._engine_for_new_stream(), "_continuity": StreamContinuity(),
                     "_rolling": RollingWindow(self.window), "_engine_next_seq": None,
                     "_fed": 0, "_monitor": self._new_monitor(),
                     "_check_due": False, "_check_waited": 0, "_check_info": (None, {}),
                     "_trust": self._new_trust(), "_trust_info": {}}
        for a, v in state.items():
            setattr(self, a, v)
        self._stream = key
        if state["_engine_next_seq"] is None:
            self._engine_reset()

    def _engine_for_new_stream(self) -> Any:
        if not self._streaming:
            return self._engine  # reconstruct() keeps no state: one engine serves all
        import copy

        try:
            return copy.deepcopy(self._engine)
        except Exception as e:  # e.g. a compiled backend that cannot be copied
            logger.info("engine copy failed (%s); loading another one", e)
            return self._load_engine()

    # ------------------------------------------------------------------ blinking check
    def _reset_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.reset()
            self._check_due = False
        if self._trust is not None:
            self._trust.reset()

    def _watch(self, img: np.ndarray, seq: int | None = None) -> None:
        """Copy one frame into the blinking check's ring and the trust check's companion SOFI
        (cheap); note when a blinking check is due."""
        if self._trust is not None and img.ndim == 2:
            try:
                self._trust.add(img, seq)
            except Exception as e:  # the check must never stop the engine
                self._trust_problem = f"unavailable: {_first_line(e)}"
                logger.warning("trust check failed, off for this stream: %s", self._trust_problem)
                self._trust = None
        mon = self._monitor
        if mon is None or img.ndim != 2 or min(img.shape) < 4:
            return
        if mon.store(img):
            self._check_due, self._check_waited = True, 0
        elif self._check_due:  # never idle (a camera faster than the engine): run it anyway, late
            self._check_waited += 1
            if self._check_waited >= CHECK_MAX_WAIT_FRAMES:
                self._run_check()

    def _run_check(self) -> None:
        """Run the due blinking check; log its first report and every flip of ``ok``."""
        self._check_due = False
        mon = self._monitor
        try:
            report = mon.evaluate()
        except Exception as e:  # the check must never stop the engine
            logger.warning("blinking check failed: %s: %s", type(e).__name__, e)
            return
        if mon.changed:  # (`livesr engine` logs INFO; a local run shows it via the pipeline)
            logger.info("blinking check: %s", report.message)

    def _result_info(self) -> dict[str, Any]:
        """The engine's output_info() plus the latest blinking check, for ResultHeader.info."""
        info: dict[str, Any] = {}
        if callable(self._info_fn):
            try:
                info.update(self._info_fn())
            except Exception as e:  # never lose an image over its description
                info["info_error"] = f"{type(e).__name__}: {e}"[:200]
        mon = self._monitor
        if mon is not None and mon.report is not None:
            if self._check_info[0] is not mon.report:  # flattened once per report
                self._check_info = (mon.report, {f"blinking_check.{k}": v for k, v in mon.report.as_dict().items()})
            info.update(self._check_info[1])
        if self._trust_on:
            info.update(self._trust_info or {"trust.ok": None, "trust.reason": self._trust_problem or "checking"})
        return info

    def _assess_trust(self, out: np.ndarray, seq: int) -> None:
        """The trust verdict for this output (a fresh agreement when one is due)."""
        tm = self._trust
        if tm is None:
            return
        try:
            mon = self._monitor
            self._trust_info = tm.assess(out, seq, blinking=None if mon is None else mon.report).info()
        except Exception as e:  # never lose an image over its check
            self._trust_problem = f"unavailable: {_first_line(e)}"
            logger.warning("trust check failed, off for this stream: %s", self._trust_problem)
            self._trust, self._trust_info = None, {}

    def _publish_reference(self, h: FrameHeader) -> None:
        """The companion SOFI image the newest agreement was measured against (viewers show it)."""
        tm = self._trust
        if tm is None or not tm.fresh_reference or tm.reference is None:
            return
        tm.fresh_reference = False
        img, first, last = tm.reference
        img = np.ascontiguousarray(img, dtype=np.float32)
        ref = ReferenceHeader(
            seq_first=max(0, first), seq_last=max(0, last), shape=(int(img.shape[0]), int(img.shape[1])),
            engine=REFERENCE_ENGINE, run_id=h.run_id, stream=h.stream,
            info={k: v for k, v in self._trust_info.items() if k in ("trust.agreement", "trust.measured_at")})
        self._pub.send_multipart(encode_reference(ref, img), copy=True)

    # ------------------------------------------------------------------ input
    def _count_malformed(self, reason: str, detail: str) -> None:
        n = self.stats.malformed.get(reason, 0) + 1
        self.stats.malformed[reason] = n
        if n <= 3 or n % 1000 == 0:
            logger.warning("malformed message #%d (%s): %s", n, reason, detail)

    def _drain(self, pull: zmq.Socket) -> tuple[list[tuple[FrameHeader, np.ndarray, int]], EndOfStream | None]:
        """Everything queued right now, up to (and excluding anything after) an EndOfStream."""
        frames: list[tuple[FrameHeader, np.ndarray, int]] = []
        for _ in range(self.max_drain):
            try:
                parts = pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            t_recv = time.time_ns()
            try:
                header, img = decode(parts)
            except ProtocolError as e:
                self._count_malformed(e.reason, str(e))
                continue
            if isinstance(header, (FrameHeader, EndOfStream)) and not self._own_run(header.run_id):
                self._count_malformed(FOREIGN, f"{header.kind!r} of run {header.run_id!r}, "
                                               f"serving {self._run_id!r}")
                continue
            if isinstance(header, FrameHeader):
                self.stats.frames_received += 1
                frames.append((header, img, t_recv))  # type: ignore[arg-type]
            elif isinstance(header, EndOfStream):
                return frames, header
            else:
                self._count_malformed("unexpected_kind", f"{header.kind!r} message on the frame socket")
        return frames, None

    # ------------------------------------------------------------------ compute
    def _engine_reset(self) -> None:
        self._engine_next_seq = None
        self._fed = 0  # frames a stateful engine has been fed since its reset
        self._state_first_seq: int | None = None  # the first of them: its outputs depend on all since
        if self._streaming:
            self._engine.reset()

    def _process_batch(self, frames: list[tuple[FrameHeader, np.ndarray, int]]) -> None:
        """Feed one drained batch, stream by stream (MDA positions/channels/z never mix)."""
        groups: dict[str, list[tuple[FrameHeader, np.ndarray, int]]] = {}
        for f in frames:
            groups.setdefault(f[0].stream, []).append(f)
        for key, group in groups.items():
            self._select_stream(key)
            self._process_stream_batch(group)

    def _process_stream_batch(self, frames: list[tuple[FrameHeader, np.ndarray, int]]) -> None:
        """Feed one stream's frames; publish the newest due output of each continuous run."""
        t_start = time.time_ns()
        W, K = self.window, self.stride
        # 1. plan: run membership and due outputs (headers only, no pixels touched)
        new_run: list[bool] = []
        due: list[bool] = []
        for h, img, _ in frames:
            started = self._continuity.advance(h.seq, img.shape, img.dtype)
            c = self._continuity.count
            new_run.append(started)
            due.append(c >= W and (c - W) % K == 0)
        bounds = [i for i, s in enumerate(new_run) if s] + [len(frames)]
        if not new_run or not new_run[0]:
            bounds = [0] + bounds
        # 2. execute each run: only the frames its newest due output (and the future) needs
        for a, b in pairwise(bounds):
            if a == b:
                continue
            dues = [i for i in range(a, b) if due[i]]
            last_due = dues[-1] if dues else None
            self.stats.outputs_skipped += max(0, len(dues) - 1)
            if new_run[a]:
                self._rolling.reset()
                self._engine_reset()
                self._reset_monitor()
            if self._stateful:
                self._feed_stateful_run(frames[a:b], [i - a for i in dues], t_start)
                continue
            feed = plan_window_feed(b - a, window=W, last_due=None if last_due is None else last_due - a,
                                    continues=self._streaming and self._engine_next_seq == frames[a][0].seq)
            for i in range(a, b):
                if not self._feed_frame(frames, i, last_due, feed[i - a], t_start):
                    # engine error: that run is broken; the frames after it start a new one
                    self._continuity.reset()
                    self._rolling.reset()
                    if i + 1 < len(frames):
                        self._process_stream_batch(frames[i + 1 :])
                    return

    def _feed_stateful_run(self, run: list, dues: list[int], t_start: int) -> None:
        """One continuous run of a stateful engine: keep its state, skip outputs (and the oldest
        frames the engine cannot afford, see plan_stateful_feed), publish the newest due output."""
        for h_, img, _ in run:  # the blinking and trust checks see every frame, fed or skipped
            self._watch(img, h_.seq)
        m = plan_stateful_feed(len(run), per_frame_s=self._cost_frame_s,
                               per_output_s=self._cost_output_s)
        m = max(m, min(len(run), self.window - self._fed))  # a warm-up is fed in full
        start = len(run) - m
        last_due = dues[-1] if dues else None
        published = False
        try:
            if last_due is not None and last_due >= start:
                h, _, t_recv = run[last_due]
                out = self._push_frames([img for _, img, _ in run[start:last_due + 1]], True, run[start][0].seq)
                if out is not None:
                    self._publish(h, out, t_recv, t_start)
                    published = True
                start = last_due + 1
            if start < len(run):
                self._push_frames([img for _, img, _ in run[start:]], False, run[start][0].seq)
        except Exception as e:
            self._engine_error(e)
            self._continuity.reset()  # the next frame starts a fresh run on the reset engine
        if dues and not published:  # the others were counted by the caller
            self.stats.outputs_skipped += 1

    def _push_frames(self, imgs: list, want_output: bool, first_seq: int) -> Any:
        """Feed frames (the first is ``first_seq``) to a stateful engine (push_many when it has
        one); learn its costs."""
        eng = self._engine
        if self._state_first_seq is None:
            self._state_first_seq = first_seq
        self._fed += len(imgs)
        t0 = time.perf_counter()
        many = getattr(eng, "push_many", None)
        if callable(many):
            out = many(imgs, output=want_output)
        else:
            out = None
            for img in imgs:
                out = eng.push(img)
        cost = getattr(eng, "last_cost", None)
        ingest_s, output_s = cost if cost is not None else (time.perf_counter() - t0, None)
        a = 0.3
        per_frame = ingest_s / len(imgs)
        self._cost_frame_s = per_frame if self._cost_frame_s is None else (
            (1 - a) * self._cost_frame_s + a * per_frame)
        if output_s:
            self._cost_output_s = output_s if self._cost_output_s is None else (
                (1 - a) * self._cost_output_s + a * output_s)
        return out if want_output else None

    def _feed_frame(self, frames: list, i: int, last_due: int | None, needed: bool, t_start: int) -> bool:
        h, img, t_recv = frames[i]
        is_output = i == last_due
        out = None
        self._watch(img, h.seq)
        try:
            if self._streaming:
                if not needed:  # (plan_window_feed)
                    return True
                if self._engine_next_seq is not None and h.seq != self._engine_next_seq:
                    self._engine_reset()  # we skipped frames to catch up: restart cleanly
                out = (self._engine.push(img, output=is_output) if self._push_output_kw
                       else self._engine.push(img))
                self._engine_next_seq = h.seq + 1
            else:
                self._rolling.append(h.seq, img)
                if is_output:
                    out = self._engine.reconstruct(self._rolling.stack())
        except Exception as e:
            self._engine_error(e)
            return False
        if is_output:
            if out is None:
                self.stats.outputs_skipped += 1  # the engine had not warmed up (should not happen)
                return True
            try:
                self._publish(h, out, t_recv, t_start)
            except Exception as e:
                self._engine_error(e)
                return False
        return True

    def _engine_error(self, e: Exception) -> None:
        self.stats.engine_errors += 1
        self.stats.last_error = f"{type(e).__name__}: {e}"
        if self.stats.engine_errors <= 3 or self.stats.engine_errors % 100 == 0:
            logger.error("engine error #%d: %s", self.stats.engine_errors, self.stats.last_error)
        try:
            self._engine_reset()
        except Exception as e2:  # a reset that fails too: keep serving, report it
            self.stats.last_error += f" (reset failed: {type(e2).__name__}: {e2})"

    def _publish(self, h: FrameHeader, out: Any, t_recv: int, t_start: int) -> None:
        t_done = time.time_ns()
        out = np.asarray(out)
        if out.ndim != 2 or out.dtype.kind not in "uif":
            raise TypeError(f"engine returned {out.dtype} array of shape {out.shape}, expected a 2-D real image")
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        out = np.ascontiguousarray(out)
        seq_last = h.seq
        if self._trust is not None:
            self._assess_trust(out, seq_last)
        # a windowed engine saw the last `window` frames; a stateful one (ConvLSTM: `window`
        # is its warm-up) carries state from every frame fed since its reset
        first = self._state_first_seq if self._stateful and self._state_first_seq is not None else (
            seq_last - self.window + 1)
        header = ResultHeader(
            seq_first=first,
            seq_last=seq_last,
            t_acq_ns=h.t_acq_ns,
            shape=(int(out.shape[0]), int(out.shape[1])),
            engine=self._engine_name,
            dtype="float32",
            timings_ns={"received": t_recv, "start": t_start, "done": t_done, "published": time.time_ns()},
            outputs_skipped=self.stats.outputs_skipped,
            run_id=h.run_id,
            stream=h.stream,
            info=self._result_info(),
        )
        # copy=True: an engine may reuse its output buffer on the next push
        self._pub.send_multipart(encode_result(header, out), copy=True)
        self.stats.outputs += 1
        self._publish_reference(h)


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's errors can run to a page)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _process_main(worker: EngineWorker) -> None:
    """Entry point of the spawned worker process."""
    logging.basicConfig(level=worker.log_level, format="%(asctime)s engine-worker %(levelname)s %(message)s")
    # Ctrl+C in a terminal reaches the whole process group: the parent decides when we stop
    # (it sends the EndOfStream), so that the queued frames are still processed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal hangs up the whole group too
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if worker.threads >= 1:  # before torch is imported: also caps OpenMP/MKL pools
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(worker.threads))
    try:
        worker.run()
    except EngineLoadError:
        raise SystemExit(1) from None  # reported through startup_error() and the final stats
    except Exception:
        logger.exception("engine worker failed")
        raise SystemExit(1) from None
