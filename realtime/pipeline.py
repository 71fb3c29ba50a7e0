"""One live run: camera -> acquisition thread (+ recorder) -> engine worker -> results collector.

The CLI and the GUI drive this same class. Why it is built this way:

* ``start()`` only does what can fail fast (open the camera / movie, create the recording
  file, spawn the worker) and returns; loading the engine happens in the worker, and the
  camera is started by the collector thread only once the worker reports "ready", so the
  first frames never wait in a queue behind torch's import and latency is honest.
* Every state change a viewer needs is a psygnal signal emitted from a pipeline thread
  (``frameReady``, ``resultReady``, ``metricsUpdated``, ``error``, ``started``,
  ``finished``); a Qt GUI relays them to its own thread. Nothing here blocks the caller
  beyond short joins; ``stop(wait=False)`` returns at once.
* The run ends by itself when the source ends (a replay played once) or fails: the
  acquisition sends an EndOfStream, the worker finishes its queue and publishes final
  stats, and the collector closes everything and emits ``finished(metrics)``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq
from psygnal import Signal

from .config import PipelineConfig
from .metrics import LatencyTracker, PipelineMetrics, RateMeter
from .protocol import ProtocolError, ResultHeader, StatsMessage, decode
from .worker import EngineWorker

__all__ = ["BLINKING_PREFIX", "Pipeline", "PipelineError"]

logger = logging.getLogger(__name__)

#: ResultHeader.info keys of the worker's blinking check (the rest is the engine's output_info())
BLINKING_PREFIX = "blinking_check."

SocketSetup = Callable[[zmq.Socket], None]


class PipelineError(RuntimeError):
    """The pipeline cannot start (bad source, recording file, engine)."""


class Pipeline:
    """Wire a frame source, a recorder, an engine worker and a results collector.

    ``engine`` overrides ``config.engine`` with an engine object or factory (tests, custom
    engines); it must be picklable when ``config.worker_mode == "process"``.
    ``socket_setup`` is applied to every ZeroMQ socket (e.g. CURVE keys).
    """

    frameReady = Signal(int, object)  # (seq, raw frame) for every acquired frame
    resultReady = Signal(object, object)  # (ResultHeader, float32 image)
    metricsUpdated = Signal(object)  # PipelineMetrics snapshot, a few times per second
    error = Signal(str)  # a problem the user should see (the run may continue)
    started = Signal()  # the engine is ready and the camera acquires
    finished = Signal(object)  # final PipelineMetrics: the run is over, files are closed
    engineDied = Signal(str)  # the engine process died (it is being restarted) / went silent
    engineRestarted = Signal(int)  # ... and is back: outputs resume on fresh windows (count)
    warning = Signal(str)  # something the user should know that does not stop the run
    blinkingChecked = Signal(object)  # the blinking check's report (dict): first one, and when "ok" flips

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        mmcore: Any = None,
        engine: Any = None,
        socket_setup: SocketSetup | None = None,
        metrics_interval_s: float = 0.25,
    ) -> None:
        self.config = config if config is not None else PipelineConfig()
        self._mmcore = mmcore
        self._engine_override = engine
        self._socket_setup = socket_setup
        self._metrics_interval_s = metrics_interval_s

        self.core: Any = None
        self.acquisition: Any = None
        self.worker: EngineWorker | None = None
        self.recorder: Any = None
        self.latency = LatencyTracker()
        self._lock = threading.Lock()
        self._m = PipelineMetrics(engine=self._engine_label())
        self._acq_rate = RateMeter()
        self._out_rate = RateMeter()
        self._stats: StatsMessage | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._collector: threading.Thread | None = None
        self._started_evt = threading.Event()
        self._done_evt = threading.Event()
        self._stop_requested = threading.Event()
        self._acq_ended = threading.Event()
        self._acq_started = False
        self._stop_thread: threading.Thread | None = None
        self._engine_warnings: set[str] = set()

    # ================================================================== public API
    @property
    def is_running(self) -> bool:
        return self._collector is not None and not self._done_evt.is_set()

    @property
    def is_finished(self) -> bool:
        return self._done_evt.is_set()

    def start(self) -> None:
        """Open the source and the recording, spawn the engine worker; returns at once.

        Raises PipelineError (with a readable message) when the configuration, the source,
        the recording file or the worker cannot be set up; nothing is left running then.
        """
        if self._collector is not None:
            raise RuntimeError("a Pipeline runs once; create a new one for the next run")
        try:
            cfg = self.config.validate()
        except ValueError as e:
            raise PipelineError(f"invalid configuration: {e}") from None
        addrs = cfg.addresses.resolved()
        try:
            from .security import check_bind_allowed

            for addr in (addrs.frames, addrs.results):  # both are bound on this machine
                check_bind_allowed(addr, curve=self._socket_setup is not None, hint=(
                    "Keep --frames-addr/--results-addr on 127.0.0.1; to use a GPU on another "
                    "machine run `livesr engine` there and pass --engine-at."))
        except ValueError as e:
            raise PipelineError(str(e)) from None
        try:
            self.core = self._make_core(cfg)
            self.recorder = self._make_recorder(cfg)
            self.acquisition = self._make_acquisition(cfg, addrs.frames)
            if cfg.engine_at:  # remote engine(s): a client stands where the worker would
                self.worker = self._remote_client(cfg, addrs)
                self.worker.run_in_thread()
            else:
                self._start_local_worker(cfg, addrs)
        except Exception as e:
            self._cleanup_failed_start()
            if isinstance(e, PipelineError):
                raise
            raise PipelineError(_describe(e)) from e
        self._collector = threading.Thread(
            target=self._collect, args=(addrs.results,), name="livesr-results", daemon=True
        )
        self._collector.start()

    def camera_pixel_size(self) -> tuple[float | None, str]:
        """The camera pixel in the sample (um) as the core reports it, and where that came from.

        ``core.getPixelSizeUm()`` is the Micro-Manager pixel-size configuration (a replayed
        movie's metadata sets it); 0 means unknown -> (None, why).
        """
        try:
            um = float(self.core.getPixelSizeUm()) if self.core is not None else 0.0
        except Exception as e:  # a device adapter that cannot say
            return None, f"core.getPixelSizeUm() failed ({type(e).__name__})"
        if not um > 0:
            return None, "the core reports 0 (no pixel-size configuration)"
        where = "from file metadata (core pixel size)" if self.config.source_kind == "replay" else \
            "from core pixel-size config"
        return um, where

    def _engine_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        if cfg.engine != "sofi" or self._engine_override is not None:
            return cfg.engine_options()
        um, where = self.camera_pixel_size()
        if um is None and cfg.sofi.pixel_size_um is None:
            self._warn(f"SOFI: the camera's pixel size is unknown ({where}); assuming the default 0.1 um: "
                       "pass --pixel-size-um for a correct PSF width")
        return cfg.engine_options(um, where)

    def _start_local_worker(self, cfg: PipelineConfig, addrs: Any) -> None:
        self.worker = EngineWorker(
            self._engine_override if self._engine_override is not None else cfg.engine,
            addrs.frames,
            addrs.results,
            cfg.stride,
            engine_options=self._engine_options(cfg),
            threads=cfg.threads,
            socket_setup=self._socket_setup,
        )
        if cfg.worker_mode == "process":
            self.worker = self._supervised(self.worker)  # restarted if it dies
            self.worker.run_in_process()
        else:
            self.worker.run_in_thread()

    def stop(self, wait: bool = True, timeout: float = 60.0) -> PipelineMetrics:
        """Stop acquiring; the engine finishes what it received. Returns the metrics.

        With ``wait`` it returns once the recording is closed and the worker has ended
        (``finished`` has been emitted); otherwise at once (``finished`` comes later).
        """
        self._stop_requested.set()
        if self._collector is None:
            return self.metrics()
        self._request_acquisition_stop()
        if wait:
            if not self._done_evt.wait(timeout):
                self._emit_error(f"pipeline did not finish within {timeout:.0f} s of stop(); forcing")
                if self.worker is not None:
                    self.worker.stop()
                self._done_evt.wait(10.0)
        return self.metrics()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has finished (by itself or after stop()); True if it has."""
        return self._done_evt.wait(timeout)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until acquisition runs (True) or the run ended without starting (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._started_evt.is_set():
            if self._done_evt.is_set():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._started_evt.wait(0.05)
        return True

    def run_for(self, seconds: float | None) -> PipelineMetrics:
        """Start (if needed), acquire for ``seconds`` (None: until the source ends), stop."""
        if self._collector is None:
            self.start()
        try:
            if self.wait_started(self.config.engine_ready_timeout_s + 30.0):
                self._done_evt.wait(seconds)  # returns early when the source ends
        finally:
            self.stop(wait=True)
        return self.metrics()

    def metrics(self) -> PipelineMetrics:
        """A snapshot of the current (or, once finished, final) metrics."""
        with self._lock:
            m = self._m
            acq = self.acquisition
            if acq is not None:
                m.frames_acquired = int(acq.frames_acquired)
                m.frames_published = int(acq.frames_published)
            if self.recorder is not None:
                m.frames_recorded = int(getattr(self.recorder, "frames_recorded", 0))
            st = self._stats
            if st is not None:
                m.frames_received = st.frames_received
                m.outputs = max(st.outputs, m.outputs_received)
                m.frames_dropped_by_engine = max(st.frames_dropped, m.frames_dropped_by_engine)
                m.malformed_messages = dict(st.malformed)
                m.engine_errors = st.engine_errors
                if st.engine:
                    m.engine = st.engine
            m.fps_acquired = self._acq_rate.rate
            m.fps_output = self._out_rate.rate
            m.latency_ms = self.latency.percentiles()
            if self._t_start is not None:
                m.duration_s = (self._t_end or time.monotonic()) - self._t_start
            return PipelineMetrics(**{**m.__dict__, "latency_ms": dict(m.latency_ms),
                                      "malformed_messages": dict(m.malformed_messages),
                                      "errors": list(m.errors), "warnings": list(m.warnings),
                                      "engine_info": dict(m.engine_info),
                                      "blinking_check": None if m.blinking_check is None else dict(m.blinking_check)})

    # ================================================================== setup
    def _engine_label(self) -> str:
        e = self._engine_override
        if e is None:
            return self.config.engine
        return str(getattr(e, "name", getattr(e, "__name__", type(e).__name__)))

    def _make_core(self, cfg: PipelineConfig) -> Any:
        from acquisition.cameras import make_core  # lazy: the GUI may list configs without it

        core = make_core(cfg.source, size=cfg.size, fps=cfg.fps, loop=cfg.loop, crop=cfg.roi, mmcore=self._mmcore)
        if cfg.crop is not None:
            w, h = int(core.getImageWidth()), int(core.getImageHeight())
            if cfg.crop > min(w, h):
                raise PipelineError(f"crop {cfg.crop} is larger than the {w}x{h} camera image")
            core.setROI((w - cfg.crop) // 2, (h - cfg.crop) // 2, cfg.crop, cfg.crop)
        if cfg.exposure_ms is not None:
            core.setExposure(float(cfg.exposure_ms))
        return core

    def _make_recorder(self, cfg: PipelineConfig) -> Any:
        if cfg.record is None:
            return None
        from acquisition.recorder import OmeTiffRecorder

        meta: dict[str, Any] = {"name": f"livesr {cfg.source}"}
        if cfg.fps:
            meta["fps"] = float(cfg.fps)
        try:
            return OmeTiffRecorder(cfg.record, metadata=meta, overwrite=cfg.overwrite)
        except FileExistsError:
            raise PipelineError(f"recording file {cfg.record} exists; choose another name or allow overwrite") from None

    def _make_acquisition(self, cfg: PipelineConfig, address: str) -> Any:
        from acquisition.thread import AcquisitionThread

        acq = AcquisitionThread(mmcore=self.core, address=address, recorder=self.recorder,
                                socket_setup=self._socket_setup)
        acq.frameReady.connect(self._on_frame)
        acq.error.connect(self._on_acquisition_error)
        acq.stopped.connect(self._on_acquisition_stopped)
        return acq

    def _remote_client(self, cfg: PipelineConfig, addrs: Any) -> Any:
        """RemoteEngineClient: forwards frames to `livesr engine` servers, results back."""
        from .remote import RemoteEngineClient, RemoteEngineOptions

        opts = RemoteEngineOptions(
            endpoints=cfg.engine_at,
            server_key=cfg.server_key,
            client_key=cfg.client_key,
            window=cfg.window,
            stride=cfg.stride,
        )
        client = RemoteEngineClient(opts, addrs.frames, addrs.results)

        def died(reason: str) -> None:
            self._emit_error(reason)
            self._safe_emit(self.engineDied, reason)

        def back(n: int) -> None:
            self._safe_emit(self.engineRestarted, n)

        client.engineDied.connect(died)
        client.engineRestarted.connect(back)
        client.authFailed.connect(self._emit_error)
        return client

    def _supervised(self, worker: EngineWorker) -> Any:
        """Wrap a process worker so that a crash restarts it; acquisition never notices."""
        from .supervisor import SupervisedWorker

        sw = SupervisedWorker(worker)

        def died(reason: str) -> None:
            self._emit_error(f"{reason} (acquisition and recording continue)")
            self._safe_emit(self.engineDied, reason)

        def restarted(n: int) -> None:
            logger.warning("engine restarted (%d); outputs resume on fresh windows", n)
            self._safe_emit(self.engineRestarted, n)

        def gave_up(reason: str) -> None:
            self._emit_error(reason)

        sw.engineDied.connect(died)
        sw.engineRestarted.connect(restarted)
        sw.gaveUp.connect(gave_up)
        return sw

    def _cleanup_failed_start(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(5)
        if self.recorder is not None:
            try:
                self.recorder.close()
            except Exception as e:
                logger.warning("closing the recording after a failed start: %s", e)
        self._done_evt.set()

    # ================================================================== acquisition callbacks
    def _on_frame(self, seq: int, img: np.ndarray) -> None:
        self._acq_rate.tick(time.monotonic())
        self._safe_emit(self.frameReady, seq, img)

    def _on_acquisition_error(self, message: str) -> None:
        self._emit_error(message)

    def _on_acquisition_stopped(self, frames_acquired: int) -> None:
        self._t_end = time.monotonic()
        self._acq_ended.set()
        logger.info("acquisition ended (%s) after %d frames",
                    getattr(self.acquisition, "end_reason", "?"), frames_acquired)

    def _request_acquisition_stop(self) -> None:
        """Stop the camera on a helper thread: AcquisitionThread.stop() joins and closes the file."""
        if self._stop_thread is not None or not self._acq_started:
            return
        acq = self.acquisition
        self._stop_thread = threading.Thread(target=acq.stop, name="livesr-stop-acquisition", daemon=True)
        self._stop_thread.start()

    # ================================================================== collector
    def _collect(self, results_addr: str) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        try:
            if self._socket_setup is not None:
                self._socket_setup(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVHWM, 200)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(results_addr)
            if self._wait_engine_ready(sub) and self._start_acquisition():
                self._receive_until_end(sub)
        except Exception as e:  # the collector must always finish the run cleanly
            logger.exception("results collector failed")
            self._emit_error(f"results collector failed: {_describe(e)}")
        finally:
            sub.close()
            ctx.term()
            self._finish()

    def _wait_engine_ready(self, sub: zmq.Socket) -> bool:
        deadline = time.monotonic() + self.config.engine_ready_timeout_s
        worker = self.worker
        assert worker is not None
        while not self._stop_requested.is_set():
            if sub.poll(100):
                st = self._handle_message(sub.recv_multipart(copy=False))
                if st is not None:
                    if st.final:
                        self._emit_error(st.last_error or worker.startup_error()
                                         or "engine worker ended before it was ready")
                        return False
                    return True
            if not worker.is_alive():
                why = worker.startup_error() or f"exit code {worker.exitcode}"
                self._emit_error(f"engine worker ended before it was ready: {why}")
                return False
            if time.monotonic() > deadline:
                self._emit_error(f"engine {self._engine_label()!r} not ready after "
                                 f"{self.config.engine_ready_timeout_s:.0f} s")
                return False
        return False

    def _start_acquisition(self) -> bool:
        if self._stop_requested.is_set():
            return False
        try:
            self.acquisition.start()
        except Exception as e:
            self._emit_error(f"camera could not start: {_describe(e)}")
            return False
        self._acq_started = True
        self._t_start = time.monotonic()
        self._started_evt.set()
        if self._stop_requested.is_set():  # stop() raced with the start
            self._request_acquisition_stop()
        self._safe_emit(self.started)
        return True

    def _receive_until_end(self, sub: zmq.Socket) -> None:
        worker = self.worker
        assert worker is not None
        next_metrics = time.monotonic()
        eos_grace_deadline: float | None = None
        while True:
            if sub.poll(50):
                for _ in range(1000):
                    try:
                        parts = sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    st = self._handle_message(parts)
                    if st is not None and st.final:
                        return
            now = time.monotonic()
            if now >= next_metrics:
                self._safe_emit(self.metricsUpdated, self.metrics())
                next_metrics = now + self._metrics_interval_s
            if not worker.is_alive():
                self._drain_after_worker_exit(sub)
                if worker.exitcode not in (0, None):
                    self._emit_error(f"engine worker crashed (exit code {worker.exitcode})")
                return
            if self._acq_ended.is_set():
                # the worker should answer the EndOfStream with final stats; if the EOS was
                # lost (no engine reading) do not wait forever
                if eos_grace_deadline is None:
                    eos_grace_deadline = now + 30.0
                elif now > eos_grace_deadline:
                    self._emit_error("engine did not confirm the end of the stream; stopping it")
                    worker.stop()
                    eos_grace_deadline = now + 30.0

    def _drain_after_worker_exit(self, sub: zmq.Socket) -> None:
        while sub.poll(100):
            st = self._handle_message(sub.recv_multipart(copy=False))
            if st is not None and st.final:
                return

    def _handle_message(self, parts: list) -> StatsMessage | None:
        """Account for one message from the worker; returns it if it is a StatsMessage."""
        t_recv = time.time_ns()
        try:
            header, img = decode(parts)
        except ProtocolError as e:
            with self._lock:
                key = f"results:{e.reason}"
                self._m.malformed_messages[key] = self._m.malformed_messages.get(key, 0) + 1
            logger.warning("malformed message from the engine worker: %s", e)
            return None
        if isinstance(header, ResultHeader):
            published = header.timings_ns.get("published", t_recv)
            self.latency.add((published - header.t_acq_ns) / 1e6, header.seq_last)
            with self._lock:
                self._m.outputs_received += 1
                self._m.frames_dropped_by_engine = max(self._m.frames_dropped_by_engine, header.frames_dropped)
            if header.info:
                self._adopt_info(header.info)
            self._out_rate.tick(time.monotonic())
            self._safe_emit(self.resultReady, header, img)
            return None
        if isinstance(header, StatsMessage):
            prev = self._stats
            self._stats = header
            if header.engine_errors > (prev.engine_errors if prev else 0) and header.last_error:
                self._emit_error(f"engine error: {header.last_error}")
            new_bad = sum(header.malformed.values()) - (sum(prev.malformed.values()) if prev else 0)
            if new_bad > 0 and (prev is None or not prev.malformed):
                self._emit_error(f"engine worker received malformed messages: {header.malformed}")
            return header
        return None

    def _finish(self) -> None:
        """Close everything (idempotent paths) and publish the final metrics."""
        try:
            if self._acq_started:
                self._request_acquisition_stop()
                if self._stop_thread is not None:
                    self._stop_thread.join(60.0)
            elif self.recorder is not None:
                try:
                    self.recorder.close()
                except Exception as e:
                    self._emit_error(f"closing the recording failed: {_describe(e)}")
            worker = self.worker
            if worker is not None:
                worker.stop()
                if not worker.join(10.0):
                    runner = worker._runner
                    if hasattr(runner, "terminate"):
                        logger.warning("engine worker did not stop; terminating it")
                        runner.terminate()  # type: ignore[union-attr]
                        worker.join(5.0)
            if self._t_start is not None and self._t_end is None:
                self._t_end = time.monotonic()
        except Exception as e:
            logger.exception("pipeline shutdown failed")
            self._emit_error(f"shutdown failed: {_describe(e)}")
        finally:
            final = self.metrics()
            if self.config.json is not None:  # before done: stop(wait=True) callers read it
                try:
                    final.write_json(self.config.json)
                except OSError as e:
                    logger.error("cannot write %s: %s", self.config.json, e)
            self._done_evt.set()
            self._safe_emit(self.metricsUpdated, final)
            self._safe_emit(self.finished, final)

    def _adopt_info(self, info: dict[str, Any]) -> None:
        """Keep the newest engine info and blinking check; tell the user when something changed."""
        prefix = BLINKING_PREFIX
        engine_info = {k: v for k, v in info.items() if not k.startswith(prefix)}
        check = {k[len(prefix):]: v for k, v in info.items() if k.startswith(prefix)}
        with self._lock:
            self._m.engine_info = engine_info
            prev = self._m.blinking_check
            if check:
                self._m.blinking_check = check
        if check and (prev is None or prev.get("ok") != check.get("ok")):
            logger.info("blinking check: %s", check.get("message"))  # the user reads it via blinkingChecked
            self._safe_emit(self.blinkingChecked, dict(check))
        text = engine_info.get("warning")
        if isinstance(text, str) and text:  # each kind once a run (its numbers change per window)
            kind = text.split(":", 1)[0]
            if kind not in self._engine_warnings:
                self._engine_warnings.add(kind)
                self._warn(f"{self._engine_label()}: {text}")

    # ================================================================== helpers
    def _warn(self, message: str) -> None:
        logger.info("warning: %s", message)  # the user reads it via the warning signal
        with self._lock:
            self._m.warnings.append(message)
        self._safe_emit(self.warning, message)

    def _emit_error(self, message: str) -> None:
        logger.error("%s", message)
        with self._lock:
            self._m.errors.append(message)
        self._safe_emit(self.error, message)

    @staticmethod
    def _safe_emit(signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except Exception:  # a broken listener must not stop the pipeline
            logger.exception("a listener of %s raised", getattr(signal, "name", "a signal"))


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        return f"file not found: {e.filename}"
    return text
