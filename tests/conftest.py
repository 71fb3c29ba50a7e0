"""Shared fixtures: free loopback addresses, a fake frame publisher, a result subscriber,
and trivial engines (so that realtime tests need neither torch nor the real engines).

Other owners may add fixtures here; keep additions additive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import zmq
from scipy import ndimage

from realtime.config import free_tcp_address
from realtime.protocol import (
    EndOfStream,
    FrameHeader,
    ResultHeader,
    StatsMessage,
    decode,
    encode_eos,
    encode_frame,
)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- addresses


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (the 2-core CI machine runs other tests' processes too)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def free_tcp_addr() -> str:
    """A ``tcp://127.0.0.1:PORT`` that is free right now."""
    return free_tcp_address()


@pytest.fixture
def make_tcp_addr():
    """Factory for as many free loopback addresses as a test needs."""
    return free_tcp_address


@pytest.fixture
def ipc_addr(tmp_path) -> str:
    """A unique ``ipc://`` endpoint inside the test's tmp dir."""
    return f"ipc://{tmp_path}/livesr-{uuid.uuid4().hex[:8]}.sock"


# --------------------------------------------------------------------------- fake engines


class MeanEngine:
    """Mean of the last ``window`` frames, upsampled 2x: trivially checkable output.

    ``delay_s`` makes it slow (to exercise catch-up); a frame whose first pixel equals
    ``fail_value`` makes it raise (to exercise engine-error handling).
    """

    name = "mean"
    upsample = 2

    def __init__(self, window: int = 4, delay_s: float = 0.0, fail_value: int | None = None) -> None:
        self.window = window
        self.delay_s = delay_s
        self.fail_value = fail_value
        self.calls = 0
        self._frames: deque[np.ndarray] = deque(maxlen=window)

    def _out(self, stack: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        m = np.asarray(stack[-self.window :], dtype=np.float32).mean(axis=0)
        return np.kron(m, np.ones((2, 2), np.float32))

    def _check(self, frame: np.ndarray) -> None:
        if self.fail_value is not None and int(frame.flat[0]) == self.fail_value:
            raise RuntimeError("injected engine failure")

    def push(self, frame: np.ndarray) -> np.ndarray | None:
        self._check(frame)
        self._frames.append(np.array(frame))
        if len(self._frames) < self.window:
            return None
        return self._out(np.stack(self._frames))

    def reset(self) -> None:
        self._frames.clear()

    def reconstruct(self, stack: np.ndarray) -> np.ndarray:
        for f in stack:
            self._check(f)
        if len(stack) < self.window:
            raise ValueError("too few frames")
        return self._out(stack)


class StackOnlyMeanEngine:
    """Like MeanEngine but without push(): exercises the RollingWindow path."""

    name = "mean-stack"
    upsample = 2

    def __init__(self, window: int = 4) -> None:
        self.window = window
        self._inner = MeanEngine(window)

    def reconstruct(self, stack: np.ndarray) -> np.ndarray:
        return self._inner.reconstruct(stack)


class LearnedMean(MeanEngine):
    """The mean of the window, flagged as a learned engine (the worker then checks it)."""

    name = "learned-mean"
    learned = True


class PriorNetwork:
    """A 'network' that draws the same filaments whatever the camera shows (a learned prior)."""

    name = "prior-net"
    learned = True
    upsample = 2

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._n = 0

    def push(self, frame: np.ndarray) -> np.ndarray | None:
        self._n += 1
        if self._n < self.window:
            return None
        h, w = frame.shape
        img = np.zeros((2 * h, 2 * w), np.float32)
        img[::9, :] = 1.0
        img[:, ::13] = 1.0
        return ndimage.gaussian_filter(img, 1.5) * 1e4

    def reset(self) -> None:
        self._n = 0


def make_mean_engine(window: int = 4, delay_s: float = 0.0) -> MeanEngine:
    """Picklable factory (module-level) for process-mode tests."""
    return MeanEngine(window=window, delay_s=delay_s)


def seq_frame(seq: int, shape=(8, 8), dtype=np.uint16) -> np.ndarray:
    """A frame whose value encodes its sequence number (plus a fixed spatial pattern)."""
    pattern = np.arange(shape[0] * shape[1]).reshape(shape) % 7
    return (pattern + 10 * seq).astype(dtype)


def expected_mean_output(seq_first: int, seq_last: int, shape=(8, 8)) -> np.ndarray:
    stack = np.stack([seq_frame(s, shape).astype(np.float32) for s in range(seq_first, seq_last + 1)])
    return np.kron(stack.mean(axis=0), np.ones((2, 2), np.float32))


@pytest.fixture
def mean_engine_cls():
    return MeanEngine


# --------------------------------------------------------------------------- fake publisher / subscriber


class FramePusher:
    """Binds a PUSH socket like the acquisition thread does, and sends what a test asks."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.bind(addr)
        self.sent = 0

    def frame(self, seq: int, img: np.ndarray, t_acq_ns: int | None = None) -> None:
        h = FrameHeader(
            seq=seq,
            t_acq_ns=time.time_ns() if t_acq_ns is None else t_acq_ns,
            shape=img.shape,
            dtype=img.dtype.name,
        )
        self.sock.send_multipart(encode_frame(h, img), copy=False)
        self.sent += 1

    def raw(self, parts: list) -> None:
        self.sock.send_multipart(parts)

    def eos(self, reason: str = "stopped") -> None:
        self.sock.send_multipart(encode_eos(EndOfStream(frames_sent=self.sent, reason=reason)))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class ResultCollector:
    """SUB socket gathering results and stats from a worker's PUB address."""

    def __init__(self, addr: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.results: list[tuple[ResultHeader, np.ndarray]] = []
        self.stats: list[StatsMessage] = []

    def _recv(self, timeout_s: float) -> bool:
        if not self.sock.poll(int(timeout_s * 1000)):
            return False
        h, img = decode(self.sock.recv_multipart())
        if isinstance(h, ResultHeader):
            self.results.append((h, np.array(img)))
        elif isinstance(h, StatsMessage):
            self.stats.append(h)
        return True

    def wait_ready(self, timeout_s: float = 20.0) -> StatsMessage:
        """Wait for the worker's first stats message: proves the subscription is live."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._recv(0.1)
            if self.stats:
                return self.stats[-1]
        raise TimeoutError("no stats message from the worker")

    def wait_final(self, timeout_s: float = 20.0) -> StatsMessage:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._recv(0.1)
            if self.stats and self.stats[-1].final:
                return self.stats[-1]
        raise TimeoutError("no final stats message from the worker")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def frame_pusher(make_tcp_addr):
    p = FramePusher(make_tcp_addr())
    yield p
    p.close()


@pytest.fixture
def shared_data() -> Path:
    """The folder of real recorded movies; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"unavailable: shared data folder {SHARED_DATA} not found")
    return SHARED_DATA


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs root, as in the container this project runs in)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("unavailable: mounting a tmpfs needs root (the file-size-limit test "
                    "covers the OME-TIFF case without it)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"unavailable: cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------- fine-tuning inputs


@pytest.fixture(scope="session")
def fixed_sample_recording(tmp_path_factory) -> Path:
    """500 frames (the fine-tuning minimum) of a fixed, blinking, simulated 48 px honeycomb
    (a class the networks never trained on), written through the Recorder as a run records."""
    from acquisition.recordings import write_recording
    from acquisition.simulation import BlinkingScene, SimulationConfig

    cfg = SimulationConfig(size=48, structure="honeycomb", photons=300.0, background=15.0,
                           on_ms=10.0, off_ms=600.0, emitters_per_um=40.0, seed=3)
    path = tmp_path_factory.mktemp("rec") / "cell.ome.tif"
    return write_recording(path, BlinkingScene(cfg).frames(500), pixel_size_um=0.1, fps=100.0,
                           camera="SimulatedCamera")


@pytest.fixture(scope="session")
def tiny_convgru_weights(tmp_path_factory) -> Path:
    """A small ConvGRU (4 channels, random init) saved as a current livesr weights file:
    loads and fine-tunes in milliseconds per step."""
    import torch

    from engines.convgru import ConvGRUConfig, ConvGRUNet
    from engines.nn_common import NormConfig, save_weights

    torch.manual_seed(0)
    arch = ConvGRUConfig(hidden=4)
    path = tmp_path_factory.mktemp("w") / "tiny_convgru.pt"
    return save_weights(path, ConvGRUNet(arch), model_name="convgru", arch=arch,
                        norm=NormConfig(), training={"final_step": 0})
