"""ConvGRU engine: shapes, engine API, cached rolling window, weights I/O and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines import Engine, load_engine
from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet
from engines.nn_common import NormConfig, WeightsError, save_weights


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(window: int = 4) -> tuple[ConvGRUNet, ConvGRUConfig]:
    torch.manual_seed(0)
    arch = ConvGRUConfig(hidden=4, window=window)
    return ConvGRUNet(arch), arch


def _movie(t: int = 9, h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.poisson(20.0, (t, h, w)) + 100
    m[:, 3, 4] += rng.poisson(200.0, t)  # a blinking-ish bright pixel
    return m.astype(np.uint16)


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    model, arch = _tiny()
    return save_weights(tmp_path / "convgru.pt", model, model_name="convgru", arch=arch,
                        norm=NormConfig(), training={"steps": 0})


def test_net_shapes():
    model, _ = _tiny()
    y = model(torch.randn(2, 4, 8, 10))
    assert y.shape == (2, 1, 16, 20)


def test_engine_api_shapes_and_dtype(weights_file):
    eng = load_engine("convgru", weights=weights_file)
    assert isinstance(eng, Engine) and isinstance(eng, ConvGRUEngine)
    assert (eng.name, eng.window, eng.upsample) == ("convgru", 4, 2)
    out = eng.reconstruct(_movie())
    assert out.shape == (16, 20) and out.dtype == np.float32 and np.isfinite(out).all()
    with pytest.raises(ValueError, match="at least"):
        eng.reconstruct(_movie(t=3))
    assert load_engine("convgru", weights=weights_file, window=6).window == 6


def test_cached_rolling_equals_recomputing(weights_file):
    """push() encodes each frame once and reuses it; outputs equal a full recomputation."""
    eng = load_engine("convgru", weights=weights_file)
    movie = _movie(t=9)
    for i, frame in enumerate(movie):
        out = eng.push(frame)
        if i + 1 < eng.window:
            assert out is None
            continue
        ref = eng.reconstruct(movie[: i + 1])  # uses the last `window` frames
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert len(eng._enc) == eng.window  # the ring holds exactly one window of encodings
    eng.reset()
    assert eng.push(movie[0]) is None


def test_output_ignores_camera_offset_and_gain(weights_file):
    """Per-frame robust normalisation: an affine change of camera offset/gain changes nothing."""
    eng = load_engine("convgru", weights=weights_file)
    m = _movie().astype(np.float64)
    np.testing.assert_allclose(eng.reconstruct(m), eng.reconstruct(m * 7.5 + 1000.0),
                               rtol=1e-4, atol=1e-5)


def test_weights_round_trip(weights_file, tmp_path):
    eng = load_engine("convgru", weights=weights_file)
    again = tmp_path / "again.pt"
    save_weights(again, eng.model, model_name="convgru", arch=eng.model.cfg, norm=eng.norm)
    m = _movie()
    np.testing.assert_array_equal(eng.reconstruct(m),
                                  load_engine("convgru", weights=again).reconstruct(m))
    assert eng.config["training"] == {"steps": 0} and eng.config["arch"]["hidden"] == 4


def test_garbage_weights_name_the_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a torch file" * 50)
    with pytest.raises(WeightsError, match="garbage.pt"):
        load_engine("convgru", weights=bad)


def test_truncated_weights_name_the_file(weights_file, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weights_file.read_bytes()[:300])
    with pytest.raises(WeightsError, match=r"cut\.pt.*(corrupt|truncated)"):
        load_engine("convgru", weights=cut)


def test_wrong_architecture_and_model_name(tmp_path, weights_file):
    model, arch = _tiny()
    wrong = tmp_path / "wrong.pt"
    arch_in_file = ConvGRUConfig(hidden=6, window=4)  # config says 6, tensors are 4
    save_weights(wrong, model, model_name="convgru", arch=arch_in_file, norm=NormConfig())
    with pytest.raises(WeightsError, match=r"wrong\.pt.*shape mismatch"):
        load_engine("convgru", weights=wrong)
    with pytest.raises(WeightsError, match=r"convgru\.pt.*'convgru' model, not 'convlstm'"):
        load_engine("convlstm", weights=weights_file)
    with pytest.raises(WeightsError, match=r"not found.*missing\.pt"):
        load_engine("convgru", weights=tmp_path / "missing.pt")


def test_shipped_weights_load_and_are_small():
    path = Path(__file__).resolve().parents[1] / "engines" / "weights" / "convgru.pt"
    if not path.exists():
        pytest.skip(f"unavailable: {path} not trained yet")
    assert path.stat().st_size < 2_000_000
    eng = load_engine("convgru")
    assert eng.window == 20
    out = eng.reconstruct(_movie(t=20, h=12, w=12))
    assert out.shape == (24, 24) and np.isfinite(out).all()
