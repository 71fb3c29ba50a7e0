"""Live SR on pymmcore-plus MDA runs: per-stream windows (worker), the listener with
`mda_listeners_connected(..., asynchronous=True)`, and `livesr mda` on the simulated camera.
The real DemoCamera runs are in test_democamera.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import useq
import zarr

from conftest import MeanEngine, ResultCollector
from realtime.mda import LiveSR, load_sequence, stream_key
from realtime.protocol import EndOfStream, FrameHeader, encode_eos, encode_frame
from realtime.worker import EngineWorker

REPO = Path(__file__).resolve().parents[1]
FREE = ["--frames-addr", "tcp://127.0.0.1:0", "--results-addr", "tcp://127.0.0.1:0"]


def test_stream_key_names_position_channel_z_not_time():
    assert stream_key({"t": 4, "c": 1, "p": 0, "z": 2}) == "p0/c1/z2"
    assert stream_key({"t": 3}) == "" and stream_key({"g": 1, "p": 2}) == "p2/g1"


def test_a_bad_sequence_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such MDA sequence file"):
        load_sequence(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("time_plan: {interval: 0, loops: -3}\n")
    with pytest.raises(ValueError, match="cannot read the MDA sequence"):
        load_sequence(bad)


def _frame(stream: int, t: int) -> np.ndarray:
    """Pixel values that say which stream and time point a frame is."""
    return np.full((6, 6), 1000 * stream + t, np.uint16)


def test_the_worker_never_mixes_frames_of_different_streams(make_tcp_addr):
    """Four streams interleaved frame by frame (as an MDA with 2 positions x 2 channels
    delivers them): every output is the mean of one stream's own last `window` frames."""
    import zmq

    frames_addr, results_addr = make_tcp_addr(), make_tcp_addr()
    worker = EngineWorker(MeanEngine(window=3), frames_addr, results_addr)
    worker.run_in_thread()
    results = ResultCollector(results_addr)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(frames_addr)
    keys = ["p0/c0", "p0/c1", "p1/c0", "p1/c1"]
    try:
        results.wait_ready()
        for t in range(8):
            for k, key in enumerate(keys):
                img = _frame(k, t)
                h = FrameHeader(seq=t, t_acq_ns=time.time_ns(), shape=img.shape, stream=key)
                push.send_multipart(encode_frame(h, img))
            time.sleep(0.01)
        push.send_multipart(encode_eos(EndOfStream(frames_sent=32)))
        results.wait_final()
    finally:
        push.close(linger=1000)
        ctx.term()
        results.close()
        worker.join(5)
    assert results.results
    got: dict[str, list[int]] = {}
    for h, img in results.results:
        k = keys.index(h.stream)
        assert h.seq_last - h.seq_first + 1 == 3
        expected = np.mean([1000 * k + t for t in range(h.seq_first, h.seq_last + 1)])
        np.testing.assert_allclose(img, expected)  # one stream's frames, nothing else
        got.setdefault(h.stream, []).append(h.seq_last)
    assert sorted(got) == keys
    # a window mixing streams would have given outputs from the 3rd interleaved frame on
    assert all(min(v) >= 2 for v in got.values())


def _sim_core(size: int = 32):
    from acquisition.cameras import make_core

    return make_core("sim", size=size, fps=200.0)


def test_plain_pymmcore_plus_mda_with_the_listener_asynchronous(tmp_path):
    """The README pattern on the simulated camera: LiveSR + mda_listeners_connected."""
    from pymmcore_plus.mda import mda_listeners_connected

    core = _sim_core()
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 40})
    results = []
    with LiveSR(core, engine=MeanEngine(window=5), record=tmp_path / "run.ome.zarr",
                worker_mode="thread") as sr:
        sr.resultReady.connect(lambda h, img: results.append((h, np.array(img))))
        with mda_listeners_connected(sr, mda_events=core.mda.events, asynchronous=True):
            core.mda.run(seq)
    m = sr.metrics()
    assert m.frames_acquired == m.frames_recorded == 40 and m.errors == []
    assert m.outputs == len(results) and 0 < len(results) <= 36
    data = zarr.open_group(str(tmp_path / "run.ome.zarr"), mode="r")["0"][:]
    assert data.shape == (40, 32, 32)
    for h, img in results:  # every result is the mean of the recorded frames it names
        stack = data[h.seq_first : h.seq_last + 1].astype(np.float32)
        np.testing.assert_allclose(img, np.kron(stack.mean(0), np.ones((2, 2))), rtol=1e-5)


def test_a_slow_engine_never_stalls_the_mda():
    """An engine 20x slower than the camera: the MDA runs at camera speed, every frame is
    acquired, and the engine computes what it can (the newest windows)."""
    from pymmcore_plus.mda import mda_listeners_connected

    core = _sim_core(16)
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 60})
    with LiveSR(core, engine=MeanEngine(window=4, delay_s=0.1), worker_mode="thread") as sr:
        t = time.perf_counter()
        with mda_listeners_connected(sr, mda_events=core.mda.events, asynchronous=True):
            core.mda.run(seq)
            mda_s = time.perf_counter() - t
    m = sr.metrics()
    print(f"slow engine: MDA of 60 frames took {mda_s:.2f} s, {m.outputs} outputs")
    assert m.frames_acquired == 60 and m.errors == []
    assert mda_s < 3.0  # 60 frames x 0.1 s of engine time would be 6 s if it stalled
    assert 0 < m.outputs < 57


def test_livesr_mda_cli_on_the_simulated_camera(tmp_path):
    seq = tmp_path / "seq.yaml"
    seq.write_text("time_plan: {interval: 0, loops: 30}\nchannels: [DAPI, FITC]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "mda", str(seq), "--headless", "--size", "16",
         "--window", "4", "--record", str(tmp_path / "s.ome.zarr"), "--json",
         str(tmp_path / "m.json"), "--worker", "thread", *FREE],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    # the simulated camera has no "Channel" group: the run fails, says why in one line, rc 1
    assert proc.returncode == 1
    assert proc.stderr.count("livesr: the MDA run failed: ValueError: Configuration group "
                             '"Channel" or its preset "DAPI" does not exist') == 1
    seq.write_text("time_plan: {interval: 0, loops: 30}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "mda", str(seq), "--headless", "--size", "16",
         "--window", "4", "--record", str(tmp_path / "t.ome.tif"), "--save-sr",
         str(tmp_path / "sr.ome.zarr"), "--json", str(tmp_path / "m.json"), "--worker", "thread", *FREE],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["frames_acquired"] == m["frames_recorded"] == 30
    assert 0 < m["outputs"] == m["sr_images_recorded"] <= 27
    import tifffile

    assert tifffile.imread(tmp_path / "t.ome.tif").shape == (30, 16, 16)
    sr = zarr.open_group(str(tmp_path / "sr.ome.zarr"), mode="r")
    assert sr["0"].shape == (m["outputs"], 32, 32)
    scale = sr.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[1:] == pytest.approx([0.05, 0.05])  # half the simulator's 0.1 um
    first = sr.attrs["ome_writers"]["frame_metadata"][0]
    assert first["source_seq_last"] - first["source_seq_first"] == 3
    assert f"recording written to {tmp_path / 't.ome.tif'} (30 frames)" in proc.stdout


def test_a_stopped_mda_records_what_was_acquired_not_what_was_planned(tmp_path):
    """5000 planned time points, stopped after ~1.5 s: the OME-Zarr holds the frames that
    were acquired (not 5000 with zeros after them), and an `interval: 0` sequence gets the
    measured frame interval as its time scale instead of 0 s."""
    seq = tmp_path / "long.yaml"
    seq.write_text("time_plan: {interval: 0, loops: 5000}\n")
    rec = tmp_path / "stopped.ome.zarr"
    proc = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "mda", str(seq), "--headless", "--size", "16",
         "--seconds", "1.5", "--worker", "thread", "--record", str(rec),
         "--json", str(tmp_path / "m.json"), *FREE],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    group = zarr.open_group(str(rec), mode="r")
    assert 20 < m["frames_recorded"] < 5000
    assert group["0"].shape == (m["frames_recorded"], 16, 16)
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"][0] == pytest.approx(0.01, rel=0.3)  # the simulator runs at 100 fps
