"""Frame sources (simulated, replayed, Micro-Manager), the acquisition thread and the recorder.

Names are re-exported lazily: ``from acquisition.simulation import ...`` (used to make
training data) must not pay for importing pymmcore-plus and ZeroMQ.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AcquisitionThread": "acquisition.thread",
    "CAMERA_MODELS": "acquisition.cameras",
    "FramePacer": "acquisition.cameras",
    "MicroManagerConfigError": "acquisition.cameras",
    "ReplayCamera": "acquisition.cameras",
    "ReplayFileError": "acquisition.cameras",
    "ReplayStack": "acquisition.cameras",
    "SimulatedCamera": "acquisition.cameras",
    "load_replay_stack": "acquisition.cameras",
    "make_core": "acquisition.cameras",
    "OmeTiffRecorder": "acquisition.recorder",
    "RecorderError": "acquisition.recorder",
    "BlinkingScene": "acquisition.simulation",
    "CameraNoise": "acquisition.simulation",
    "SimulationConfig": "acquisition.simulation",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from acquisition.cameras import (
        CAMERA_MODELS,
        FramePacer,
        MicroManagerConfigError,
        ReplayCamera,
        ReplayFileError,
        ReplayStack,
        SimulatedCamera,
        load_replay_stack,
        make_core,
    )
    from acquisition.recorder import OmeTiffRecorder, RecorderError
    from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig
    from acquisition.thread import AcquisitionThread


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'acquisition' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
