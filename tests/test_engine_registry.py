"""The torch-free engine registry: what it says matches the engines, and importing it is cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engines import load_engine
from engines.registry import (
    ANY_ENGINE_MIN_WINDOW,
    BACKEND_CHOICES,
    ENGINES,
    PRECISIONS,
    EngineSpec,
    default_window,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["engines.registry", "engines", "realtime.config", "realtime.handle"])
def test_import_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_registry_facts_match_the_sofi_engine():
    eng = load_engine("sofi")
    info = ENGINES["sofi"]
    assert eng.window == info.default_window == default_window("sofi") == 20
    assert eng.min_window == info.min_window == ANY_ENGINE_MIN_WINDOW == 2
    assert not info.needs_weights and not info.stateful
    with pytest.raises(ValueError, match=">= 2"):
        load_engine("sofi", window=1)


def test_network_classes_read_their_facts_from_the_registry():
    from engines.convgru import ConvGRUEngine
    from engines.convlstm import ConvLSTMEngine

    for cls, name in ((ConvGRUEngine, "convgru"), (ConvLSTMEngine, "convlstm")):
        info = ENGINES[name]
        assert cls.name == name and info.needs_weights
        assert cls.min_window == info.min_window
        assert bool(getattr(cls, "stateful", False)) == info.stateful
        assert tuple(cls.backend_targets) == info.backend_targets
    assert ENGINES["convlstm"].stateful and not ENGINES["convgru"].stateful


def test_backend_and_precision_lists_are_shared():
    from engines import backends
    from gui import bridge
    from realtime import config

    assert config.BACKEND_CHOICES is BACKEND_CHOICES and backends.BACKENDS is config.BACKENDS
    assert bridge.backend_names() == list(BACKEND_CHOICES)
    assert backends.PRECISIONS[: len(PRECISIONS)] == PRECISIONS and "int8" in backends.PRECISIONS


def test_an_engine_spec_is_passed_whole_and_the_short_form_builds_one():
    import pickle

    spec = EngineSpec("sofi", window=30, options={"lag": 1, "bleach_order": 0})
    assert pickle.loads(pickle.dumps(spec)) == spec  # it travels to the worker process
    with pytest.raises(AttributeError):
        spec.window = 5  # type: ignore[misc]  (frozen)
    eng = load_engine(spec)
    short = load_engine("sofi", window=30, lag=1, bleach_order=0)
    assert eng.window == short.window == 30
    assert eng.lag_setting == short.lag_setting == 1 and eng.bleach_order == short.bleach_order == 0
    assert spec.info is ENGINES["sofi"] and spec.info.takes_optics


@pytest.mark.parametrize("name, option", [("sofi", "colour"), ("convgru", "optics"), ("convlstm", "lag")])
def test_factories_reject_unknown_options_by_name(name, option):
    with pytest.raises(TypeError, match=f"{name!r} does not take option.*{option!r}"):
        load_engine(EngineSpec(name, options={option: 1}))


def test_every_registry_entry_names_an_existing_factory_and_module():
    import importlib

    for name, info in ENGINES.items():
        module = importlib.import_module(info.module)
        assert callable(getattr(module, info.factory.partition(":")[2])), name
        assert info.min_window <= info.default_window, name


def test_default_windows_outside_the_registry_follow_it():
    """Training data, the GUI's window mean and the simulator's target use the registry's windows
    (the simulator writes its number itself: acquisition/ does not import engines/)."""
    import inspect

    from acquisition.simulation import BlinkingScene
    from engines.data import DataConfig
    from engines.registry import DEFAULT_ENGINE, DEFAULT_NETWORK, REFERENCE_ENGINE

    assert DataConfig().frames == default_window(DEFAULT_NETWORK)
    assert DataConfig().target_window == ENGINES["convlstm"].default_window
    sim_default = inspect.signature(BlinkingScene.expected_cumulant).parameters["window"].default
    assert sim_default == default_window(REFERENCE_ENGINE)
    pytest.importorskip("qtpy")
    from gui.compare_view import RollingMean

    assert RollingMean().window == default_window(DEFAULT_ENGINE)
