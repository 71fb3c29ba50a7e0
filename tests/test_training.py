"""Training: loss functions, seeded data, a few steps learn, CLI end-to-end with resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines import load_engine
from engines.data import CLASS_WEIGHTS, DataConfig, SampleStream, make_sample, random_structure
from engines.nn_common import (
    NormConfig,
    combined_loss,
    decode_output,
    encode_target,
    normalise_with_scale,
    trailing_mean,
)
from engines.training import TrainConfig, _build, compute_loss, main, predict


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = DataConfig(size=8, frames=4)


def test_loss_is_zero_only_for_identical_images_and_relative_per_image():
    torch.manual_seed(0)
    y = torch.rand(2, 16, 16)
    assert combined_loss(y, y, l1_weight=1.0, image_floor=0.02).item() == pytest.approx(0.0, abs=1e-7)
    assert combined_loss(y + 0.1, y).item() == pytest.approx(0.01, rel=1e-4)  # plain MSE
    # relative per image: the same relative error costs the same on a dim and a bright image
    dim, bright = 0.01 * y, 10.0 * y
    rel_dim = combined_loss(1.1 * dim, dim, image_floor=1e-6).item()
    rel_bright = combined_loss(1.1 * bright, bright, image_floor=1e-6).item()
    assert rel_dim == pytest.approx(rel_bright, rel=1e-3)
    # where the target is zero (nothing blinks) any output costs, scaled by the floor
    zero = torch.zeros(1, 16, 16)
    assert combined_loss(zero + 0.02, zero, image_floor=0.02).item() == pytest.approx(1.0, rel=1e-4)


def test_representation_round_trip_and_trailing_scale():
    t = torch.rand(3, 8, 8) * 500.0  # ADU^2
    s = torch.tensor([2.0, 5.0, 9.0])
    a = encode_target(t, s)
    torch.testing.assert_close(decode_output(a, s), t, rtol=1e-5, atol=1e-4)
    assert decode_output(-a, s).abs().max() == 0  # negative outputs mean "nothing"
    sc = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    torch.testing.assert_close(trailing_mean(sc, 2), torch.tensor([[1.0, 1.5, 2.5, 3.5, 4.5]]))


def test_samples_are_seeded_and_shaped():
    x1, y1 = make_sample(3, TINY)
    x2, y2 = make_sample(3, TINY)
    assert x1.shape == (4, 8, 8) and y1.shape == (16, 16)
    assert x1.dtype == np.float32 and y1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(make_sample(4, TINY)[0], x1)
    seq = DataConfig(size=8, frames=5, per_frame_targets=True, target_from=2, p_moving=1.0)
    xs, ys = next((s for s in (make_sample(k, seq) for k in range(50)) if s[1].max() > 0))
    assert ys.shape == (5, 16, 16) and not ys[:2].any() and ys[2:].max() > 0


def test_domain_class_mix_and_zero_targets():
    rng = np.random.default_rng(0)
    names = [random_structure(rng, CLASS_WEIGHTS) for _ in range(2000)]
    share = {k: np.mean([n == k for n in names]) for k in CLASS_WEIGHTS if k != "mixture"}
    assert max(share.values()) < 0.2  # filaments do not dominate
    assert np.mean(["+" in n for n in names]) == pytest.approx(CLASS_WEIGHTS["mixture"], abs=0.03)
    data = DataConfig(size=16, frames=4)
    zero = np.mean([not make_sample(k, data)[1].any() for k in range(100)])
    assert 0.05 <= zero <= 0.25  # ~10 % empty or static-only, plus fields nothing lands in
    with pytest.raises(ValueError, match="classes"):
        DataConfig(classes={"cells": 1.0})
    with pytest.raises(ValueError, match="photons"):
        DataConfig(photons=(100.0, 10.0))


def test_stream_resumes_at_the_same_batch():
    full = SampleStream(TINY, batch=2, seed=1, workers=0)
    batches = [next(full) for _ in range(3)]
    resumed = SampleStream(TINY, batch=2, seed=1, start_batch=2, workers=0)
    np.testing.assert_array_equal(next(resumed)[0], batches[2][0])


@pytest.mark.parametrize("model", ["convgru", "convlstm"])
def test_a_few_steps_reduce_the_loss(model):
    torch.manual_seed(0)
    data = DataConfig(size=8, frames=4, per_frame_targets=model == "convlstm", target_from=1)
    cfg = TrainConfig(model=model, hidden=4, warmup_loss=1, data=data)
    net, _ = _build(cfg)
    samples = [s for s in (make_sample(k, data) for k in range(60)) if s[1].max() > 0][:2]
    x, y = (torch.from_numpy(np.stack(a)) for a in zip(*samples))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    norm = NormConfig()
    first = compute_loss(net, x, y, cfg, norm).item()
    for _ in range(40):
        loss = compute_loss(net, x, y, cfg, norm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (first, loss.item())


def test_training_and_engine_map_outputs_back_identically(tmp_path):
    """The trainer's view of an output (predict + decode) is what the engine returns."""
    for model in ("convgru", "convlstm"):
        cfg = TrainConfig(model=model, hidden=4, data=DataConfig(size=8, frames=6))
        net, arch = _build(cfg)
        from engines.nn_common import save_weights

        w = save_weights(tmp_path / f"{model}.pt", net, model_name=model, arch=arch,
                         norm=NormConfig())
        eng = load_engine(model, weights=w, window=6)
        x = torch.from_numpy(make_sample(11, cfg.data)[0])[None] * 3.0 + 50.0
        with torch.no_grad():
            a, s = predict(eng.model, x, eng.norm, model, decode_from=5)
        ref = decode_output(a.reshape(-1, *a.shape[-2:])[-1], s.reshape(-1)[-1]).numpy()
        np.testing.assert_allclose(eng.reconstruct(x[0].numpy()), ref, rtol=1e-4, atol=1e-5)
        assert not eng.legacy and eng.output_units == "ADU^2"
        _, scale = normalise_with_scale(x[0], eng.norm)
        assert scale.shape == (6,)


def test_cli_trains_checkpoints_resumes_and_writes_loadable_weights(tmp_path):
    out, w = tmp_path / "run", tmp_path / "w.pt"
    args = ["--model", "convgru", "--steps", "2", "--batch", "2", "--patch", "8", "--frames", "4",
            "--hidden", "4", "--workers", "0", "--ckpt-every", "1", "--eval-every", "1",
            "--out", str(out), "--weights-out", str(w), "--seed", "3"]
    assert main(args) == 0
    assert (out / "ckpt.pt").exists() and w.exists()
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2
    assert main(args[:2] + ["--steps", "3"] + args[4:] + ["--resume", str(out / "ckpt.pt")]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    eng = load_engine("convgru", weights=w)
    assert eng.window == 4
    assert eng.config["training"]["final_step"] == 3
    assert eng.config["training"]["data"]["size"] == 8
    assert eng.config["output"]["units"] == "ADU^2"
    out_img = eng.reconstruct(np.random.default_rng(0).poisson(50, (4, 8, 8)).astype(np.uint16))
    assert out_img.shape == (16, 16) and np.isfinite(out_img).all()


# ---------------------------------------------------------------- where training writes (issue 15)
def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_cli_writes_to_the_user_data_dir_never_into_the_package(tmp_path):
    """`livesr train` once replaced engines/weights/convgru.pt at its first checkpoint."""
    import os
    import subprocess
    import sys

    from engines.nn_common import WEIGHTS_DIR

    shipped = {p.name: _sha(p) for p in WEIGHTS_DIR.glob("*.pt")}
    assert shipped, "the package ships weights"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    args = ["--model", "convgru", "--steps", "2", "--batch", "2", "--patch", "8", "--frames", "4",
            "--hidden", "4", "--workers", "0", "--ckpt-every", "1", "--eval-every", "1"]
    run = subprocess.run([sys.executable, "-m", "realtime.cli", "train", *args], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert {p.name: _sha(p) for p in WEIGHTS_DIR.glob("*.pt")} == shipped
    runs = list((tmp_path / "data" / "livesr" / "runs").glob("convgru-*"))
    assert len(runs) == 1
    assert {"convgru.pt", "ckpt.pt", "log.jsonl"} <= {p.name for p in runs[0].iterdir()}
    assert f"--weights {runs[0] / 'convgru.pt'}" in run.stdout
    assert load_engine("convgru", weights=runs[0] / "convgru.pt").window == 4
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # nothing in the current folder


def test_train_refuses_the_shipped_weights_folder_unless_asked(tmp_path, monkeypatch, capsys):
    from engines import training
    from engines.nn_common import WEIGHTS_DIR

    target = WEIGHTS_DIR / "convgru.pt"
    before = _sha(target)
    rc = main(["--model", "convgru", "--steps", "1", "--weights-out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite-shipped" in err and len(err.strip().splitlines()) == 1
    assert _sha(target) == before
    # the lead ships new weights with the flag (checked on a stand-in weights folder)
    fake = tmp_path / "weights"
    monkeypatch.setattr(training, "WEIGHTS_DIR", fake)
    cfg = TrainConfig(model="convgru", out=str(tmp_path / "run"), weights_out=str(fake / "convgru.pt"))
    with pytest.raises(ValueError, match="inside the shipped weights"):
        training.output_paths(cfg)
    cfg.overwrite_shipped = True
    assert training.output_paths(cfg) == (tmp_path / "run", fake / "convgru.pt")
    cfg.weights_out = None  # default: the weights go into the run folder
    cfg.overwrite_shipped = False
    assert training.output_paths(cfg)[1] == tmp_path / "run" / "convgru.pt"
