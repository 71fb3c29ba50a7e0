"""ConvGRU engine: shapes, engine API, cached rolling window, weights I/O and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines import Engine, load_engine
from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet
from engines.nn_common import LegacyWeightsWarning, NormConfig, WeightsError, save_weights

SHIPPED = Path(__file__).resolve().parents[1] / "engines" / "weights" / "convgru.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_output_follows_camera_gain_squared_and_ignores_offset(weights_file):
    """Per-frame robust normalisation: the network sees the same input whatever the camera
    offset and gain, and the output is in ADU^2, so a gain g scales it by g^2."""
    eng = load_engine("convgru", weights=weights_file)
    m = _movie().astype(np.float64)
    ref = eng.reconstruct(m)
    assert ref.max() > 0
    np.testing.assert_allclose(eng.reconstruct(m * 7.5 + 1000.0), 7.5**2 * ref,
                               rtol=1e-4, atol=1e-5 * ref.max())


def test_legacy_weights_are_said_to_be_legacy_and_unknown_outputs_refused(tmp_path, weights_file):
    model, arch = _tiny()
    blob = torch.load(weights_file, weights_only=True)
    del blob["config"]["output"]  # what files written before cumulant outputs look like
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    with pytest.warns(LegacyWeightsWarning, match="legacy weights"):
        eng = load_engine("convgru", weights=old)
    assert eng.legacy and "legacy" in eng.output_units
    x = torch.from_numpy(_movie(t=4).astype(np.float32))
    from engines.nn_common import normalise_frames

    with torch.no_grad():
        raw = eng.model(normalise_frames(x, eng.norm)[None])[0, 0].numpy()
    np.testing.assert_allclose(eng.reconstruct(_movie(t=4)), raw, rtol=1e-5, atol=1e-6)
    blob["config"]["output"] = {"target": "something else"}
    torch.save(blob, tmp_path / "alien.pt")
    with pytest.raises(WeightsError, match=r"alien\.pt has outputs of kind"):
        load_engine("convgru", weights=tmp_path / "alien.pt")


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
    if not SHIPPED.exists():
        pytest.skip(f"unavailable: {SHIPPED} not trained yet")
    assert SHIPPED.stat().st_size < 2_000_000
    eng = load_engine("convgru")
    assert eng.window == 20
    out = eng.reconstruct(_movie(t=20, h=12, w=12))
    assert out.shape == (24, 24) and np.isfinite(out).all()


def test_shipped_weights_beat_the_widefield_mean():
    """On 3 held-out scenes at the thesis's SNR the network must beat the 20-frame mean by a
    margin against the expected cumulant image: an untrained or damaged file cannot pass."""
    if not SHIPPED.exists():
        pytest.skip(f"unavailable: {SHIPPED} not trained yet")
    from engines.evaluation import EvaluationConfig, evaluate

    cfg = EvaluationConfig(size=40, n=1, classes=("filaments", "mitochondria", "rings"),
                           sets=("thesis",), engines=("convgru",), figure=False, progress=False)
    rows = {(r["engine"], r["class"]): r for r in evaluate(cfg)["summary"]}
    net, mean = rows[("convgru", "all")], rows[("mean", "all")]
    assert net["n"] == 3
    assert net["pearson"]["mean"] > mean["pearson"]["mean"] + 0.05, (net, mean)
