"""The simulator is the source of training data and the demo camera: check its physics."""

import numpy as np
import pytest

from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig, render_gaussians


def test_frames_are_uint16_and_seeded():
    a = BlinkingScene(SimulationConfig(size=32, seed=5)).frames(5)
    b = BlinkingScene(SimulationConfig(size=32, seed=5)).frames(5)
    assert a.dtype == np.uint16 and a.shape == (5, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])


def test_camera_offset_and_gain_set_the_dark_level():
    cam = CameraNoise(kind="scmos", offset_adu=300.0, gain_e_per_adu=2.0, read_noise_e=1.0)
    cfg = SimulationConfig(size=32, photons=0.0, background=20.0, camera=cam)
    f = BlinkingScene(cfg).frames(50).astype(float)
    # mean = offset + qe*bg/gain ; var ~ (qe*bg + read^2)/gain^2
    assert f.mean() == pytest.approx(300 + 0.9 * 20 / 2.0, rel=0.01)
    assert f.var() == pytest.approx((0.9 * 20 + 1.0) / 4.0, rel=0.15)


def test_blinking_on_ratio_matches_rates():
    cfg = SimulationConfig(size=32, on_ms=10.0, off_ms=90.0, seed=1)
    sc = BlinkingScene(cfg)
    fractions = []
    for _ in range(200):
        sc.next_frame()
        fractions.append(sc._on.mean())
    # stationary on-fraction of the two-state chain = p_on / (p_on + p_off)
    expect = sc._p_on / (sc._p_on + sc._p_off)
    assert np.mean(fractions) == pytest.approx(expect, rel=0.1)


def test_single_emitter_lands_on_the_right_pixels():
    img = render_gaussians(np.array([[10.5, 20.5]]), np.array([1000.0]), (32, 32), 0.9)
    assert np.unravel_index(img.argmax(), img.shape) == (10, 20)
    assert img.sum() == pytest.approx(1000.0, rel=1e-3)  # photons are conserved


def test_ground_truth_is_on_the_2x_grid_and_aligned_with_the_mean_image():
    cfg = SimulationConfig(size=48, seed=2, photons=2000.0)
    sc = BlinkingScene(cfg)
    mean = sc.frames(300).astype(float).mean(0)
    gt = sc.ground_truth()
    assert gt.shape == (96, 96) and gt.dtype == np.float32 and gt.max() == pytest.approx(1.0)
    binned = gt.reshape(48, 2, 48, 2).mean((1, 3))
    assert np.corrcoef(binned.ravel(), mean.ravel())[0, 1] > 0.6


def test_emccd_and_moving_mitochondria_run():
    cfg = SimulationConfig(size=48, structure="mitochondria", camera=CameraNoise.emccd(),
                           drift_px_per_frame=(0.2, 0.0), rotation_deg_per_frame=0.5)
    sc = BlinkingScene(cfg)
    g0 = sc.ground_truth()
    assert g0.max() == pytest.approx(1.0)  # structure in view
    sc.frames(20)
    assert sc.n_emitters > 0
    assert not np.allclose(g0, sc.ground_truth())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="size"):
        SimulationConfig(size=0)
    with pytest.raises(ValueError, match="fps"):
        SimulationConfig(fps=-1)
