"""`livesr evaluate --real`: the real-data suite end to end on small movies written here, and on
the shared real donut (skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from engines import evaluation
from engines.real_evaluation import RealEvaluationConfig, evaluate_real, main, parse_row


def _movie(path, frames: int, size: int = 24, seed: int = 5):
    from acquisition.simulation import BlinkingScene, SimulationConfig

    stack = BlinkingScene(SimulationConfig(size=size, seed=seed)).frames(frames)
    tifffile.imwrite(path, stack.astype(np.uint16))
    return path


def test_suite_scores_a_static_blinking_movie_and_writes_table_csv_json_and_figure(tmp_path, capsys):
    movie = _movie(tmp_path / "static.tif", 60)
    out = tmp_path / "out"
    rc = main([str(movie), "--no-data", "--engines", "mean20,sofi20,sofi100", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "static.tif (60 x 24 x 24" in text and "n/a: a 100-frame window" in text
    assert "wrote" in text and str(out / "real_data.json") in text
    d = json.loads((out / "real_data.json").read_text())
    (m,) = d["movies"]
    rows = {r["engine"]: r for r in m["rows"]}
    assert rows["sofi100"]["status"].startswith("n/a")  # 100 frames > the movie: it would be the reference
    for name in ("mean20", "sofi20"):
        r = rows[name]
        assert r["status"] == "ok" and r["n_windows"] == 3 and len(r["windows"]) == 3
        assert -1 <= r["agreement"] <= 1 and 0 <= r["invented"] <= 1 and 0 <= r["invented_filaments"] <= 1
    # a static sample: any two windows show the same structure (up to their noise)
    assert rows["mean20"]["consistency"] > 0.5 and rows["sofi20"]["consistency"] > 0.3
    assert m["reference"]["lag"] in (0, 1) and m["blinking_check"]["ok"] is True
    csv_lines = (out / "real_data.csv").read_text().splitlines()
    assert csv_lines[0].startswith("movie,sample,frames,engine") and len(csv_lines) == 1 + 3
    png = out / "real_static.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_short_movies_are_skipped_and_nothing_scored_is_exit_1(tmp_path, capsys):
    short = _movie(tmp_path / "short.tif", 12)
    rc = main([str(short), "--no-data", "--engines", "mean20,sofi20", "--out", str(tmp_path), "--quiet",
               "--no-figure"])
    out = capsys.readouterr().out
    assert rc == 1 and "skipped: 12 frames; two disjoint 20-frame windows need 40" in out
    assert json.loads((tmp_path / "real_data.json").read_text())["movies"][0]["status"].startswith("skipped")


@pytest.mark.parametrize("argv, words", [
    (["/no/such.tif", "--no-data"], "no such movie"),
    (["--no-data"], "no movies"),
    (["--engines", "mean"], "give the mean's window"),
    (["--weights", "convgru=/no/such.pt"], "no such file"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, words, capsys, tmp_path):
    rc = main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("livesr evaluate --real: error:") and words in err[0]
    assert not (tmp_path / "real_data.json").exists()


def test_livesr_evaluate_real_dispatches_to_the_suite(tmp_path, capsys):
    movie = _movie(tmp_path / "m.tif", 40)
    rc = evaluation.main(["--real", str(movie), "--no-data", "--engines", "mean20", "--out", str(tmp_path),
                          "--quiet", "--no-figure"])
    assert rc == 0 and (tmp_path / "real_data.csv").exists()
    assert parse_row("sofi100").window == 100 and parse_row("convgru").window is None


def test_unavailable_network_is_a_row_that_says_why(tmp_path):
    movie = _movie(tmp_path / "m.tif", 40)
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a weights file")
    cfg = RealEvaluationConfig(movies=(movie,), data_dir=None, engines=("mean20", "convgru"),
                               weights={"convgru": str(bad)}, out=tmp_path, figure=False, progress=False)
    res = evaluate_real(cfg)
    rows = {r["engine"]: r for r in res["movies"][0]["rows"]}
    assert rows["convgru"]["status"].startswith("unavailable: WeightsError") and rows["mean20"]["status"] == "ok"


def test_real_donut_with_a_network(shared_data, tmp_path):
    donut = shared_data / "real-static-donut-100f.tif"
    if not donut.exists():
        pytest.skip(f"unavailable: {donut} not present")
    cfg = RealEvaluationConfig(movies=(donut,), data_dir=None, engines=("mean20", "sofi20", "convgru"),
                               out=tmp_path, progress=False)
    res = evaluate_real(cfg)
    (m,) = res["movies"]
    assert m["sample"] == "static" and m["blinking_check"]["ok"] is False
    rows = {r["engine"]: r for r in m["rows"]}
    assert rows["convgru"]["status"] == "ok" and rows["convgru"]["n_windows"] == 5
    assert rows["mean20"]["consistency"] > 0.95  # a static ring: every window's mean shows it
    assert set(m["_images"]) >= {"mean", "sofi", "reference", "convgru"}
