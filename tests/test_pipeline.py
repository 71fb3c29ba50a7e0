"""Headless end-to-end runs of the Pipeline: real UniMMCore cameras, real sockets, a real
recording read back from disk. Small images and short runs; the SOFI-in-a-process run on the
real movie is marked slow (it imports torch in a fresh process)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import tifffile

from conftest import MeanEngine
from realtime.config import Addresses, PipelineConfig
from realtime.pipeline import Pipeline, PipelineError

MOVIE = "real-emccd-nucleus-100f.tif"


def _cfg(**kw) -> PipelineConfig:
    base = dict(
        size=32, fps=100.0, worker_mode="thread", threads=1,
        addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
    )
    base.update(kw)
    return PipelineConfig(**base)


class Recorder:
    """Collects every pipeline signal (from whichever thread emits it)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.lock = threading.Lock()
        self.frames: dict[int, np.ndarray] = {}
        self.results: list = []
        self.metrics: list = []
        self.errors: list[str] = []
        self.started = 0
        self.finished: list = []
        pipe.frameReady.connect(self.on_frame)
        pipe.resultReady.connect(lambda h, img: self.results.append((h, np.array(img))))
        pipe.metricsUpdated.connect(self.metrics.append)
        pipe.error.connect(self.errors.append)
        pipe.started.connect(self.on_started)
        pipe.finished.connect(self.finished.append)

    def on_frame(self, seq, img):
        self.frames[seq] = np.array(img)

    def on_started(self):
        self.started += 1


def _check_results_match_frames(rec: Recorder, window: int) -> None:
    assert rec.results
    for h, img in rec.results:
        assert h.seq_last - h.seq_first + 1 == window
        stack = np.stack([rec.frames[s].astype(np.float32) for s in range(h.seq_first, h.seq_last + 1)])
        expected = np.kron(stack.mean(axis=0), np.ones((2, 2), np.float32))
        np.testing.assert_allclose(img, expected, rtol=1e-5)


def test_simulated_camera_end_to_end_with_recording(tmp_path):
    W = 5
    cfg = _cfg(record=tmp_path / "run.ome.tif", json=tmp_path / "m.json")
    pipe = Pipeline(cfg, engine=MeanEngine(window=W))
    rec = Recorder(pipe)
    m = pipe.run_for(1.5)

    assert rec.errors == [] and m.errors == []
    assert rec.started == 1 and len(rec.finished) == 1 and rec.metrics
    n = m.frames_acquired
    assert n >= 50, f"only {n} frames in 1.5 s at 100 fps"
    assert m.frames_published == m.frames_received == n == len(rec.frames)
    assert sorted(rec.frames) == list(range(n))
    assert m.outputs + m.outputs_skipped == n - W + 1
    assert m.outputs_received == m.outputs == len(rec.results)
    assert m.malformed_messages == {} and m.engine_errors == 0
    assert m.fps_acquired > 50 and m.fps_output > 0
    assert 0 < m.latency_ms["p50"] <= m.latency_ms["p99"] <= m.latency_ms["max"] < 5000
    _check_results_match_frames(rec, W)

    # the recording holds every acquired frame, bit for bit
    assert m.frames_recorded == n
    data = tifffile.imread(cfg.record)
    assert data.shape == (n, 32, 32)
    assert all(np.array_equal(data[s], rec.frames[s]) for s in range(n))

    # the JSON summary has the documented fields
    d = json.loads(cfg.json.read_text())
    for key in ("frames_acquired", "frames_published", "outputs", "outputs_skipped", "fps_acquired",
                "fps_output", "latency_ms", "frames_recorded", "malformed_messages"):
        assert key in d
    assert d["frames_acquired"] == n and set(d["latency_ms"]) == {"p50", "p90", "p99", "max"}


def test_replay_once_ends_by_itself(shared_data):
    W = 4
    pipe = Pipeline(_cfg(source=str(shared_data / MOVIE), fps=400.0, loop=False), engine=MeanEngine(window=W))
    rec = Recorder(pipe)
    pipe.start()
    assert pipe.wait(60), "a replay played once must end the run by itself"
    m = pipe.metrics()
    assert rec.finished and m.errors == []
    assert m.frames_acquired == m.frames_received == 100
    assert m.outputs + m.outputs_skipped == 100 - W + 1
    assert rec.results[-1][0].seq_last == 99
    _check_results_match_frames(rec, W)
    movie = tifffile.imread(shared_data / MOVIE)
    assert all(np.array_equal(rec.frames[s], movie[s]) for s in range(100))


def test_stop_without_waiting_returns_at_once():
    pipe = Pipeline(_cfg(), engine=MeanEngine(window=3))
    rec = Recorder(pipe)
    pipe.start()
    assert pipe.wait_started(30)
    pipe.stop(wait=False)
    assert pipe.wait(30) and len(rec.finished) == 1
    assert pipe.metrics().frames_acquired == pipe.metrics().frames_received


def test_stop_before_engine_ready(tmp_path):
    import time

    def slow_factory():
        time.sleep(1.0)
        return MeanEngine(window=3)

    pipe = Pipeline(_cfg(record=tmp_path / "x.ome.tif"), engine=slow_factory)
    rec = Recorder(pipe)
    pipe.start()
    m = pipe.stop(wait=True, timeout=30)
    assert len(rec.finished) == 1 and rec.started == 0
    assert m.frames_acquired == 0 and m.frames_recorded == 0


def test_bad_source_is_a_clear_error(tmp_path):
    pipe = Pipeline(_cfg(source=str(tmp_path / "missing.tif")), engine=MeanEngine())
    with pytest.raises(PipelineError, match="missing.tif"):
        pipe.start()
    assert pipe.is_finished and not pipe.is_running


def test_existing_recording_is_not_overwritten(tmp_path):
    target = tmp_path / "keep.ome.tif"
    target.write_bytes(b"precious")
    with pytest.raises(PipelineError, match="exists"):
        Pipeline(_cfg(record=target), engine=MeanEngine()).start()
    assert target.read_bytes() == b"precious"


def test_invalid_config_is_rejected():
    with pytest.raises(PipelineError, match="fps"):
        Pipeline(_cfg(fps=-5.0), engine=MeanEngine()).start()


def test_engine_load_failure_ends_run_with_error():
    def broken():
        raise RuntimeError("weights file is corrupt")

    pipe = Pipeline(_cfg(), engine=broken)
    rec = Recorder(pipe)
    pipe.start()
    assert pipe.wait(30)
    m = pipe.metrics()
    assert any("weights file is corrupt" in e for e in rec.errors)
    assert m.errors and m.frames_acquired == 0 and rec.started == 0 and len(rec.finished) == 1


def test_crop_and_exposure_reach_the_camera():
    pipe = Pipeline(_cfg(size=48, crop=16, exposure_ms=5.0), engine=MeanEngine(window=3))
    rec = Recorder(pipe)
    pipe.run_for(0.5)
    assert rec.frames and all(f.shape == (16, 16) for f in rec.frames.values())
    assert rec.results[-1][1].shape == (32, 32)
    assert pipe.core.getExposure() == pytest.approx(5.0)


@pytest.mark.slow
def test_replay_real_movie_through_sofi_in_a_process(shared_data, tmp_path):
    """The done-when check: all 100 frames of the real movie stream through SOFI."""
    cfg = _cfg(source=str(shared_data / MOVIE), fps=None, worker_mode="process", engine="sofi",
               json=tmp_path / "m.json")
    pipe = Pipeline(cfg)
    rec = Recorder(pipe)
    m = pipe.run_for(None)
    assert m.errors == [] and m.engine_errors == 0
    assert m.frames_acquired == m.frames_received == 100
    assert m.outputs + m.outputs_skipped == 100 - 20 + 1
    h, img = rec.results[-1]
    assert h.seq_last == 99 and h.engine == "sofi" and img.shape == (204, 216)
    assert np.isfinite(img).all() and img.max() > 0


@pytest.mark.parametrize("which", ["frames", "results"])
def test_busy_port_is_one_clear_error_at_start(make_tcp_addr, which):
    """A fixed port held by someone else: start() refuses at once, nothing left running."""
    import zmq

    addr = make_tcp_addr()
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    squatter.bind(addr)
    try:
        addrs = {"frames": "tcp://127.0.0.1:0", "results": "tcp://127.0.0.1:0", which: addr}
        pipe = Pipeline(_cfg(addresses=Addresses(**addrs)), engine=MeanEngine())
        with pytest.raises(PipelineError) as exc:
            pipe.start()
        msg = str(exc.value)
        assert "Address already in use" in msg and addr in msg and "free port" in msg
        assert "\n" not in msg and pipe.is_finished
    finally:
        squatter.close(linger=0)
        ctx.term()


def test_compiled_backend_is_built_before_the_camera_starts():
    """Issue 15: --backend compile/auto compiled after acquisition started (first output after
    16-24 s, a 10 s run lasting 30 s). Now: "compiling ..." during start-up, nothing built live."""
    from engines import convlstm
    from engines.backends import apply_backend

    model, norm = convlstm.build_model({"arch": {"hidden": 4}})
    eng = apply_backend(convlstm.ConvLSTMEngine(model=model, norm=norm, warmup=3), "jit", "fp32")
    pipe = Pipeline(_cfg(size=16, seconds=1.0, backend="jit"), engine=eng)
    events: list[str] = []
    built_at_start: dict = {}
    pipe.status.connect(lambda msg: events.append("status: " + msg))

    def started():
        events.append("started")
        built_at_start.update({k: set(m._paths) for k, m in eng.backend_modules.items()})

    pipe.started.connect(started)
    first_result: list[float] = []
    pipe.resultReady.connect(lambda h, img: first_result or first_result.append(pipe.metrics().duration_s))
    m = pipe.run_for(1.0)
    assert m.errors == [] and m.outputs > 0
    assert events[0].startswith("status: compiling convlstm with backend 'jit'") and "16x16" in events[0]
    assert events.index("started") == 1
    assert all(built_at_start.values())
    assert {k: set(v._paths) for k, v in eng.backend_modules.items()} == built_at_start
    assert m.duration_s < 2.0 and first_result[0] < 0.5  # acquisition time, not compile time


# ----------------------------------------------------------------------------- SOFI info, blinking check
def test_replay_static_donut_reports_failed_blinking_check_and_lag(shared_data, tmp_path):
    """The done-when check in-process: the real donut is flagged (JSON blinking_check.ok false), SOFI
    chose lag 1, and the unknown pixel size is a warning (not an error: the run did what was asked)."""
    donut = shared_data / "real-static-donut-100f.tif"
    if not donut.exists():
        pytest.skip(f"unavailable: {donut} not present")
    cfg = _cfg(source=str(donut), fps=400.0, engine="sofi", json=tmp_path / "m.json")
    pipe = Pipeline(cfg)
    rec = Recorder(pipe)
    checks, warnings = [], []
    pipe.blinkingChecked.connect(checks.append)
    pipe.warning.connect(warnings.append)
    m = pipe.run_for(None)
    assert m.errors == [] and m.frames_acquired == 100
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["blinking_check"]["ok"] is False
    assert d["blinking_check"]["local_correlation"] < 0.1
    assert "static fluorescence" in d["blinking_check"]["message"]
    assert d["engine_info"]["lag"] == 1 and d["engine_info"]["bleach_correction"] == "quadratic"
    assert d["engine_info"]["pixel_size_source"] == "default 0.1 um"
    assert any("pixel size is unknown" in w for w in d["warnings"]) and warnings
    assert checks and checks[0]["ok"] is False  # reported once (it never flipped)
    assert len(checks) == 1
    h, _ = rec.results[-1]
    assert h.info["psf_source"].startswith("default NA 1.4") and h.info["blinking_check.ok"] is False


def test_replay_nucleus_uses_the_files_pixel_size_and_passes_the_check(shared_data, tmp_path):
    cfg = _cfg(source=str(shared_data / MOVIE), fps=400.0, engine="sofi", json=tmp_path / "m.json")
    cfg.sofi.na, cfg.sofi.wavelength_nm = 1.3, 603.0
    pipe = Pipeline(cfg)
    m = pipe.run_for(None)
    # the emitters diffuse, so their correlations are ~2x wider than the optics: the fit is refused once
    assert m.errors == [] and len(m.warnings) == 1 and "PSF fit rejected" in m.warnings[0]
    info = m.engine_info
    assert info["pixel_size_um"] == pytest.approx(0.16) and info["pixel_size_source"].startswith("from file metadata")
    assert info["psf_fwhm_px"] == pytest.approx(0.51 * 603 / 1.3 / 160, rel=1e-3)
    assert info["psf_source"] == "NA 1.3 / 603 nm (0.51 lambda/NA)" and info["lag"] == 0
    assert m.blinking_check is not None and m.blinking_check["ok"] is True
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["blinking_check"]["ok"] is True and d["engine_info"]["psf_fwhm_nm"] == pytest.approx(236.55, abs=0.01)


def test_every_engine_gets_the_blinking_check():
    """A non-SOFI engine (no output_info): the results still carry the check, engine_info stays empty.

    (64 px: at 32 px the default scene (seed 0) has almost no structure in view, and the check
    rightly says shot noise only.)"""
    pipe = Pipeline(_cfg(size=64), engine=MeanEngine(window=4))
    m = pipe.run_for(1.0)
    assert m.errors == [] and m.engine_info == {}
    assert m.blinking_check is not None and m.blinking_check["ok"] is True  # the simulated demo blinks
    assert m.blinking_check["n_frames"] in (20, 24)  # the first check (20 frames), then the newest 24
