"""One live run: frame source -> sinks (recorder, publisher, raw view) -> engine worker -> results.

The CLI and the GUI drive this same class. Why it is built this way:

* The frame source is the continuous `AcquisitionThread` (``mode="live"``) or an MDA run
  (``mode="mda"``, `realtime.mda`); both feed the same sinks, in this order: the recorder
  (never drops), the ZeroMQ frame publisher (the engine's feed) and the raw view
  (``frameReady``).
* ``start()`` only does what can fail fast (open the camera / movie, check the recording
  file, bind the frame socket, spawn the worker) and returns; loading the engine happens in
  the worker, and the camera is started by the collector thread only once the worker
  reports "ready", so the first frames never wait in a queue behind torch's import and
  latency is honest.
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
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
import zmq
from psygnal import Signal

from engines.registry import EngineSpec
from engines.trust import TRUST_PREFIX, TrustTally  # numpy / scipy only

from .config import Addresses, PipelineConfig, memory_problem
from .handle import EngineHandle
from .metrics import LatencyTracker, MeanRate, PipelineMetrics
from .protocol import (
    FOREIGN,
    EngineCounts,
    ProtocolError,
    ReferenceHeader,
    ResultHeader,
    StatsMessage,
    decode,
    new_run_id,
)
from .worker import EngineWorker

__all__ = ["BLINKING_PREFIX", "TRUST_PREFIX", "Pipeline", "PipelineError"]

logger = logging.getLogger(__name__)

#: ResultHeader.info keys of the worker's blinking check (the rest is the engine's output_info())
BLINKING_PREFIX = "blinking_check."

SocketSetup = Callable[[zmq.Socket], None]


_STOPS = "; the run stops (--on-recording-failure continue keeps acquiring without recording)"
_GOES_ON = "; the run goes on WITHOUT recording (--on-recording-failure continue)"


class PipelineError(RuntimeError):
    """The pipeline cannot start (bad source, recording file, engine)."""


class RecordingExistsError(PipelineError):
    """The recording file exists and overwriting was not allowed (each front end says how)."""

    def __init__(self, path: Any) -> None:
        super().__init__(f"recording file {path} exists")
        self.path = path


#: a camera delivering less than this share of the requested rate is reported
LOW_RATE_SHARE = 0.8

_PORT_HINT = (" (another livesr, or another program, holds that port: stop it, or leave out "
              "--frames-addr/--results-addr so that a free port is used)")


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
    status = Signal(str)  # progress the user may want to know ("compiling ...")
    started = Signal()  # the engine is ready and the camera acquires
    finished = Signal(object)  # final PipelineMetrics: the run is over, files are closed
    engineDied = Signal(str)  # the engine process died (it is being restarted) / went silent
    engineRestarted = Signal(int)  # ... and is back: outputs resume on fresh windows (count)
    warning = Signal(str)  # something the user should know that does not stop the run
    blinkingChecked = Signal(object)  # the blinking check's report (dict): first one, and when "ok" flips
    # the image a learned engine's output was checked against (ReferenceHeader, float32 image):
    # the trust check's companion SOFI, a few times a second
    referenceReady = Signal(object, object)

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
        self.acquisition: Any = None  # the frame source (AcquisitionThread or MDASource)
        self.worker: EngineHandle | None = None
        self.recorder: Any = None
        self.publisher: Any = None
        self.sr_recorder: Any = None  # --save-sr: the super-resolved images
        self._sr_setup = False
        self._reported: list[str] = []
        self.latency = LatencyTracker()
        self._lock = threading.Lock()
        self._m = PipelineMetrics(engine=self._engine_label())
        self._acq_rate = MeanRate()
        self._out_rate = MeanRate()
        self._stats: StatsMessage | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._collector: threading.Thread | None = None
        self._started_evt = threading.Event()
        self._done_evt = threading.Event()
        self._stop_requested = threading.Event()
        self._stopped_by_caller = False  # stop() was called (Ctrl-C, a signal, --seconds, the GUI)
        self._acq_ended = threading.Event()
        self._acq_started = False
        self._stop_thread: threading.Thread | None = None
        self.run_id = new_run_id()  # stamped on every frame; only its results are shown
        self.endpoints: Addresses | None = None  # the bound endpoints (port 0 resolved)
        self._sub_ctx: zmq.Context | None = None
        self._sub: zmq.Socket | None = None
        self._local_malformed: dict[str, int] = {}  # bad messages seen by the collector
        self.json_written: Any = None  # the --json path once it was written
        self._base = EngineCounts()  # totals of engine processes that died and were restarted
        # the engine's counts as of its newest message (one socket: messages arrive in order):
        # its last stats, plus the results published since (each one output), and the
        # skipped-output count every result carries
        self._outputs_since_stats = 0
        self._skipped_now = 0
        self._engine_warnings: set[str] = set()
        self._trust = TrustTally()

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
        try:
            from .security import check_bind_allowed

            for addr in (cfg.addresses.frames, cfg.addresses.results):  # both bound here
                check_bind_allowed(addr, curve=self._socket_setup is not None, hint=(
                    "Keep --frames-addr/--results-addr on 127.0.0.1; to use a GPU on another "
                    "machine run `livesr engine` there and pass --engine-at."))
        except ValueError as e:
            raise PipelineError(str(e)) from None
        try:
            self.core = self._make_core(cfg)
            self.recorder = self._make_recorder(cfg)
            self.sr_recorder = self._make_sr_recorder(cfg)
            self.publisher = self._make_publisher(cfg.addresses.frames)
            self.acquisition = self._make_source(cfg)
            self.endpoints = Addresses(frames=self.publisher.address, results=self._bind_results())
            if cfg.engine_at:  # remote engine(s): a client stands where the worker would
                self.worker = self._remote_client(cfg, self.endpoints)
                self.worker.start()
            else:
                self._start_local_worker(cfg, self.endpoints)
        except Exception as e:
            self._cleanup_failed_start()
            if isinstance(e, PipelineError):
                raise
            raise PipelineError(_describe(e)) from e
        self._collector = threading.Thread(target=self._collect, name="livesr-results", daemon=True)
        self._collector.start()

    def _bind_results(self) -> str:
        """Bind the collector's SUB socket (workers connect their PUB to it)."""
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        try:
            if self._socket_setup is not None:
                self._socket_setup(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVHWM, 200)
            sub.setsockopt(zmq.LINGER, 0)
            sub.bind(self.config.addresses.results)
        except zmq.ZMQError as e:
            sub.close(linger=0)
            ctx.term()
            raise PipelineError(f"cannot listen for results on {self.config.addresses.results}: "
                                f"{e.strerror}{_PORT_HINT}") from None
        self._sub_ctx, self._sub = ctx, sub
        return sub.getsockopt_string(zmq.LAST_ENDPOINT)

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

    def _engine_spec(self, cfg: PipelineConfig) -> EngineSpec:
        """The run's engine with the camera's pixel size (for optics and the trust companion)."""
        um, where = self.camera_pixel_size()
        spec = cfg.engine_spec(um, where)
        if (spec.options.get("optics") is not None and self._engine_override is None
                and um is None and cfg.sofi.pixel_size_um is None):
            self._emit_warning(f"SOFI: the camera's pixel size is unknown ({where}); assuming the default 0.1 um: "
                               "pass --pixel-size-um for a correct PSF width")
        return spec

    def _start_local_worker(self, cfg: PipelineConfig, addrs: Addresses) -> None:
        spec = self._engine_spec(cfg)
        override = self._engine_override
        worker = EngineWorker(
            spec if override is None else override,
            addrs.frames,
            addrs.results,
            cfg.stride,
            threads=cfg.threads,
            socket_setup=self._socket_setup,
            run_id=self.run_id,
            connect_results=True,
            warmup_shape=(int(self.core.getImageHeight()), int(self.core.getImageWidth())),
            trust=None if override is None else spec.trust,
            trust_options=None if override is None else spec.trust_options,
        )
        self.worker = self._supervised(worker) if cfg.worker_mode == "process" else worker
        self.worker.start()  # a process worker is restarted if it dies

    def stop(self, wait: bool = True, timeout: float = 60.0) -> PipelineMetrics:
        """Stop acquiring; the engine finishes what it received. Returns the metrics.

        With ``wait`` it returns once the recording is closed and the worker has ended
        (``finished`` has been emitted); otherwise at once (``finished`` comes later).
        """
        self._stop_requested.set()
        self._stopped_by_caller = True
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
            if self.wait_started(None):  # _wait_engine_ready enforces the ready timeout
                self._done_evt.wait(seconds)  # returns early when the source ends
        finally:
            self.stop(wait=True)
        return self.metrics()

    def _newest_counts(self) -> EngineCounts:
        """The current engine process's counts as of its newest message: its last stats, the
        results published since (one output each) and the skip count the newest one carries."""
        st = self._stats
        if st is None:
            return EngineCounts()
        return msgspec.structs.replace(st.counts, outputs=st.counts.outputs + self._outputs_since_stats,
                                       outputs_skipped=self._skipped_now)

    def metrics(self) -> PipelineMetrics:
        """A snapshot of the current (or, once finished, final) metrics."""
        with self._lock:
            m = self._m
            acq = self.acquisition
            if acq is not None:
                m.frames_acquired = int(acq.frames_acquired)
            if self.publisher is not None:
                m.frames_published = int(self.publisher.frames_published)
            if self.recorder is not None:
                m.frames_recorded = int(self.recorder.frames_recorded)
                m.frames_not_recorded = int(self.recorder.frames_not_recorded)
            if self.sr_recorder is not None:
                m.sr_images_recorded = int(self.sr_recorder.frames_recorded)
            st = self._stats
            if st is not None and st.engine:
                m.engine = st.engine
            m.counts = self._base + self._newest_counts() + EngineCounts(malformed=self._local_malformed)
            m.fps_acquired = self._acq_rate.rate
            m.fps_output = self._out_rate.rate
            m.latency_ms = self.latency.percentiles()
            if self._t_start is not None:
                m.duration_s = (self._t_end or time.monotonic()) - self._t_start
            snapshot = m.copy()
            snapshot.trust = self._trust.summary()
            return snapshot

    # ================================================================== setup
    def _engine_label(self) -> str:
        e = self._engine_override
        if e is None and self.config.engine_at:  # the remote says what it runs (stats)
            return "remote engine at " + ", ".join(self.config.engine_at)
        if e is None:
            return self.config.engine
        return str(getattr(e, "name", getattr(e, "__name__", type(e).__name__)))

    def _make_core(self, cfg: PipelineConfig) -> Any:
        if cfg.source == "core":  # the caller's core, as it is (an MDA the user runs)
            if self._mmcore is None:
                raise PipelineError("source 'core' needs mmcore= (the core the MDA runs on)")
            core = self._mmcore
        else:
            from acquisition.cameras import make_core  # lazy: the GUI may list configs without it

            core = make_core(cfg.source, size=cfg.size, fps=cfg.fps, loop=cfg.loop, crop=cfg.roi,
                             mmcore=self._mmcore)
        if cfg.crop is not None:
            w, h = int(core.getImageWidth()), int(core.getImageHeight())
            if cfg.crop > min(w, h):
                raise PipelineError(f"crop {cfg.crop} is larger than the {w}x{h} camera image")
            core.setROI((w - cfg.crop) // 2, (h - cfg.crop) // 2, cfg.crop, cfg.crop)
        if cfg.exposure_ms is not None:
            core.setExposure(float(cfg.exposure_ms))
        if cfg.source_kind != "sim":  # the simulator's size was checked with the config
            why = memory_problem(int(core.getImageHeight()), int(core.getImageWidth()), cfg.window)
            if why:
                raise PipelineError(why)
        return core

    def _run_settings(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The livesr settings a recording carries as annotations."""
        keys = ("mode", "source", "engine", "window", "stride", "backend", "device", "precision",
                "weights", "sequence")
        d = cfg.to_dict()
        return {"livesr_version": _version(), **{k: d[k] for k in keys if d.get(k) is not None}}

    def _make_recorder(self, cfg: PipelineConfig) -> Any:
        if cfg.record is None:
            return None
        from acquisition.recorder import Recorder

        try:
            rec = Recorder(cfg.record, overwrite=cfg.overwrite)  # settings come with StreamInfo
        except FileExistsError:
            raise RecordingExistsError(cfg.record) from None
        except ValueError as e:
            raise PipelineError(str(e)) from None
        rec.failed.connect(self._on_recording_failed)
        return rec

    def _make_sr_recorder(self, cfg: PipelineConfig) -> Any:
        if cfg.save_sr is None:
            return None
        from acquisition.recorder import Recorder

        if cfg.record is not None and Path(cfg.save_sr).resolve() == Path(cfg.record).resolve():
            raise PipelineError("--save-sr and --record must be different files")
        try:
            return Recorder(cfg.save_sr, overwrite=cfg.overwrite,
                            annotations={"content": "super-resolved"})
        except FileExistsError:
            raise PipelineError(f"file {cfg.save_sr} exists; choose another name or pass "
                                "--overwrite") from None
        except ValueError as e:
            raise PipelineError(str(e)) from None

    def _make_publisher(self, address: str) -> Any:
        from .publisher import FramePublisher

        try:
            return FramePublisher(address, socket_setup=self._socket_setup, run_id=self.run_id)
        except RuntimeError as e:
            raise PipelineError(f"{e}{_PORT_HINT}") from None

    def _make_source(self, cfg: PipelineConfig) -> Any:
        from acquisition.sinks import SignalSink

        view = SignalSink()
        view.frameReady.connect(self._on_frame)
        sinks = [self.recorder, self.publisher, view]  # the recorder first: it never drops
        name = f"livesr {cfg.source}"
        if cfg.mode == "mda":
            from acquisition.sinks import is_multi_stream

            from .mda import MDASource, load_sequence

            try:
                sequence = None if cfg.sequence is None else load_sequence(cfg.sequence)
                if sequence is not None and self.recorder is not None:
                    self.recorder.check_sequence(sequence)
                if sequence is not None and cfg.engine_at and is_multi_stream(sequence):
                    raise ValueError("a remote engine (--engine-at) serves one stream; this "
                                     "sequence has several positions, channels or z planes: "
                                     "run the engine locally")
            except (ValueError, RuntimeError) as e:
                raise PipelineError(str(e)) from None
            src: Any = MDASource(self.core, sinks=sinks, sequence=sequence, name=name,
                                 settings=self._run_settings(cfg))
        else:
            from acquisition.thread import AcquisitionThread

            src = AcquisitionThread(mmcore=self.core, sinks=sinks, name=name,
                                    settings=self._run_settings(cfg))
        src.error.connect(self._on_acquisition_error)
        src.stopped.connect(self._on_acquisition_stopped)
        return src

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
        client = RemoteEngineClient(opts, addrs.frames, addrs.results, run_id=self.run_id,
                                    connect_results=True)

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
            if not self._acq_started and sw.startup_error():
                return  # it failed to load: the collector reports why, once
            self._emit_error(f"{reason} (acquisition and recording continue)")
            self._safe_emit(self.engineDied, reason)

        def restarted(n: int) -> None:
            logger.warning("engine restarted (%d); outputs resume on fresh windows", n)
            self._safe_emit(self.engineRestarted, n)

        def gave_up(reason: str) -> None:
            if not self._acq_started and sw.startup_error():
                return
            self._emit_error(reason)

        sw.engineDied.connect(died)
        sw.engineRestarted.connect(restarted)
        sw.gaveUp.connect(gave_up)
        return sw

    def _cleanup_failed_start(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(5)
        self._close_results_socket()
        self._close_unstarted_sinks()
        self._done_evt.set()

    def _close_unstarted_sinks(self) -> None:
        """Sinks the source never started (and so will not close): no file, no socket left."""
        for sink in (self.recorder, self.sr_recorder if not self._sr_setup else None,
                     self.publisher):
            if sink is None:
                continue
            try:
                sink.close()
            except Exception as e:
                logger.warning("closing %s after a failed start: %s", getattr(sink, "name", sink), e)

    # ================================================================== acquisition callbacks
    def _on_frame(self, seq: int, img: np.ndarray) -> None:
        self._acq_rate.tick(time.monotonic())
        self._safe_emit(self.frameReady, seq, img)

    def _on_acquisition_error(self, message: str) -> None:
        self._emit_error(message)

    def _on_recording_failed(self, message: str) -> None:
        """The recorder stopped writing (full disk, ...): stop the run or go on, as configured."""
        if self.config.recording_failure == "stop":
            self._emit_error(f"{message}{_STOPS}")
            self._stop_requested.set()
            self._request_acquisition_stop()
        else:
            self._emit_error(f"{message}{_GOES_ON}")

    def _on_acquisition_stopped(self, frames_acquired: int) -> None:
        self._t_end = time.monotonic()
        self._acq_ended.set()
        logger.info("acquisition ended (%s) after %d frames",
                    getattr(self.acquisition, "end_reason", "?"), frames_acquired)

    def _request_acquisition_stop(self) -> None:
        """Stop the camera on a helper thread: AcquisitionThread.stop() joins and closes the file."""
        with self._lock:
            if self._stop_thread is not None or not self._acq_started:
                return
            acq = self.acquisition
            self._stop_thread = threading.Thread(target=acq.stop, name="livesr-stop-acquisition",
                                                 daemon=True)
            self._stop_thread.start()

    # ================================================================== collector
    def _collect(self) -> None:
        sub = self._sub
        try:
            assert sub is not None
            if self._wait_engine_ready(sub):
                self._check_movie_length()
                if self._start_acquisition():
                    self._receive_until_end(sub)
        except Exception as e:  # the collector must always finish the run cleanly
            logger.exception("results collector failed")
            self._emit_error(f"results collector failed: {_describe(e)}")
        finally:
            self._close_results_socket()
            self._finish()

    def _close_results_socket(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._sub_ctx is not None:
            self._sub_ctx.term()
            self._sub_ctx = None

    def _wait_engine_ready(self, sub: zmq.Socket) -> bool:
        """Wait for the engine's first "ready"; a compiling engine ("preparing" heartbeats)
        gets the ready timeout afresh with every heartbeat."""
        timeout = self.config.engine_ready_timeout_s
        deadline = time.monotonic() + timeout
        worker = self.worker
        assert worker is not None
        said_preparing = False
        while not self._stop_requested.is_set():
            if sub.poll(100):
                st = self._handle_message(sub.recv_multipart(copy=False))
                if st is not None:
                    if st.final:
                        self._emit_error(st.counts.last_error or worker.startup_error()
                                         or "engine worker ended before it was ready")
                        return False
                    if st.state != "preparing":
                        return True
                    deadline = time.monotonic() + timeout
                    if not said_preparing:
                        said_preparing = True
                        self._emit_status(self._preparing_message())
            if not worker.is_alive():
                why = worker.startup_error() or worker.failure() or "it exited"
                self._emit_error(f"engine worker ended before it was ready: {why}")
                return False
            if time.monotonic() > deadline:
                self._emit_error(f"engine {self._engine_label()!r} not ready after "
                                 f"{timeout:.0f} s")
                return False
        return False

    def _preparing_message(self) -> str:
        cfg = self.config
        h, w = int(self.core.getImageHeight()), int(self.core.getImageWidth())
        return (f"compiling {self._engine_label()} with backend {cfg.backend!r} ({cfg.precision}) "
                f"for {w}x{h} frames and checking it against eager, before the camera starts "
                "(the first time can take a minute) ...")

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
                m = self.metrics()
                self._safe_emit(self.metricsUpdated, m)
                next_metrics = now + self._metrics_interval_s
                cfg = self.config
                if (cfg.fps and cfg.source_kind != "mm" and m.duration_s >= 3.0
                        and 0 < m.fps_acquired < LOW_RATE_SHARE * cfg.fps):
                    self._emit_warning(self._low_rate_message(m.fps_acquired))
            if not worker.is_alive():
                self._drain_after_worker_exit(sub)
                why = worker.failure()
                if why:
                    self._emit_error(f"engine worker crashed: {why}")
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

    def _count_local_malformed(self, reason: str, detail: str) -> None:
        with self._lock:
            key = f"results:{reason}"
            n = self._local_malformed[key] = self._local_malformed.get(key, 0) + 1
        if n <= 3 or n % 1000 == 0:
            logger.warning("dropped message #%d on the results socket (%s): %s", n, reason, detail)

    def _handle_message(self, parts: list) -> StatsMessage | None:
        """Account for one message from the worker; returns it if it is a StatsMessage.

        A message of another run is counted ("results:foreign") and dropped: it is
        never shown and never changes this run's numbers.
        """
        t_recv = time.time_ns()
        try:
            header, img = decode(parts)
        except ProtocolError as e:
            self._count_local_malformed(e.reason, str(e))
            return None
        if isinstance(header, (ResultHeader, ReferenceHeader, StatsMessage)) and header.run_id != self.run_id:
            self._count_local_malformed(FOREIGN, f"{header.kind} of run {header.run_id!r}, "
                                                 f"this run is {self.run_id!r}")
            return None
        if isinstance(header, ResultHeader):
            published = header.timings_ns.get("published", t_recv)
            self.latency.add((published - header.t_acq_ns) / 1e6, header.seq_last)
            with self._lock:
                self._m.outputs_received += 1
                self._outputs_since_stats += 1
                self._skipped_now = header.outputs_skipped
            if header.info:
                self._adopt_info(header.info)
            self._out_rate.tick(time.monotonic())
            if self.sr_recorder is not None and img is not None:  # decode gives results an image
                self._record_sr(header, img)
            self._safe_emit(self.resultReady, header, img)
            return None
        if isinstance(header, ReferenceHeader):
            self._safe_emit(self.referenceReady, header, img)
            return None
        if isinstance(header, StatsMessage):
            prev = self._stats
            with self._lock:
                if prev is not None and (header.counts.frames_received < prev.counts.frames_received
                                         or header.counts.outputs < prev.counts.outputs):
                    # a restarted engine process counts from zero again: keep the earlier
                    # totals, as of its newest message (its last stats and the results after)
                    self._base += self._newest_counts()
                self._stats = header
                self._outputs_since_stats = 0
                self._skipped_now = header.counts.outputs_skipped
            new, old = header.counts, (prev.counts if prev is not None else EngineCounts())
            if new.engine_errors > old.engine_errors and new.last_error:
                if not (header.final and not self._acq_started):  # a load failure: said once
                    self._emit_error(f"engine error: {new.last_error}")
            new_bad = sum(new.malformed.values()) - sum(old.malformed.values())
            if new_bad > 0 and not old.malformed:
                self._emit_error(f"engine worker received malformed messages: {new.malformed}")
            return header
        self._count_local_malformed("unexpected_kind", f"{header.kind!r} message on the results socket")
        return None

    def _record_sr(self, header: ResultHeader, img: np.ndarray) -> None:
        """--save-sr: every result, with half the pixel size and its source frame range."""
        from acquisition.sinks import FrameMeta, StreamInfo

        rec = self.sr_recorder
        n = rec.frames_queued
        try:
            if not self._sr_setup:
                self._sr_setup = True
                info = getattr(self.acquisition, "info", None)
                px = getattr(info, "pixel_size_um", None)
                raw_h = info.shape[0] if info is not None else header.shape[0]
                up = max(1, round(header.shape[0] / raw_h))  # 2 for every engine today
                interval = getattr(info, "frame_interval_s", None)
                rec.setup(StreamInfo(
                    shape=(int(header.shape[0]), int(header.shape[1])), dtype="float32",
                    camera=getattr(info, "camera", ""),
                    exposure_ms=getattr(info, "exposure_ms", None),
                    pixel_size_um=px / up if px else None,
                    frame_interval_s=interval * self.config.stride if interval else None,
                    name=f"livesr {header.engine} super-resolved",
                    settings={**getattr(info, "settings", {}), "upsample": up}))
            rec.append(np.array(img), FrameMeta(
                seq=n, frame=n, t_acq_ns=header.t_acq_ns, stream_key=header.stream,
                source_range=(header.seq_first, header.seq_last)))
        except Exception as e:
            if getattr(rec, "error", None) is None and not getattr(self, "_sr_failed", False):
                self._sr_failed = True
                self._emit_error(f"saving the super-resolved images failed: {_describe(e)}")

    def _finish(self) -> None:
        """Close everything (idempotent paths) and publish the final metrics."""
        try:
            if self._acq_started:
                self._request_acquisition_stop()
                if self._stop_thread is not None:
                    self._stop_thread.join(60.0)
            else:
                self._close_unstarted_sinks()
            worker = self.worker
            if worker is not None:
                worker.stop()
                if not worker.join(10.0):
                    worker.terminate()
                    worker.join(5.0)
            if self._t_start is not None and self._t_end is None:
                self._t_end = time.monotonic()
            if self.sr_recorder is not None and self._sr_setup:
                try:
                    self.sr_recorder.close()
                except Exception as e:
                    self._emit_error(f"saving the super-resolved images: {_describe(e)}")
        except Exception as e:
            logger.exception("pipeline shutdown failed")
            self._emit_error(f"shutdown failed: {_describe(e)}")
        finally:
            if self._acq_started:
                self._check_outcome()
            final = self.metrics()
            if self.config.json is not None:  # before done: stop(wait=True) callers read it
                try:
                    final.write_json(self.config.json)
                    self.json_written = self.config.json
                except OSError as e:
                    self._emit_error(f"metrics NOT written: cannot write {self.config.json}: "
                                     f"{e.strerror or e}")
                    final = self.metrics()
            self._done_evt.set()
            self._safe_emit(self.metricsUpdated, final)
            self._safe_emit(self.finished, final)

    def _check_outcome(self) -> None:
        """Say so when the run did not do what was asked: no frame, no output, a slow camera."""
        m, cfg = self.metrics(), self.config
        window = self._engine_window() or cfg.window
        if m.frames_acquired == 0:
            self._emit_error("no frame was acquired")
        elif m.outputs == 0 and m.outputs_received == 0 and not m.engine_errors:
            need = f"{window} consecutive frames" if window else "more frames"
            text = (f"no output: the engine needs {need} per output and received "
                    f"{m.frames_received} of the {m.frames_acquired} acquired")
            if self._stopped_by_caller and window and m.frames_acquired < window:
                self._emit_warning(text + " before the run was stopped")  # as asked, if early
            else:
                self._emit_error(text)
        if (cfg.fps and cfg.source_kind != "mm" and m.duration_s >= 2.0
                and 0 < m.fps_acquired < LOW_RATE_SHARE * cfg.fps):
            self._emit_warning(self._low_rate_message(m.fps_acquired))

    def _low_rate_message(self, fps: float) -> str:
        cfg = self.config
        h, w = int(self.core.getImageHeight()), int(self.core.getImageWidth())
        what = "the simulator" if cfg.source_kind == "sim" else "the replay"
        return (f"the camera delivered {fps:.1f} fps of the {cfg.fps:g} requested ({what} cannot "
                f"produce {w}x{h} frames faster here): use a smaller --size/--crop or a lower --fps")

    def _check_movie_length(self) -> None:
        """Before the camera starts: a movie played once that is shorter than the window."""
        cfg, window = self.config, self._engine_window()
        if cfg.source_kind != "replay" or cfg.loop or not window:
            return
        try:
            frames = int(self.core.getProperty(self.core.getCameraDevice(), "Frames"))
        except Exception:  # not our replay camera: nothing to say
            return
        if frames < window:
            self._emit_warning(f"the movie has {frames} frame(s) but the engine needs {window} "
                               "per output: no output can be made (use --window, or --loop)")

    def _engine_window(self) -> int | None:
        """Frames per output as the engine reported them when ready (None before)."""
        report = self.worker.report() if self.worker is not None else None
        return report.window if report is not None else None

    # ================================================================== helpers
    def _emit_status(self, message: str) -> None:
        logger.info("%s", message)
        self._safe_emit(self.status, message)

    def _adopt_info(self, info: dict[str, Any]) -> None:
        """Keep the newest engine info and blinking check; tell the user when something changed."""
        prefix = BLINKING_PREFIX
        engine_info = {k: v for k, v in info.items() if not k.startswith((prefix, TRUST_PREFIX))}
        check = {k[len(prefix):]: v for k, v in info.items() if k.startswith(prefix)}
        with self._lock:
            self._m.engine_info = engine_info
            prev = self._m.blinking_check
            if check:
                self._m.blinking_check = check
            n_warnings = len(self._trust.warnings)
            self._trust.add(info)
            new_trust = self._trust.warnings[n_warnings:]
        for w in new_trust:  # each kind once a run: the GUI and --json show every output's verdict
            self._emit_warning(f"{self._engine_label()}: do not trust the image: {w}")
        if check and (prev is None or prev.get("ok") != check.get("ok")):
            logger.info("blinking check: %s", check.get("message"))  # the user reads it via blinkingChecked
            self._safe_emit(self.blinkingChecked, dict(check))
        text = engine_info.get("warning")
        if isinstance(text, str) and text:  # each kind once a run (its numbers change per window)
            kind = text.split(":", 1)[0]
            if kind not in self._engine_warnings:
                self._engine_warnings.add(kind)
                self._emit_warning(f"{self._engine_label()}: {text}")


    def _emit_error(self, message: str) -> None:
        """Tell the user once (the same text twice is said once); listeners print it."""
        with self._lock:
            # a recorder failure comes once as a signal and again from close(): say it once
            if message in self._m.errors or any(r in message for r in self._reported if len(r) > 20):
                return
            self._reported.append(message.replace(_STOPS, "").replace(_GOES_ON, ""))
            self._m.errors.append(message)
        logger.debug("%s", message)
        self._safe_emit(self.error, message)

    def _emit_warning(self, message: str) -> None:
        """A run that goes on but not as asked (kept in metrics.warnings, said once)."""
        with self._lock:
            if message in self._m.warnings:
                return
            self._m.warnings.append(message)
        logger.info("warning: %s", message)  # the user reads it via the warning signal
        self._safe_emit(self.warning, message)

    @staticmethod
    def _safe_emit(signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except Exception:  # a broken listener must not stop the pipeline
            logger.exception("a listener of %s raised", getattr(signal, "name", "a signal"))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("livesr")
    except Exception:
        return "unknown"


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        return f"file not found: {e.filename}"
    return text
