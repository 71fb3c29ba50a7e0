"""Reconstruction engines behind one API: ``load_engine(name, ...)`` -> :class:`Engine`.

Why a lazy registry (name -> "module:factory"): importing ``engines`` must stay cheap (numpy
only: the blinking check and the optics run in processes that never load torch) and must
not fail because one engine's module (or its weights, or an optional dependency) is missing;
``load_engine("convgru")`` imports ``engines.convgru`` only when asked.

``load_engine(spec)`` takes an :class:`engines.registry.EngineSpec`; a factory is called as
``factory(device=..., precision=..., weights=..., window=..., **spec.options)``
(``window=None`` means the engine's default) and returns an object satisfying :class:`Engine`.
A factory takes exactly the options it understands: any other is a TypeError naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .blinking import BlinkingReport, assess_blinking
from .psf import Optics
from .registry import ENGINES, EngineSpec

if TYPE_CHECKING:  # torch-based: imported on first use (see __getattr__), not by `import engines`
    from .base import Engine, EngineBase

__all__ = [
    "BlinkingReport",
    "Engine",
    "EngineBase",
    "EngineSpec",
    "EngineUnavailableError",
    "Optics",
    "assess_blinking",
    "available_engines",
    "exception_reason",
    "engine_module",
    "load_engine",
    "load_engine_for_scoring",
    "register_engine",
]


def __getattr__(name: str) -> Any:
    """``Engine`` / ``EngineBase`` live in ``engines.base``, which imports torch: load it on demand,
    so that ``import engines`` (and ``engines.assess_blinking``) stays numpy-only."""
    if name in ("Engine", "EngineBase"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# name -> "module:factory" (from engines.registry, plus register_engine's); modules are imported
# only by load_engine
_REGISTRY: dict[str, str] = {name: info.factory for name, info in ENGINES.items()}
_BACKENDS_MODULE = "engines.backends"


class EngineUnavailableError(ImportError):
    """A registered engine whose module (or factory) cannot be imported on this install."""


def register_engine(name: str, target: str) -> None:
    """Register (or replace) ``name`` -> ``"package.module:factory"``; nothing is imported now."""
    module, sep, attr = target.partition(":")
    if not (name and module and sep and attr):
        raise ValueError(f"engine target must look like 'package.module:factory', got {target!r}")
    _REGISTRY[name] = target


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_engines() -> list[str]:
    """Registered engines whose module is present in this install (modules are not imported)."""
    return [name for name, target in _REGISTRY.items() if _module_exists(target.partition(":")[0])]


def _factory(name: str) -> Any:
    if name not in _REGISTRY:
        raise ValueError(f"unknown engine {name!r}; registered: {sorted(_REGISTRY)}")
    module_name, _, attr = _REGISTRY[name].partition(":")
    if not _module_exists(module_name):
        raise EngineUnavailableError(
            f"engine {name!r} is registered but its module {module_name!r} is not installed; "
            f"available here: {available_engines()}"
        )
    module = importlib.import_module(module_name)  # a real import error inside the module propagates
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise EngineUnavailableError(f"engine {name!r}: {module_name!r} has no factory {attr!r}") from exc


def load_engine(spec: EngineSpec | str, **kwargs: Any) -> Engine:
    """Build the engine ``spec`` describes; ``load_engine("sofi", window=50, lag=1)`` is the
    short form (the keywords are EngineSpec fields, the rest the engine's own options).

    ``spec.backend`` other than "eager" is handled by ``engines.backends.apply_backend(engine,
    backend, precision)`` when that module exists (its return value, if not None, replaces the
    engine); without it only "eager" is accepted.
    """
    if isinstance(spec, str):
        spec = spec_from_keywords(spec, **kwargs)
    elif kwargs:
        raise TypeError(f"load_engine(spec) takes no keywords besides the spec, got {sorted(kwargs)}")
    has_backends = _module_exists(_BACKENDS_MODULE)
    if not has_backends and spec.backend != "eager":
        raise ValueError(f"unknown backend {spec.backend!r}: only 'eager' is available in this install")
    factory = _factory(spec.name)
    _check_options(spec.name, factory, spec.options)
    engine = factory(device=spec.device, precision=spec.precision, weights=spec.weights,
                     window=spec.window, **spec.options)
    if has_backends:
        backends = importlib.import_module(_BACKENDS_MODULE)
        wrapped = backends.apply_backend(engine, spec.backend, spec.precision)
        if wrapped is not None:
            engine = wrapped
    return engine


_SPEC_FIELDS = ("window", "backend", "device", "precision", "weights", "trust", "trust_options")


def spec_from_keywords(name: str, **kwargs: Any) -> EngineSpec:
    """``EngineSpec`` from loose keywords: its fields by name, everything else an engine option."""
    fields = {k: kwargs.pop(k) for k in _SPEC_FIELDS if k in kwargs}
    if fields.get("weights") is not None:
        fields["weights"] = str(fields["weights"])
    return EngineSpec(name, options=kwargs, **fields)


def _check_options(name: str, factory: Any, options: Any) -> None:
    """A clear TypeError for an option the engine's factory does not take."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and odd callables: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        takes = sorted(set(params) - {"self", "device", "precision", "weights", "window"})
        raise TypeError(f"engine {name!r} does not take option(s) {', '.join(map(repr, unknown))}; "
                        f"it takes {', '.join(takes) or 'no options'}")


def engine_module(name: str) -> ModuleType:
    """Engine ``name``'s own module (imported now): its factory and, for a network, its
    training hooks (``training_net``, ``engine_from_model``, ``TRAIN_PRESETS``, ``load_model``)."""
    _factory(name)  # unknown / not installed: the same clear errors as load_engine
    return importlib.import_module(_REGISTRY[name].partition(":")[0])


def exception_reason(exc: BaseException) -> str:
    """``"ValueError: first line of the message"``: one line for a table cell or a log."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_engine_for_scoring(name: str, *, device: str, window: int | None = None,
                            weights: str | Path | None = None) -> tuple[Engine | None, str]:
    """``(engine, "")``, or ``(None, "unavailable: why")`` so an evaluation scores the other
    engines; a legacy-weights warning is silenced (callers report ``engine.legacy`` as a note)."""
    import warnings

    spec = EngineSpec(name, window=window, device=device,
                      weights=None if weights is None else str(weights))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_engine(spec), ""
    except Exception as exc:  # missing weights, unknown engine, no CUDA: say why, go on
        return None, f"unavailable: {exception_reason(exc)}"
