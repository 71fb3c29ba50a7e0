"""The acquisition thread with real UniMMCore cameras, real sinks: the recorder, the ZeroMQ
frame publisher (real sockets) and the raw view."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import tifffile
import zmq
from pymmcore_plus.experimental.unicore import UniMMCore

from acquisition.cameras import SimulatedCamera, make_core
from acquisition.recorder import Recorder
from acquisition.simulation import SimulationConfig
from acquisition.sinks import SignalSink
from acquisition.thread import AcquisitionThread
from realtime.protocol import EndOfStream, FrameHeader, decode
from realtime.publisher import FramePublisher


class Puller:
    """A PULL socket on the frame address (the engine worker's side)."""

    def __init__(self, addr: str, rcvhwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.frames: list[tuple[FrameHeader, np.ndarray]] = []
        self.eos: EndOfStream | None = None

    def receive_until_eos(self, timeout_s: float = 10.0, delay_s: float = 0.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.eos is None and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            header, img = decode(self.sock.recv_multipart())
            if isinstance(header, EndOfStream):
                self.eos = header
            else:
                self.frames.append((header, np.array(img)))
                if delay_s:
                    time.sleep(delay_s)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class Frames:
    """Collects the raw view's frames (what the GUI would show) and the thread's signals."""

    def __init__(self, thread: AcquisitionThread, view: SignalSink) -> None:
        self.seqs: list[int] = []
        self.images: list[np.ndarray] = []
        self.stopped: list[int] = []
        self.errors: list[str] = []
        view.frameReady.connect(self._frame)
        thread.stopped.connect(self.stopped.append)
        thread.error.connect(self.errors.append)

    def _frame(self, seq: int, img: np.ndarray) -> None:
        self.seqs.append(seq)
        self.images.append(img.copy())


def acquisition(core, *sinks, **kwargs) -> tuple[AcquisitionThread, Frames]:
    """A thread feeding `sinks` then a raw view, and what that view saw."""
    view = SignalSink()
    thread = AcquisitionThread(core, sinks=[*sinks, view], **kwargs)
    return thread, Frames(thread, view)


def test_every_frame_is_published_in_order_with_its_header(free_tcp_addr):
    core = make_core("sim", size=32, fps=200.0)
    pub = FramePublisher(free_tcp_addr)
    thread, seen = acquisition(core, pub)
    puller = Puller(free_tcp_addr)
    try:
        thread.start()
        time.sleep(0.5)
        n = thread.stop()
        puller.receive_until_eos()
    finally:
        puller.close()
    assert n == thread.frames_acquired >= 50
    rate = n / 0.5
    print(f"acquisition thread: {n} frames in ~0.5 s ({rate:.0f} fps, camera set to 200)")
    assert [h.seq for h, _ in puller.frames] == list(range(n))
    assert puller.eos is not None and puller.eos.frames_sent == n
    assert pub.frames_published == n and pub.publish_drops == 0 and thread.gaps == 0
    h0 = puller.frames[0][0]
    assert h0.camera == "SimCamera" and h0.shape == (32, 32) and h0.dtype == "uint16"
    assert h0.pixel_size_um == pytest.approx(0.1) and h0.exposure_ms == pytest.approx(5.0)
    assert h0.elapsed_ms is not None and h0.t_acq_ns > 0
    t = [h.t_acq_ns for h, _ in puller.frames]
    assert t == sorted(t)
    # what went over the wire is exactly what the GUI saw
    assert seen.seqs == list(range(n))
    np.testing.assert_array_equal(np.stack([im for _, im in puller.frames]), np.stack(seen.images))
    assert seen.stopped == [n] and seen.errors == []
    assert thread.end_reason == "stopped"


def test_recording_keeps_every_frame_when_the_engine_never_reads(ipc_addr, tmp_path):
    """A connected PULL that never reads: the socket queue fills, frames pile up in the
    backlog and the oldest are given up for publishing, but the recording loses none."""
    core = make_core("sim", size=64, fps=400.0)
    recorder = Recorder(tmp_path / "rec.ome.tif")
    pub = FramePublisher(ipc_addr, sndhwm=5, backlog=10, linger_ms=200)
    thread, seen = acquisition(core, recorder, pub)
    puller = Puller(ipc_addr, rcvhwm=5)  # connected, never reads during the run
    try:
        thread.start()
        time.sleep(0.6)
        thread.stop()
    finally:
        puller.close()
    n = thread.frames_acquired
    print(f"never-reading engine: acquired {n}, published {pub.frames_published}, "
          f"not published {pub.publish_drops}, recorded {recorder.frames_recorded}")
    assert n >= 80
    assert pub.publish_drops > 0  # the bound was reached: the test did exercise it
    assert recorder.frames_recorded == n
    data = tifffile.imread(tmp_path / "rec.ome.tif")
    assert data.shape == (n, 64, 64)
    np.testing.assert_array_equal(data, np.stack(seen.images))
    assert seen.errors == []


def test_recording_and_publishing_keep_up_with_a_slow_reader(free_tcp_addr, tmp_path):
    """An engine that reads slowly (5 ms per frame, camera at 400 fps) gets every frame in
    order eventually (backlog, no drops) and the recording has all of them."""
    core = make_core("sim", size=32, fps=400.0)
    recorder = Recorder(tmp_path / "rec.ome.tif")
    pub = FramePublisher(free_tcp_addr, linger_ms=10_000)
    thread, _ = acquisition(core, recorder, pub)
    puller = Puller(free_tcp_addr)
    reader = threading.Thread(target=puller.receive_until_eos, kwargs={"timeout_s": 20.0,
                                                                        "delay_s": 0.005})
    try:
        thread.start()
        reader.start()
        time.sleep(0.5)
        thread.stop()
        reader.join(25.0)
    finally:
        puller.close()
    n = thread.frames_acquired
    print(f"slow engine: acquired {n}, received {len(puller.frames)}, "
          f"recorded {recorder.frames_recorded}")
    assert recorder.frames_recorded == n >= 50
    assert [h.seq for h, _ in puller.frames] == list(range(n))
    assert puller.eos is not None and puller.eos.frames_sent == n
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "rec.ome.tif"),
                                  np.stack([im for _, im in puller.frames]))


def test_max_frames_ends_the_acquisition_by_itself():
    core = make_core("sim", size=16, fps=500.0)
    thread, seen = acquisition(core, max_frames=25)
    thread.start()
    assert thread.join(10.0)
    assert thread.frames_acquired == 25 and seen.stopped == [25] and seen.errors == []
    assert thread.end_reason == "max_frames"
    assert not core.isSequenceRunning()


def test_a_replay_played_once_ends_normally(free_tcp_addr, tmp_path):
    movie = np.arange(7 * 12 * 10, dtype=np.uint16).reshape(7, 12, 10)
    tifffile.imwrite(tmp_path / "m.tif", movie, imagej=True, metadata={"axes": "TYX"})
    core = make_core(tmp_path / "m.tif", fps=300.0, loop=False)
    thread, seen = acquisition(core, FramePublisher(free_tcp_addr))
    puller = Puller(free_tcp_addr)
    try:
        thread.start()
        puller.receive_until_eos()
    finally:
        puller.close()
    assert thread.join(5.0)
    assert thread.end_reason == "end of source" and seen.errors == []
    assert puller.eos is not None and puller.eos.reason == "end of source"
    np.testing.assert_array_equal(np.stack([im for _, im in puller.frames]), movie)


class FailingCamera(SimulatedCamera):
    """Breaks after `fail_after` frames, as a camera that loses its connection would."""

    def __init__(self, fail_after: int) -> None:
        super().__init__(SimulationConfig(size=16, fps=300.0))
        self.fail_after = fail_after
        self.served = 0

    def next_image(self, buffer: np.ndarray) -> Mapping[str, Any]:
        if self.served >= self.fail_after:
            raise OSError("USB camera disconnected")
        self.served += 1
        return super().next_image(buffer)


def test_a_failing_camera_reports_an_error_and_leaves_a_valid_recording(tmp_path):
    core = UniMMCore()
    core.loadPyDevice("Flaky", FailingCamera(fail_after=6))
    core.initializeDevice("Flaky")
    core.setCameraDevice("Flaky")
    recorder = Recorder(tmp_path / "rec.ome.tif")
    thread, seen = acquisition(core, recorder)
    thread.start()
    assert thread.join(10.0)
    assert len(seen.errors) == 1
    assert "Flaky" in seen.errors[0] and "USB camera disconnected" in seen.errors[0]
    assert thread.end_reason == "error" and seen.stopped == [6]
    assert recorder.closed and recorder.frames_recorded == 6
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "rec.ome.tif"), np.stack(seen.images))


def test_the_publisher_fails_clearly_when_the_address_is_taken(free_tcp_addr):
    first = FramePublisher(free_tcp_addr, linger_ms=0)
    try:
        with pytest.raises(RuntimeError, match="cannot bind the frame socket"):
            FramePublisher(free_tcp_addr)
    finally:
        first.close()


def test_start_needs_a_camera():
    with pytest.raises(RuntimeError, match="no camera"):
        AcquisitionThread(UniMMCore()).start()


def test_a_sink_that_fails_at_setup_stops_the_start_and_leaves_no_file(tmp_path):
    class Refuses:
        def setup(self, info):
            raise OSError("read-only file system")

        def append(self, frame, meta): ...
        def skip(self, *, frames=1): ...
        def close(self): ...

    core = make_core("sim", size=16)
    recorder = Recorder(tmp_path / "r.ome.tif")
    with pytest.raises(RuntimeError, match="read-only file system"):
        AcquisitionThread(core, sinks=[recorder, Refuses()]).start()
    assert not core.isSequenceRunning() and not (tmp_path / "r.ome.tif").exists()


def test_a_broken_frame_listener_does_not_stop_acquisition():
    core = make_core("sim", size=16, fps=500.0)
    thread, seen = acquisition(core, max_frames=20)
    view = thread.sinks.sinks[-1]

    def broken(seq: int, img: np.ndarray) -> None:
        raise ValueError("bug in a viewer")

    view.frameReady.connect(broken)
    thread.start()
    assert thread.join(10.0)
    assert thread.frames_acquired == 20 and thread.error_message is None
    assert seen.seqs == list(range(20))


def test_a_failing_sink_is_reported_once_and_the_others_keep_every_frame(tmp_path):
    class Breaks:
        name = "flaky sink"
        calls = 0

        def setup(self, info): ...
        def skip(self, *, frames=1): ...
        def close(self): ...

        def append(self, frame, meta):
            Breaks.calls += 1
            if meta.frame == 3:
                raise RuntimeError("network share gone")

    core = make_core("sim", size=16, fps=500.0)
    recorder = Recorder(tmp_path / "r.ome.tif")
    thread, seen = acquisition(core, recorder, Breaks(), max_frames=30)
    thread.start()
    assert thread.join(10.0)
    assert Breaks.calls == 4  # taken out after its first failure
    assert len(seen.errors) == 1 and "flaky sink" in seen.errors[0]
    assert "network share gone" in seen.errors[0]
    assert recorder.frames_recorded == 30 and seen.seqs == list(range(30))
    assert tifffile.imread(tmp_path / "r.ome.tif").shape == (30, 16, 16)


def test_acquisition_imports_neither_realtime_nor_zmq_nor_torch():
    """The data flow is acquisition/ -> realtime/: acquisition must stand on its own."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, acquisition.thread, acquisition.recorder, acquisition.sinks, "
            "acquisition.cameras, acquisition.ome_tiff, acquisition.ome_zarr; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('realtime', 'zmq', 'torch', 'engines', 'gui')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
