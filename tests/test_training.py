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


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
