"""The engine worker: camera frames in (PULL), reconstructed images out (PUB).

Why it looks like this:

* It runs in its own process by default (``run_in_process``, spawn) so that the engine's
  compute never competes with acquisition for the GIL; tests use ``run_in_thread``.
* When the engine is slower than the camera, frames queue up. The worker then drains every
  queued message first and computes only the *newest* output that is due, counting the
  outputs it skipped (``frames_dropped``). Frames are never dropped in transit (PUSH/PULL)
  and an output is only ever computed from consecutive frames of one stream: a sequence gap
  or a shape change restarts the window and the engine.
* Every engine's input is also watched by the blinking check (``engines.blinking``): the newest
  ``blinking_frames`` frames are copied into a small ring and, every ``blinking_every`` frames,
  assessed on ``blinking_pixels`` pixels (~5-10 ms) in the loop's first idle moment (no frame
  queued; at the latest ``CHECK_MAX_WAIT_FRAMES`` frames later). Not on a helper thread: its many small numpy calls held the GIL against the engine's
  and made outputs ~10x later. Its latest report rides on every result's ``info`` as
  ``blinking_check.*`` keys next to the engine's own ``output_info()``, and is logged at the
  first report and whenever ``ok`` flips.
* Everything on the input socket is untrusted: a malformed message is counted by
  ``ProtocolError.reason`` and reported in the periodic :class:`StatsMessage`; it never
  crashes the worker and never becomes an image. An engine that raises is counted too
  (``engine_errors``) and restarted on the next frame.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import zmq

from .protocol import (
    EndOfStream,
    FrameHeader,
    ProtocolError,
    ResultHeader,
    StatsMessage,
    decode,
    encode_result,
    encode_stats,
)
from .window import RollingWindow, StreamContinuity

__all__ = ["EngineWorker", "WorkerStats", "default_compute_threads"]

logger = logging.getLogger(__name__)

#: An engine name for ``engines.load_engine``, an engine object, or a zero-argument factory.
EngineSpec = Union[str, Any, Callable[[], Any]]
SocketSetup = Callable[[zmq.Socket], None]


#: a due blinking check waits for an idle moment at most this many frames
CHECK_MAX_WAIT_FRAMES = 10


def default_compute_threads() -> int:
    """Half the cores (acquisition, recording and display need the rest), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class WorkerStats:
    """Running totals of one worker (published as a StatsMessage)."""

    frames_received: int = 0
    outputs: int = 0
    frames_dropped: int = 0  # outputs that were due but skipped to keep up
    malformed: dict[str, int] = field(default_factory=dict)
    engine_errors: int = 0
    last_error: str = ""
    frames_sent: int | None = None  # from the EndOfStream


class EngineWorker:
    """Pull frames from ``in_addr`` (connect), publish results on ``out_addr`` (bind).

    ``engine`` is a name for ``engines.load_engine(name, **engine_options)`` (imported in the
    worker, so the spawning process never loads torch), an engine object, or a zero-argument
    factory returning one. Objects and factories must be picklable for ``run_in_process``.

    ``socket_setup`` is applied to both sockets before bind/connect (e.g. CURVE keys).
    With ``exit_on_eos`` the worker finishes after the first EndOfStream; otherwise it resets
    and waits for the next stream until :meth:`stop`.
    """

    def __init__(
        self,
        engine: EngineSpec,
        in_addr: str,
        out_addr: str,
        stride: int = 1,
        *,
        engine_options: dict[str, Any] | None = None,
        exit_on_eos: bool = True,
        stats_interval_s: float = 0.5,
        socket_setup: SocketSetup | None = None,
        max_drain: int = 4096,
        use_push: bool | None = None,
        result_hwm: int = 100,
        threads: int | None = None,
        blinking_check: bool = True,
        blinking_frames: int = 24,
        blinking_every: int = 100,
        blinking_pixels: int = 4096,
    ) -> None:
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.engine_spec = engine
        self.in_addr = in_addr
        self.out_addr = out_addr
        self.stride = stride
        self.engine_options = dict(engine_options or {})
        self.exit_on_eos = exit_on_eos
        self.stats_interval_s = stats_interval_s
        self.socket_setup = socket_setup
        self.max_drain = max_drain
        self.use_push = use_push
        self.result_hwm = result_hwm
        self.threads = default_compute_threads() if threads is None else int(threads)
        self.blinking_check = bool(blinking_check)
        self.blinking_frames = int(blinking_frames)
        self.blinking_every = int(blinking_every)
        self.blinking_pixels = int(blinking_pixels)  # 16 x 16 tiles spread over the frame: ~8 ms a check
        self.stats = WorkerStats()
        self._stop_event: Any = threading.Event()
        self._ready_event: Any = threading.Event()
        self._failure: Any = queue.SimpleQueue()  # why the worker could not start
        self._log_level = logging.WARNING
        self._runner: threading.Thread | mp.process.BaseProcess | None = None

    # ------------------------------------------------------------------ lifecycle
    def run_in_thread(self) -> threading.Thread:
        """Start :meth:`run` on a daemon thread (tests, single-process use)."""
        self._stop_event = threading.Event()
        self._ready_event = threading.Event()
        self._failure = queue.SimpleQueue()
        t = threading.Thread(target=self._run_logged, name="livesr-engine-worker", daemon=True)
        t.start()
        self._runner = t
        return t

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            logger.exception("engine worker failed")

    def run_in_process(self) -> mp.process.BaseProcess:
        """Start :meth:`run` in a fresh spawned process (the default in the pipeline)."""
        ctx = mp.get_context("spawn")
        self._stop_event = ctx.Event()
        self._ready_event = ctx.Event()
        self._failure = ctx.SimpleQueue()
        self._log_level = logging.getLogger().getEffectiveLevel()
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

    @property
    def exitcode(self) -> int | None:
        return getattr(self._runner, "exitcode", None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_runner"] = None  # a Thread/Process handle does not travel to the child
        return state

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        """Serve until an EndOfStream (with ``exit_on_eos``) or :meth:`stop`. Blocking."""
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pull = ctx.socket(zmq.PULL)
        try:
            for s in (pub, pull):
                if self.socket_setup is not None:
                    self.socket_setup(s)
            pub.setsockopt(zmq.SNDHWM, self.result_hwm)
            pub.setsockopt(zmq.LINGER, 2000)  # let the final stats leave
            pull.setsockopt(zmq.LINGER, 0)
            try:
                pub.bind(self.out_addr)
            except zmq.ZMQError as e:
                msg = f"cannot publish results on {self.out_addr}: {e}"
                if e.errno == zmq.EADDRINUSE:
                    msg += " (another livesr running? use a free port, e.g. tcp://127.0.0.1:0)"
                self._failure.put(msg)
                raise RuntimeError(msg) from None
            try:
                engine = self._load_engine()
            except Exception as e:  # report why, then end: nothing can be computed
                msg = f"engine {self._engine_label()!r} failed to load: {type(e).__name__}: {e}"
                logger.error(msg)
                self.stats.engine_errors += 1
                self.stats.last_error = msg
                self._failure.put(msg)
                self._announce_failure(pub)
                raise
            pull.connect(self.in_addr)
            self._serve(engine, pull, pub)
        finally:
            pull.close()
            pub.close()
            ctx.term()

    def _engine_label(self) -> str:
        spec = self.engine_spec
        return spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)

    def _limit_threads(self) -> None:
        """Cap torch's intra-op threads. On a small, busy machine torch's default (one
        thread per core) spin-waits against acquisition and is ~50x slower than one thread
        (measured: SOFI 256x256 push 2.9 ms with 1 thread vs 160 ms with 2 on 2 loaded cores)."""
        if self.threads < 1 or (not isinstance(self.engine_spec, str) and "torch" not in sys.modules):
            return
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(self.threads)

    def _load_engine(self) -> Any:
        self._limit_threads()
        spec = self.engine_spec
        if isinstance(spec, str):
            from engines import load_engine  # lazy: torch loads in the worker only

            opts = {k: v for k, v in self.engine_options.items() if v is not None}
            return load_engine(spec, **opts)
        if hasattr(spec, "window") and (hasattr(spec, "reconstruct") or hasattr(spec, "push")):
            return spec
        if callable(spec):
            return spec()
        raise TypeError(f"engine must be a name, an engine object or a factory, got {type(spec).__name__}")

    def _announce_failure(self, pub: zmq.Socket) -> None:
        """Publish the final stats for ~1 s so that a subscriber that is still joining sees it."""
        for _ in range(10):
            if self._stop_event.is_set():
                break
            pub.send_multipart(encode_stats(self._stats_message("final", final=True)))
            time.sleep(0.1)

    def _stats_message(self, state: str, final: bool = False) -> StatsMessage:
        s = self.stats
        return StatsMessage(
            engine=self._engine_name,
            state=state,
            frames_received=s.frames_received,
            outputs=s.outputs,
            frames_dropped=s.frames_dropped,
            malformed=dict(s.malformed),
            engine_errors=s.engine_errors,
            last_error=s.last_error,
            frames_sent=s.frames_sent,
            final=final,
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
        self._push_all = False
        self._info_fn = getattr(engine, "output_info", None)
        self._monitor: Any = None
        self._check_due = False
        self._check_waited = 0
        self._check_info: tuple[Any, dict[str, Any]] = (None, {})
        if self.blinking_check:
            from engines.blinking import BlinkingMonitor, warm_up  # numpy only

            warm_up()
            n = max(self.blinking_frames, 10)
            self._monitor = BlinkingMonitor(frames=n, every=max(1, self.blinking_every), first=min(20, n),
                                            max_pixels=self.blinking_pixels)
        self._engine_reset()

    def _serve(self, engine: Any, pull: zmq.Socket, pub: zmq.Socket) -> None:
        self._setup_engine(engine, pub)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        state = "ready"
        pub.send_multipart(encode_stats(self._stats_message(state)))
        self._ready_event.set()
        next_stats = time.monotonic() + self.stats_interval_s
        parent = mp.parent_process()  # None in the main process (thread mode)
        ended = False
        while not self._stop_event.is_set() and not ended:
            if poller.poll(timeout=50):
                frames, eos = self._drain(pull)
                if frames:
                    state = "running"
                    self._process_batch(frames)
                if self._check_due and eos is None and not poller.poll(0):
                    self._run_check()  # only while no frame waits: it never delays a queued frame
                if eos is not None:
                    self.stats.frames_sent = eos.frames_sent
                    logger.info("end of stream (%s) after %d frames sent", eos.reason, eos.frames_sent)
                    if self.exit_on_eos:
                        ended = True
                    else:
                        pub.send_multipart(encode_stats(self._stats_message("final", final=True)))
                        self._new_stream()
                        state = "ready"
            now = time.monotonic()
            if now >= next_stats and not ended:
                pub.send_multipart(encode_stats(self._stats_message(state)))
                next_stats = now + self.stats_interval_s
                if parent is not None and not parent.is_alive():
                    logger.warning("the process that started this worker is gone; exiting")
                    break
        pub.send_multipart(encode_stats(self._stats_message("final", final=True)))

    def _new_stream(self) -> None:
        self._continuity.reset()
        self._rolling.reset()
        self._engine_reset()
        self._reset_monitor()

    # ------------------------------------------------------------------ blinking check
    def _reset_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.reset()
            self._check_due = False

    def _watch(self, img: np.ndarray) -> None:
        """Copy one frame into the blinking check's ring (cheap); note when a check is due."""
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
        return info

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
        if self._streaming:
            self._engine.reset()

    def _process_batch(self, frames: list[tuple[FrameHeader, np.ndarray, int]]) -> None:
        """Feed one drained batch; publish the newest due output of each continuous run in it."""
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
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue
            dues = [i for i in range(a, b) if due[i]]
            last_due = dues[-1] if dues else None
            self.stats.frames_dropped += max(0, len(dues) - 1)
            if new_run[a]:
                self._rolling.reset()
                self._engine_reset()
                self._reset_monitor()
            # A streaming engine whose state already runs up to this batch keeps it when that
            # is no dearer than a restart (<= window pushes): skipping would cost a full
            # re-warm per output and, for a recurrent net near capacity, never catch up.
            self._push_all = (self._streaming and self._engine_next_seq == frames[a][0].seq
                              and b - a <= W)
            for i in range(a, b):
                if not self._feed_frame(frames, i, last_due, b, t_start):
                    # engine error: that run is broken; the frames after it start a new one
                    self._continuity.reset()
                    self._rolling.reset()
                    if i + 1 < len(frames):
                        self._process_batch(frames[i + 1 :])
                    return

    def _needed(self, i: int, last_due: int | None, end: int) -> bool:
        """Does frame i contribute to the newest due output, or to outputs after this batch?"""
        if self._push_all:
            return True
        if last_due is not None and i <= last_due:
            return last_due - i < self.window
        return i >= end - self.window

    def _feed_frame(self, frames: list, i: int, last_due: int | None, end: int, t_start: int) -> bool:
        h, img, t_recv = frames[i]
        is_output = i == last_due
        out = None
        self._watch(img)
        try:
            if self._streaming:
                if not self._needed(i, last_due, end):
                    return True
                if self._engine_next_seq is not None and h.seq != self._engine_next_seq:
                    self._engine_reset()  # we skipped frames to catch up: restart cleanly
                out = self._engine.push(img)
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
                self.stats.frames_dropped += 1  # the engine had not warmed up (should not happen)
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
        header = ResultHeader(
            seq_first=seq_last - self.window + 1,
            seq_last=seq_last,
            t_acq_ns=h.t_acq_ns,
            shape=(int(out.shape[0]), int(out.shape[1])),
            engine=self._engine_name,
            dtype="float32",
            timings_ns={"received": t_recv, "start": t_start, "done": t_done, "published": time.time_ns()},
            frames_dropped=self.stats.frames_dropped,
            info=self._result_info(),
        )
        # copy=True: an engine may reuse its output buffer on the next push
        self._pub.send_multipart(encode_result(header, out), copy=True)
        self.stats.outputs += 1


def _process_main(worker: EngineWorker) -> None:
    """Entry point of the spawned worker process."""
    logging.basicConfig(level=worker._log_level, format="%(asctime)s engine-worker %(levelname)s %(message)s")
    # Ctrl+C in a terminal reaches the whole process group: the parent decides when we stop
    # (it sends the EndOfStream), so that the queued frames are still processed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if worker.threads >= 1:  # before torch is imported: also caps OpenMP/MKL pools
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(worker.threads))
    try:
        worker.run()
    except Exception:
        logger.exception("engine worker failed")
        raise SystemExit(1)
