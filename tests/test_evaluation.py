"""`livesr evaluate` on a tiny held-out set with the real SOFI engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import engines
from acquisition.simulation import BlinkingScene
from engines.evaluation import (
    EVAL_SEED_BASE,
    ZERO_KINDS,
    EngineRun,
    ScoredEngine,
    EvaluationConfig,
    _run_engine,
    evaluate,
    main,
    parse_scored_engine,
    zero_target_config,
)
from engines.nn_common import WEIGHTS_DIR, read_weights
from engines.sofi import SofiEngine

torch.set_num_threads(1)

FULL_RUN_STEPS = 10_000  # the model card's recommended long runs; shorter ones are interim
NOT_YET_REASON = ("the shipped weights are legacy or an interim CPU run (< 10000 steps): the issue-14 "
                  "simulated target is not met yet (MODEL_CARD.md, 'Shipped weights')")


def _shipped_not_fully_trained() -> bool:
    """True while a shipped file predates cumulant outputs or comes from a short run."""
    for m in ("convgru", "convlstm"):
        path = WEIGHTS_DIR / f"{m}.pt"
        if not path.exists():
            continue
        config = read_weights(path, m)[0]
        steps = (config.get("training") or {}).get("final_step") or 0
        if "output" not in config or steps < FULL_RUN_STEPS:
            return True
    return False


def test_engine_specs():
    assert parse_scored_engine("sofi100") == ScoredEngine("sofi100", "sofi", 100, False)
    assert parse_scored_engine("convgru") == ScoredEngine("convgru", "convgru", None, False)
    assert parse_scored_engine("ConvLSTM").streaming
    with pytest.raises(ValueError, match="bad engine"):
        parse_scored_engine("sofi-20")


def test_held_out_seeds_are_disjoint_and_the_thesis_snr_is_used():
    cfg = EvaluationConfig(n=5, seed=0)
    seeds = {cfg.scene_seed(s, g, k) for s in ("thesis", "wide", "zero") for g in range(7)
             for k in range(50)}
    assert min(seeds) >= EVAL_SEED_BASE > 10**6 and len(seeds) == 3 * 7 * 50
    assert EvaluationConfig(seed=1).scene_seed("thesis", 0, 0) != cfg.scene_seed("thesis", 0, 0)
    for k in range(20):
        sim = cfg.thesis_config("mixed", cfg.scene_seed("thesis", 6, k))
        assert 40 <= sim.photons <= 120 and 0.004 <= sim.on_ratio <= 0.02 + 1e-9
        assert 200 <= sim.fwhm_nm <= 260 and sim.pixel_nm == 100 and "+" in sim.structure


def test_scenes_have_structure_in_view_and_zero_kinds_have_zero_targets():
    cfg = EvaluationConfig(size=32, n=2, n_wide=2, n_zero=3, classes=("filaments", "rings"),
                           min_structure=0.02)
    scenes = list(cfg.scenes())
    assert [(s["set"], s["cls"]) for s in scenes] == [
        ("thesis", "filaments"), ("thesis", "filaments"), ("thesis", "rings"), ("thesis", "rings"),
        ("wide", scenes[4]["cls"]), ("wide", scenes[5]["cls"]),
        ("zero", "static"), ("zero", "empty"), ("zero", "flicker")]
    for s in scenes:
        gt = BlinkingScene(s["cfg"]).expected_cumulant()[3:-3, 3:-3]
        if s["set"] == "zero":
            assert not gt.any() and s["twin"] is not None
        else:
            assert np.mean(gt > 0.1 * gt.max()) >= 0.02
    # a static twin has the blinking sample's mean brightness
    twin = scenes[6]["twin"]
    static = zero_target_config(twin, "static")
    a = BlinkingScene(twin).frames(400).astype(float).mean()
    b = BlinkingScene(static).frames(50).astype(float).mean()
    assert b == pytest.approx(a, rel=0.02)
    with pytest.raises(ValueError, match="zero-target kind"):
        zero_target_config(twin, "dark")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n must"):
        EvaluationConfig(n=-1)
    with pytest.raises(ValueError, match="classes"):
        EvaluationConfig(classes=("cells",))
    with pytest.raises(ValueError, match="sets"):
        EvaluationConfig(sets=("real",))
    with pytest.raises(ValueError, match="no scenes"):
        EvaluationConfig(n=0, n_wide=0, n_zero=0)
    assert main(["--n", "-1", "--quiet"]) == 2


def test_streaming_engine_scores_the_last_output():
    rng = np.random.default_rng(0)
    movie = rng.poisson(20, size=(7, 12, 12)).astype(np.uint16)
    run = EngineRun(ScoredEngine("s", "sofi", 4, True), engine=SofiEngine(4), n_input=6)
    out, times = _run_engine(run, movie)
    assert len(times) == 3  # pushes 4, 5, 6 give outputs; 1-3 are warm-up
    np.testing.assert_allclose(out, SofiEngine(4).reconstruct(movie[:6]), rtol=1e-5, atol=1e-6)


def test_evaluate_tiny_sets_writes_files(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["--size", "32", "--n", "1", "--classes", "filaments,rings", "--n-wide", "1",
               "--n-zero", "3", "--engines", "sofi20,sofi100,nosuch", "--out", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "sofi100" in table and "unavailable" in table and "level static" in table

    res = json.loads((out / "results.json").read_text())
    rows = {r["engine"]: r for r in res["engines"]}
    assert rows["nosuch"]["status"].startswith("unavailable: ")
    summary = {(r["set"], r["class"], r["engine"]): r for r in res["summary"]}
    for name in ("sofi20", "sofi100"):
        assert rows[name]["status"] == "ok" and rows[name]["frames"] == int(name[4:])
        th = summary[("thesis", "all", name)]
        assert th["n"] == 2 and 0.0 < th["pearson"]["mean"] <= 1.0
        assert 0.0 <= th["invented"]["mean"] <= 1.0
        assert summary[("wide", "all", name)]["n"] == 1
        for kind in ZERO_KINDS:
            assert summary[("zero", kind, name)]["level"]["n"] == 1
    # more frames, better SOFI: the cumulant estimate converges, and its noise level drops
    assert summary[("thesis", "all", "sofi100")]["pearson"]["mean"] > \
        summary[("thesis", "all", "sofi20")]["pearson"]["mean"]
    assert summary[("zero", "all", "sofi100")]["level"]["mean"] < \
        summary[("zero", "all", "sofi20")]["level"]["mean"]
    assert ("zero", "all", "mean") not in summary  # the mean image has no level to score
    assert len(res["scenes"]) == 2 + 1 + 3

    with (out / "results.csv").open() as fh:
        table_rows = list(csv.DictReader(fh))
    assert {r["engine"] for r in table_rows} == {"mean", "sofi20", "sofi100", "nosuch"}
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

    def fake_load(spec, **kw):  # load_engine(EngineSpec) as the evaluation calls it
        name = getattr(spec, "name", spec)
        return fakes[name]() if name in fakes else real(spec, **kw)

    monkeypatch.setattr(engines, "load_engine", fake_load)
    cfg = EvaluationConfig(size=24, n=1, classes=("puncta", "rings"), sets=("thesis",),
                           engines=("crash", "wrongshape", "sofi20"), out=tmp_path,
                           figure=False, progress=False)
    res = evaluate(cfg)
    rows = {r["engine"]: r for r in res["engines"]}
    assert rows["crash"]["status"] == "error: RuntimeError: boom"
    assert rows["wrongshape"]["status"].startswith("error: ValueError: output shape (24, 24)")
    assert rows["sofi20"]["status"] == "ok" and rows["sofi20"]["n"] == 2


@pytest.mark.slow
@pytest.mark.xfail(_shipped_not_fully_trained(), reason=NOT_YET_REASON, strict=False)
def test_shipped_networks_reach_the_issue_14_targets_at_the_thesis_snr(tmp_path):
    """The model card's claim, reproduced: 64 px, 20 frames, thesis SNR, six classes and their
    mixtures; ConvGRU Pearson >= 0.85 against the expected cumulant, ConvLSTM within 0.03,
    and neither invents more structure than SOFI-20."""
    cfg = EvaluationConfig(sets=("thesis", "zero"), engines=("sofi20", "convgru", "convlstm"),
                           out=tmp_path, figure=False, progress=False)
    rows = {(r["set"], r["class"], r["engine"]): r for r in evaluate(cfg)["summary"]}
    gru = rows[("thesis", "all", "convgru")]["pearson"]["mean"]
    lstm = rows[("thesis", "all", "convlstm")]["pearson"]["mean"]
    assert gru >= 0.85 and lstm >= gru - 0.03, (gru, lstm)
    sofi_inv = rows[("thesis", "all", "sofi20")]["invented"]["mean"]
    for net in ("convgru", "convlstm"):
        assert rows[("thesis", "all", net)]["invented"]["mean"] <= sofi_inv
        assert rows[("zero", "all", net)]["level"]["mean"] < 0.1



def test_information_ceiling_scores_the_evaluation_scenes(tmp_path, capsys):
    """The oracle benchmark runs on evaluate's scenes, writes what it says it wrote, and a bad
    --windows is one error line and exit 2 (no file)."""
    from benchmarks.information_ceiling import main as ceiling_main

    assert ceiling_main(["--n", "1", "--n-wide", "0", "--windows", "20,60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "thesis/all" in out and f"wrote {tmp_path / 'information_ceiling.json'}" in out
    data = json.loads((tmp_path / "information_ceiling.json").read_text())
    rows = data["scenes"]
    assert len(rows) == 7 and {r["set"] for r in rows} == {"thesis"}
    for r in rows:  # more frames carry more: the ceiling rises with the window
        assert 0 < r["ceiling20"] < r["ceiling60"] <= 1
        assert r["detect20"] > 0
    bad = tmp_path / "bad"
    assert ceiling_main(["--windows", "1", "--out", str(bad)]) == 2
    assert "--windows" in capsys.readouterr().err and not bad.exists()
