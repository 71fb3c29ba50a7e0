"""What livesr knows about each engine, backend and precision, without importing torch.

Why a torch-free table: the CLI, the GUI's Qt thread, the configuration checks and the
benchmarks need the engine names, default windows and backend lists long before (or without)
loading an engine; importing this module costs nothing. ``engines.load_engine`` builds an
engine from its ``factory`` entry; the engine classes read their facts (minimum window,
stateful, backend targets) from here, so each fact is written once. Adding an engine is one
``EngineInfo`` entry here plus its module.

:class:`EngineSpec` is the one description of *which* engine to run and how (name, window,
backend, device, precision, weights, engine options, trust check). `PipelineConfig` and
`EngineServerConfig` build it from the CLI's and the GUI's settings; the worker, the remote
server and the benchmarks pass it whole; the evaluations load through
`engines.load_engine_for_scoring`; training builds the network from its module's hooks.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ANY_ENGINE_MIN_WINDOW",
    "BACKENDS",
    "BACKEND_ALIASES",
    "BACKEND_CHOICES",
    "BACKEND_PRECISIONS",
    "DEFAULT_ENGINE",
    "DEFAULT_NETWORK",
    "ENGINES",
    "EngineInfo",
    "EngineSpec",
    "REFERENCE_ENGINE",
    "PRECISIONS",
    "canonical_backend",
    "default_window",
    "neural_engines",
    "parse_weights_arg",
]


@dataclass(frozen=True)
class EngineInfo:
    """One engine's facts; ``factory`` is ``"package.module:callable"``, imported on first use."""

    name: str
    factory: str
    default_window: int  # frames per output (ConvLSTM: the warm-up before its first output)
    min_window: int
    stateful: bool  # output depends on every frame since reset: skip outputs, never reset to catch up
    needs_weights: bool  # a trained network (False: computed from the data alone)
    backend_targets: tuple[str, ...]  # per-frame modules the execution backends compile
    description: str
    title: str = ""  # how tables and figures name it ("ConvGRU")
    #: takes the microscope's optics and SOFI's corrections (``realtime.config.SofiOptions``:
    #: optics, lag, bleach_order) as engine options
    takes_optics: bool = False

    @property
    def module(self) -> str:
        """The engine's own module (``engines.convgru``): its factory and, for a network, its
        training hooks (``training_net``, ``engine_from_model``, ``TRAIN_PRESETS``)."""
        return self.factory.partition(":")[0]


ENGINES: dict[str, EngineInfo] = {
    e.name: e
    for e in (
        EngineInfo("sofi", "engines.sofi:SofiEngine", 20, 2, False, False, (),
                   "second-order SOFI cumulant of a rolling window (no training)",
                   title="SOFI", takes_optics=True),
        EngineInfo("convgru", "engines.convgru:load", 20, 1, False, True,
                   ("model.encode", "model.fuse_decode"),
                   "ConvGRU network over a rolling window of frames", title="ConvGRU"),
        EngineInfo("convlstm", "engines.convlstm:load", 20, 1, True, True,
                   ("model.encoder", "model.update", "model.decoder"),
                   "streaming ConvLSTM: one output per frame after a warm-up", title="ConvLSTM"),
    )
}

#: the engine a run uses when none is named (computed from the data: needs no weights)
DEFAULT_ENGINE = "sofi"
#: the network that training, fine-tuning and ONNX export make when none is named
DEFAULT_NETWORK = "convgru"
#: what a learned engine's outputs are checked against (``engines.trust``'s companion)
REFERENCE_ENGINE = "sofi"

#: the smallest window that every registered engine accepts (what the CLI and the remote
#: server check before an engine is chosen or loaded)
ANY_ENGINE_MIN_WINDOW = max(e.min_window for e in ENGINES.values())

#: engine precisions (torch dtypes of the network); the backends also accept int8 (TensorRT)
PRECISIONS = ("fp32", "fp16", "bf16")
BACKEND_PRECISIONS = PRECISIONS + ("int8",)

#: execution backends of the neural engines (implemented in engines.backends)
BACKENDS = ("eager", "channels_last", "jit", "compile", "compile-cudagraphs", "onnxruntime",
            "tensorrt")
#: what --backend accepts: a backend, a torch backend with channels_last ("+cl"), or "auto"
BACKEND_CHOICES = BACKENDS + ("jit+cl", "compile+cl", "auto")
#: other spellings accepted for convenience
BACKEND_ALIASES = {"compiled": "compile", "torch.compile": "compile", "ort": "onnxruntime",
                   "onnx": "onnxruntime", "trt": "tensorrt", "torchscript": "jit"}


def canonical_backend(backend: str) -> str:
    """Backend name with aliases resolved ('compiled+cl' -> 'compile+cl')."""
    base, sep, flag = backend.partition("+")
    return BACKEND_ALIASES.get(base, base) + sep + flag


def default_window(name: str | None = None) -> int:
    """Engine ``name``'s default window; without a name, the largest default of any engine."""
    if name is None:
        return max(e.default_window for e in ENGINES.values())
    return ENGINES[name].default_window


def neural_engines() -> tuple[str, ...]:
    """The engines that run a trained network (the ones training and fine-tuning can make)."""
    return tuple(n for n, e in ENGINES.items() if e.needs_weights)


@dataclass(frozen=True)
class EngineSpec:
    """Which engine to run, and how: what every front end hands to ``engines.load_engine``
    and to the engine worker, whole (picklable: it travels to the worker process).

    ``window=None`` keeps the engine's default (the registry's); ``options`` are the engine's
    own keyword arguments (SOFI: ``optics``, ``lag``, ``bleach_order``; an option the engine's
    factory does not take is a TypeError naming it); ``trust`` checks a learned engine's
    outputs against a companion SOFI (None: for learned engines), ``trust_options`` are
    ``engines.trust.TrustConfig`` fields.
    """

    name: str = DEFAULT_ENGINE
    window: int | None = None
    backend: str = "eager"
    device: str = "cpu"
    precision: str = "fp32"
    weights: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    trust: bool | None = None
    trust_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, str):
            object.__setattr__(self, "weights", str(self.weights))
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "trust_options", dict(self.trust_options))

    @property
    def info(self) -> EngineInfo:
        """This engine's registry entry (KeyError for an engine added by register_engine only)."""
        return ENGINES[self.name]

    def replace(self, **changes: Any) -> EngineSpec:
        return replace(self, **changes)


class WeightsArgError(argparse.ArgumentTypeError, ValueError):
    """A bad ``--weights ENGINE=PATH``: argparse prints its message, callers may catch ValueError."""


def parse_weights_arg(text: str) -> tuple[str, str]:
    """``"convgru=runs/x.pt"`` -> ``("convgru", "runs/x.pt")``; the file must exist."""
    name, sep, path = (part.strip() for part in text.partition("="))
    if not sep or not name or not path:
        raise WeightsArgError(f"--weights must look like ENGINE=PATH, got {text!r}")
    if not Path(path).is_file():
        raise WeightsArgError(f"--weights {name}: no such file {path!r}")
    return name.lower(), path
