"""Backends: every backend available here matches eager fp32 on a tiny input, unavailable ones
say why, a deviating fast path is refused loudly, and `auto` remembers its choice."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from engines import backend_cache as bc
from engines import backends as B
from engines import onnx_export

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir (auto choices, ONNX files); inductor keeps its own."""
    monkeypatch.setenv("LIVESR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/livesr_test_inductor")


# --------------------------------------------------------------------------- stand-ins


class TinyRecurrent(nn.Module):
    """Stand-in for the neural engines: per-frame encoder + a recurrent loop + an upsampler,
    with a nested (h, c) state argument like the ConvLSTM step."""

    def __init__(self, ch: int = 3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.PReLU(ch))
        self.gate = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(ch, 1, 2, stride=2)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:  # (B, T, H, W) -> (B, T, C, H, W)
        b, t, h, w = frames.shape
        return self.enc(frames.reshape(b * t, 1, h, w)).reshape(b, t, -1, h, w)

    def step(self, x: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor]):
        h, c = hc
        i, f = torch.sigmoid(self.gate(torch.cat([x, h], 1))).chunk(2, 1)
        c = f * c + i * torch.tanh(x)
        h = torch.tanh(c)
        return self.up(h), [(h, c)]

    def fuse(self, enc: torch.Tensor) -> torch.Tensor:
        z = enc.new_zeros(enc[:, 0].shape)
        hc = (z, z)  # aliased zero state, as in ConvLSTMNet.zero_state
        y = None
        for i in range(enc.shape[1]):
            y, (hc,) = self.step(enc[:, i], hc)
        return y


class TinyEngine:
    """Minimal object with the engine API calling its model through two targets."""

    name = "tiny"
    upsample = 2
    backend_targets = ("model.encode", "model.fuse")

    def __init__(self, window: int = 4, seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        self.model = TinyRecurrent().eval().to(dtype)
        self.window = window
        self.norm = None
        self.dtype = dtype
        self._buf: list[np.ndarray] = []

    @torch.inference_mode()
    def reconstruct(self, stack) -> np.ndarray:
        x = torch.as_tensor(np.asarray(stack[-self.window:], np.float32))[None]
        x = (x - x.mean()) / (x.std() + 1e-6)
        return self.model.fuse(self.model.encode(x.to(self.dtype)))[0, 0].float().numpy()

    def push(self, frame):
        self._buf = (self._buf + [np.asarray(frame, np.float32)])[-self.window:]
        return self.reconstruct(np.stack(self._buf)) if len(self._buf) == self.window else None

    def reset(self) -> None:
        self._buf = []


def _stack(n=4, size=8, seed=0):
    return np.random.default_rng(seed).poisson(50, (n, size, size)).astype(np.uint16)


FAST_CPU = ["eager", "channels_last", "jit", "jit+cl", "onnxruntime"]


# --------------------------------------------------------------------------- availability


@pytest.mark.parametrize("precision", B.PRECISIONS)
@pytest.mark.parametrize("backend", list(B.BACKENDS) + ["jit+cl", "compile+cl"])
def test_status_is_ok_or_says_why(backend, precision):
    status = B.backend_status(backend, "cpu", precision)
    assert status == "ok" or status.startswith("unavailable: "), status


def test_gpu_only_backends_say_why_on_cpu():
    assert B.backend_status("tensorrt", "cpu").startswith("unavailable: TensorRT needs")
    assert B.backend_status("compile-cudagraphs", "cpu").startswith("unavailable: CUDA graphs")
    assert B.backend_status("jit", "cpu", "int8").startswith("unavailable: int8")
    assert B.backend_status("nonsense").startswith("unavailable: unknown backend")
    if not torch.cuda.is_available():
        assert "no GPU" in B.backend_status("eager", "cuda")


def test_tensorrt_unavailable_skips_with_reason():
    status = B.backend_status("tensorrt", "cuda" if torch.cuda.is_available() else "cpu", "fp16")
    if status != "ok":
        with pytest.raises(B.BackendUnavailable, match="^unavailable: "):
            B.AcceleratedModule(nn.Conv2d(1, 1, 3), "tensorrt", "fp16")
        pytest.skip(status)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("backend", FAST_CPU)
def test_backend_matches_eager_fp32_on_engine(backend):
    status = B.backend_status(backend, "cpu", "fp32")
    if status != "ok":
        pytest.skip(status)
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(), backend, "fp32", on_mismatch="raise")
    out = eng.reconstruct(stack)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= B.TOLERANCE["fp32"], f"{backend}: rel err {rel}"
    if backend != "eager":  # eager fp32 is the engine untouched
        calls = B.backend_calls(eng)
        assert calls == {"model.encode": 1, "model.fuse": 1}
        reports = B.backend_reports(eng)
        assert reports and all(r["ok"] and r["used"] == backend for r in reports)
        assert all(r["max_rel"] <= B.TOLERANCE["fp32"] for r in reports)
        # streaming through the same wrappers: different state each step, still equal
        ref_e = TinyEngine()
        outs = [(eng.push(f), ref_e.push(f)) for f in _stack(6, seed=1)]
        for a, b in outs[3:]:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("backend", ["eager", "jit"])
def test_bf16_within_stated_tolerance(backend):
    status = B.backend_status(backend, "cpu", "bf16")
    if status != "ok":
        pytest.skip(status)
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(dtype=torch.bfloat16), backend, "bf16", on_mismatch="raise")
    out = eng.reconstruct(stack)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < rel <= B.TOLERANCE["bf16"], rel  # bf16 does change the numbers, within tolerance
    assert all(r["precision"] == "bf16" and r["ok"] for r in B.backend_reports(eng))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_compile_matches_eager(precision):
    status = B.backend_status("compile", "cpu", precision)
    if status != "ok":
        pytest.skip(status)
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(dtype=B.DTYPES[precision]), "compile", precision,
                          on_mismatch="raise")
    rel = np.abs(eng.reconstruct(stack) - ref).max() / np.abs(ref).max()
    assert rel <= B.TOLERANCE[precision]


def test_nested_aliased_state_is_not_merged_by_onnx():
    """Regression: exporting with h is c (zero state) once wired both inputs to one tensor."""
    if B.backend_status("onnxruntime") != "ok":
        pytest.skip(B.backend_status("onnxruntime"))
    torch.manual_seed(0)
    net = TinyRecurrent().eval()
    w = B.AcceleratedModule(B.MethodModule(net, "step"), "onnxruntime", on_mismatch="raise")
    x = torch.randn(1, 3, 6, 6)
    z = torch.zeros(1, 3, 6, 6)
    w(x, (z, z))
    h, c = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6)
    _, rel = B.compare(w(x, (h, c)), net.step(x, (h, c)))
    assert rel < 1e-5


# --------------------------------------------------------------------------- refusing bad fast paths


def _wrong_builder(scale_after: int = 0):
    """A 'backend' that is right for the first `scale_after` calls, then off by 5 %."""
    def build(module, args, ctx):
        n = {"calls": 0}

        def run(*a):
            n["calls"] += 1
            out = module(*a)
            return out * 1.05 if n["calls"] > scale_after else out
        return run
    return build


def test_deviating_backend_raises(monkeypatch):
    monkeypatch.setitem(B._BUILDERS, "jit", _wrong_builder())
    eng = B.apply_backend(TinyEngine(), "jit", "fp32", on_mismatch="raise")
    with pytest.raises(B.BackendMismatch, match="deviates from eager fp32"):
        eng.reconstruct(_stack())


def test_deviating_backend_falls_back_loudly_and_keeps_the_image(monkeypatch):
    monkeypatch.setitem(B._BUILDERS, "jit", _wrong_builder())
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(), "jit", "fp32")  # default: fallback
    with pytest.warns(RuntimeWarning, match="REFUSED"):
        out = eng.reconstruct(stack)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    used = {r["used"] for r in B.backend_reports(eng)}
    assert all(u.startswith("eager-fp32 (fallback:") for u in used)


def test_later_call_deviation_is_caught(monkeypatch):
    """Right on the build-check input, wrong afterwards: the follow-up checks catch it."""
    monkeypatch.setitem(B._BUILDERS, "jit", _wrong_builder(scale_after=3))
    eng = B.apply_backend(TinyEngine(), "jit", "fp32", on_mismatch="raise", check_calls=5)
    with pytest.raises(B.BackendMismatch, match="on call"):
        for f in _stack(12, seed=2):
            eng.push(f)


def test_build_failure_falls_back_loudly(monkeypatch):
    def broken(module, args, ctx):
        raise RuntimeError("compiler exploded")
    monkeypatch.setitem(B._BUILDERS, "jit", broken)
    stack = _stack()
    eng = B.apply_backend(TinyEngine(), "jit", "fp32")
    with pytest.warns(RuntimeWarning, match="compiler exploded"):
        out = eng.reconstruct(stack)
    np.testing.assert_allclose(out, TinyEngine().reconstruct(stack), rtol=1e-6, atol=1e-6)
    with pytest.raises(B.BackendError, match="compiler exploded"):
        B.apply_backend(TinyEngine(), "jit", "fp32", on_mismatch="raise").reconstruct(stack)


def test_too_strict_tolerance_refuses_bf16():
    eng = B.apply_backend(TinyEngine(dtype=torch.bfloat16), "eager", "bf16", tolerance=0.0,
                          on_mismatch="raise")
    with pytest.raises(B.BackendMismatch):
        eng.reconstruct(_stack())


# --------------------------------------------------------------------------- auto


def test_auto_measures_stores_and_reuses(monkeypatch):
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(), "auto", "fp32", candidates=("eager", "jit"), auto_reps=3)
    np.testing.assert_allclose(eng.reconstruct(stack), ref, rtol=1e-4, atol=1e-5)
    data = json.loads((bc.cache_dir() / bc.AUTO_CHOICES_FILE).read_text())
    assert len(data) == 2  # one decision per target (encode, fuse) for this signature
    for entry in data.values():
        assert entry["backend"] in ("eager", "jit")
        assert set(entry["timings_ms"]) == {"eager", "jit"}
        if entry["backend"] == "jit":  # kept eager unless clearly faster
            assert entry["timings_ms"]["jit"] <= 0.9 * entry["timings_ms"]["eager"]
            assert entry["iqr_ms"]["jit"][1] < entry["iqr_ms"]["eager"][0]
        assert entry["device"] == bc.device_name("cpu")
        assert entry["uses"] == 0 and len(entry["history"]) == 1 and entry["rounds"] == 3
    first = {r["target"]: r["backend"] for r in B.backend_reports(eng)}

    # a new engine must reuse the remembered choice without timing anything again
    def no_timing(*a, **k):
        raise AssertionError("auto re-timed although a choice was stored")
    monkeypatch.setattr(B, "time_interleaved", no_timing)
    eng2 = B.apply_backend(TinyEngine(), "auto", "fp32", candidates=("eager", "jit"))
    np.testing.assert_allclose(eng2.reconstruct(stack), ref, rtol=1e-4, atol=1e-5)
    reports = B.backend_reports(eng2)
    assert all(r["auto_cached"] for r in reports)
    assert {r["target"]: r["backend"] for r in reports} == first


def test_auto_choice_depends_on_weights_and_shape():
    k = dict(engine="e", target="t", device="cpu", precision="fp32")
    m1 = bc.module_fingerprint(TinyRecurrent())
    torch.manual_seed(123)
    m2 = bc.module_fingerprint(TinyRecurrent())
    assert m1 != m2
    assert bc.auto_choice_key(signature="1x8", module_hash=m1, **k) != bc.auto_choice_key(
        signature="1x16", module_hash=m1, **k)
    assert bc.artefact_key(module_hash=m1, signature="s", backend="onnxruntime", precision="fp32",
                           device="cpu") != bc.artefact_key(module_hash=m1, signature="s",
                                                            backend="onnxruntime",
                                                            precision="bf16", device="cpu")


def test_corrupt_choices_file_is_ignored_and_rewritten():
    path = bc.cache_dir() / bc.AUTO_CHOICES_FILE
    path.write_text("{not json")
    assert bc.load_auto_choices() == {}
    bc.store_auto_choice("k", {"backend": "eager"})
    assert bc.get_auto_choice("k") == {"backend": "eager", "history": [{"backend": "eager"}]}


# --------------------------------------------------------------------------- real engines


def test_real_convgru_and_convlstm_targets_are_accelerated():
    from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet

    stack = _stack(3, 12)
    torch.manual_seed(0)
    ref = ConvGRUEngine(model=ConvGRUNet(ConvGRUConfig(hidden=4, window=3))).reconstruct(stack)
    torch.manual_seed(0)
    eng = ConvGRUEngine(model=ConvGRUNet(ConvGRUConfig(hidden=4, window=3)))
    B.apply_backend(eng, "jit", "fp32", on_mismatch="raise")
    np.testing.assert_allclose(eng.reconstruct(stack), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert all(n > 0 for n in B.backend_calls(eng).values()), B.backend_calls(eng)

    from engines import convlstm

    model, norm = convlstm.build_model({"arch": {"hidden": 4}})
    ref_e = convlstm.ConvLSTMEngine(model=model, norm=norm, warmup=3)
    lstm = convlstm.ConvLSTMEngine(model=__import__("copy").deepcopy(model), norm=norm, warmup=3)
    backend = "onnxruntime" if B.backend_status("onnxruntime") == "ok" else "jit"
    B.apply_backend(lstm, backend, "fp32", on_mismatch="raise")
    compared = 0
    for f in _stack(6, 12, seed=3):
        a, b = lstm.push(f), ref_e.push(f)
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
            compared += 1
    assert compared == 4
    assert set(B.backend_calls(lstm)) == {"model.encoder", "model.update", "model.decoder"}
    assert all(n > 0 for n in B.backend_calls(lstm).values())


def test_sofi_accepts_only_eager():
    from engines import load_engine

    sofi = load_engine("sofi", window=4)
    with pytest.raises(B.BackendUnavailable, match="only 'eager'"):
        B.apply_backend(sofi, "jit", "fp32")
    assert B.apply_backend(sofi, "auto", "fp32") is sofi


def test_load_engine_hook_applies_backend():
    from engines import load_engine

    with pytest.raises(B.BackendUnavailable):
        load_engine("sofi", backend="jit")


def test_int8_calibrator_records_real_target_inputs():
    from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet

    torch.manual_seed(0)
    eng = ConvGRUEngine(model=ConvGRUNet(ConvGRUConfig(hidden=4, window=3)))
    calib = B.make_calibrator(eng, "model.fuse_decode", outputs=4)
    samples = calib((torch.zeros(1, 3, 4, 16, 16),))
    assert len(samples) == 4 and samples[0][0].shape == (1, 3, 4, 16, 16)
    assert "fuse_decode" not in vars(eng.model)  # the recorder was removed again
    assert not torch.equal(samples[0][0], samples[1][0])  # different windows of frames


# --------------------------------------------------------------------------- export


def test_onnx_export_matches_eager(tmp_path):
    if B.backend_status("onnxruntime") != "ok":
        pytest.skip(B.backend_status("onnxruntime"))
    from engines.convgru import ConvGRUConfig, ConvGRUEngine, ConvGRUNet

    torch.manual_seed(0)
    eng = ConvGRUEngine(model=ConvGRUNet(ConvGRUConfig(hidden=4, window=3)))
    from engines.onnx_export import export_onnx

    info = export_onnx(eng, 16, tmp_path / "m.onnx")
    assert info["check"] == "ok" and info["max_rel"] <= B.TOLERANCE["fp32"]
    import onnx

    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["livesr_engine"] == "convgru" and meta["window"] == "3"


def test_export_says_so_when_onnx_missing(monkeypatch, capsys, tmp_path):
    real = B.import_error
    monkeypatch.setattr(B, "import_error",
                        lambda m: "ModuleNotFoundError: no onnx" if m == "onnx" else real(m))
    assert onnx_export.main(["--engine", "convgru", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install 'livesr[onnx]'" in capsys.readouterr().out
    assert not (tmp_path / "x.onnx").exists()


def test_export_of_sofi_is_refused(capsys, tmp_path):
    if B.import_error("onnx"):
        pytest.skip("onnx not installed")
    assert onnx_export.main(["--engine", "sofi", "--out", str(tmp_path / "s.onnx")]) == 1
    assert "no neural network" in capsys.readouterr().out


def test_applying_again_replaces_and_eager_fp32_restores():
    stack = _stack()
    ref = TinyEngine().reconstruct(stack)
    eng = B.apply_backend(TinyEngine(), "jit", "fp32")
    B.apply_backend(eng, "channels_last", "fp32")
    assert {m.backend for m in eng.backend_modules.values()} == {"channels_last"}
    np.testing.assert_allclose(eng.reconstruct(stack), ref, rtol=1e-5, atol=1e-5)
    B.apply_backend(eng, "eager", "fp32")
    assert "encode" not in vars(eng.model) and B.backend_calls(eng) == {}
    np.testing.assert_allclose(eng.reconstruct(stack), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- auto: reliable ranking


def test_pick_backend_keeps_eager_unless_clearly_faster():
    eager = [10.0, 10.2, 9.9, 10.1, 10.4, 9.8]
    assert B.pick_backend({"eager": eager, "jit": [8.0, 8.1, 7.9, 8.2, 8.0, 8.1]}) == "jit"
    # 5 % faster: within the margin
    assert B.pick_backend({"eager": eager, "jit": [9.5, 9.6, 9.4, 9.5, 9.7, 9.5]}) == "eager"
    # 20 % faster median, but the spreads overlap (one noisy measurement must not decide)
    assert B.pick_backend({"eager": eager, "jit": [8.0, 8.0, 8.0, 13.0, 14.0, 15.0]}) == "eager"
    # the slowest is never picked; without eager the lowest median wins
    assert B.pick_backend({"eager": eager, "compile": [20.0] * 6}) == "eager"
    assert B.pick_backend({"jit": [3.0, 3.1], "compile": [2.0, 2.1]}, baseline="eager") == "compile"
    with pytest.raises(ValueError):
        B.pick_backend({})


def test_time_interleaved_rotates_the_order_every_round():
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    samples = B.time_interleaved(fns, (), torch.device("cpu"), rounds=3, min_rounds=3, budget_s=60)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # warm call, 3 rounds


def test_auto_rechecks_a_remembered_choice_after_n_uses(monkeypatch):
    stack = _stack()
    timed = []
    real = B.time_interleaved
    monkeypatch.setattr(B, "time_interleaved", lambda *a, **k: timed.append(1) or real(*a, **k))
    monkeypatch.setattr(B, "AUTO_RECHECK_USES", 2)
    for _ in range(4):
        B.apply_backend(TinyEngine(), "auto", "fp32", candidates=("eager", "jit"),
                        auto_reps=3).reconstruct(stack)
    # measured, reused twice, measured again: 2 targets x 2 measurements
    assert len(timed) == 4
    entry = next(iter(bc.load_auto_choices().values()))
    assert len(entry["history"]) == 2 and entry["uses"] == 0


def test_warm_up_builds_every_per_frame_path_before_the_first_real_frame():
    from engines import convlstm

    model, norm = convlstm.build_model({"arch": {"hidden": 4}})
    eng = convlstm.ConvLSTMEngine(model=model, norm=norm, warmup=3)
    B.apply_backend(eng, "jit", "fp32", on_mismatch="raise")
    seconds = B.warm_up(eng, (12, 10))
    assert seconds > 0
    built = {k: set(m._paths) for k, m in eng.backend_modules.items()}
    assert all(built.values()) and len(built["model.encoder"]) == eng.encode_batch  # 1..4 frames
    frames = _stack(20, 12)[:, :, :10]
    eng.push_many(list(frames[:5]))
    for f in frames[5:]:
        eng.push(f)
    eng.push_many(list(frames[:4]))
    assert {k: set(m._paths) for k, m in eng.backend_modules.items()} == built, "compiled live"
    assert eng._count == 5 + 15 + 4  # the warm-up left no state behind
