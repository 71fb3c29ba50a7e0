"""Frame sources (simulated, replayed, Micro-Manager), the acquisition thread, sinks, the recorder.

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
    "FrameMeta": "acquisition.sinks",
    "FrameSink": "acquisition.sinks",
    "Recorder": "acquisition.recorder",
    "RecorderError": "acquisition.recorder",
    "SignalSink": "acquisition.sinks",
    "SinkSet": "acquisition.sinks",
    "StreamInfo": "acquisition.sinks",
    "ThreadedSink": "acquisition.sinks",
    "recording_format": "acquisition.formats",
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
    from acquisition.formats import recording_format
    from acquisition.recorder import Recorder, RecorderError
    from acquisition.simulation import BlinkingScene, CameraNoise, SimulationConfig
    from acquisition.sinks import (
        FrameMeta,
        FrameSink,
        SignalSink,
        SinkSet,
        StreamInfo,
        ThreadedSink,
    )
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
