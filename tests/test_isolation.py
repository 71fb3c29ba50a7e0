"""Two runs on one machine never see each other (issue 15, item 2).

Real processes, real ZeroMQ sockets: local runs bind port 0 and read the endpoint back, and
every frame / result / stats message carries the run's stream id, so a message of another
run is counted ("foreign") and dropped, never shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import MeanEngine, ResultCollector, seq_frame
from realtime.config import Addresses, PipelineConfig
from realtime.pipeline import Pipeline
from realtime.protocol import (
    EndOfStream,
    FrameHeader,
    ResultHeader,
    StatsMessage,
    encode_eos,
    encode_frame,
    encode_result,
    encode_stats,
    new_run_id,
)
from realtime.worker import EngineWorker

REPO = Path(__file__).resolve().parents[1]


def _livesr(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "realtime.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_on_one_machine_with_default_ports_keep_their_own_results(tmp_path):
    """The issue's recipe: a long run, then a short one, both with the default addresses."""
    common = ["--headless", "--size", "32", "--worker", "thread", "--threads", "1"]
    long_js, short_js = tmp_path / "long.json", tmp_path / "short.json"
    long_run = _livesr("demo", *common, "--seconds", "8", "--window", "4", "--json", str(long_js))
    try:
        time.sleep(3.0)  # the first run is acquiring and publishing
        short = _livesr("demo", *common, "--seconds", "1.5", "--window", "6", "--json", str(short_js))
        out, err = short.communicate(timeout=120)
        assert short.returncode == 0, err
    finally:
        out_long, err_long = long_run.communicate(timeout=120)
    assert long_run.returncode == 0, err_long
    s, lg = json.loads(short_js.read_text()), json.loads(long_js.read_text())
    for d in (s, lg):
        assert d["errors"] == [] and d["malformed_messages"] == {}
        assert d["frames_received"] == d["frames_acquired"] > 0
    # each run's outputs come from its own frames (window 6 vs 4): 1 output per due frame
    assert s["outputs"] + s["outputs_skipped"] == s["frames_acquired"] - 6 + 1
    assert s["outputs_received"] <= s["outputs"] and s["duration_s"] < 4.0


def _cfg(**kw) -> PipelineConfig:
    base = dict(size=16, fps=100.0, worker_mode="thread", threads=1,
                addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    base.update(kw)
    return PipelineConfig(**base)


def test_foreign_results_and_stats_are_counted_and_never_shown():
    pipe = Pipeline(_cfg(seconds=None), engine=MeanEngine(window=3))
    shown = []
    pipe.resultReady.connect(lambda h, img: shown.append(h))
    pipe.start()
    assert pipe.wait_started(60)
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.PUB)
    intruder.connect(pipe.endpoints.results)  # the pipeline binds its results SUB
    try:
        other = new_run_id()
        img = np.full((32, 32), 7.0, np.float32)
        bad = ResultHeader(seq_first=0, seq_last=2, t_acq_ns=time.time_ns(), shape=(32, 32),
                           engine="other-run", run_id=other)
        final = StatsMessage(engine="other-run", state="final", final=True, run_id=other)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            intruder.send_multipart(encode_result(bad, img))
            intruder.send_multipart(encode_stats(final))  # would end the run if believed
            time.sleep(0.02)
        assert pipe.is_running, "a foreign 'final' stats message ended the run"
        m = pipe.stop(wait=True)
    finally:
        intruder.close(0)
        ctx.term()
    assert m.malformed_messages.get("results:foreign", 0) > 0
    assert shown and all(h.engine == "mean" and h.run_id == pipe.run_id for h in shown)
    assert m.errors == [] and m.outputs_received == len(shown)


def _frame(seq: int, run_id: str) -> list:
    h = FrameHeader(seq=seq, t_acq_ns=time.time_ns(), shape=(8, 8), run_id=run_id)
    return encode_frame(h, seq_frame(seq))


def test_worker_for_one_run_drops_frames_of_another(frame_pusher, make_tcp_addr):
    mine, other = new_run_id(), new_run_id()
    w = EngineWorker(MeanEngine(window=2), frame_pusher.addr, make_tcp_addr(), run_id=mine,
                     stats_interval_s=0.05)
    w.run_in_thread()
    assert w.wait_ready(20)
    rc = ResultCollector(w.out_addr)
    try:
        assert rc.wait_ready().run_id == mine
        for s in range(5):
            frame_pusher.raw([bytes(p) for p in _frame(s, other)])
        frame_pusher.raw(encode_eos(EndOfStream(frames_sent=5, run_id=other)))  # not ours: ignored
        for s in range(4):
            frame_pusher.raw([bytes(p) for p in _frame(s, mine)])
            time.sleep(0.005)
        frame_pusher.raw(encode_eos(EndOfStream(frames_sent=4, run_id=mine)))
        final = rc.wait_final()
    finally:
        w.stop()
        w.join(5)
        rc.close()
    assert final.counts.malformed == {"foreign": 6} and final.counts.frames_received == 4
    assert final.run_id == mine and final.window == 2
    assert rc.results and all(h.run_id == mine for h, _ in rc.results)


def test_server_worker_adopts_the_next_client_stream_once_the_first_falls_silent(frame_pusher,
                                                                                make_tcp_addr):
    a, b = new_run_id(), new_run_id()
    w = EngineWorker(MeanEngine(window=2), frame_pusher.addr, make_tcp_addr(), exit_on_eos=False,
                     stats_interval_s=0.05, run_idle_s=0.3)
    w.run_in_thread()
    assert w.wait_ready(20)
    rc = ResultCollector(w.out_addr)
    try:
        rc.wait_ready()
        for s in range(3):
            frame_pusher.raw([bytes(p) for p in _frame(s, a)])
            time.sleep(0.005)
        frame_pusher.raw([bytes(p) for p in _frame(0, b)])  # client b while a streams: refused
        time.sleep(0.6)  # a falls silent (crashed client, no EndOfStream)
        for s in range(3):
            frame_pusher.raw([bytes(p) for p in _frame(s, b)])
            time.sleep(0.005)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(h.run_id == b for h, _ in rc.results):
            rc._recv(0.1)
    finally:
        w.stop()
        w.join(5)
        rc.close()
    runs = [h.run_id for h, _ in rc.results]
    assert a in runs and b in runs
    assert w.stats.malformed == {"foreign": 1}
