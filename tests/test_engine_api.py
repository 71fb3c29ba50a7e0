"""The engine API every engine shares: registry, input checks, shapes, streaming contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import engines
from engines import Engine, EngineBase, EngineUnavailableError, available_engines, load_engine, register_engine
from engines.base import as_tensor, resolve_device


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry so tests can register names without leaking them."""
    monkeypatch.setattr(engines, "_REGISTRY", dict(engines._REGISTRY))
    return engines._REGISTRY


def _stack(t=25, h=6, w=7, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(300.0, (t, h, w)).astype(dtype)


# ----------------------------------------------------------------------------- registry
def test_sofi_is_available_and_loads_with_defaults():
    assert "sofi" in available_engines()
    eng = load_engine("sofi")
    assert isinstance(eng, Engine)
    assert (eng.name, eng.window, eng.upsample) == ("sofi", 20, 2)
    assert load_engine("sofi", window=100).window == 100
    assert load_engine("sofi", clip_negative=False, distance_factor="psf").clip_negative is False


def test_registry_is_lazy():
    """Importing engines must not import any engine module; load_engine imports only the one asked for."""
    code = (
        "import sys, engines\n"
        "names = ('engines.sofi', 'engines.convgru', 'engines.convlstm')\n"
        "assert not any(n in sys.modules for n in names), [n for n in names if n in sys.modules]\n"
        "engines.load_engine('sofi')\n"
        "assert 'engines.sofi' in sys.modules\n"
        "assert 'engines.convgru' not in sys.modules and 'engines.convlstm' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown engine 'nope'.*sofi"):
        load_engine("nope")


def test_registered_but_missing_module_is_a_clear_error(registry):
    register_engine("ghost", "engines.no_such_module_xyz:load")
    assert "ghost" not in available_engines()
    with pytest.raises(EngineUnavailableError, match="ghost.*not installed"):
        load_engine("ghost")
    register_engine("ghost2", "engines.sofi:NoSuchFactory")
    with pytest.raises(EngineUnavailableError, match="no factory"):
        load_engine("ghost2")


def test_register_engine_validates_target(registry):
    for bad in ("engines.sofi", ":load", "engines.sofi:", ""):
        with pytest.raises(ValueError, match="module:factory"):
            register_engine("x", bad)


def test_factory_receives_the_standard_keywords(registry, monkeypatch):
    seen = {}

    def factory(**kw):
        seen.update(kw)
        return engines.sofi.SofiEngine(window=kw["window"])

    import engines.sofi

    monkeypatch.setattr(engines.sofi, "probe_factory", factory, raising=False)
    register_engine("probe", "engines.sofi:probe_factory")
    eng = load_engine("probe", window=9, extra=1)
    assert eng.window == 9
    assert seen == {"device": "cpu", "precision": "fp32", "weights": None, "window": 9, "extra": 1}


def test_unknown_backend_is_rejected():
    # without engines.backends: ValueError here; with it, that module's own error (its choice)
    with pytest.raises((ValueError, RuntimeError), match="backend|unavailable"):
        load_engine("sofi", backend="no-such-backend")


def test_only_eager_without_backends_module(monkeypatch):
    monkeypatch.setattr(engines, "_BACKENDS_MODULE", "engines.no_such_backends_module")
    assert load_engine("sofi", backend="eager").name == "sofi"
    with pytest.raises(ValueError, match="only 'eager'"):
        load_engine("sofi", backend="compile")


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="no weights"):
        load_engine("sofi", weights="x.pt")
    with pytest.raises(ValueError, match="precision"):
        load_engine("sofi", precision="fp8")
    with pytest.raises(ValueError, match="window must be >= 2"):
        load_engine("sofi", window=1)
    with pytest.raises(TypeError, match="window must be an int"):
        load_engine("sofi", window=2.5)
    with pytest.raises(ValueError, match="distance_factor"):
        load_engine("sofi", distance_factor="guess")
    with pytest.raises(ValueError, match="psf_fwhm_px"):
        load_engine("sofi", psf_fwhm_px=-1.0)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-9000")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is unavailable"):
            load_engine("sofi", device="cuda")


# ----------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64])
def test_any_real_dtype_gives_float32_2h_2w(dtype):
    stack = _stack(dtype=dtype) // (2 if dtype == np.uint8 else 1)
    out = load_engine("sofi").reconstruct(stack)
    assert out.shape == (12, 14) and out.dtype == np.float32
    ref = load_engine("sofi").reconstruct(stack.astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_torch_tensor_input():
    stack = _stack()
    eng = load_engine("sofi")
    np.testing.assert_array_equal(eng.reconstruct(torch.from_numpy(stack.astype(np.int32))), eng.reconstruct(stack))


def test_uses_the_last_window_frames():
    stack = _stack(t=50)
    eng = load_engine("sofi", window=20, clip_negative=False)
    last = eng.reconstruct(stack)
    np.testing.assert_array_equal(last, eng.reconstruct(stack[-20:]))
    assert not np.allclose(last, eng.reconstruct(stack[:20]))


def test_bad_input_is_a_clear_error():
    eng = load_engine("sofi", window=10)
    with pytest.raises(ValueError, match="at least window=10 frames, got 9"):
        eng.reconstruct(_stack(t=9))
    with pytest.raises(ValueError, match=r"\(T, H, W\) stack"):
        eng.reconstruct(_stack()[0])
    with pytest.raises(ValueError, match=r"\(T, H, W\) stack"):
        eng.reconstruct(_stack()[None])
    with pytest.raises(TypeError, match="real numbers"):
        eng.reconstruct(_stack().astype(np.complex64))
    with pytest.raises(TypeError, match="real numbers"):
        eng.reconstruct(torch.zeros((12, 5, 5), dtype=torch.complex64))
    with pytest.raises(TypeError, match="real numbers"):
        eng.reconstruct(_stack() > 300)
    with pytest.raises(TypeError, match="real numbers"):
        eng.reconstruct(np.full((12, 4, 4), "a"))
    bad = _stack().astype(np.float32)
    bad[-1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        eng.reconstruct(bad)
    with pytest.raises(ValueError, match="at least 2x2"):
        eng.reconstruct(_stack(h=1, w=5))


def test_input_is_not_modified():
    stack = _stack().astype(np.float64)
    before = stack.copy()
    eng = load_engine("sofi", window=5)
    eng.reconstruct(stack)
    for f in stack:
        eng.push(f)
    np.testing.assert_array_equal(stack, before)


# ----------------------------------------------------------------------------- streaming
def test_push_contract():
    stack = _stack(t=12)
    eng = load_engine("sofi", window=5)
    outs = [eng.push(f) for f in stack]
    assert all(o is None for o in outs[:4])
    for k in range(4, 12):
        assert outs[k].shape == (12, 14) and outs[k].dtype == np.float32
        np.testing.assert_allclose(outs[k], eng.reconstruct(stack[k - 4:k + 1]), rtol=1e-5, atol=1e-4)
    eng.reset()
    assert eng.push(stack[0]) is None
    with pytest.raises(ValueError, match=r"\(H, W\) frame"):
        eng.push(stack[:2])
    with pytest.raises(TypeError, match="real numbers"):
        eng.push(stack[0].astype(np.complex128))
    with pytest.raises(ValueError, match="NaN"):
        eng.push(np.full((6, 7), np.inf))


class _BlockMean(EngineBase):
    """A toy engine (mean of the window, nearest-upsampled) to test the base class alone."""

    name = "blockmean"

    def _reconstruct(self, frames):
        return frames.mean(0).repeat_interleave(2, 0).repeat_interleave(2, 1)


def test_base_class_gives_streaming_for_free():
    stack = _stack(t=9).astype(np.float32)
    eng = _BlockMean(3)
    assert isinstance(eng, Engine)
    outs = [eng.push(f) for f in stack]
    assert outs[:2] == [None, None]
    for k in range(2, 9):
        np.testing.assert_allclose(outs[k], eng.reconstruct(stack[k - 2:k + 1]), rtol=1e-6)
        np.testing.assert_allclose(outs[k][::2, ::2], stack[k - 2:k + 1].mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="reset"):
        eng.push(np.zeros((3, 3), np.float32))
    eng.reset()
    assert eng.push(np.zeros((3, 3), np.float32)) is None


def test_as_tensor_copy_never_aliases():
    a = np.ones((4, 4), np.float32)
    t = as_tensor(a, ndim=2, device=torch.device("cpu"), copy=True)
    a[:] = 5
    assert float(t.max()) == 1.0
    src = torch.ones(4, 4)
    t2 = as_tensor(src, ndim=2, device=torch.device("cpu"), copy=True)
    src += 1
    assert float(t2.max()) == 1.0
