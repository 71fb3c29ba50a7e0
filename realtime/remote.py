"""Run the engine on another machine (a GPU box) and stream camera frames to it.

Two halves:

* **Server** (`livesr engine --bind tcp://HOST:PORT`, on the GPU machine): an
  `EngineGateway` binds the public sockets - frames in (PULL on PORT), results out (PUB on
  PORT+1) - protected by CURVE and a client allow-list, and forwards to a local
  `EngineWorker` that an `EngineSupervisor` restarts whenever it dies. The public sockets
  belong to the gateway, not to the worker, so a crashed engine never drops the client's
  connection: the restarted worker simply starts on fresh windows.
* **Client** (`livesr live/demo/replay --engine-at tcp://HOST:PORT`, on the microscope PC):
  a `RemoteEngineClient` stands where the local worker would: it pulls the acquisition's
  frames from the local frames address and publishes results on the local results
  address, so the rest of the pipeline does not know the engine is remote.

Several engines can share one camera stream (`--engine-at` given more than once). Frames
are routed in **contiguous chunks**: outputs are split into blocks of `block` consecutive
sequence numbers, block b goes to engine b mod n, and that engine also receives the
`window - 1` frames before the block as lead-in. Every output is therefore computed from
`window` consecutive frames of the real stream - exactly the window a single engine
would use - while each engine receives only about 1/n of the frames (plus
(window - 1)/block overhead). We chose this over a PUB/SUB fan-out (every engine gets
every frame and computes outputs with seq % n == k) because fan-out multiplies network
traffic by n, and PUB silently drops frames for a slow subscriber. Results are put back
in order by `ResultReorderer`: every output once, in order.

The client never blocks the acquisition: it drains the local frames socket at once,
keeps a byte-bounded queue per engine that drops the *oldest* frames when the link is
slow or down (the display wants the newest), and sends without blocking. Recording
happens in the acquisition process before any of this, so a dropped network never costs
a recorded frame. ZeroMQ reconnects by itself when the network returns.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq
from psygnal import Signal
from zmq.utils.monitor import recv_monitor_message

from engines.registry import ANY_ENGINE_MIN_WINDOW, DEFAULT_ENGINE, ENGINES, EngineSpec

from .config import SofiOptions
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
    decode,
    encode_eos,
    encode_result,
    encode_stats,
)
from .reorder import ResultReorderer
from .security import (
    CurveClient,
    CurveServer,
    SecurityError,
    check_bind_allowed,
    find_public_file,
    find_secret_file,
)
from .send_queue import DropOldestQueue
from .supervisor import EngineSupervisor

log = logging.getLogger("livesr.remote")

DEFAULT_ENGINE_BIND = "tcp://127.0.0.1:5570"


def results_endpoint_for(frames_endpoint: str) -> str:
    """The results endpoint paired with a frames endpoint (tcp: next port)."""
    if frames_endpoint.startswith("tcp://"):
        u = urlsplit(frames_endpoint)
        if u.port is None:
            raise ValueError(f"{frames_endpoint}: a tcp endpoint needs an explicit port")
        if u.port == 0:
            raise ValueError(f"{frames_endpoint}: port 0 has no fixed partner; give both")
        if u.port >= 65535:
            raise ValueError(f"{frames_endpoint}: no port after {u.port} for results")
        host = frames_endpoint[len("tcp://") :].rsplit(":", 1)[0]
        return f"tcp://{host}:{u.port + 1}"
    if frames_endpoint.startswith(("ipc://", "inproc://")):
        return frames_endpoint + ".results"
    raise ValueError(f"unsupported endpoint {frames_endpoint!r} (use tcp://, ipc:// or inproc://)")


def _check_endpoint(ep: str, what: str) -> None:
    if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"{what} {ep!r} must look like tcp://HOST:PORT")
    if ep.startswith("tcp://"):
        try:
            port = urlsplit(ep).port
        except ValueError as e:
            raise ValueError(f"{what} {ep!r}: bad port ({e})") from None
        if port is None:
            raise ValueError(f"{what} {ep!r} needs a port, e.g. tcp://127.0.0.1:5570")


# ============================================================================ server
@dataclass
class EngineServerConfig:
    """`livesr engine` settings: where to listen, which engine, which keys."""

    bind: str = DEFAULT_ENGINE_BIND  # frames in; results on the next port
    results_bind: str | None = None
    engine: Any = DEFAULT_ENGINE  # a name for engines.load_engine, or an engine object/factory
    window: int | None = None
    stride: int = 1
    backend: str = "eager"
    device: str = "cpu"
    precision: str = "fp32"
    weights: str | None = None
    keys: Path | None = None  # server .key_secret (or a directory holding exactly one)
    allow: Path | None = None  # directory of accepted client public keys
    worker_mode: str = "process"  # "process" (supervised, restarted) | "thread" (tests)
    max_restarts: int = 5
    max_frame_mib: float = 64.0  # bigger messages drop the sender's connection
    queue_frames: int = 64  # frames queued toward a (re)starting worker before dropping
    sofi: SofiOptions = field(default_factory=SofiOptions)  # optics and corrections (SOFI, trust)

    def validate(self) -> EngineServerConfig:
        _check_endpoint(self.bind, "--bind")
        if self.results_bind is None:
            self.results_bind = results_endpoint_for(self.bind)
        _check_endpoint(self.results_bind, "--results-bind")
        if self.results_bind == self.bind:
            raise ValueError("frames and results need different endpoints")
        if (self.keys is None) != (self.allow is None):
            raise SecurityError("--keys and --allow go together (server key + client allow-list)")
        for ep in (self.bind, self.results_bind):
            check_bind_allowed(ep, curve=self.keys is not None)
        if self.window is not None and self.window < ANY_ENGINE_MIN_WINDOW:
            raise ValueError(f"--window must be >= {ANY_ENGINE_MIN_WINDOW} frames, got {self.window}")
        if self.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {self.stride}")
        if self.worker_mode not in ("process", "thread"):
            raise ValueError(f"worker_mode must be 'process' or 'thread', got {self.worker_mode!r}")
        if not (0 < self.max_frame_mib <= 4096):
            raise ValueError(f"--max-frame-mib must be in (0, 4096], got {self.max_frame_mib}")
        if self.queue_frames < 1:
            raise ValueError(f"queue_frames must be >= 1, got {self.queue_frames}")
        problems = self.sofi.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def engine_spec(self) -> EngineSpec:
        """The served engine (a named one); no camera here: the pixel size is --pixel-size-um
        or the default."""
        sofi = self.sofi.engine_options()
        info = ENGINES.get(str(self.engine))
        return EngineSpec(str(self.engine), window=self.window, backend=self.backend,
                          device=self.device, precision=self.precision, weights=self.weights,
                          options=sofi if info is not None and info.takes_optics else {},
                          trust_options={"sofi": sofi})  # a network's companion SOFI


@dataclass
class GatewayStats:
    frames_in: int = 0
    frames_to_worker: int = 0
    frames_dropped_no_worker: int = 0  # worker dead/restarting or not keeping up
    messages_out: int = 0
    engine_deaths: int = 0
    engine_restarts: int = 0
    clients: int = 0  # microscopes connected now (frames socket)


class EngineGateway:
    """Public (CURVE) sockets in front of one supervised local engine worker."""

    def __init__(self, cfg: EngineServerConfig):
        self.cfg = cfg.validate()
        self.stats = GatewayStats()
        self.ctx = zmq.Context()
        self.curve: CurveServer | None = None
        if cfg.keys is not None and cfg.allow is not None:
            self.curve = CurveServer(find_secret_file(cfg.keys), cfg.allow)
        # gateway PUSH binds -> worker PULL connects; gateway SUB binds <- worker PUB connects
        # (both on port 0, read back at bind time: see _open)
        self._worker_in = "tcp://127.0.0.1:0"
        self._worker_out = "tcp://127.0.0.1:0"
        self.supervisor: EngineSupervisor | None = None
        self.worker: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sockets: list[zmq.Socket] = []
        self._client_fds: set[int] = set()
        self._handshaking: list[int] = []
        self.bound = False

    # ------------------------------------------------------------------ worker
    def _make_worker(self) -> Any:
        from .worker import EngineWorker

        named = isinstance(self.cfg.engine, str)
        return EngineWorker(
            self.cfg.engine_spec() if named else self.cfg.engine,
            self._worker_in,
            self._worker_out,
            self.cfg.stride,
            trust_options=None if named else {"sofi": self.cfg.sofi.engine_options()},
            exit_on_eos=False,  # serve one client stream after another
            connect_results=True,  # to the gateway's SUB, bound on a free port
        )

    def _start_worker_process(self) -> Any:
        self.worker = self._make_worker()
        return self.worker.run_in_process()

    def _on_died(self, reason: str) -> None:
        self.stats.engine_deaths += 1
        log.error("engine died: %s; frames are dropped until it is back", reason)

    def _on_restarted(self, n: int) -> None:
        self.stats.engine_restarts = n
        log.warning("engine restarted (%d); it resumes on fresh windows", n)

    # ------------------------------------------------------------------ sockets
    def _open(self) -> None:
        c = self.cfg
        if c.results_bind is None:  # validate() fills it in
            raise ValueError("no results endpoint: call EngineServerConfig.validate() first")
        pull = self.ctx.socket(zmq.PULL)
        pub = self.ctx.socket(zmq.PUB)
        for s in (pull, pub):
            if self.curve is not None:
                self.curve.setup(s)
            s.linger = 0
        pull.setsockopt(zmq.MAXMSGSIZE, int(c.max_frame_mib * 2**20) + 65536)
        pull.rcvhwm = max(16, c.queue_frames)
        pub.sndhwm = 256
        to_worker = self.ctx.socket(zmq.PUSH)
        to_worker.linger = 0
        to_worker.sndhwm = c.queue_frames
        from_worker = self.ctx.socket(zmq.SUB)
        from_worker.linger = 0
        from_worker.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            pull.bind(c.bind)
            pub.bind(c.results_bind)
        except zmq.ZMQError as e:
            for s in (pull, pub, to_worker, from_worker):
                s.close()
            if self.curve is not None:
                self.curve.close()
            self.ctx.term()
            raise OSError(f"cannot listen on {c.bind} / {c.results_bind}: {e}") from None
        to_worker.bind(self._worker_in)
        from_worker.bind(self._worker_out)
        self._worker_in = to_worker.getsockopt_string(zmq.LAST_ENDPOINT)
        self._worker_out = from_worker.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pull, self._pub, self._to_worker, self._from_worker = pull, pub, to_worker, from_worker
        self._sockets = [pull, pub, to_worker, from_worker]
        self.bound = True

    def start(self) -> None:
        """Bind, start the worker (supervised in process mode) and the forwarding thread."""
        self._open()
        if self.cfg.worker_mode == "process":
            self.supervisor = EngineSupervisor(
                self._start_worker_process,
                max_restarts=self.cfg.max_restarts,
                was_ready=lambda: bool(self.worker.wait_ready(0)),
            )
            self.supervisor.clean_exit_is_done = False  # a server worker never "finishes"
            self.supervisor.engineDied.connect(self._on_died)
            self.supervisor.engineRestarted.connect(self._on_restarted)
            self.supervisor.start()
        else:
            self.worker = self._make_worker()
            self.worker.run_in_thread()
        self._thread = threading.Thread(target=self._loop, name="livesr-gateway", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        w = self.worker
        return bool(w is not None and w.wait_ready(timeout))

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._from_worker, zmq.POLLIN)
        monitor = self._pull.get_monitor_socket(
            zmq.EVENT_ACCEPTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_DISCONNECTED
        )
        poller.register(monitor, zmq.POLLIN)
        try:
            self._forward(poller, monitor)
        finally:
            self._pull.disable_monitor()
            monitor.close(0)

    def _count_clients(self, monitor: zmq.Socket) -> None:
        """Warn when two microscopes stream at once: their frames would interleave."""
        while monitor.poll(0):
            ev = recv_monitor_message(monitor, zmq.NOBLOCK)
            e, value = ev["event"], ev["value"]
            # ACCEPTED and DISCONNECTED carry the connection's fd, handshake events do not:
            # attribute each handshake to the oldest connection still shaking hands
            if e == zmq.EVENT_ACCEPTED:
                self._handshaking.append(value)
            elif e != zmq.EVENT_HANDSHAKE_SUCCEEDED and e != zmq.EVENT_DISCONNECTED:
                if self._handshaking:  # a refused handshake
                    self._handshaking.pop(0)
            elif e == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                fd = self._handshaking.pop(0) if self._handshaking else -1
                self._client_fds.add(fd)
                self.stats.clients = len(self._client_fds)
                log.info("microscope connected (%d connected)", self.stats.clients)
                if self.stats.clients > 1:
                    log.warning(
                        "%d microscopes are streaming to this engine: their frames interleave "
                        "and windows keep restarting; give each microscope its own engine",
                        self.stats.clients,
                    )
            elif value in self._client_fds:  # DISCONNECTED of a counted connection
                self._client_fds.discard(value)
                self.stats.clients = len(self._client_fds)
                log.info("microscope disconnected (%d connected)", self.stats.clients)
            elif value in self._handshaking:
                self._handshaking.remove(value)

    def _forward(self, poller: zmq.Poller, monitor: zmq.Socket) -> None:
        while not self._stop.is_set():
            events = dict(poller.poll(50))
            if monitor in events:
                self._count_clients(monitor)
            if self._pull in events:
                for _ in range(1024):
                    try:
                        parts = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.stats.frames_in += 1
                    try:  # untrusted bytes go to the worker, which validates and counts
                        self._to_worker.send_multipart(parts, zmq.NOBLOCK, copy=False)
                        self.stats.frames_to_worker += 1
                    except zmq.Again:
                        self.stats.frames_dropped_no_worker += 1
            if self._from_worker in events:
                for _ in range(1024):
                    try:
                        parts = self._from_worker.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._pub.send_multipart(parts, zmq.NOBLOCK, copy=False)
                        self.stats.messages_out += 1
                    except zmq.Again:
                        pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.supervisor is not None:
            self.supervisor.stop(timeout=5)
        elif self.worker is not None:
            self.worker.stop()
            self.worker.join(5)
        for s in self._sockets:
            s.close(0)
        if self.curve is not None:
            self.curve.close()
        self.ctx.term()


# ============================================================================ client
@dataclass
class RemoteEngineOptions:
    """Client side of `--engine-at` (one or several remote engines)."""

    endpoints: tuple[str, ...] = ()  # each engine's frames endpoint (results: next port)
    server_key: Path | None = None  # the engines' public server.key (or dir holding one)
    client_key: Path | None = None  # this PC's .key_secret (or dir holding one)
    window: int | None = None  # the engines' window (None: from their ready stats)
    stride: int = 1
    block: int | None = None  # outputs per chunk with several engines (default 5*window)
    queue_mib: float = 64.0  # per-engine send queue; the oldest frames go first
    heartbeat_timeout_s: float = 2.5  # silence after which an engine counts as gone
    reorder_wait_s: float = 0.25  # longest an output waits for a missing predecessor
    eos_timeout_s: float = 5.0  # wait for the engines' final stats after end of stream
    auth_give_up_s: float = 10.0  # refused this long and never connected: stop with an error
    stats_interval_s: float = 0.5

    def validate(self) -> RemoteEngineOptions:
        if not self.endpoints:
            raise ValueError("--engine-at needs at least one tcp://HOST:PORT")
        self.endpoints = tuple(self.endpoints)
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"--engine-at lists an engine twice: {list(self.endpoints)}")
        for ep in self.endpoints:
            _check_endpoint(ep, "--engine-at")
            results_endpoint_for(ep)
        if (self.server_key is None) != (self.client_key is None):
            raise SecurityError(
                "--server-key and --client-key go together (CURVE needs the engine's public "
                "key and this PC's secret key)"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.block is not None and self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if not (self.queue_mib > 0):
            raise ValueError(f"queue_mib must be > 0, got {self.queue_mib}")
        return self

    @property
    def curve(self) -> bool:
        return self.server_key is not None

    def block_size(self, window: int) -> int:
        """Outputs per chunk for engines with this window (whole strides)."""
        b = self.block if self.block is not None else max(5 * window, 100)
        # whole strides per block keep every engine's outputs on one stride grid
        return max(self.stride, (b // self.stride) * self.stride)

    def socket_setup(self) -> CurveClient | None:
        if self.server_key is None or self.client_key is None:
            return None
        return CurveClient.from_files(
            find_secret_file(self.client_key), find_public_file(self.server_key)
        )


class ChunkPlan:
    """Which engine(s) get frame `seq`: contiguous blocks plus a `lead_in` overlap."""

    def __init__(self, n_engines: int, block: int, lead_in: int):
        if n_engines < 1 or block < 1 or lead_in < 0:
            raise ValueError("need n_engines >= 1, block >= 1, lead_in >= 0")
        self.n, self.block, self.lead_in = n_engines, block, lead_in
        self._owner: dict[int, int] = {}

    def owner(self, b: int, up: Sequence[bool] | None = None) -> int:
        """Engine for block b: b mod n, or the next live one if that engine is down.

        Decided once per block (when its lead-in starts) so a block never changes hands
        half way through a window.
        """
        o = self._owner.get(b)
        if o is None:
            o = b % self.n
            if up is not None and not up[o] and any(up):
                while not up[o]:
                    o = (o + 1) % self.n
            self._owner[b] = o
            for old in [k for k in self._owner if k < b - 2]:
                del self._owner[old]
        return o

    def targets(self, seq: int, up: Sequence[bool] | None = None) -> list[int]:
        if self.n == 1:
            return [0]
        b = seq // self.block
        out = [self.owner(b, up)]
        if self.lead_in and seq >= (b + 1) * self.block - self.lead_in:
            nxt = self.owner(b + 1, up)
            if nxt not in out:
                out.append(nxt)
        return out


@dataclass
class LinkStats:
    """Per remote engine: what went out, what came back, whether it is alive."""

    endpoint: str
    frames_sent: int = 0
    frames_dropped: int = 0  # queue full (slow or dead link): oldest frames dropped
    results: int = 0
    last_heard: float | None = None
    up: bool = False
    ups: int = 0
    downs: int = 0
    auth_failures: int = 0
    first_refused: float | None = None
    handshake_failures: list[tuple[int, int]] = field(default_factory=list)  # (event, value)
    advised_at: int = 0  # auth_failures when the user was last told why
    engine_restarts: int = 0  # seen as the engine's counters starting again from zero
    last_stats: StatsMessage | None = None
    final: StatsMessage | None = None
    # totals of earlier engine processes behind this link (counters restart with them), less
    # what a server engine had counted for earlier clients when this run first heard of it
    base: EngineCounts = field(default_factory=EngineCounts)


@dataclass
class ClientStats:
    frames_in: int = 0
    malformed_local: dict[str, int] = field(default_factory=dict)
    malformed_remote: dict[str, int] = field(default_factory=dict)
    results_out: int = 0
    links: list[LinkStats] = field(default_factory=list)
    frames_not_routed: int = 0  # came before the engines said their window, beyond HELD_FRAMES


class _Link:
    """One remote engine: PUSH for frames, SUB for results, a queue, a monitor."""

    def __init__(self, ctx: zmq.Context, endpoint: str, setup: CurveClient | None, hwm: int,
                 queue_bytes: float):
        self.endpoint = endpoint
        self.results_endpoint = results_endpoint_for(endpoint)
        self.stats = LinkStats(endpoint)
        self.queue: DropOldestQueue[list] = DropOldestQueue(max_cost=queue_bytes)  # cost: bytes
        self.just_recovered = False  # heard again after an outage; not yet a stats message
        push = ctx.socket(zmq.PUSH)
        sub = ctx.socket(zmq.SUB)
        for s in (push, sub):
            s.linger = 0
            if setup is not None:
                setup(s)
        push.immediate = True  # hand frames only to an engine that completed the handshake
        push.sndhwm = hwm
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.rcvhwm = 1000
        for s in (push, sub):
            s.reconnect_ivl = 100
            s.reconnect_ivl_max = 2000
        self.monitor = push.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_DISCONNECTED
        )
        push.connect(endpoint)
        sub.connect(self.results_endpoint)
        self.push, self.sub = push, sub

    def close(self) -> None:
        try:
            self.push.disable_monitor()
        except zmq.ZMQError:
            pass
        for s in (self.monitor, self.push, self.sub):
            s.close(0)


class RemoteEngineClient:
    """Stand-in for a local `EngineWorker` that forwards to remote engines.

    Pulls frames from `in_addr` (the acquisition's PUSH), publishes results and stats on
    `out_addr` (PUB; bound, or connected to the pipeline's SUB with `connect_results`) like
    a worker does, so the pipeline and GUI need no changes. `run_id` is the run's id: its
    stats carry it, and a remote result of any other run is counted
    ("remote_foreign") and dropped.

    Signals (emitted from the client thread): `engineDied(str)` when an engine falls
    silent for `heartbeat_timeout_s` (it died, or the network dropped),
    `engineRestarted(int)` when it is heard from again (count of recoveries),
    `authFailed(str)` when an engine refuses this PC's key.
    """

    engineDied = Signal(str)
    engineRestarted = Signal(int)
    authFailed = Signal(str)
    #: frames kept while the engines' window is not known yet (the pipeline starts the camera
    #: only after their ready stats, so normally none)
    HELD_FRAMES = 256

    def __init__(
        self,
        options: RemoteEngineOptions,
        in_addr: str,
        out_addr: str,
        *,
        exit_on_eos: bool = True,
        run_id: str = "",
        connect_results: bool = False,
    ):
        self.options = options.validate()
        self.in_addr = in_addr
        self.out_addr = out_addr
        self.exit_on_eos = exit_on_eos
        self.run_id = run_id
        self.connect_results = connect_results
        self._setup = options.socket_setup()  # key errors surface here, before any thread
        # the engines' window (what their ready stats say; options.window until then): the
        # chunks' lead-in. Frames that come before it is known wait in _held.
        self.window: int | None = None
        self.plan: ChunkPlan | None = None
        self.reorderer: ResultReorderer[list] | None = None
        self._held: deque[tuple[FrameHeader, list]] = deque()
        if options.window is not None:
            self._start_plan(options.window)
        self.stats = ClientStats()
        self.recoveries = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stream_started = False
        self._eos: EndOfStream | None = None
        self._eos_deadline = 0.0

    def _start_plan(self, window: int) -> None:
        """Chunk the stream for engines with this window; route the frames held until now."""
        o = self.options
        self.window = window
        self.plan = ChunkPlan(len(o.endpoints), o.block_size(window), max(0, window - 1))
        self.reorderer = ResultReorderer(step=o.stride, max_wait_s=o.reorder_wait_s,
                                         max_pending=4 * o.block_size(window) + 64,
                                         sources=list(range(len(o.endpoints))))
        held, self._held = self._held, deque()
        for header, parts in held:
            self._route(header, parts)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """EngineHandle: run the client on its own thread."""
        self.run_in_thread()

    def run_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run_logged, name="livesr-remote", daemon=True)
        self._thread.start()
        return self._thread

    def _run_logged(self) -> None:
        try:
            self.run()
        except SecurityError as e:
            self._error = e
            log.error("%s", e)
        except BaseException as e:  # noqa: BLE001 - reported via .error and the log
            self._error = e
            log.exception("remote engine client failed")

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stop(self) -> None:
        self._stop.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once every remote engine has been heard from (handshake done, worker up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._thread is not None and not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def startup_error(self) -> str | None:
        """Why the client stopped (e.g. every engine refused this PC's key), like a worker."""
        return None if self._error is None else str(self._error)

    def failure(self) -> str | None:
        """Why the client ended abnormally (every engine refused the key, ...); None otherwise."""
        if self.is_alive() or self._error is None:
            return None
        return f"remote engine client failed: {self._error}"

    def terminate(self) -> None:
        """A thread cannot be ended: ask it to stop (it polls every 20 ms)."""
        self.stop()

    def report(self) -> EngineReport | None:
        """The remote engines' name and window, once their ready stats said so."""
        latest = [lk.stats.last_stats for lk in getattr(self, "_links", ())]
        named = [st for st in latest if st is not None and st.window]
        if self.window is None or not named:
            return None
        return EngineReport(named[0].engine, self.window)

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        ctx = zmq.Context()
        o = self.options
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        pull.rcvhwm = 1000
        pub = ctx.socket(zmq.PUB)
        pub.linger = 2000
        pub.sndhwm = 1000
        links: list[_Link] = []
        try:
            if self.connect_results:
                pub.connect(self.out_addr)
            else:
                pub.bind(self.out_addr)
            links = [_Link(ctx, ep, self._setup, hwm=16, queue_bytes=o.queue_mib * 2**20)
                     for ep in o.endpoints]
            self._links = links
            self.stats.links = [lk.stats for lk in links]
            pull.connect(self.in_addr)
            self._pub = pub
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            for lk in links:
                poller.register(lk.sub, zmq.POLLIN)
                poller.register(lk.monitor, zmq.POLLIN)
            next_stats = time.monotonic() + o.stats_interval_s
            while not self._stop.is_set():
                events = dict(poller.poll(20))
                now = time.monotonic()
                if pull in events and self._eos is None:
                    self._take_frames(pull)
                for i, lk in enumerate(links):
                    if lk.monitor in events:
                        self._monitor_event(lk)
                    if lk.sub in events:
                        self._take_results(i, lk, pub)
                    self._flush_queue(lk)
                    self._check_heartbeat(lk, now)
                    self._advise(lk, now)
                    self._check_refused(lk, now)
                if self.reorderer is not None:
                    self._publish_released(self.reorderer.poll())
                if now >= next_stats and self.window is not None and any(lk.stats.ups for lk in links):
                    # like a worker, say "ready" only once an engine is there: the pipeline
                    # starts the camera on the first stats message
                    pub.send_multipart(encode_stats(self._aggregate_stats(final=False)))
                    next_stats = now + o.stats_interval_s
                if self._eos is not None and self._finished(now):
                    if self.reorderer is not None:
                        self._publish_released(self.reorderer.flush())
                    pub.send_multipart(encode_stats(self._aggregate_stats(final=True)))
                    if self.exit_on_eos:
                        break
                    self._eos = None
                    self._stream_started = False
                    for lk in links:
                        lk.stats.final = None
        finally:
            for lk in links:
                lk.close()
            pull.close(0)
            pub.close()
            ctx.term()

    # ------------------------------------------------------------------ frames out
    def _count(self, d: dict[str, int], reason: str) -> None:
        d[reason] = d.get(reason, 0) + 1

    def _take_frames(self, pull: zmq.Socket) -> None:
        for _ in range(4096):
            try:
                parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header, _img = decode(parts)
            except ProtocolError as e:
                self._count(self.stats.malformed_local, e.reason)
                continue
            if isinstance(header, EndOfStream):
                self._begin_end_of_stream(header)
                return
            if not isinstance(header, FrameHeader):
                self._count(self.stats.malformed_local, "unexpected_kind")
                continue
            self.stats.frames_in += 1
            if self.plan is None:
                self._held.append((header, parts))  # routed once the engines said their window
                if len(self._held) > self.HELD_FRAMES:  # bounded: the oldest are given up
                    self._held.popleft()
                    self.stats.frames_not_routed += 1
                    if self.stats.frames_not_routed == 1:
                        log.warning("frames arrive before the engines said their window; "
                                    "holding the newest %d", self.HELD_FRAMES)
            else:
                self._route(header, parts)

    def _route(self, header: FrameHeader, parts: list) -> None:
        """Send one frame to the engine(s) whose chunk needs it."""
        assert self.plan is not None and self.reorderer is not None and self.window is not None
        if not self._stream_started:
            self._stream_started = True
            self._publish_released(self.reorderer.reset(first_seq=header.seq + self.window - 1))
        up = [lk.stats.up for lk in self._links]
        nbytes = sum(len(p.buffer) for p in parts)
        for i in self.plan.targets(header.seq, up):
            self._enqueue(self._links[i], parts, nbytes)

    def _enqueue(self, lk: _Link, parts: list, nbytes: int) -> None:
        lk.stats.frames_dropped += lk.queue.put(parts, nbytes)  # the display wants the newest frames
        self._flush_queue(lk)

    def _flush_queue(self, lk: _Link) -> None:
        while lk.queue:
            parts = lk.queue.peek()
            try:
                lk.push.send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            lk.queue.pop()
            if len(parts) == 2:
                lk.stats.frames_sent += 1

    def _begin_end_of_stream(self, eos: EndOfStream) -> None:
        self._eos = eos
        self._eos_deadline = time.monotonic() + self.options.eos_timeout_s
        msg = encode_eos(eos)
        for lk in self._links:
            lk.queue.put(msg, 0)
            self._flush_queue(lk)

    def _finished(self, now: float) -> bool:
        if now >= self._eos_deadline:
            missing = [lk.endpoint for lk in self._links if lk.stats.final is None]
            if missing:
                log.warning("no final stats from %s after end of stream", ", ".join(missing))
            return True
        return all(lk.stats.final is not None or not lk.stats.up for lk in self._links) and all(
            not lk.queue for lk in self._links
        )

    # ------------------------------------------------------------------ results in
    def _take_results(self, i: int, lk: _Link, pub: zmq.Socket) -> None:
        for _ in range(4096):
            try:
                parts = lk.sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._heard(lk)
            try:
                header, _img = decode(parts)
            except ProtocolError as e:
                self._count(self.stats.malformed_remote, e.reason)
                continue
            if isinstance(header, (ResultHeader, ReferenceHeader)) and header.run_id != self.run_id:
                self._count(self.stats.malformed_remote, FOREIGN)  # another run's image
                continue
            if isinstance(header, StatsMessage) and header.run_id not in ("", self.run_id):
                continue  # the engine serves another microscope's run: alive, not ours
            if isinstance(header, ResultHeader):
                lk.stats.results += 1
                if self.reorderer is None:  # (an engine never says its window after results)
                    self._count(self.stats.malformed_remote, "before_window")
                    continue
                parts = self._restamp(i, header, _img, parts)
                self._publish_released(self.reorderer.push(header.seq_last, parts, source=i))
            elif isinstance(header, ReferenceHeader):
                pub.send_multipart(parts)  # a network's trust reference: shown, never counted
            elif isinstance(header, StatsMessage):
                if header.window:
                    self._learn_window(header.window)
                    self._check_ready()
                prev = lk.stats.last_stats
                if prev is None:
                    # a server engine counts across client sessions: start from its totals now
                    lk.stats.base -= header.counts
                elif (header.counts.frames_received < prev.counts.frames_received
                      or header.counts.outputs < prev.counts.outputs):
                    lk.stats.base += prev.counts
                    lk.stats.engine_restarts += 1
                    if not lk.just_recovered:  # an outage already reported it otherwise
                        self._engine_replaced(lk)
                lk.just_recovered = False
                lk.stats.last_stats = header
                if header.final and self._eos is not None:
                    lk.stats.final = header
            else:
                self._count(self.stats.malformed_remote, "unexpected_kind")

    def _restamp(self, i: int, header: ResultHeader, img: Any, parts: list) -> list:
        """Rewrite a remote result's header for the local collector (pixels untouched).

        * Timings: the engine's clock is another machine's, so its stamps move to
          ``remote_*`` keys and ``published`` becomes the arrival time here: latency is then
          measured on one clock, network included.
        * ``outputs_skipped``: a server engine counts across client sessions and each engine
          only its own skips; the collector reads it as this run's total, so put that.
        """
        total = header.outputs_skipped + self._links[i].stats.base.outputs_skipped
        for j, lk in enumerate(self._links):
            if j != i and lk.stats.last_stats is not None:
                total += lk.stats.last_stats.counts.outputs_skipped + lk.stats.base.outputs_skipped
        timings = {f"remote_{k}": v for k, v in header.timings_ns.items()}
        timings["published"] = time.time_ns()
        fixed = msgspec.structs.replace(header, outputs_skipped=max(0, total), timings_ns=timings)
        return [encode_result(fixed, img)[0], parts[1]]  # the pixel frame is passed on as is

    def _learn_window(self, window: int) -> None:
        """The engines' window, as they report it: the lead-in of the chunks still to be planned."""
        if self.plan is None:
            log.info("engines use a %d-frame window (lead-in %d frames)", window, window - 1)
            self._start_plan(window)
        elif window != self.window:
            log.warning("engines use a %d-frame window, not %s as given (lead-in %d frames)",
                        window, self.window, window - 1)
            self.window = window
            self.plan.lead_in = window - 1

    def _publish_released(self, released: list[tuple[int, list]]) -> None:
        for _seq, parts in released:
            try:
                self._pub.send_multipart(parts, zmq.NOBLOCK, copy=False)
                self.stats.results_out += 1
            except zmq.Again:
                pass

    # ------------------------------------------------------------------ liveness
    def _heard(self, lk: _Link) -> None:
        lk.stats.last_heard = time.monotonic()
        if not lk.stats.up:
            lk.stats.up = True
            lk.stats.ups += 1
            if lk.stats.ups == 1:
                log.info("engine at %s is up", lk.endpoint)
            else:
                lk.just_recovered = True
                self.recoveries += 1
                log.warning("engine at %s is back (recovery %d)", lk.endpoint, self.recoveries)
                self.engineRestarted.emit(self.recoveries)
            self._check_ready()

    def _check_ready(self) -> None:
        """Ready once every engine was heard from and their window is known."""
        if self.window is not None and all(x.stats.up for x in self._links):
            self._ready.set()

    def _engine_replaced(self, lk: _Link) -> None:
        """The engine behind a link restarted faster than the heartbeat could notice."""
        msg = (
            f"engine at {lk.endpoint} restarted (its process died; the server restarted it); "
            "outputs resume on fresh windows"
        )
        log.warning("%s", msg)
        self.engineDied.emit(msg)
        self.recoveries += 1
        self.engineRestarted.emit(self.recoveries)

    def _check_heartbeat(self, lk: _Link, now: float) -> None:
        s = lk.stats
        if s.up and s.last_heard is not None and now - s.last_heard > self.options.heartbeat_timeout_s:
            s.up = False
            s.downs += 1
            msg = (
                f"engine at {lk.endpoint} silent for {now - s.last_heard:.1f} s (engine died or "
                "network down); acquisition and recording continue, outputs resume when it is back"
            )
            log.error("%s", msg)
            self.engineDied.emit(msg)

    def _check_refused(self, lk: _Link, now: float) -> None:
        s = lk.stats
        if s.ups == 0 and s.first_refused is not None:
            if now - s.first_refused > self.options.auth_give_up_s:
                raise SecurityError(
                    f"engine at {lk.endpoint} refused this PC's key for "
                    f"{self.options.auth_give_up_s:g} s; giving up (see the message above)"
                )

    def _monitor_event(self, lk: _Link) -> None:
        while lk.monitor.poll(0):
            try:
                ev = recv_monitor_message(lk.monitor, zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            e = ev["event"]
            if e in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            ):
                lk.stats.auth_failures += 1
                if lk.stats.first_refused is None:
                    lk.stats.first_refused = time.monotonic()
                lk.stats.handshake_failures.append((e, ev["value"]))
                del lk.stats.handshake_failures[:-20]
                self._advise(lk, time.monotonic())
            elif e == zmq.EVENT_DISCONNECTED:
                log.warning("link to engine at %s dropped; ZeroMQ keeps reconnecting", lk.endpoint)

    def _advise(self, lk: _Link, now: float) -> None:
        """Say why an engine refuses us, once a few attempts show the most specific reason
        (a keyless engine shows up as a mechanism mismatch only on some attempts), then every
        50 attempts."""
        st = lk.stats
        if st.auth_failures == 0 or st.auth_failures == st.advised_at:
            return
        if st.advised_at == 0:
            if st.auth_failures < 5 and now - (st.first_refused or now) < 1.0:
                return
        elif st.auth_failures - st.advised_at < 50:
            return
        st.advised_at = st.auth_failures
        mismatch = [f for f in st.handshake_failures
                    if f == (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)]
        auth = [f for f in st.handshake_failures if f[0] == zmq.EVENT_HANDSHAKE_FAILED_AUTH]
        e, value = (mismatch or auth or st.handshake_failures)[-1]
        hint = handshake_advice(e, value, curve=self.options.curve)
        msg = f"engine at {lk.endpoint} refused the connection ({zmq.Event(e).name}): {hint}"
        log.error("%s", msg)
        self.authFailed.emit(msg)

    # ------------------------------------------------------------------ stats
    def _aggregate_stats(self, *, final: bool) -> StatsMessage:
        """One StatsMessage for the pipeline: the engines' counts added up (earlier engine
        processes included), outputs as released here, and this client's own bad messages."""
        newest = (lk.stats.final or lk.stats.last_stats for lk in self._links)
        latest = [s for s in newest if s is not None]
        total = EngineCounts.total([s.counts for s in latest] + [lk.stats.base for lk in self._links])
        malformed = {k: v for k, v in total.malformed.items() if v}
        for prefix, counts in (("remote_", self.stats.malformed_remote), ("local_", self.stats.malformed_local)):
            for k, v in counts.items():
                malformed[prefix + k] = malformed.get(prefix + k, 0) + v
        last_error = next((s.counts.last_error for s in latest if s.counts.last_error), "")
        down = [lk.endpoint for lk in self._links if not lk.stats.up]
        if down and not last_error:
            last_error = "no contact with engine(s) at " + ", ".join(down)
        unsent = sum(lk.stats.frames_dropped for lk in self._links)
        if unsent and not last_error:
            last_error = f"{unsent} frame(s) not sent to the engine(s): link slow or down"
        engine = latest[0].engine if latest else "remote"
        running = any(s.state == "running" for s in latest)
        return StatsMessage(
            engine=engine,
            state="final" if final else ("running" if running else "ready"),
            counts=msgspec.structs.replace(total, outputs=self.stats.results_out, malformed=malformed,
                                           last_error=last_error),
            frames_sent=self._eos.frames_sent if (final and self._eos is not None) else None,
            final=final,
            run_id=self.run_id,
            window=self.window or 0,
        )


def handshake_advice(event: int, value: int, *, curve: bool) -> str:
    """What the user should do about a failed ZeroMQ handshake with an engine."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if curve:
            return ("the engine does not use CURVE (it was started without --keys/--allow): "
                    "restart it with --keys and --allow, or leave out --server-key/--client-key "
                    "(an engine without keys listens on loopback only: use an ssh tunnel)")
        return "the engine requires CURVE keys: pass --server-key and --client-key"
    if not curve:
        return "the engine requires CURVE keys: pass --server-key and --client-key"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "the engine does not accept this PC's key: copy this PC's public .key into its --allow directory"
    # no detail: a wrong server key, or (on some attempts) an engine without CURVE at all
    return ("either the engine does not use CURVE (started without --keys/--allow: restart it "
            "with them, or leave out --server-key/--client-key), or --server-key is not its "
            "server.key (--client-key must be this PC's .key_secret, its public .key in the "
            "engine's --allow folder)")


# ============================================================================ CLI glue
def engine_main(argv: Sequence[str] | None = None) -> int:
    """`livesr engine ARGS` (kept for callers of this module)."""
    from .cli import main as livesr

    return livesr(["engine", *(sys.argv[1:] if argv is None else argv)])


def serve_cli(cfg: EngineServerConfig, *, verbose: bool = False) -> int:
    """`livesr engine` (realtime/cli_tools.py): serve ``cfg`` until Ctrl-C / SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if cfg.device is None:
        cfg = dataclasses.replace(cfg, device="cuda" if _cuda_available() else "cpu")
    try:
        gw = EngineGateway(cfg)
        gw.start()
    except (SecurityError, ValueError, OSError) as e:
        print(f"livesr engine: error: {e}", file=sys.stderr)
        return 2
    curve = (
        f"CURVE on, {len(gw.curve.allow)} allowed client key(s) in {cfg.allow}"
        if gw.curve
        else "CURVE off (loopback only)"
    )
    print(f"livesr engine: {cfg.engine} on {cfg.device}; frames {cfg.bind}, results {cfg.results_bind}; {curve}")
    if cfg.engine_spec().options.get("optics") is not None and cfg.sofi.pixel_size_um is None:
        print("livesr engine: warning: SOFI assumes 0.1 um camera pixels (this machine has no camera to ask): "
              "pass --pixel-size-um for a correct PSF width", file=sys.stderr)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    rc = 0
    announced = False
    try:
        while not stop.wait(0.5):
            if not announced and gw.worker is not None and gw.worker.wait_ready(0):
                announced = True
                print("livesr engine: ready (Ctrl-C to stop)", flush=True)
            if gw.supervisor is not None and gw.supervisor.gave_up:
                why = gw.worker.startup_error() if gw.worker is not None else None
                print(
                    f"livesr engine: error: {gw.supervisor.gave_up_reason}"
                    + (f": {why}" if why else ""),
                    file=sys.stderr,
                )
                rc = 1
                break
    finally:
        gw.close()
        s = gw.stats
        print(
            f"livesr engine: stopped. frames in {s.frames_in}, to engine {s.frames_to_worker}, "
            f"dropped while engine was down {s.frames_dropped_no_worker}, engine deaths "
            f"{s.engine_deaths}, restarts {s.engine_restarts}"
        )
    return rc


def _cuda_available() -> bool:
    try:
        import torch  # noqa: PLC0415 - optional, heavy

        return bool(torch.cuda.is_available())
    except Exception:
        return False


__all__ = [
    "ChunkPlan",
    "EngineGateway",
    "EngineServerConfig",
    "RemoteEngineClient",
    "RemoteEngineOptions",
    "engine_main",
    "results_endpoint_for",
]
