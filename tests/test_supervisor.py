"""The engine process is killed mid-stream: recording loses nothing, outputs resume.

Real pieces: the live pipeline with a UniMMCore simulated camera, the acquisition thread,
the OME-TIFF recorder, an engine worker in a spawned process, ZeroMQ on loopback, SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from realtime.config import free_tcp_address
from realtime.protocol import ResultHeader
from realtime.supervisor import EngineSupervisor, SupervisedWorker, describe_exit
from realtime.worker import EngineWorker
from conftest import StackOnlyMeanEngine

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="unavailable: uses SIGKILL")

WINDOW = 4


MeanEngine = StackOnlyMeanEngine  # reconstruct-only, window 4: no torch start-up in spawned engines


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_describe_exit_words():
    assert "SIGKILL" in describe_exit(-9, 12) and "out of memory" in describe_exit(-9)
    assert "exit code 3" in describe_exit(3)
    assert "SIGSEGV" in describe_exit(-11)


def test_supervisor_gives_up_on_a_worker_that_keeps_dying():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    starts = []

    def start():
        p = ctx.Process(target=os._exit, args=(3,), daemon=True)
        p.start()
        starts.append(p)
        return p

    sup = EngineSupervisor(start, max_restarts=2, restart_window_s=30, backoff_s=0.01)
    gave_up: list[str] = []
    died: list[str] = []
    sup.gaveUp.connect(gave_up.append)
    sup.engineDied.connect(died.append)
    sup.start()
    assert sup.wait(30)
    assert len(starts) == 3 and sup.restarts == 2
    assert len(died) == 3 and all("exit code 3" in d for d in died)
    assert gave_up and "not restarting" in gave_up[0]
    sup.stop()


def test_clean_exit_is_not_restarted():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    starts = []

    def start():
        p = ctx.Process(target=os._exit, args=(0,), daemon=True)
        p.start()
        starts.append(p)
        return p

    sup = EngineSupervisor(start, backoff_s=0.01)
    died: list[str] = []
    sup.engineDied.connect(died.append)
    sup.start()
    assert _wait(lambda: not sup.alive and sup._thread is not None and not sup._thread.is_alive(), 20)
    assert len(starts) == 1 and died == []
    sup.stop()


def test_engine_that_fails_to_load_is_not_restarted():
    """A bad engine name fails the same way every time: report it once, do not loop."""
    worker = SupervisedWorker(
        EngineWorker("no-such-engine", free_tcp_address(), free_tcp_address()), backoff_s=0.01
    )
    gave_up: list[str] = []
    worker.gaveUp.connect(gave_up.append)
    worker.start()
    assert not worker.wait_ready(60)
    assert _wait(lambda: bool(gave_up), 10)
    assert "failed to start" in gave_up[0] and worker.restarts == 0
    assert not worker.is_alive() and worker.failure() is not None  # a non-zero exit
    worker.stop()
    assert worker.join(5)


def test_pipeline_survives_its_engine_process_being_killed(tmp_path):
    """The whole live pipeline (camera, recorder, worker process): kill -9 the engine."""
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    cfg = PipelineConfig(
        source="sim",
        size=32,
        fps=100.0,
        seconds=None,
        record=tmp_path / "run.ome.tif",
        worker_mode="process",
        addresses=Addresses(frames="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0"),
    )
    pipe = Pipeline(cfg, engine=MeanEngine())
    results: list[ResultHeader] = []
    died: list[str] = []
    restarted: list[int] = []
    pipe.resultReady.connect(lambda h, img: results.append(h))
    pipe.engineDied.connect(died.append)
    pipe.engineRestarted.connect(restarted.append)
    pipe.start()
    try:
        assert pipe.wait_started(60)
        assert _wait(lambda: len(results) >= 10, 30)
        assert _wait(lambda: pipe.metrics().frames_received >= 30, 30)  # its stats arrived
        reported = pipe.metrics().frames_received
        os.kill(pipe.worker.pid, signal.SIGKILL)
        killed_at = pipe.metrics().frames_acquired
        assert _wait(lambda: restarted == [1], 30), died
        assert _wait(lambda: results[-1].seq_last > killed_at + 2 * WINDOW, 30)
        assert pipe.is_running, "the run must go on after an engine crash"
    finally:
        m = pipe.stop(wait=True, timeout=60)
    assert died and "SIGKILL" in died[0]
    assert m.frames_acquired > killed_at
    assert m.frames_recorded == m.frames_acquired, "the recording lost frames"
    assert any("SIGKILL" in e for e in m.errors), "the crash is reported to the user"
    import tifffile

    with tifffile.TiffFile(cfg.record) as tf:  # the file on disk agrees
        assert len(tf.pages) == m.frames_acquired
    seqs = [h.seq_last for h in results]
    assert seqs == sorted(set(seqs))
    # outputs after the restart come from fresh, complete windows, never across the gap
    after = [h for h in results if h.seq_last > killed_at]
    assert after and all(h.seq_last - h.seq_first + 1 == WINDOW for h in after)
    assert not pipe.worker.is_alive()
    # counters span both engine processes (issue 15: "received by engine 2129" vs 2880 outputs)
    new_worker = pipe._stats.counts.frames_received
    assert m.frames_received >= reported + new_worker, "the first engine's frames were forgotten"
    assert m.outputs_received <= m.outputs <= m.frames_received <= m.frames_acquired
