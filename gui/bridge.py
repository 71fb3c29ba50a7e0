"""The only place where the GUI touches `realtime/`, `acquisition/` and `engines/`.

Maps control values onto `PipelineConfig`, builds and (dis)connects the pipeline, and
reads metrics. Keeping this in one module means a change of a pipeline field name is a
one-line fix here, not a hunt through widget code. No torch work happens here: engines are
only listed (`available_engines()`); loading happens on pipeline threads/processes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.registry import BACKEND_CHOICES, DEFAULT_ENGINE
from gui.controls import ControlValues

if TYPE_CHECKING:  # (names only: the pipeline is imported when a run starts)
    from pymmcore_plus import CMMCorePlus

    from realtime.config import PipelineConfig
    from realtime.metrics import PipelineMetrics
    from realtime.pipeline import Pipeline
    from realtime.protocol import ResultHeader

log = logging.getLogger(__name__)

#: pipeline signal name -> MainWindow handler name
SIGNALS = {
    "frameReady": "on_frame",
    "resultReady": "on_result",
    "metricsUpdated": "on_metrics",
    "error": "on_error",
    "status": "on_status",
    "started": "on_started",
    "finished": "on_finished",
    "warning": "on_warning",
    "blinkingChecked": "on_blinking_checked",
    "referenceReady": "on_reference",
}

#: ResultHeader.info keys of the worker's blinking check (realtime.pipeline.BLINKING_PREFIX)
BLINKING_PREFIX = "blinking_check."


def default_config() -> PipelineConfig:
    from realtime.config import PipelineConfig

    return PipelineConfig()


def default_pipeline_factory(config: PipelineConfig, mmcore: CMMCorePlus | None = None) -> Pipeline:
    from realtime.pipeline import Pipeline

    return Pipeline(config, mmcore=mmcore)


def qt_thread_core(cfg: PipelineConfig) -> CMMCorePlus | None:
    """For an MDA run, an empty core made here, on the Qt thread (None otherwise).

    With a QApplication running, pymmcore-plus delivers MDA events as Qt signals, queued to
    the thread the core was created in; a core created on a helper thread (which has no
    event loop) would never deliver a frame. Devices are loaded later, off the Qt thread.
    """
    if getattr(cfg, "mode", "live") != "mda" or getattr(cfg, "source", "") == "core":
        return None
    if str(getattr(cfg, "source", "")).lower().endswith(".cfg"):
        from pymmcore_plus import CMMCorePlus

        return CMMCorePlus()
    from pymmcore_plus.experimental.unicore import UniMMCore

    return UniMMCore()


def engine_names() -> list[str]:
    """Registered engines whose module is installed (looks for files: call it off the Qt
    thread, see `MainWindow`)."""
    try:
        from engines import available_engines

        names = list(available_engines())
    except Exception as exc:  # an engine package that fails to import must not kill the GUI
        log.warning("engines.available_engines() failed: %s", exc)
        names = []
    return names or [DEFAULT_ENGINE]


def backend_names() -> list[str]:
    """Backend choices (static: listing the available ones would import torch here)."""
    return list(BACKEND_CHOICES)


def controls_from_config(cfg: PipelineConfig) -> ControlValues:
    """What the widgets show for a configuration (e.g. the one the CLI built)."""
    record = getattr(cfg, "record", None)
    return ControlValues(
        engine=str(getattr(cfg, "engine", DEFAULT_ENGINE)),
        backend=str(getattr(cfg, "backend", "eager")),
        window=getattr(cfg, "window", None),
        stride=int(getattr(cfg, "stride", 1) or 1),
        exposure_ms=getattr(cfg, "exposure_ms", None),
        fps=getattr(cfg, "fps", 100.0),
        record=record is not None,
        record_path="" if record is None else str(record),
        weights=str(getattr(cfg, "weights", None) or ""),
    )


def apply_controls(cfg: PipelineConfig, v: ControlValues) -> PipelineConfig:
    """A new config with the user's choices; raises ValueError for impossible values.

    The GUI runs until Stop (or the end of a replay), so `seconds` becomes None.
    """
    if v.record and not v.record_path:
        raise ValueError("recording is on but no file is chosen")
    simulated = getattr(cfg, "source", "sim") == "sim"
    if simulated and v.exposure_ms and v.fps and v.exposure_ms * v.fps > 1000.0 + 1e-6:
        raise ValueError(
            f"exposure {v.exposure_ms:g} ms does not fit in a frame at {v.fps:g} fps "
            f"(max {1000.0 / v.fps:.2f} ms)"
        )
    changes: dict[str, Any] = {
        "engine": v.engine,
        "backend": v.backend,
        "window": v.window,
        "stride": int(v.stride),
        "fps": v.fps,
        "record": Path(v.record_path) if v.record else None,
        "seconds": None,
        "exposure_ms": v.exposure_ms,
        "roi": tuple(v.roi) if v.roi is not None else None,
        **({"crop": None} if v.roi is not None else {}),  # a drawn ROI replaces --crop
        "headless": False,
        "weights": v.weights or None,
        "overwrite": bool(v.overwrite),
    }
    names = {f.name for f in dataclasses.fields(cfg)}
    unsupported = [k for k, val in changes.items() if k not in names and val is not None]
    if "roi" in unsupported:
        raise ValueError("this pipeline cannot crop to a ROI (PipelineConfig has no 'roi')")
    new = dataclasses.replace(cfg, **{k: val for k, val in changes.items() if k in names})
    validate = getattr(new, "validate", None)
    return validate() if validate is not None else new


def connect_pipeline(pipe: Pipeline, window: object) -> None:
    for sig_name, handler in SIGNALS.items():
        sig = getattr(pipe, sig_name, None)
        if sig is not None and hasattr(sig, "connect"):
            sig.connect(getattr(window, handler))


def disconnect_pipeline(pipe: Pipeline, window: object) -> None:
    for sig_name, handler in SIGNALS.items():
        sig = getattr(pipe, sig_name, None)
        if sig is not None and hasattr(sig, "disconnect"):
            try:
                sig.disconnect(getattr(window, handler))
            except Exception:  # already disconnected
                pass


def final_metrics(pipe: Pipeline) -> PipelineMetrics | None:
    m = getattr(pipe, "metrics", None)
    return m() if callable(m) else m


def counters(m: PipelineMetrics | None) -> dict[str, int]:
    """Counter values from a `PipelineMetrics` (only the fields it has)."""
    if m is None:
        return {}
    out: dict[str, int] = {}
    if hasattr(m, "frames_acquired"):
        out["acquired"] = int(m.frames_acquired)
    rec = getattr(m, "frames_recorded", None)
    if rec is not None:
        out["recorded"] = int(rec)
    if hasattr(m, "outputs_received"):
        out["results"] = int(m.outputs_received)
    if hasattr(m, "outputs_skipped"):
        out["dropped"] = int(m.outputs_skipped)
    mal = getattr(m, "malformed_messages", None)
    if isinstance(mal, dict):
        out["malformed"] = int(sum(mal.values()))
    elif mal is not None:
        out["malformed"] = int(mal)
    return out


def describe_error(exc: BaseException) -> str:
    """A one-line message for the user: the exception's text, not a traceback, and advice
    that names controls this window has."""
    from realtime.pipeline import RecordingExistsError

    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, FileNotFoundError) and getattr(exc, "filename", None):
        text = f"file not found: {exc.filename}"
    if isinstance(exc, RecordingExistsError):
        text += ("; type another file name, or choose this file with the '...' button next to "
                 "it and confirm that it may be replaced")
    return text


def result_title(header: ResultHeader) -> str:
    engine = getattr(header, "engine", "") or "super-resolved"
    first, last = getattr(header, "seq_first", None), getattr(header, "seq_last", None)
    span = f", frames {first}-{last}" if first is not None and last is not None else ""
    return f"{engine} (2x){span}"


def engine_info_text(info: dict[str, Any] | None) -> str:
    """One short line of what the engine used (SOFI: PSF width and where it came from, lag, bleaching)."""
    if not info:
        return ""
    parts = []
    px = info.get("psf_fwhm_px")
    if isinstance(px, (int, float)):
        pix = info.get("pixel_size_um")
        parts.append(f"PSF {px:.2f} px ({info.get('psf_source')}; pixel {pix} um, {info.get('pixel_size_source')})")
        fit = info.get("psf_fit_fwhm_px")
        if isinstance(fit, (int, float)):
            parts.append(f"fit {fit:.2f} px: {info.get('psf_fit')}")
    if "lag" in info:
        parts.append(f"lag {info.get('lag')} ({info.get('lag_choice')})")
    if "bleach_correction" in info:
        parts.append(f"bleaching correction {info.get('bleach_correction')}")
    if info.get("weights"):
        parts.append(f"weights {info['weights']}: {info.get('weights_note')}")
    if info.get("warning"):
        parts.append(f"warning: {info['warning']}")
    return " | ".join(parts)


def split_info(info: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine info, blinking check) from a ResultHeader.info."""
    info = info or {}
    engine = {k: v for k, v in info.items() if not k.startswith(BLINKING_PREFIX)}
    check = {k[len(BLINKING_PREFIX):]: v for k, v in info.items() if k.startswith(BLINKING_PREFIX)}
    return engine, check


def blinking_banner_text(check: dict[str, Any] | None) -> str | None:
    """The warning to show over the super-resolved view, or None when the check passed / has not run."""
    if not check or check.get("ok") is not False:
        return None
    return f"Not super-resolution: {check.get('message', 'no independent blinking detected')}"
