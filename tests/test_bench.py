"""The latency and pipeline benchmarks run in a tiny configuration and write their files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from benchmarks import latency
from benchmarks.latency import BenchConfig, compute_ratios, summarise

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVESR_CACHE", str(tmp_path / "cache"))


def test_thesis_formula_reproduces_reported_rate():
    # thesis: 4.85 SR fps at 128 px, W = 20, N = 100 fps -> T = 1/4.85 - 0.2 s = 6.19 ms
    t_ms = (1 / 4.85 - 20 / 100) * 1e3
    row = summarise([t_ms] * 3, window=20, camera_fps=(100.0, 1000.0), mode="window")
    assert row["R_100fps"] == pytest.approx(4.85, rel=1e-6)
    assert row["R_1000fps"] == pytest.approx(1 / (0.02 + t_ms / 1e3))
    assert row["outputs_per_s"] == pytest.approx(1e3 / t_ms)
    push = summarise([2.0, 4.0, 3.0], window=20, camera_fps=(100.0, 1000.0), mode="push")
    assert push["median_ms"] == 3.0 and push["update_hz_100fps"] == 100.0
    assert push["update_hz_1000fps"] == pytest.approx(1e3 / 3.0)


def test_ratios_from_rows():
    rows = [
        dict(engine="convgru", mode="window", backend="eager", precision="fp32", size=16,
             threads=1, status="ok", median_ms=100.0),
        dict(engine="convgru", mode="window", backend="jit", precision="bf16", size=16,
             threads=1, status="ok", median_ms=40.0),
        dict(engine="convgru", mode="window", backend="onnxruntime", precision="fp32", size=16,
             threads=1, status="MISMATCH vs eager fp32", median_ms=1.0),  # never "best"
        dict(engine="convlstm", mode="push", backend="eager", precision="fp32", size=16,
             threads=1, status="ok", median_ms=5.0),
        dict(engine="sofi", mode="push", backend="eager", precision="fp32", size=16,
             threads=1, status="ok", median_ms=2.0),
    ]
    r = compute_ratios(rows)["16px_t1"]
    assert r["convgru_window_over_convlstm_push"] == 20.0
    assert r["convgru_window_over_sofi_push"] == 50.0
    assert r["eager_fp32_over_best_backend"] == 2.5
    assert r["best_backend"] == "jit bf16 t1"


def test_tiny_benchmark_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "res"
    rc = latency.main(["--engines", "sofi,convgru,convlstm", "--sizes", "16,32", "--reps", "5",
                       "--warmup", "1", "--backends", "eager", "--threads", "1",
                       "--out-dir", str(out), "--stem", "tiny"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "torch " + torch.__version__ in printed
    assert "ratios" in printed
    for ext in ("csv", "json", "png"):
        assert (out / f"tiny.{ext}").stat().st_size > 0
    lines = (out / "tiny.csv").read_text().splitlines()
    assert lines[0].startswith("# machine: ")
    rows = list(csv.DictReader(lines[1:]))
    payload = json.loads((out / "tiny.json").read_text())
    assert payload["machine"]["cores"] and payload["machine"]["torch"] == torch.__version__
    got = {(r["engine"], r["mode"], r["backend"], r["size"]) for r in rows if r["status"] == "ok"}
    for eng in ("sofi", "convgru", "convlstm"):
        for size in ("16", "32"):
            for mode in ("window", "push"):
                assert (eng, mode, "eager", size) in got, (eng, mode, size)
    for r in rows:
        if r["status"] == "ok":
            assert int(r["n"]) == 5
            assert float(r["median_ms"]) > 0
            assert float(r["p90_ms"]) <= float(r["p99_ms"]) + 1e-9
            assert 0 < float(r["R_100fps"]) <= 100 / int(r["window"]) + 1e-9
    assert "16px_t1" in payload["ratios"] and "32px_t1" in payload["ratios"]
    assert payload["ratios"]["32px_t1"]["convgru_window_over_convlstm_push"] > 0


def test_backend_rows_are_checked_against_eager(tmp_path):
    cfg = BenchConfig(engines=("sofi", "convgru"), backends=("eager", "jit"), sizes=(16,),
                      modes=("window",), reps=3, warmup=0, out_dir=tmp_path, plot=False,
                      progress=False, interleave=True)
    rows = latency.run(cfg)["rows"]
    jit = [r for r in rows if r["backend"] == "jit"]
    assert len(jit) == 1 and jit[0]["engine"] == "convgru" and jit[0]["status"] == "ok"
    assert jit[0]["n"] == 3  # interleaved round-robin still times every config fully
    assert jit[0]["check_max_rel"] <= 1e-3 and jit[0]["module_max_rel"] <= 1e-3
    assert json.loads(jit[0]["backend_calls"])["model.fuse_decode"] > 0
    # SOFI has no network: measured once (eager), not once per backend
    assert [r["backend"] for r in rows if r["engine"] == "sofi"] == ["eager"]


def test_unavailable_backend_is_a_row_not_a_crash(tmp_path):
    cfg = BenchConfig(engines=("convgru",), backends=("tensorrt",), sizes=(16,), reps=2,
                      warmup=0, out_dir=tmp_path, plot=False, progress=False)
    res = latency.run(cfg)
    statuses = {r["status"] for r in res["rows"]}
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tensorrt may be available")
    assert statuses and all(s.startswith("unavailable: TensorRT needs") for s in statuses)


def test_list_backends(capsys):
    assert latency.main(["--list-backends"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "unavailable:" in out and " ok" in out


def test_pipeline_mode_end_to_end(tmp_path, capsys):
    rc = latency.main(["--pipeline", "--quick", "--engines", "sofi", "--sizes", "16",
                       "--seconds", "1", "--out-dir", str(tmp_path), "--stem", "pipe"])
    assert rc == 0
    payload = json.loads((tmp_path / "pipe.json").read_text())
    run = payload["runs"][0]
    assert run["frames_acquired"] > 20 and run["frames_received"] == run["frames_acquired"]
    assert run["outputs_received"] > 0
    lat = run["latency_acq_to_received_ms"]
    assert lat["n"] == run["outputs_received"] and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert (tmp_path / "pipe.csv").read_text().startswith("# machine: ")


def _tree_state(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("extra", [[], ["--pipeline", "--quick", "--seconds", "0.5"]])
def test_bench_without_out_dir_writes_into_the_current_folder(tmp_path, extra):
    """Issue 15: `livesr bench` overwrote the repository's benchmarks/results/*."""
    import os
    import subprocess
    import sys

    results = Path(latency.RESULTS_DIR)
    before = _tree_state(results)
    argv = extra or ["--engines", "sofi", "--sizes", "16", "--modes", "push", "--reps", "2",
                     "--warmup", "0", "--threads", "1", "--no-plot"]
    run = subprocess.run([sys.executable, "-m", "realtime.cli", "bench", *argv], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    stem = "pipeline_cpu" if extra else "latency_cpu"
    assert written == [f"{stem}.csv", f"{stem}.json"], written
    assert _tree_state(results) == before
