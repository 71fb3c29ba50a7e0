"""What a user hits in the first hour (issue 15, items 7, 9, 10): every run command in a real
`livesr` process, every failure one clear line and the right exit code, no false "written".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

REPO = Path(__file__).resolve().parents[1]
FAST = ["--worker", "thread", "--threads", "1"]


def livesr(*argv: str, env: dict | None = None, timeout: float = 180, cwd: Path | None = None
           ) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "realtime.cli", *argv], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(run: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in run.stderr, run.stderr


def run_main(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`livesr ARGV` in this process (torch is loaded once for the whole suite)."""
    from realtime.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, cap.out, cap.err)


# ---------------------------------------------------------------- item 7: SIGHUP


def test_sighup_finishes_the_recording_and_writes_the_json(tmp_path):
    """`kill -HUP` (closed terminal, dropped ssh) reaches the whole process group."""
    rec, js = tmp_path / "h.ome.tif", tmp_path / "h.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "realtime.cli", "demo", "--headless", "--seconds", "60", "--size",
         "32", "--record", str(rec), "--json", str(js)],  # engine in its own process (default)
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not rec.exists() or rec.stat().st_size < 200_000):
            time.sleep(0.2)  # acquiring and recording
        assert rec.exists(), "the run did not start"
        os.killpg(proc.pid, signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "SIGHUP received" in err
    d = json.loads(js.read_text())
    assert d["frames_recorded"] == d["frames_acquired"] > 0 and d["errors"] == []
    with tifffile.TiffFile(rec) as tf:
        assert tf.is_ome and "<OME" in tf.ome_metadata
        assert len(tf.pages) == d["frames_recorded"]
    assert f"recording written to {rec} ({d['frames_recorded']} frames)" in out


# ---------------------------------------------------------------- item 10: GUI fallback


def test_stale_display_falls_back_to_headless_instead_of_aborting(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    run = subprocess.run([sys.executable, "-m", "realtime.cli", "demo", "--seconds", "1", "--size",
                          "16", "--json", str(tmp_path / "m.json"), *FAST], cwd=REPO,
                         env={**base, "DISPLAY": ":93"}, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "GUI unavailable: Qt cannot open :93" in run.stderr and "running headless" in run.stderr
    assert json.loads((tmp_path / "m.json").read_text())["frames_acquired"] > 0


# ---------------------------------------------------------------- item 9: refused up front


@pytest.mark.parametrize("argv, words", [
    (["--window", "100000", "--size", "256"], "need about 52"),
    (["--size", "100000"], "GB of memory"),
    (["--size", "20000", "--record", "{tmp}/x.ome.tif"], "GB of memory"),
    (["--json", "{tmp}/afile/m.json"], "is not a folder"),
    (["--json", "{tmp}"], "is a folder"),
    (["--backend", "nonsense"], "choose one of eager, channels_last, jit, compile"),
    (["--device", "gpu"], "use cpu, cuda, cuda:N or auto"),
    (["--engine-at", "tcp://127.0.0.1:5999", "--engine", "convlstm"], "--engine cannot be sent"),
])
def test_impossible_runs_are_refused_with_one_line(tmp_path, capsys, argv, words):
    (tmp_path / "afile").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = run_main(capsys, "demo", "--headless", "--seconds", "1", *argv)
    assert run.returncode == 2, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and words in errors[0], run.stderr
    assert "written" not in run.stdout and not (tmp_path / "x.ome.tif").exists()
    no_traceback(run)


def test_unwritable_json_at_the_end_is_an_error_not_written(tmp_path):
    """The file cannot be written when the run ends: say so, exit 1, never 'written'."""
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline

    from conftest import MeanEngine

    js = tmp_path / "m.json"
    pipe = Pipeline(PipelineConfig(size=16, seconds=None, json=js, worker_mode="thread",
                                   addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")),
                    engine=MeanEngine())
    pipe.start()
    assert pipe.wait_started(30)
    js.mkdir()  # something took the name meanwhile
    m = pipe.stop(wait=True)
    assert pipe.json_written is None
    assert any(e.startswith(f"metrics NOT written: cannot write {js}") for e in m.errors), m.errors


@pytest.mark.parametrize("movie", ["five", "image"])
def test_movie_shorter_than_the_window_warns_and_fails(tmp_path, capsys, movie):
    rng = np.random.default_rng(0)
    data = rng.poisson(100, (5, 32, 32) if movie == "five" else (32, 32)).astype(np.uint16)
    path = tmp_path / f"{movie}.tif"
    tifffile.imwrite(path, data)
    run = run_main(capsys, "replay", str(path), "--headless", *FAST)
    n = 5 if movie == "five" else 1
    assert run.returncode == 1, run.stderr
    assert f"the movie has {n} frame(s) but the engine needs 20 per output" in run.stderr
    assert f"no output: the engine needs 20 consecutive frames per output and received {n}" in run.stderr
    no_traceback(run)


def test_camera_far_slower_than_requested_is_warned_in_the_summary(tmp_path, capsys):
    js = tmp_path / "m.json"
    run = run_main(capsys, "demo", "--headless", "--seconds", "2.5", "--size", "64", "--fps",
                   "20000", "--json", str(js), *FAST)
    assert run.returncode == 0, run.stderr
    warn = [w for w in json.loads(js.read_text())["warnings"] if "requested" in w]  # (not SOFI's)
    assert len(warn) == 1 and "of the 20000 requested" in warn[0]
    assert f"warning           {warn[0]}" in run.stdout and "livesr: warning:" in run.stderr


# ---------------------------------------------------------------- item 10: one line each


@pytest.mark.parametrize("argv, words", [
    (["--engine", "nonsense"], "unknown engine 'nonsense'"),
    pytest.param(["--engine", "convlstm", "--weights", "{tmp}/junk.pt"], "is corrupt or truncated",
                 marks=pytest.mark.slow),
])
def test_an_engine_that_cannot_load_is_reported_once(tmp_path, argv, words):
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = livesr("demo", "--headless", "--seconds", "1", "--size", "16", *argv)  # process worker
    assert run.returncode == 1
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], run.stderr
    assert run.stdout == ""  # no summary of a run that never started
    no_traceback(run)


@pytest.mark.slow
def test_cuda_on_a_cpu_machine_is_reported_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = livesr("demo", "--headless", "--seconds", "1", "--size", "16", "--engine", "convlstm",
                 "--device", "cuda")
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 1 and len(lines) == 1 and "CUDA is unavailable" in lines[0], run.stderr


def test_a_taken_port_is_one_line_without_traceback():
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PULL)
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    try:
        run = livesr("demo", "--headless", "--seconds", "1", "--size", "16",
                     "--frames-addr", f"tcp://127.0.0.1:{port}", *FAST)
    finally:
        squatter.close(0)
        ctx.term()
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert "Address already in use" in lines[0] and "free port" in lines[0]
    no_traceback(run)


def test_bad_micromanager_config_advice_names_real_commands(tmp_path, capsys):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("Device,Camera,NoSuchAdapter,NoSuchCamera\n")
    run = run_main(capsys, "live", "--config", str(cfg), "--headless", "--seconds", "1")
    assert run.returncode == 1
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--source" not in lines[0], run.stderr
    assert "livesr demo" in lines[0] or "cannot load Micro-Manager config" in lines[0]
    no_traceback(run)
