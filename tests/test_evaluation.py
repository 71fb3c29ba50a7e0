"""`livesr evaluate` on a tiny held-out set with the real SOFI engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import engines
from engines.evaluation import (
    EVAL_SEED_BASE,
    EngineRun,
    EngineSpec,
    EvaluationConfig,
    _run_engine,
    evaluate,
    main,
    parse_engine_spec,
)
from engines.sofi import SofiEngine

torch.set_num_threads(1)


def test_engine_specs():
    assert parse_engine_spec("sofi100") == EngineSpec("sofi100", "sofi", 100, False)
    assert parse_engine_spec("convgru") == EngineSpec("convgru", "convgru", None, False)
    assert parse_engine_spec("ConvLSTM").streaming
    with pytest.raises(ValueError, match="bad engine"):
        parse_engine_spec("sofi-20")


def test_held_out_seeds_are_disjoint_from_training():
    cfg = EvaluationConfig(n=5, seed=0)
    seeds = [cfg.scene_seed(i) for i in range(cfg.n)]
    assert min(seeds) >= EVAL_SEED_BASE > 10**6
    assert len(set(seeds)) == cfg.n
    assert EvaluationConfig(seed=1).scene_seed(0) != cfg.scene_seed(0)


def test_scenes_without_structure_in_view_are_skipped():
    picky = EvaluationConfig(size=32, n=3, min_structure=0.05)
    got = list(picky.scenes())
    assert len(got) == 3 and [k for k, _ in got] == sorted(k for k, _ in got)
    for _, scene in got:
        assert np.mean(scene.ground_truth()[3:-3, 3:-3] > 0.1) >= 0.05
    assert [k for k, _ in EvaluationConfig(size=32, n=3, min_structure=0.0).scenes()] == [0, 1, 2]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n must"):
        EvaluationConfig(n=0)
    with pytest.raises(ValueError, match="structure"):
        EvaluationConfig(structure="cells")
    assert main(["--n", "0", "--quiet"]) == 2


def test_streaming_engine_scores_the_last_output():
    rng = np.random.default_rng(0)
    movie = rng.poisson(20, size=(7, 12, 12)).astype(np.uint16)
    run = EngineRun(EngineSpec("s", "sofi", 4, True), engine=SofiEngine(4), n_input=6)
    out, times = _run_engine(run, movie)
    assert len(times) == 3  # pushes 4, 5, 6 give outputs; 1-3 are warm-up
    np.testing.assert_allclose(out, SofiEngine(4).reconstruct(movie[:6]), rtol=1e-5, atol=1e-6)


def test_evaluate_tiny_set_writes_files(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["--size", "32", "--n", "2", "--engines", "sofi20,sofi40,nosuch", "--out", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "sofi40" in table and "unavailable" in table and "110 nm" in table

    res = json.loads((out / "results.json").read_text())
    rows = {r["engine"]: r for r in res["engines"]}
    assert rows["nosuch"]["status"].startswith("unavailable: ")
    assert res["reference"]["half_diffraction_limit_nm"] == pytest.approx(110.0)
    for name, frames in (("sofi20", 20), ("sofi40", 40)):
        row = rows[name]
        assert row["status"] == "ok" and row["n"] == 2 and row["frames"] == frames
        assert 0.2 < row["pearson"]["mean"] <= 1.0
        assert 50.0 < row["resolution_nm"]["mean"] < 400.0
        assert 0.0 <= row["tpr"]["mean"] <= 1.0 and 0.0 <= row["tnr"]["mean"] <= 1.0
        assert row["time_ms_median"] > 0
        assert len(row["samples"]) == 2
    # more frames, better SOFI: the cumulant estimate converges
    assert rows["sofi40"]["pearson"]["mean"] > rows["sofi20"]["pearson"]["mean"]

    with (out / "results.csv").open() as fh:
        table_rows = list(csv.DictReader(fh))
    assert [r["engine"] for r in table_rows] == ["widefield", "sofi20", "sofi40", "nosuch"]
    png = (out / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


class _CrashingEngine:
    name = "crash"
    window = 3
    upsample = 2

    def reconstruct(self, stack):
        raise RuntimeError("boom")

    def push(self, frame):
        raise RuntimeError("boom")

    def reset(self):
        pass


class _WrongShapeEngine(_CrashingEngine):
    def reconstruct(self, stack):
        return np.ones(stack.shape[1:], dtype=np.float32)  # 1x instead of 2x


def test_crashing_or_wrong_engine_is_reported_and_others_continue(monkeypatch, tmp_path):
    real = engines.load_engine
    fakes = {"crash": _CrashingEngine, "wrongshape": _WrongShapeEngine}

    def fake_load(name, **kw):
        return fakes[name]() if name in fakes else real(name, **kw)

    monkeypatch.setattr(engines, "load_engine", fake_load)
    cfg = EvaluationConfig(size=24, n=2, engines=("crash", "wrongshape", "sofi20"), out=tmp_path,
                           figure=False, progress=False)
    res = evaluate(cfg)
    rows = {r["engine"]: r for r in res["engines"]}
    assert rows["crash"]["status"] == "error: RuntimeError: boom"
    assert rows["wrongshape"]["status"].startswith("error: ValueError: output shape (24, 24)")
    assert rows["sofi20"]["status"] == "ok" and rows["sofi20"]["n"] == 2
