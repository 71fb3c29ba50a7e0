"""EngineWorker over real ZeroMQ sockets on 127.0.0.1 with trivial engines.

Every output is checked against the mean of exactly the frames its header names, so an
output computed across a gap, from the wrong frames or from a malformed message would fail.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import (
    MeanEngine,
    ResultCollector,
    StackOnlyMeanEngine,
    expected_mean_output,
    make_mean_engine,
    seq_frame,
)
from realtime.handle import EngineHandle, EngineReport
from realtime.protocol import PROTOCOL_VERSION, FrameHeader, ResultHeader, encode_frame, encode_result
from realtime.worker import EngineWorker


@pytest.fixture
def start_worker(frame_pusher, make_tcp_addr):
    """Start a worker (thread by default) wired to the fake frame pusher; yield (worker, results)."""
    started = []

    def _start(engine, *, mode="thread", **kw):
        w = EngineWorker(engine, frame_pusher.addr, make_tcp_addr(), stats_interval_s=0.05, **kw)
        w.run_in_process() if mode == "process" else w.run_in_thread()
        assert w.wait_ready(60), "worker did not become ready"
        rc = ResultCollector(w.out_addr)
        rc.wait_ready()
        started.append((w, rc))
        return w, rc

    yield _start
    for w, rc in started:
        w.stop()
        assert w.join(10), "worker did not stop"
        rc.close()


def assert_outputs_correct(results, window, shape=(8, 8)):
    for h, img in results:
        assert h.seq_last - h.seq_first + 1 == window
        np.testing.assert_allclose(img, expected_mean_output(h.seq_first, h.seq_last, shape), rtol=1e-6)
        assert img.shape == (2 * shape[0], 2 * shape[1]) and img.dtype == np.float32


def finish(pusher, rc):
    pusher.eos()
    return rc.wait_final()


def test_streams_outputs_for_every_due_frame(frame_pusher, start_worker):
    w, rc = start_worker(MeanEngine(window=4))
    for s in range(12):
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)  # a camera, not a burst
    final = finish(frame_pusher, rc)
    due = 12 - 4 + 1
    assert final.counts.outputs + final.counts.outputs_skipped == due
    assert final.counts.frames_received == 12 and final.frames_sent == 12 and final.counts.malformed == {}
    assert len(rc.results) == final.counts.outputs >= 1
    assert rc.results[-1][0].seq_last == 11  # the newest window is always computed
    assert_outputs_correct(rc.results, 4)
    h = rc.results[-1][0]
    t = h.timings_ns
    assert h.t_acq_ns <= t["received"] <= t["start"] <= t["done"] <= t["published"]
    assert w.join(5), "exit_on_eos: worker ends after the final stats"


def test_stack_only_engine_uses_rolling_window(frame_pusher, start_worker):
    _, rc = start_worker(StackOnlyMeanEngine(window=3))
    for s in range(10):
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    assert final.counts.outputs + final.counts.outputs_skipped == 8 and final.counts.outputs >= 1
    assert_outputs_correct(rc.results, 3)


def test_stride(frame_pusher, start_worker):
    _, rc = start_worker(MeanEngine(window=4), stride=3)
    for s in range(14):
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    # due at run counts 4, 7, 10, 13 -> seq 3, 6, 9, 12
    assert final.counts.outputs + final.counts.outputs_skipped == 4
    assert {h.seq_last for h, _ in rc.results} <= {3, 6, 9, 12}
    assert_outputs_correct(rc.results, 4)


def test_gap_never_mixes_frames(frame_pusher, start_worker):
    _, rc = start_worker(MeanEngine(window=4))
    seqs = list(range(0, 6)) + list(range(9, 15))  # gap 5 -> 9
    for s in seqs:
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)
    finish(frame_pusher, rc)
    assert_outputs_correct(rc.results, 4)
    assert all(h.seq_first >= 9 or h.seq_last <= 5 for h, _ in rc.results)
    assert rc.results[-1][0].seq_last == 14


def test_shape_change_restarts_window(frame_pusher, start_worker):
    _, rc = start_worker(MeanEngine(window=3))
    for s in range(5):
        frame_pusher.frame(s, seq_frame(s, (8, 8)))
        time.sleep(0.005)
    for s in range(5, 10):
        frame_pusher.frame(s, seq_frame(s, (6, 10)))
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    assert final.counts.engine_errors == 0
    small = [(h, i) for h, i in rc.results if h.seq_last >= 5]
    big = [(h, i) for h, i in rc.results if h.seq_last < 5]
    assert small and all(h.seq_first >= 5 for h, _ in small)
    assert_outputs_correct(small, 3, (6, 10))
    assert_outputs_correct(big, 3, (8, 8))


def test_malformed_messages_are_counted_and_survived(frame_pusher, start_worker):
    _, rc = start_worker(MeanEngine(window=3))
    good = encode_frame(FrameHeader(seq=0, t_acq_ns=1, shape=(8, 8)), seq_frame(0))
    bad = {
        "json": [b"\xff\xfenot json", b"123"],
        "version": [good[0].replace(f'"version":{PROTOCOL_VERSION}'.encode(), b'"version":9'), bytes(good[1])],
        "kind": [good[0].replace(b'"kind":"frame"', b'"kind":"pizza"'), bytes(good[1])],
        "parts": [good[0]],
        "length": [good[0], bytes(good[1])[:-1]],
        "shape": [good[0].replace(b'"shape":[8,8]', b'"shape":[0,8]'), bytes(good[1])],
        "dtype": [good[0].replace(b'"dtype":"uint16"', b'"dtype":"complex64"'), bytes(good[1])],
        "field": [good[0].replace(b'"seq":0', b'"seq":"zero"'), bytes(good[1])],
    }
    result_msg = encode_result(
        ResultHeader(seq_first=0, seq_last=0, t_acq_ns=0, shape=(2, 2), engine="x"), np.zeros((2, 2), np.float32)
    )
    s = 0
    for parts in bad.values():
        frame_pusher.frame(s, seq_frame(s))
        frame_pusher.raw([bytes(p) for p in parts])
        s += 1
    frame_pusher.raw([bytes(p) for p in result_msg])  # a valid message of the wrong kind
    for _ in range(3):
        frame_pusher.frame(s, seq_frame(s))
        s += 1
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    assert final.counts.malformed == {**{k: 1 for k in bad}, "unexpected_kind": 1}
    assert final.counts.frames_received == s == final.frames_sent - 0
    assert final.counts.outputs >= 1 and rc.results[-1][0].seq_last == s - 1
    assert_outputs_correct(rc.results, 3)  # no malformed message became (part of) an image
    # the running stats message reports them too, before the end
    assert any(st.counts.malformed for st in rc.stats)


def test_slow_engine_drains_and_computes_only_newest(frame_pusher, start_worker):
    engine = MeanEngine(window=4, delay_s=0.02)
    _, rc = start_worker(engine)
    n = 80
    for s in range(n):  # a burst far faster than 50 outputs/s
        frame_pusher.frame(s, seq_frame(s))
    final = finish(frame_pusher, rc)
    due = n - 4 + 1
    assert final.counts.frames_received == n
    assert final.counts.outputs + final.counts.outputs_skipped == due
    assert final.counts.outputs_skipped > due // 2, "it should have skipped most outputs to keep up"
    assert rc.results[-1][0].seq_last == n - 1  # caught up to the newest window
    assert rc.results[-1][0].outputs_skipped <= final.counts.outputs_skipped
    assert_outputs_correct(rc.results, 4)


def test_engine_error_is_counted_and_worker_recovers(frame_pusher, start_worker):
    fail_seq = 5
    _, rc = start_worker(MeanEngine(window=3, fail_value=int(seq_frame(fail_seq)[0, 0])))
    for s in range(12):
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    assert final.counts.engine_errors == 1 and "injected engine failure" in final.counts.last_error
    assert_outputs_correct(rc.results, 3)
    assert all(not (h.seq_first <= fail_seq <= h.seq_last) for h, _ in rc.results)
    assert rc.results[-1][0].seq_last == 11


def test_engine_load_failure_is_reported(make_tcp_addr):
    def broken_factory():
        raise RuntimeError("no such weights")

    w = EngineWorker(broken_factory, make_tcp_addr(), make_tcp_addr(), stats_interval_s=0.05)
    rc = ResultCollector(w.out_addr)
    try:
        w.run_in_thread()
        final = rc.wait_final(10)
        assert final.counts.engine_errors == 1 and "no such weights" in final.counts.last_error
        assert w.join(5)
        assert not w.wait_ready(0.1)
    finally:
        rc.close()


def test_stop_without_eos(start_worker):
    w, rc = start_worker(MeanEngine(window=3))
    w.stop()
    assert w.join(5)
    assert rc.wait_final(5).final


def test_persistent_worker_serves_several_streams(frame_pusher, start_worker):
    _, rc = start_worker(MeanEngine(window=3), exit_on_eos=False)
    for run in range(2):
        for s in range(6):
            frame_pusher.frame(s, seq_frame(s))  # both streams start at seq 0
            time.sleep(0.005)
        frame_pusher.eos()
        rc.wait_final()
        rc.stats.clear()
    assert_outputs_correct(rc.results, 3)
    assert sum(h.seq_last == 5 for h, _ in rc.results) == 2


def test_rejects_bad_stride():
    with pytest.raises(ValueError):
        EngineWorker(MeanEngine(), "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", stride=0)


def test_run_in_process(frame_pusher, start_worker):
    w, rc = start_worker(make_mean_engine, mode="process")
    for s in range(8):
        frame_pusher.frame(s, seq_frame(s))
        time.sleep(0.005)
    final = finish(frame_pusher, rc)
    assert final.counts.frames_received == 8 and final.counts.outputs >= 1
    assert_outputs_correct(rc.results, 4)
    assert w.join(10) and w.exitcode == 0
    assert w.report() == EngineReport("mean", 4, False)  # what the engine in the child said
    assert w.failure() is None  # a clean end


def test_busy_result_address_is_reported(make_tcp_addr):
    import zmq

    addr = make_tcp_addr()
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    squatter.bind(addr)
    try:
        w = EngineWorker(MeanEngine(), make_tcp_addr(), addr)
        w.run_in_thread()
        assert w.join(5) and not w.wait_ready(0.1)
        assert "in use" in w.startup_error() and addr in w.startup_error()
    finally:
        squatter.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- catch-up logic, deterministic
# A drained batch is fed straight into the worker (no sockets, no timing), so the skip/catch-up
# decisions can be checked exactly.


class _CapturePub:
    def __init__(self):
        self.results = []

    def send_multipart(self, parts, copy=True):
        from realtime.protocol import decode

        h, img = decode([bytes(p) for p in parts])
        self.results.append((h, np.array(img)))


class CountingEngine(MeanEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pushed = []
        self.resets = 0

    def push(self, frame):
        self.pushed.append(int(frame[0, 0]) // 10)
        return super().push(frame)

    def reset(self):
        self.resets += 1
        super().reset()


def _batch(seqs, shape=(8, 8)):
    return [(FrameHeader(seq=s, t_acq_ns=time.time_ns(), shape=shape), seq_frame(s, shape), time.time_ns())
            for s in seqs]


def _worker(engine, stride=1):
    w = EngineWorker(engine, "inproc://unused-in", "inproc://unused-out", stride)
    pub = _CapturePub()
    w._setup_engine(engine, pub)
    return w, pub


def test_backlog_computes_only_the_newest_window_and_pushes_only_its_frames():
    eng = CountingEngine(window=4)
    w, pub = _worker(eng)
    w._process_batch(_batch(range(30)))
    assert [h.seq_last for h, _ in pub.results] == [29]
    assert w.stats.outputs == 1 and w.stats.outputs_skipped == 30 - 4  # 27 due, 1 computed
    assert eng.pushed == [26, 27, 28, 29]  # frames older than the newest window are skipped
    assert_outputs_correct(pub.results, 4)
    # keeping up afterwards: one frame per batch, every frame pushed, every output computed
    for s in range(30, 33):
        w._process_batch(_batch([s]))
    assert [h.seq_last for h, _ in pub.results] == [29, 30, 31, 32]
    assert eng.pushed[-3:] == [30, 31, 32]
    assert_outputs_correct(pub.results, 4)


def test_backlog_continuing_a_run_uses_the_engine_state():
    eng = CountingEngine(window=4)
    w, pub = _worker(eng)
    w._process_batch(_batch(range(0, 2)))
    w._process_batch(_batch(range(2, 5)))  # short backlog: no skip, no reset
    assert eng.pushed == [0, 1, 2, 3, 4] and [h.seq_last for h, _ in pub.results] == [4]
    assert w.stats.outputs_skipped == 1  # seq 3 was due but only the newest (4) was computed
    assert_outputs_correct(pub.results, 4)


class SumsOnlyEngine(CountingEngine):
    """Like SOFI: push(frame, output=False) updates the sums and computes no image."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.images = 0

    def push(self, frame, *, output=True):
        out = super().push(frame)
        if out is not None and output:
            self.images += 1
            return out
        return None


def test_backlog_asks_a_sums_only_engine_for_the_published_image_alone():
    eng = SumsOnlyEngine(window=4)
    w, pub = _worker(eng)
    w._process_batch(_batch(range(0, 4)))
    w._process_batch(_batch(range(4, 8)))  # a short backlog: all pushed, one image computed
    assert eng.pushed == list(range(8)) and [h.seq_last for h, _ in pub.results] == [3, 7]
    assert eng.images == 2 and w.stats.outputs_skipped == 3
    assert_outputs_correct(pub.results, 4)


def test_backlog_with_a_gap_gives_one_output_per_run_never_mixed():
    eng = CountingEngine(window=4)
    w, pub = _worker(eng)
    w._process_batch(_batch(list(range(0, 10)) + list(range(20, 30))))
    assert [(h.seq_first, h.seq_last) for h, _ in pub.results] == [(6, 9), (26, 29)]
    assert_outputs_correct(pub.results, 4)


def test_backlog_with_stride_computes_the_newest_due_output():
    eng = CountingEngine(window=4)
    w, pub = _worker(eng, stride=5)
    w._process_batch(_batch(range(20)))  # due at counts 4, 9, 14, 19 -> seq 3, 8, 13, 18
    assert [h.seq_last for h, _ in pub.results] == [18]
    assert w.stats.outputs_skipped == 3
    w._process_batch(_batch([20, 21, 22, 23]))  # next due: seq 23
    assert [h.seq_last for h, _ in pub.results] == [18, 23]
    assert_outputs_correct(pub.results, 4)


def test_stack_engine_backlog_uses_the_rolling_window():
    w, pub = _worker(StackOnlyMeanEngine(window=3))
    w._process_batch(_batch(range(12)))
    assert [h.seq_last for h, _ in pub.results] == [11]
    assert w.stats.outputs_skipped == 9
    assert_outputs_correct(pub.results, 3)


def test_engine_error_inside_a_backlog_restarts_with_the_next_frames():
    fail_seq = 28  # inside the newest window of the backlog, so it is pushed
    eng = CountingEngine(window=3, fail_value=int(seq_frame(fail_seq)[0, 0]))
    w, pub = _worker(eng)
    w._process_batch(_batch(range(30)))
    assert w.stats.engine_errors == 1 and "injected" in w.stats.last_error
    assert pub.results == []  # the window 27..29 contained the failing frame
    w._process_batch(_batch([30, 31]))
    # a new run started right after the failing frame: 29, 30, 31
    assert [(h.seq_first, h.seq_last) for h, _ in pub.results] == [(29, 31)]
    assert_outputs_correct(pub.results, 3)


# ---------------------------------------------------------------- stateful engines (ConvLSTM)
from realtime.worker import plan_stateful_feed  # noqa: E402


def test_plan_stateful_feed_keeps_the_output_rate_near_capacity():
    # unknown costs (just started) or nothing queued: feed everything
    assert plan_stateful_feed(7, per_frame_s=None, per_output_s=None) == 7
    assert plan_stateful_feed(0, per_frame_s=0.01, per_output_s=0.01) == 1
    assert plan_stateful_feed(1, per_frame_s=0.05, per_output_s=0.01) == 1
    # ConvLSTM on a CPU: 80 % of a push ingests the frame, 20 % makes the output; keeping
    # >= 80 % of its capacity allows one frame per output, >= 50 % two
    assert plan_stateful_feed(30, per_frame_s=0.019, per_output_s=0.005) == 1
    assert plan_stateful_feed(30, per_frame_s=0.019, per_output_s=0.005, min_output_share=0.5) == 2
    # cheap frames (a batched encoder on a GPU), dear outputs: many frames per output
    assert plan_stateful_feed(30, per_frame_s=0.001, per_output_s=0.008) == 3
    assert plan_stateful_feed(30, per_frame_s=0.001, per_output_s=0.008, min_output_share=0.25) == 28
    assert plan_stateful_feed(5, per_frame_s=0.001, per_output_s=0.1) == 5  # never more than queued
    # the time per output stays within 1/share of the capacity interval
    for pf, po, share in [(0.02, 0.005, 0.8), (0.003, 0.01, 0.6), (0.01, 0.0, 0.5)]:
        m = plan_stateful_feed(100, per_frame_s=pf, per_output_s=po, min_output_share=share)
        assert m * pf + po <= (pf + po) / share + 1e-12
        assert (m + 1) * pf + po > (pf + po) / share or m == 100
    with pytest.raises(ValueError):
        plan_stateful_feed(3, per_frame_s=0.01, per_output_s=0.0, min_output_share=0)


class StatefulEngine(CountingEngine):
    """Like a ConvLSTM: output = mean of every frame since reset (so a reset shows)."""

    stateful = True

    def __init__(self, window=3, frame_cost=0.02, output_cost=0.005):
        super().__init__(window=window)
        self.frame_cost, self.output_cost = frame_cost, output_cost
        self.total = None
        self.count = 0
        self.last_cost = None

    def push_many(self, frames, output=True):
        for f in frames:
            self.pushed.append(int(f[0, 0]) // 10)
            self.total = f.astype(np.float64) if self.total is None else self.total + f
            self.count += 1
        self.last_cost = (self.frame_cost * len(frames), self.output_cost if output else 0.0)
        if not output or self.count < self.window:
            return None
        return np.kron(self.total / self.count, np.ones((2, 2))).astype(np.float32)

    def push(self, frame):
        return self.push_many([frame])

    def reset(self):
        super().reset()
        self.total, self.count = None, 0


def test_stateful_engine_keeps_its_state_through_a_backlog():
    eng = StatefulEngine(window=3)
    w, pub = _worker(eng)
    w._process_batch(_batch(range(5)))  # costs unknown yet: every frame is fed
    assert eng.pushed == [0, 1, 2, 3, 4] and [h.seq_last for h, _ in pub.results] == [4]
    resets = eng.resets
    w._process_batch(_batch(range(5, 40)))  # a long backlog: no reset, newest frame fed
    assert eng.resets == resets, "a stateful engine was reset to catch up"
    assert [h.seq_last for h, _ in pub.results] == [4, 39]
    assert eng.pushed[-1] == 39 and len(eng.pushed) == 6  # 1 frame per output at 80 % capacity
    assert w.stats.outputs_skipped == (3 - 1) + (35 - 1)
    # the output carries the state of every frame fed since the reset
    fed = eng.pushed
    expected = np.mean([seq_frame(s).astype(np.float64) for s in fed], axis=0)
    np.testing.assert_allclose(pub.results[-1][1], np.kron(expected, np.ones((2, 2))), rtol=1e-6)
    # keeping up again: every frame fed, every output made
    for s in range(40, 43):
        w._process_batch(_batch([s]))
    assert eng.pushed[-3:] == [40, 41, 42] and [h.seq_last for h, _ in pub.results][-3:] == [40, 41, 42]
    # a result names every frame its state carries: from the first fed since the reset (for a
    # ConvLSTM `window` is its warm-up, not the span of what it saw)
    assert all(h.seq_first == 0 for h, _ in pub.results)
    # a real gap in the stream (lost frames) still restarts it
    n0 = len(eng.pushed)
    w._process_batch(_batch([50, 51, 52, 53]))
    assert eng.resets == resets + 1 and pub.results[-1][0].seq_last == 53
    assert pub.results[-1][0].seq_first == eng.pushed[n0] > 49  # the first frame fed after it


def test_stateful_engine_feeds_more_frames_when_they_are_cheap():
    eng = StatefulEngine(window=2, frame_cost=0.001, output_cost=0.008)
    w, pub = _worker(eng)
    w._process_batch(_batch(range(3)))
    w._process_batch(_batch(range(3, 30)))
    assert eng.pushed[3:] == [27, 28, 29]  # 3 frames fit the budget of one output


def test_stateful_engine_in_a_live_pipeline_is_never_rewarmed():
    """Camera at 100 fps, engine capacity ~40 outputs/s: outputs keep coming, never reset."""
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    class SlowStateful(StatefulEngine):
        def push_many(self, frames, output=True):
            time.sleep(0.02 * len(frames) + (0.005 if output else 0))
            return super().push_many(frames, output)

    eng = SlowStateful(window=5)
    cfg = PipelineConfig(size=16, fps=100.0, worker_mode="thread", threads=1,
                         addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    m = Pipeline(cfg, engine=eng).run_for(2.0)
    assert m.errors == [] and m.frames_received == m.frames_acquired > 100
    assert eng.resets == 2, "re-warmed while catching up"  # set-up + first frame only
    # re-warming 5 frames per output would give <= 1 / (5 * 20 ms) = 10 outputs/s
    assert m.outputs > 2 * 10 * m.duration_s, m


def test_plan_window_feed_is_the_newest_output_and_the_next_window():
    """The stateless catch-up plan, called directly: which queued frames a streaming window
    engine is fed (the frames of the newest due output and the last window), or all of them
    when its state already runs up to the batch and that is no dearer than a restart."""
    from realtime.worker import plan_window_feed

    # 10 queued, window 3, newest output due at index 6: frames 4..6 and 7..9
    assert plan_window_feed(10, window=3, last_due=6, continues=False) == [False] * 4 + [True] * 6
    # the output is the last frame: only its window
    assert plan_window_feed(10, window=3, last_due=9, continues=False) == [False] * 7 + [True] * 3
    # no output due: the last window only (for the outputs after this batch)
    assert plan_window_feed(5, window=3, last_due=None, continues=False) == [False, False, True, True, True]
    # a continuing engine keeps its state when the run is at most a window long ...
    assert plan_window_feed(3, window=3, last_due=None, continues=True) == [True] * 3
    # ... and restarts over the gap when that is cheaper
    assert plan_window_feed(8, window=3, last_due=7, continues=True) == [False] * 5 + [True] * 3


def test_the_three_engine_handles_implement_the_protocol():
    """EngineWorker, SupervisedWorker and RemoteEngineClient are what the Pipeline may hold."""
    from realtime.remote import RemoteEngineClient, RemoteEngineOptions
    from realtime.supervisor import SupervisedWorker

    w = EngineWorker(MeanEngine(), "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    client = RemoteEngineClient(RemoteEngineOptions(endpoints=("tcp://127.0.0.1:5570",)),
                                "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    for handle in (w, SupervisedWorker(w), client):
        assert isinstance(handle, EngineHandle), type(handle).__name__
        assert handle.report() is None and handle.failure() is None  # not started
    assert client.window is None, "no window guessed before the engines report theirs"


def test_the_report_is_the_engines_window_not_the_request(frame_pusher, start_worker):
    w, _ = start_worker(MeanEngine(window=3))
    assert w.report() == EngineReport("mean", 3, False)
