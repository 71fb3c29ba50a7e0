"""The simulator is the source of training data, targets and the demo camera: check its physics,
that every structure class is what it claims, and that the target has SOFI's units."""

from dataclasses import replace

import numpy as np
import pytest

from acquisition import structures as S
from acquisition.simulation import (
    BlinkingScene,
    CameraNoise,
    SimulationConfig,
    render_cumulant,
    render_gaussians,
)
from engines.sofi import FWHM_TO_SIGMA, SofiEngine


def _layout(seed: int = 0, **kw) -> S.Layout:
    base = dict(per_um=50.0, per_um2=300.0, count_per_100um2=6.0, punctum_size=12.0)
    base.update(kw)
    return S.Layout(np.random.default_rng(seed), 0.0, 10_000.0, **base)


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


def test_emccd_mean_and_pixel_maps():
    cam = CameraNoise.emccd(em_gain=100.0, gain_e_per_adu=10.0, per_pixel_maps=True)
    cfg = SimulationConfig(size=32, photons=0.0, background=5.0, camera=cam, seed=3)
    sc = BlinkingScene(cfg)
    f = sc.frames(200).astype(float)
    assert f.mean() == pytest.approx(float(np.mean(sc.expected_adu())), rel=0.01)
    assert f.mean() == pytest.approx(200 + 0.95 * 5 * 100 / 10, rel=0.02)
    assert np.std(sc._maps["offset"]) > 1.0  # per-pixel offset map in use
    assert cam.adu_per_photon == pytest.approx(0.95 * 100 / 10)


def test_blinking_on_ratio_and_on_time_match_the_config():
    cfg = SimulationConfig(size=32, on_ms=30.0, off_ms=270.0, seed=1, structure="texture")
    sc = BlinkingScene(cfg)
    on = []
    for _ in range(400):
        sc.next_frame()
        on.append(sc._on.copy())
    on = np.array(on)
    assert cfg.on_ratio == pytest.approx(0.1)
    assert on.mean() == pytest.approx(0.1, rel=0.05)
    # mean length of an on-run: 30 ms at 100 fps = 3 frames
    starts = (on[1:] & ~on[:-1]).sum()
    assert on[1:].sum() / starts == pytest.approx(3.0, rel=0.1)


def test_single_emitter_lands_on_the_right_pixels():
    img = render_gaussians(np.array([[10.5, 20.5]]), np.array([1000.0]), (32, 32), 0.9)
    assert np.unravel_index(img.argmax(), img.shape) == (10, 20)
    assert img.sum() == pytest.approx(1000.0, rel=1e-3)  # photons are conserved


def test_both_renderers_agree():
    """Small frames use one matrix product, large ones a patch per emitter: same pixels."""
    rng = np.random.default_rng(0)
    yx = rng.uniform(-3, 27, (300, 2))
    w = rng.uniform(10, 100, 300)
    small = render_gaussians(yx, w, (24, 24), 1.1)  # matrix product
    large = render_gaussians(yx + 40, w, (120, 120), 1.1)[40:64, 40:64]  # patches
    np.testing.assert_allclose(small, large, rtol=1e-6, atol=1e-9 * w.sum())


def test_cumulant_sample_positions_follow_the_sofi_grid():
    """Output pixel k samples simulator coordinate k/2 + 0.5: an emitter at the centre of
    input pixel (10, 20) peaks at output (2*10, 2*20), SOFI's 'real' pixel of (10, 20)."""
    img = render_cumulant(np.array([[10.5, 20.5]]), np.array([1.0]), (32, 32), 1.0)
    assert img.shape == (64, 64)
    assert np.unravel_index(img.argmax(), img.shape) == (20, 40)
    assert img.max() == pytest.approx((1 / (2 * np.pi)) ** 2, rel=1e-5)


@pytest.mark.parametrize("kw", [
    dict(camera=CameraNoise(kind="ideal")),
    dict(camera=CameraNoise.emccd(), on_ms=30.0, off_ms=570.0, structure="rings+puncta"),
])
def test_target_agrees_with_long_window_sofi_in_shape_and_units(kw):
    """The analytic target = SOFI of a long noise-free movie with the true (pixel-integrated)
    PSF: same image (Pearson) and the same ADU^2 scale."""
    cfg = SimulationConfig(**{**dict(size=24, seed=4, photons=500.0, off_ms=190.0), **kw})
    sc = BlinkingScene(cfg)
    movie = sc.frames(3000, noise=False)
    target = sc.expected_cumulant()
    sofi = SofiEngine(window=3000, distance_factor="psf", clip_negative=False,
                      psf_fwhm_px=cfg.sigma_eff_px / FWHM_TO_SIGMA).reconstruct(movie)
    a, g = sofi[4:-4, 4:-4], target[4:-4, 4:-4]
    assert g.max() > 0
    assert np.corrcoef(a.ravel(), g.ravel())[0, 1] > 0.98
    assert a.sum() / g.sum() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("kw", [
    dict(static_fraction=1.0),                                  # fully static sample
    dict(structure="empty"),                                    # empty field
    dict(static_fraction=1.0, flicker=0.05, structure="blobs"),  # flicker only
])
def test_target_is_zero_where_nothing_blinks(kw):
    sc = BlinkingScene(SimulationConfig(size=24, seed=2, noise_correlation=0.3, **kw))
    movie = sc.frames(30).astype(float)
    assert not sc.expected_cumulant().any()
    if kw.get("structure") != "empty":  # the sample is there: the mean image shows it
        assert movie.mean(0).std() > 3 * movie.std(0).mean() / np.sqrt(30)


def test_static_emitters_keep_the_target_but_add_light():
    base = SimulationConfig(size=24, seed=6, off_ms=190.0)
    full = BlinkingScene(base).expected_cumulant()
    part = BlinkingScene(replace(base, static_fraction=0.5))
    assert 0.3 * full.sum() < part.expected_cumulant().sum() < 0.7 * full.sum()
    assert part._static.mean() == pytest.approx(0.5, abs=0.1)
    assert part.signal_photons().sum() > BlinkingScene(base).signal_photons().sum()


def test_flicker_scales_every_frame_by_one_factor():
    cfg = SimulationConfig(size=24, seed=1, static_fraction=1.0, flicker=0.04, structure="texture")
    sc = BlinkingScene(cfg)
    sums = []
    for _ in range(300):
        sc.next_frame()
        sums.append(sc.signal_photons().sum())
    sums = np.array(sums)
    assert sums.std() / sums.mean() == pytest.approx(0.04, rel=0.2)


def test_bleaching_is_exponential():
    cfg = SimulationConfig(size=24, seed=1, static_fraction=1.0, structure="texture",
                           bleach_s=0.5)  # always-on emitters live 50 frames on average
    sc = BlinkingScene(cfg)
    s = []
    for _ in range(51):
        sc.next_frame()
        s.append(sc.signal_photons().sum())
    assert s[-1] / s[0] == pytest.approx(np.exp(-50 / 50), rel=0.1)
    # the incremental static layer equals a fresh render of the alive emitters
    fresh = sc._render(sc._static & sc._alive)
    np.testing.assert_allclose(sc._static_photons(), fresh, atol=1e-6 * fresh.max())


def test_bleached_blinkers_leave_the_target():
    cfg = SimulationConfig(size=24, seed=3, off_ms=90.0, bleach_s=0.3)
    sc = BlinkingScene(cfg)
    sc.next_frame()
    first = sc.expected_cumulant()
    sc.frames(60)
    after = sc.expected_cumulant()  # incremental (cached) update ...
    sc._target_cache = None
    np.testing.assert_allclose(after, sc.expected_cumulant(), atol=1e-4 * first.max())  # ... exact
    assert after.sum() < 0.8 * first.sum() and (~sc._alive).any()


def test_correlated_noise_has_the_requested_neighbour_correlation():
    for c in (0.0, 0.2, 0.4):
        cfg = SimulationConfig(size=48, photons=0.0, background=30.0, noise_correlation=c, seed=1)
        f = BlinkingScene(cfg).frames(40).astype(float)
        n = f - f.mean(0)
        r_space = np.mean(n[:, :, 1:] * n[:, :, :-1]) / n.var()
        r_time = np.mean(n[1:] * n[:-1]) / n.var()
        assert r_space == pytest.approx(c, abs=0.04)
        assert abs(r_time) < 0.05  # independent from frame to frame


def test_each_class_is_what_it_claims():
    rings = S.rings(_layout(1))[0]
    assert len(rings) > 10
    pos, gain = S.diffuse(_layout(2))
    assert len(pos) > 10_000 and np.all(gain < 0.5)  # dense and dim
    assert len(S.empty(_layout())[0]) == 0
    blobs = S.blobs(_layout(3, count_per_100um2=1.0))[0]
    assert len(blobs) > 50
    # puncta: clusters of ~punctum_size emitters, each within ~150 nm of its centre
    pun = S.puncta(_layout(4, count_per_100um2=0.3, punctum_size=20.0))[0]
    centre = pun[:20].mean(0)
    assert np.median(np.hypot(*(pun[:20] - centre).T)) < 120
    # texture: density varies smoothly (1-um bins far more variable than Poisson)
    tex = S.texture(_layout(5))[0]
    counts = np.histogram2d(tex[:, 0], tex[:, 1], bins=10, range=[[0, 1e4], [0, 1e4]])[0]
    assert counts.std() > 3 * np.sqrt(counts.mean())
    # membranes: emitters along (or filling one side of) a long curved boundary
    mem = S.membranes(_layout(6))[0]
    assert len(mem) > 100


def test_rings_have_the_radius_range():
    radii = []
    for seed in range(20):  # ~0 objects per 100 um^2 -> exactly one ring
        pos = S.rings(_layout(seed, per_um=80.0, count_per_100um2=0.01))[0]
        radii.append(np.median(np.hypot(*(pos - pos.mean(0)).T)))
    assert 80 < min(radii) and max(radii) < 520 and np.ptp(radii) > 150


def test_diffusing_molecules_walk_with_the_diffusion_constant():
    cfg = SimulationConfig(size=32, structure="diffusing", diffusing_per_um2=5.0,
                           diffusion_um2_s=0.2, seed=2)
    sc = BlinkingScene(cfg)
    p0 = sc._pos0.copy()
    sc.frames(2)
    d = sc._pos0 - p0  # one step (periodic wrap is far away for most)
    d = d[np.all(np.abs(d) < 1000, axis=1)]
    assert np.mean(d**2) == pytest.approx(2 * 0.2e6 * 0.01, rel=0.15)  # 2 D dt per axis, nm^2
    # the target is a haze along the paths: averaged over the window, never a single spot
    sc.frames(18)
    def area(img: np.ndarray) -> int:
        return int((img > 0.05 * img.max()).sum())

    assert area(sc.expected_cumulant(window=20)) > 2 * area(sc.expected_cumulant(window=1))


def test_moving_scene_target_follows_the_sample():
    cfg = SimulationConfig(size=48, structure="mitochondria", camera=CameraNoise.emccd(),
                           drift_px_per_frame=(0.5, 0.0), seed=3)
    sc = BlinkingScene(cfg)
    sc.next_frame()
    g0 = sc.expected_cumulant()
    sc.frames(8)  # 8 frames later: moved 4 px = 8 output px down
    g1 = sc.expected_cumulant()
    np.testing.assert_allclose(g1[20:-20], g0[12:-28], rtol=0.05, atol=1e-3 * g0.max())


def test_mixtures_and_legacy_ground_truth():
    sc = BlinkingScene(SimulationConfig(size=32, structure="filaments+puncta+rings", seed=1))
    assert sc.n_emitters > 0
    gt = sc.ground_truth()
    assert gt.shape == (64, 64) and gt.max() == pytest.approx(1.0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="size"):
        SimulationConfig(size=0)
    with pytest.raises(ValueError, match="fps"):
        SimulationConfig(fps=-1)
    with pytest.raises(ValueError, match="unknown structure 'cells'"):
        SimulationConfig(structure="cells")
    with pytest.raises(ValueError, match="unknown structure"):
        SimulationConfig(structure="filaments+cells")
    with pytest.raises(ValueError, match="static_fraction"):
        SimulationConfig(static_fraction=1.5)
    with pytest.raises(ValueError, match="noise_correlation"):
        SimulationConfig(noise_correlation=0.6)
    with pytest.raises(ValueError, match="camera kind"):
        CameraNoise(kind="ccd")  # type: ignore[arg-type]


def test_oracle_window_cumulant_bounds_what_n_frames_carry():
    """The noise-free N-frame oracle: zero for a sample that never blinks, closer to the
    long-acquisition target as N grows (its Pearson at N = 20 is benchmarks' ceiling)."""
    cfg = SimulationConfig(size=24, seed=5, off_ms=490.0)  # on-ratio 2 %
    r = {}
    for n in (20, 2000):
        sc = BlinkingScene(cfg)
        oracle = sc.oracle_cumulant(n)
        assert oracle.shape == sc.expected_cumulant().shape == (48, 48)
        r[n] = np.corrcoef(oracle[8:-8, 8:-8].ravel(), sc.expected_cumulant()[8:-8, 8:-8].ravel())[0, 1]
    assert r[2000] > 0.97
    assert r[20] < r[2000] - 0.05
    detect = BlinkingScene(cfg).oracle_cumulant(20, known_rates=True)
    assert detect.any() and not np.allclose(detect, BlinkingScene(cfg).oracle_cumulant(20))
    assert not BlinkingScene(replace(cfg, static_fraction=1.0)).oracle_cumulant(20).any()
    with pytest.raises(ValueError, match="static scene"):
        BlinkingScene(SimulationConfig(size=24, seed=5, drift_px_per_frame=(0.1, 0.0))).oracle_cumulant(20)
