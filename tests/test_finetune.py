"""Fine-tuning on a recording of a fixed sample (issue 11): pairs, hold-out, guards, provenance.

Real components: movies from the simulator written through the Recorder (OME-TIFF and
OME-Zarr, as a run records them), the real SOFI engine for the targets, real networks (a small
architecture saved as a livesr weights file, so steps take milliseconds), the real CLI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from acquisition.recordings import RecordingError, file_fingerprint, read_recording, write_recording
from acquisition.simulation import BlinkingScene, SimulationConfig
from acquisition.structures import STRUCTURES, VALIDATION_STRUCTURES
from engines.data import DataConfig, random_structure
from engines.finetune import MIN_FRAMES, side_files
from engines.finetune import main as finetune_main
from engines.finetune_data import (
    FieldPairs,
    PairSampler,
    Region,
    build_field,
    cumulant_level,
    drift_px,
    long_sofi,
    split_field,
    static_twin,
)
from engines.nn_common import WEIGHTS_DIR, describe_weights_file, read_weights, save_weights

SOFI = {"lag": 0, "bleach_order": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scene(size: int = 48, **kw) -> BlinkingScene:
    base = dict(size=size, structure="honeycomb", photons=300.0, background=15.0, on_ms=10.0,
                off_ms=600.0, emitters_per_um=40.0, seed=3)
    base.update(kw)
    return BlinkingScene(SimulationConfig(**base))


@pytest.fixture
def recording(fixed_sample_recording) -> Path:
    return fixed_sample_recording


@pytest.fixture
def tiny_weights(tiny_convgru_weights) -> Path:
    return tiny_convgru_weights


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the sample class
def test_the_validation_class_is_never_in_the_training_mix():
    assert set(VALIDATION_STRUCTURES).isdisjoint(STRUCTURES)
    with pytest.raises(ValueError, match="classes must map"):
        DataConfig(classes={"honeycomb": 1.0})
    rng = np.random.default_rng(0)
    drawn = {p for _ in range(500) for p in random_structure(rng, DataConfig().classes).split("+")}
    assert "honeycomb" not in drawn and "filaments" in drawn
    sc = scene(size=32)
    assert sc.n_emitters > 100 and sc.expected_cumulant().max() > 0


# --------------------------------------------------------------------------- recordings
@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_recordings_are_read_back_with_their_metadata_and_fingerprint(tmp_path, suffix):
    frames = np.random.default_rng(0).integers(0, 4000, (6, 12, 10), dtype=np.uint16)
    path = write_recording(tmp_path / f"m{suffix}", frames, pixel_size_um=0.16, fps=50.0)
    rec = read_recording(path)
    np.testing.assert_array_equal(rec.frames, frames)
    assert rec.pixel_size_um == pytest.approx(0.16) and rec.fps == pytest.approx(50.0, rel=1e-3)
    assert (rec.bytes, rec.sha256) == file_fingerprint(path) and rec.bytes > frames.nbytes // 2
    with pytest.raises(RecordingError, match="no such recording"):
        read_recording(tmp_path / "missing.ome.tif")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecordingError, match="not a recording"):
        read_recording(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- pairs
def test_split_leaves_a_gap_and_holds_out_the_far_end_of_the_longer_axis():
    train, held = split_field(128, 128, 0.25)
    assert held == Region(0, 128, 96, 128) and train == Region(0, 128, 0, 92)
    train, held = split_field(100, 40, 0.25)  # tall: the stripe is at the bottom
    assert held.y0 - train.y1 == 4 and held.y1 == 100 and train.shape == (71, 40)
    with pytest.raises(ValueError, match="too small"):
        split_field(16, 16, 0.25)


def coded_field(t: int = 30, h: int = 20, w: int = 24) -> FieldPairs:
    """A field whose every value says where it came from: frame value 10^4 t + 100 y + x,
    target value 1000 y + x on the 2x grid, level 1 + t / 100."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    ty, tx = np.meshgrid(np.arange(2 * h), np.arange(2 * w), indexing="ij")
    return FieldPairs(name="coded", train_region=Region(0, h, 0, w), held_region=Region(0, h, w + 4, w + 12),
                      train_frames=(1e4 * tt + 100 * yy + xx).astype(np.float32),
                      train_target=(1000 * ty + tx).astype(np.float32),
                      train_level=(1 + np.arange(t) / 100).astype(np.float32),
                      held_frames=np.zeros((t, h, 8), np.float32), held_target=np.zeros((2 * h, 16), np.float32),
                      target_info={})


@pytest.mark.parametrize("per_frame", [False, True])
def test_each_window_gets_the_target_of_its_own_patch_at_its_own_frames(per_frame):
    f = coded_field()
    s = PairSampler([f], patch=8, frames=5, per_frame=per_frame, seed=1)
    x, y = s.batch(0, 6)
    assert x.shape == (6, 5, 8, 8) and y.shape == ((6, 5, 16, 16) if per_frame else (6, 16, 16))
    for xi, yi in zip(x, y):
        v = int(xi[0, 0, 0])
        t0, y0, x0 = v // 10_000, (v % 10_000) // 100, v % 100
        np.testing.assert_array_equal(xi, f.train_frames[t0:t0 + 5, y0:y0 + 8, x0:x0 + 8])
        patch = f.train_target[2 * y0:2 * y0 + 16, 2 * x0:2 * x0 + 16]
        if per_frame:
            np.testing.assert_allclose(yi, patch[None] * f.train_level[t0:t0 + 5, None, None])
        else:  # the ConvGRU's output is at its window's last frame
            np.testing.assert_allclose(yi, patch * f.train_level[t0 + 4])
        assert y0 + 8 <= 19 and x0 + 8 <= 23  # never the last row/column (no SOFI pair there)
    # seeded by (seed, batch index): a resumed run sees the same batches
    np.testing.assert_array_equal(s.batch(3, 2)[0], PairSampler([f], patch=8, frames=5,
                                                               per_frame=per_frame, seed=1).batch(3, 2)[0])
    assert not np.array_equal(s.batch(3, 2)[0], s.batch(4, 2)[0])


def test_static_twins_carry_no_cumulant_and_train_towards_zero():
    """A static twin (each pixel's mean + independent noise of its own SD) looks like the
    sample but nothing in it blinks: its SOFI is ~0, and its training target is exactly 0."""
    movie = scene(size=32).frames(300).astype(np.float32)
    twin = static_twin(movie, np.random.default_rng(0))
    sd = movie.std(0)
    assert (np.abs(twin.mean(0) - movie.mean(0)) < 5 * sd / np.sqrt(300)).all()  # same look
    np.testing.assert_allclose(twin.std(0), sd, rtol=0.25)
    real, fake = long_sofi(movie, SOFI)[0], long_sofi(twin, SOFI)[0]
    assert fake[4:-4, 4:-4].mean() < 0.1 * real[4:-4, 4:-4].mean()
    f = coded_field()
    s = PairSampler([f], patch=8, frames=5, per_frame=False, seed=1, static_share=0.5)
    x, y = s.batch(0, 4)
    assert (y[2:] == 0).all() and (y[:2] > 0).all()  # the last half are twins
    # real windows are the coded integers; twins are means plus noise, never a recorded window
    assert (x[:2] == np.round(x[:2])).all() and (x[2:] != np.round(x[2:])).mean() > 0.9


def test_the_held_out_part_never_reaches_a_training_pair():
    """Replace the held-out stripe and the gap by something else entirely: every training pair
    (input and target) stays bit-identical, while the held-out target changes."""
    movie = scene().frames(120).astype(np.float32)
    a = build_field("a", movie, SOFI)
    other = movie.copy()
    other[:, :, a.train_region.x1:] = scene(seed=99).frames(120)[:, :, a.train_region.x1:]
    b = build_field("b", other, SOFI)
    assert a.train_region == b.train_region and a.held_region.x0 - a.train_region.x1 == 4
    sa = PairSampler([a], patch=16, frames=20, per_frame=False, seed=0)
    sb = PairSampler([b], patch=16, frames=20, per_frame=False, seed=0)
    for k in range(5):
        (xa, ya), (xb, yb) = sa.batch(k, 4), sb.batch(k, 4)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(a.train_target, b.train_target)
    assert not np.allclose(a.held_target, b.held_target)


def test_the_long_sofi_target_is_the_expected_cumulant_and_follows_bleaching():
    sc = scene(size=32, seed=5)
    frames = sc.frames(400).astype(np.float32)
    target, info = long_sofi(frames, SOFI)
    gt = sc.expected_cumulant()
    b = 4
    r = np.corrcoef(target[b:-b, b:-b].ravel(), gt[b:-b, b:-b].ravel())[0, 1]
    assert r > 0.8 and info["window"] == 400
    assert 0.7 < target[b:-b, b:-b].sum() / gt[b:-b, b:-b].sum() < 1.3  # same units (ADU^2)
    flat = cumulant_level(frames, target, SOFI)
    assert flat.shape == (400,) and abs(flat.mean() - 1) < 1e-5 and np.ptp(flat) < 0.5
    bleach = scene(size=32, seed=5, bleach_s=0.15).frames(400).astype(np.float32)
    level = cumulant_level(bleach, long_sofi(bleach, SOFI)[0], SOFI)
    assert level[0] > 1.3 * level[-1]  # fewer emitters blink late in the movie


def test_drift_estimate_sees_a_moving_sample_and_not_a_fixed_one():
    assert np.hypot(*drift_px(scene(size=32).frames(400))) < 0.3
    dy, dx = drift_px(scene(size=32, drift_px_per_frame=(0.0, 0.005)).frames(400))
    assert abs(dx - 0.005 * 300) < 0.5 and abs(dy) < 0.3


# --------------------------------------------------------------------------- guards (CLI)
def run_cli(*argv: str) -> int:
    return finetune_main([str(a) for a in argv])


def test_refuses_a_short_recording_in_one_sentence(tmp_path, capsys, tiny_weights):
    short = write_recording(tmp_path / "short.ome.tif", scene(size=32).frames(300), pixel_size_um=0.1)
    out = tmp_path / "ft.pt"
    assert run_cli(short, "--out", out, "--from", tiny_weights) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 300 frames" in err[0] and f"at least {MIN_FRAMES}" in err[0]
    assert not out.exists()


def test_refuses_a_recording_that_does_not_blink(tmp_path, capsys, tiny_weights):
    static = scene(size=32, static_fraction=1.0, static_brightness=0.05).frames(MIN_FRAMES)
    rec = write_recording(tmp_path / "static.ome.zarr", static, pixel_size_um=0.1)
    assert run_cli(rec, "--out", tmp_path / "ft.pt", "--from", tiny_weights) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fails the blinking check" in err[0] and "No independent blinking" in err[0]
    assert not (tmp_path / "ft.pt").exists()


def test_never_writes_into_the_installed_package(recording, capsys):
    before = {p.name: sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    assert run_cli(recording, "--out", WEIGHTS_DIR / "convgru.pt") == 2
    assert "inside the shipped weights" in capsys.readouterr().err
    assert {p.name: sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()} == before


# --------------------------------------------------------------------------- end to end
def test_finetune_writes_provenance_that_the_engine_shows_and_resumes(recording, tiny_weights,
                                                                     tmp_path, capsys):
    shipped = {p.name: sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    out = tmp_path / "adapted.pt"
    common = [recording, "--model", "convgru", "--from", tiny_weights, "--out", out, "--patch", "16",
              "--eval-windows", "2", "--threads", "1"]
    assert run_cli(*common, "--steps", "3", "--no-forgetting-check") == 0
    text = capsys.readouterr().out
    assert "budget:" in text and "s/step" in text and "held-out agreement" in text
    config, _ = read_weights(out, "convgru")
    ft = config["training"]["finetune"]
    rec = read_recording(recording)
    assert ft["recordings"][0]["sha256"] == rec.sha256 and ft["recordings"][0]["bytes"] == rec.bytes
    assert ft["frames"] == MIN_FRAMES and ft["steps"] == 3
    assert ft["base_weights"]["sha256"] == sha(tiny_weights)
    report = json.loads(side_files(out)["json"].read_text())
    assert report["before"] == ft["heldout_agreement"]["before"]["pearson"]
    assert report["after"] == ft["heldout_agreement"]["after"]["pearson"]
    assert side_files(out)["png"].stat().st_size > 10_000

    from engines import load_engine

    eng = load_engine("convgru", weights=out)
    info = eng.output_info()
    assert info["weights"] == "adapted.pt" and "fine-tuned on cell.ome.tif (500 frames, 3 steps)" in info["weights_note"]
    assert "held-out agreement" in describe_weights_file(out)
    assert eng.reconstruct(rec.frames[:20]).shape == (96, 96)

    # resume continues at the checkpoint's step (no recomputed history), with the same seed
    assert run_cli(*common, "--steps", "5", "--resume", "--no-forgetting-check") == 0
    assert "resumed from" in capsys.readouterr().out
    assert read_weights(out, "convgru")[0]["training"]["finetune"]["steps"] == 5
    # a checkpoint of another run is refused
    assert run_cli(*common, "--steps", "6", "--resume", "--seed", "7", "--no-forgetting-check") == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert {p.name: sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()} == shipped


def test_events_mode_prints_json_lines_for_the_gui(recording, tiny_weights, tmp_path, capsys):
    out = tmp_path / "e.pt"
    assert run_cli(recording, "--from", tiny_weights, "--out", out, "--patch", "16", "--steps", "2",
                   "--eval-windows", "1", "--no-forgetting-check", "--events", "--threads", "1") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "budget" in kinds and "step" in kinds
    done = events[-1]
    assert done["weights"] == str(out) and isinstance(done["before"], float) and done["steps"] == 2


def test_the_forgetting_check_scores_base_and_new_weights_on_simulated_scenes(tiny_weights):
    from engines.finetune_report import forgetting_check, worse_scores

    small = dict(size=32, n=1, n_wide=1, n_zero=3, classes=("filaments", "puncta"))
    fc = forgetting_check("convgru", {"base": tiny_weights, "new": tiny_weights}, device="cpu",
                          threads=1, scenes=small)
    assert fc["scenes"] == 2 + 1 + 3 and fc["base"] == fc["new"] and fc["worse"] == []
    assert all(isinstance(fc["new"][k], float) for k in ("thesis_pearson", "wide_pearson", "zero_level"))
    base = {"thesis_pearson": 0.8, "wide_pearson": 0.7, "zero_level": 0.1}
    assert worse_scores(base, {**base, "wide_pearson": 0.6, "zero_level": 0.3}) == ["wide_pearson", "zero_level"]
    assert worse_scores(base, {**base, "thesis_pearson": 0.77, "zero_level": None}) == []
