"""The sink contract: order, isolation of a failing sink, a slow sink on its own thread."""

from __future__ import annotations

import time

import numpy as np
import pytest

from acquisition.sinks import FrameMeta, SignalSink, SinkSet, StreamInfo, ThreadedSink

INFO = StreamInfo(shape=(4, 4), dtype="uint16")


class Collect:
    def __init__(self, log: list, name: str, fail_at: int | None = None, delay_s: float = 0.0):
        self.log, self.name, self.fail_at, self.delay_s = log, name, fail_at, delay_s
        self.frames: list[int] = []
        self.skipped = 0
        self.closed = False

    def setup(self, info: StreamInfo) -> None:
        self.log.append((self.name, "setup"))

    def append(self, frame: np.ndarray, meta: FrameMeta) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if meta.frame == self.fail_at:
            raise OSError("disk unplugged")
        self.log.append((self.name, meta.frame))
        self.frames.append(meta.frame)

    def skip(self, *, frames: int = 1) -> None:
        self.skipped += frames

    def close(self) -> None:
        self.closed = True


def _meta(i: int) -> FrameMeta:
    return FrameMeta(seq=i, frame=i, t_acq_ns=i)


def test_sinks_get_every_frame_in_order_recorder_first():
    log: list = []
    a, b = Collect(log, "recorder"), Collect(log, "publisher")
    sinks = SinkSet([a, None, b])
    sinks.setup(INFO)
    for i in range(3):
        sinks.append(np.zeros((4, 4), np.uint16), _meta(i))
    sinks.skip(frames=2)
    assert sinks.close() == []
    assert log == [("recorder", "setup"), ("publisher", "setup"), ("recorder", 0),
                   ("publisher", 0), ("recorder", 1), ("publisher", 1), ("recorder", 2),
                   ("publisher", 2)]
    assert a.skipped == b.skipped == 2 and a.closed and b.closed


def test_a_failing_sink_is_reported_once_taken_out_and_still_closed():
    log: list = []
    errors: list[str] = []
    bad, good = Collect(log, "bad", fail_at=1), Collect(log, "good")
    sinks = SinkSet([bad, good], on_error=errors.append)
    sinks.setup(INFO)
    for i in range(5):
        sinks.append(np.zeros((4, 4), np.uint16), _meta(i))
    sinks.close()
    assert bad.frames == [0] and good.frames == [0, 1, 2, 3, 4]
    assert len(errors) == 1 and "bad failed in append" in errors[0] and "disk unplugged" in errors[0]
    assert sinks.failed(bad) is not None and sinks.failed(good) is None
    assert bad.closed  # a failed sink still gets close(): its file must be finished


def test_a_slow_sink_on_its_own_thread_never_makes_the_source_wait():
    log: list = []
    slow = Collect(log, "slow", delay_s=0.05)
    threaded = ThreadedSink(slow, maxsize=4)
    threaded.setup(INFO)
    t = time.perf_counter()
    for i in range(40):
        threaded.append(np.zeros((4, 4), np.uint16), _meta(i))
    handed_over_s = time.perf_counter() - t
    threaded.close()
    assert handed_over_s < 0.05  # 40 frames handed over in less than one slow append
    # it kept what it could (the newest) and was told how many it missed
    assert len(slow.frames) + slow.skipped == 40 == len(slow.frames) + threaded.frames_skipped
    assert slow.frames == sorted(slow.frames) and slow.frames[-1] == 39
    assert threaded.frames_skipped > 0 and slow.closed


def test_a_threaded_sink_that_fails_reports_it_on_the_next_append():
    slow = Collect([], "fails", fail_at=0)
    threaded = ThreadedSink(slow)
    threaded.setup(INFO)
    threaded.append(np.zeros((4, 4), np.uint16), _meta(0))
    deadline = time.monotonic() + 5
    while threaded.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        threaded.append(np.zeros((4, 4), np.uint16), _meta(1))
    threaded.close()


def test_the_raw_view_emits_every_frame_and_survives_a_broken_viewer():
    view = SignalSink()
    got: list[int] = []
    view.frameReady.connect(lambda seq, img: got.append(seq))

    def broken(seq: int, img: np.ndarray) -> None:
        raise ValueError("viewer bug")

    view.frameReady.connect(broken)
    metas: list[FrameMeta] = []
    view.frameMeta.connect(lambda img, m: metas.append(m))
    sinks = SinkSet([view])
    sinks.setup(INFO)
    for i in range(3):
        sinks.append(np.zeros((4, 4), np.uint16), _meta(i))
    assert got == [0, 1, 2] and [m.frame for m in metas] == [0, 1, 2]
    assert sinks.failed(view) is None
