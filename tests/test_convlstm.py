"""ConvLSTM streaming engine: shapes, warm-up, push == reconstruct, weights I/O, compute cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines import Engine, load_engine
from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet
from engines.convlstm import ConvLSTMConfig, ConvLSTMEngine, ConvLSTMNet
from engines.nn_common import NormConfig, WeightsError, count_conv_macs, save_weights

SHIPPED = Path(__file__).resolve().parents[1] / "engines" / "weights" / "convlstm.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _movie(t: int = 9, h: int = 8, w: int = 10, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.poisson(20.0, (t, h, w)) + 100
    m[:, 5, 2] += rng.poisson(150.0, t)
    return m.astype(np.uint16)


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    arch = ConvLSTMConfig(hidden=4, warmup=3)
    return save_weights(tmp_path / "convlstm.pt", ConvLSTMNet(arch), model_name="convlstm",
                        arch=arch, norm=NormConfig())


def test_net_outputs_every_frame():
    net = ConvLSTMNet(ConvLSTMConfig(hidden=4))
    y, state = net(torch.randn(2, 5, 8, 10))
    assert y.shape == (2, 5, 16, 20) and len(state) == 2
    y2, _ = net(torch.randn(2, 5, 8, 10), decode_from=3)
    assert y2.shape == (2, 2, 16, 20)


def test_engine_api_and_warmup(weights_file):
    eng = load_engine("convlstm", weights=weights_file)
    assert isinstance(eng, Engine) and isinstance(eng, ConvLSTMEngine)
    assert (eng.name, eng.warmup, eng.window, eng.upsample) == ("convlstm", 3, 3, 2)
    outs = [eng.push(f) for f in _movie(t=6)]
    assert outs[:2] == [None, None]
    assert all(o.shape == (16, 20) and o.dtype == np.float32 for o in outs[2:])
    assert load_engine("convlstm", weights=weights_file, window=20).warmup == 20
    with pytest.raises(ValueError, match="warmup=3"):
        eng.reconstruct(_movie(t=2))


def test_push_sequence_equals_reconstruct(weights_file):
    """Streaming state after N pushes == running the same N frames from zero state."""
    eng = load_engine("convlstm", weights=weights_file)
    movie = _movie(t=8)
    for i, frame in enumerate(movie):
        out = eng.push(frame)
        if out is not None:
            np.testing.assert_allclose(out, eng.reconstruct(movie[: i + 1]), rtol=1e-5, atol=1e-6)
    # reconstruct left the stream alone: the next push continues from 8 frames of state
    nxt = _movie(t=1, seed=5)[0]
    np.testing.assert_allclose(eng.push(nxt), eng.reconstruct(np.concatenate([movie, nxt[None]])),
                               rtol=1e-5, atol=1e-6)
    eng.reset()
    assert eng.push(movie[0]) is None


def test_push_many_equals_pushing_one_by_one(weights_file):
    """The worker's catch-up path (batched encoder, one decode) gives the same image."""
    one, many = (load_engine("convlstm", weights=weights_file) for _ in range(2))
    assert one.stateful and many.encode_batch > 1
    movie = _movie(t=11)
    outs = [one.push(f) for f in movie]
    assert many.push_many(movie[:2]) is None  # still warming up (warmup=3)
    assert many.push_many(movie[2:7], output=False) is None  # state only
    ingest_s, output_s = many.last_cost
    assert ingest_s > 0 and output_s == 0.0
    got = many.push_many(list(movie[7:]))
    np.testing.assert_allclose(got, outs[-1], rtol=1e-5, atol=1e-6)
    assert many.last_cost[1] > 0
    with pytest.raises(ValueError, match="at least one frame"):
        many.push_many([])
    many.reset()
    with pytest.raises(ValueError, match="differ in shape"):
        many.push_many([movie[0], movie[0][:, :6]])


def test_engine_step_matches_batched_training_forward(weights_file):
    """The per-frame engine path and the batched forward used in training agree."""
    from engines.nn_common import decode_output, normalise_with_scale, trailing_mean

    eng = load_engine("convlstm", weights=weights_file)
    movie = _movie(t=5)
    with torch.no_grad():
        x, s = normalise_with_scale(torch.from_numpy(movie.astype(np.float32))[None], eng.norm)
        y, _ = eng.model(x)
    ref = decode_output(y[0, -1], trailing_mean(s, eng.model.cfg.warmup)[0, -1]).numpy()
    np.testing.assert_allclose(ref, eng.reconstruct(movie), rtol=1e-4, atol=1e-5 * ref.max())


def test_weights_round_trip_and_bad_files(weights_file, tmp_path):
    eng = load_engine("convlstm", weights=weights_file)
    again = tmp_path / "again.pt"
    save_weights(again, eng.model, model_name="convlstm", arch=eng.model.cfg, norm=eng.norm)
    m = _movie()
    np.testing.assert_array_equal(eng.reconstruct(m),
                                  load_engine("convlstm", weights=again).reconstruct(m))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_engine("convlstm", weights=junk)
    wrong = tmp_path / "wrong_arch.pt"
    save_weights(wrong, ConvLSTMNet(ConvLSTMConfig(hidden=4, layers=1)), model_name="convlstm",
                 arch=ConvLSTMConfig(hidden=4, layers=2), norm=NormConfig())
    with pytest.raises(WeightsError, match=r"wrong_arch\.pt.*missing keys"):
        load_engine("convlstm", weights=wrong)


def test_convlstm_costs_10x_less_per_new_frame_than_convgru_window():
    """Default architectures: MACs for one new output frame, ConvLSTM push vs ConvGRU window."""
    gru = ConvGRUEngine(model=ConvGRUNet(ConvGRUConfig()))
    lstm = ConvLSTMEngine(model=ConvLSTMNet(ConvLSTMConfig()))
    movie = _movie(t=20, h=16, w=16)
    gru_window = count_conv_macs(gru.model, lambda: gru.reconstruct(movie))
    for f in movie[:-1]:
        lstm.push(f)
    lstm_frame = count_conv_macs(lstm.model, lambda: lstm.push(movie[-1]))
    for f in movie[:-1]:
        gru.push(f)
    gru_cached = count_conv_macs(gru.model, lambda: gru.push(movie[-1]))
    assert gru_window / lstm_frame >= 10, (gru_window, lstm_frame)
    assert gru_cached < gru_window  # the cache saves the 19 re-encodings


def test_shipped_weights_load_and_are_small():
    if not SHIPPED.exists():
        pytest.skip(f"unavailable: {SHIPPED} not trained yet")
    assert SHIPPED.stat().st_size < 2_000_000
    eng = load_engine("convlstm")
    assert eng.warmup == 20
    out = eng.reconstruct(_movie(t=20, h=12, w=12))
    assert out.shape == (24, 24) and np.isfinite(out).all()


def test_shipped_weights_beat_the_widefield_mean():
    """As for the ConvGRU: 3 held-out thesis-SNR scenes, streamed as in live use."""
    if not SHIPPED.exists():
        pytest.skip(f"unavailable: {SHIPPED} not trained yet")
    from engines.evaluation import EvaluationConfig, evaluate

    cfg = EvaluationConfig(size=40, n=1, classes=("filaments", "mitochondria", "rings"),
                           sets=("thesis",), engines=("convlstm",), figure=False, progress=False)
    rows = {(r["engine"], r["class"]): r for r in evaluate(cfg)["summary"]}
    net, mean = rows[("convlstm", "all")], rows[("mean", "all")]
    assert net["n"] == 3
    assert net["pearson"]["mean"] > mean["pearson"]["mean"] + 0.05, (net, mean)
