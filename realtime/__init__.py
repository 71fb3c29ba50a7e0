"""The live pipeline spine: wire protocol, configuration, rolling window, engine worker,
metrics, and the Pipeline that the CLI and the GUI drive.

``realtime.protocol`` and ``realtime.config`` are the shared layer (numpy + stdlib only) that
every other package may import; the heavier names (ZeroMQ worker, psygnal pipeline) are
imported lazily so that importing the protocol stays cheap.
"""

from __future__ import annotations

from typing import Any

from .config import Addresses, PipelineConfig
from .protocol import (
    PROTOCOL_VERSION,
    EndOfStream,
    EngineCounts,
    FrameHeader,
    ProtocolError,
    ReferenceHeader,
    ResultHeader,
    StatsMessage,
    decode,
    encode_eos,
    encode_frame,
    encode_result,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Addresses",
    "EndOfStream",
    "EngineCounts",
    "EngineWorker",
    "FrameHeader",
    "LatencyTracker",
    "Pipeline",
    "PipelineConfig",
    "PipelineMetrics",
    "ProtocolError",
    "ReferenceHeader",
    "ResultHeader",
    "RollingWindow",
    "StatsMessage",
    "decode",
    "encode_eos",
    "encode_frame",
    "encode_result",
]

_LAZY = {
    "EngineWorker": "worker",
    "Pipeline": "pipeline",
    "PipelineMetrics": "metrics",
    "LatencyTracker": "metrics",
    "RollingWindow": "window",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'realtime' has no attribute {name!r}")
