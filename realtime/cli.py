"""``livesr`` command line: run the live pipeline, or hand over to the other tools.

    livesr demo   [options]            simulated blinking sample (GUI if available)
    livesr replay FILE.tif [options]   stream a recorded movie as if it were a camera
    livesr live --config FILE.cfg      a real Micro-Manager camera
    livesr mda SEQ.yaml [--config FILE.cfg]   a useq MDA sequence, live SR per position/channel/z
    livesr train|finetune|evaluate|bench|export|engine|keys ...   (passed to their own modules)

The run commands only map flags onto :class:`realtime.config.PipelineConfig`; everything
else lives in :class:`realtime.pipeline.Pipeline`. Headless runs print a one-screen summary
and write ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from engines.registry import BACKEND_CHOICES

from .config import Addresses, PipelineConfig, SofiOptions, add_sofi_arguments

__all__ = ["build_parser", "config_from_args", "main"]

#: subcommand -> ("module", "function", what it does); the function gets the remaining argv
PASSTHROUGH: dict[str, tuple[str, str, str]] = {
    "train": ("engines.training", "main", "train a neural engine"),
    "finetune": ("engines.finetune", "main", "fine-tune a network on recordings of a fixed sample"),
    "evaluate": ("engines.evaluation", "main", "score engines against ground truth"),
    "bench": ("benchmarks.latency", "main", "latency / throughput benchmark"),
    "export": ("engines.onnx_export", "main", "export an engine to a compiled backend"),
    "engine": ("realtime.remote", "engine_main", "serve an engine for a remote pipeline"),
    "keys": ("realtime.security", "keys_main", "create CURVE keys for remote engines"),
}

DEMO_HEADLESS_SECONDS = 10.0


# ----------------------------------------------------------------------------- value checks


def _positive_int(name: str, minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v

    parse.__name__ = name
    return parse


def _float(name: str, *, positive: bool = False, nonneg: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {v:g}")
        if nonneg and v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v:g}")
        return v

    parse.__name__ = name
    return parse


def _crop(text: str) -> int | tuple[int, int, int, int]:
    """``N`` (centred N x N) or ``X,Y,W,H`` (camera ROI)."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop must be N or X,Y,W,H integers, got {text!r}") from None
    if len(vals) == 1:
        if vals[0] < 4:
            raise argparse.ArgumentTypeError(f"crop must be >= 4 pixels, got {vals[0]}")
        return vals[0]
    if len(vals) != 4 or vals[0] < 0 or vals[1] < 0 or vals[2] < 4 or vals[3] < 4:
        raise argparse.ArgumentTypeError(f"crop X,Y,W,H needs X,Y >= 0 and W,H >= 4, got {text!r}")
    return tuple(vals)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- parser


def _add_run_options(p: argparse.ArgumentParser, *, replay: bool = False) -> None:
    d = PipelineConfig()
    g = p.add_argument_group("run")
    g.add_argument("--headless", action="store_true", help="no GUI: run, print a summary, write --json")
    g.add_argument("--seconds", type=_float("seconds", nonneg=True), default=None,
                   help="acquisition time (headless default: %g s for the simulator, the whole movie "
                        "for a replay; GUI: until closed)" % DEMO_HEADLESS_SECONDS)
    g.add_argument("--size", type=_positive_int("size", 4), default=d.size,
                   help="simulated camera: image size in pixels (default %(default)s)")
    g.add_argument("--fps", type=_float("fps", positive=True), default=None,
                   help="frame rate (default: 100 for the simulator, the file's own rate for a replay)")
    g.add_argument("--exposure", type=_float("exposure", positive=True), default=None, metavar="MS",
                   help="camera exposure in ms")
    g.add_argument("--crop", type=_crop, default=None, help="camera ROI: N (centred N x N) or X,Y,W,H")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default=d.engine, help="sofi | convgru | convlstm (default %(default)s)")
    e.add_argument("--window", type=_positive_int("window", 2), default=None,
                   help="frames per output (default: the engine's, 20 for sofi)")
    e.add_argument("--stride", type=_positive_int("stride", 1), default=d.stride,
                   help="one output every K frames (default %(default)s)")
    e.add_argument("--backend", default=d.backend, metavar="NAME",
                   help=" | ".join(BACKEND_CHOICES) + " (default %(default)s; neural engines only)")
    e.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N | auto (default %(default)s)")
    e.add_argument("--precision", default=d.precision, choices=["fp32", "fp16", "bf16"])
    e.add_argument("--weights", default=None, help="weights file for a neural engine")
    e.add_argument("--threads", type=_positive_int("threads", 1), default=None,
                   help="engine compute threads (default: half the cores, 1-4)")
    e.add_argument("--worker", choices=["process", "thread"], default=d.worker_mode,
                   help="run the engine in its own process (default) or a thread")
    e.add_argument("--trust-window", type=_positive_int("trust-window", 10), default=d.trust_window,
                   metavar="N", help="a network's outputs are checked against SOFI of the last N frames "
                                     "(default %(default)s; see README: Can I trust the network?)")
    e.add_argument("--no-trust", dest="trust", action="store_false",
                   help="do not check a network's outputs (saves one streaming SOFI)")
    add_sofi_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--record", type=Path, default=None, metavar="PATH",
                   help="record every frame: PATH.ome.tif (OME-TIFF) or PATH.ome.zarr (OME-Zarr)")
    o.add_argument("--save-sr", type=Path, default=None, metavar="PATH",
                   help="save every super-resolved image (.ome.tif or .ome.zarr; half the pixel "
                        "size, source frame range of each image in the metadata)")
    o.add_argument("--on-recording-failure", choices=["stop", "continue"], default=d.recording_failure,
                   help="when the recording cannot be written (full disk): stop the run (default), "
                        "or continue without recording")
    o.add_argument("--overwrite", action="store_true", help="replace existing --record/--save-sr files")
    o.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the run's metrics as JSON")
    o.add_argument("--frames-addr", default=d.addresses.frames,
                   help="ZeroMQ endpoint this run binds for frames (default %(default)s: a free port)")
    o.add_argument("--results-addr", default=d.addresses.results,
                   help="ZeroMQ endpoint this run binds for results (default %(default)s: a free port)")
    o.add_argument("-v", "--verbose", action="store_true", help="log what the pipeline does")
    from .remote import add_remote_client_arguments  # --engine-at, --server-key, --client-key

    add_remote_client_arguments(p)
    if replay:
        lp = p.add_mutually_exclusive_group()
        lp.add_argument("--loop", dest="loop", action="store_true", help="loop the movie")
        lp.add_argument("--once", dest="loop", action="store_false", help="play the movie once (default)")
        p.set_defaults(loop=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livesr",
        description="Live super-resolution (SOFI, ConvGRU, streaming ConvLSTM) while a camera acquires.",
    )
    parser.add_argument("--version", action="version", version=f"livesr {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("demo", help="simulated blinking sample", description="Simulated camera -> live engine.")
    _add_run_options(p)
    p = sub.add_parser("replay", help="stream a recorded movie (TIFF) as a camera",
                       description="Replay a TIFF movie through the live pipeline.")
    p.add_argument("file", type=Path, help="TIFF movie (T, H, W)")
    _add_run_options(p, replay=True)
    p = sub.add_parser("live", help="a Micro-Manager camera", description="Live camera from a Micro-Manager .cfg.")
    p.add_argument("--config", dest="mm_config", type=Path, required=True, metavar="FILE.cfg",
                   help="Micro-Manager hardware configuration")
    _add_run_options(p)
    p = sub.add_parser("mda", help="run a useq MDA sequence with live SR",
                       description="Run a useq-schema MDA sequence (YAML/JSON, as `mmcore run`) and "
                                   "reconstruct every position/channel/z stream live.")
    p.add_argument("sequence", type=Path, metavar="SEQUENCE.yaml", help="useq-schema MDASequence file")
    p.add_argument("--config", dest="mm_config", type=Path, default=None, metavar="FILE.cfg",
                   help="Micro-Manager hardware configuration (default: the simulated camera)")
    _add_run_options(p)
    for name, (module, func, what) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{what} (see `livesr {name} --help`)", add_help=False)
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """Map parsed flags onto a PipelineConfig (raises ValueError for absurd combinations)."""
    mode, sequence = "live", None
    if args.command == "demo":
        source, fps = "sim", args.fps if args.fps is not None else 100.0
    elif args.command == "replay":
        source, fps = str(args.file), args.fps
    elif args.command == "mda":
        mode, sequence = "mda", args.sequence
        source = "sim" if args.mm_config is None else str(args.mm_config)
        fps = args.fps if args.fps is not None else (100.0 if source == "sim" else None)
    else:
        source, fps = str(args.mm_config), args.fps
    seconds = args.seconds
    loop = bool(getattr(args, "loop", False))
    if seconds is None and args.headless and args.command != "mda" and (
            args.command != "replay" or loop):
        seconds = DEMO_HEADLESS_SECONDS
    crop = roi = None
    if isinstance(args.crop, tuple):
        roi = args.crop
    elif args.crop is not None:
        crop = args.crop
    cfg = PipelineConfig(
        source=source, size=args.size, fps=fps, loop=loop, crop=crop, roi=roi,
        exposure_ms=args.exposure, seconds=seconds, engine=args.engine, window=args.window,
        stride=args.stride, backend=args.backend, device=args.device, precision=args.precision,
        weights=args.weights, worker_mode=args.worker, threads=args.threads, record=args.record,
        save_sr=args.save_sr, recording_failure=args.on_recording_failure, mode=mode,
        sequence=sequence, json=args.json, headless=args.headless, overwrite=args.overwrite,
        addresses=Addresses(frames=args.frames_addr, results=args.results_addr),
        engine_at=tuple(args.engine_at or ()), server_key=args.server_key,
        client_key=args.client_key, sofi=SofiOptions.from_args(args),
        trust=args.trust, trust_window=args.trust_window,
    )
    return cfg.validate()


# ----------------------------------------------------------------------------- commands


def _run_passthrough(command: str, argv: list[str]) -> int:
    module_name, func_name, _ = PASSTHROUGH[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name and module_name.startswith(e.name):
            why = f"{module_name} is missing"
        else:
            why = f"importing {module_name} failed: {type(e).__name__}: {e}"
        print(f"livesr {command}: not available in this install ({why})", file=sys.stderr)
        return 2
    func = getattr(module, func_name, None)
    if func is None:
        print(f"livesr {command}: not available ({module_name} has no {func_name}())", file=sys.stderr)
        return 2
    rc = func(argv)
    return int(rc) if isinstance(rc, (int, bool)) else 0


#: run in a fresh interpreter: can Qt open its platform (display) here? A stale DISPLAY makes
#: Qt abort the whole process (rc 134), so it is tried where an abort costs nothing
_QT_PROBE = "from qtpy import QtWidgets; QtWidgets.QApplication(['livesr-probe'])"


def _gui_problem() -> str | None:
    """Why a GUI cannot open here (None if it can)."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        return "no display (DISPLAY / WAYLAND_DISPLAY unset)"
    try:
        importlib.import_module("gui.app")
    except Exception as e:  # ImportError, or Qt failing to load its libraries
        return f"gui.app cannot be imported ({type(e).__name__}: {e})"
    import subprocess

    try:
        probe = subprocess.run([sys.executable, "-c", _QT_PROBE], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Qt could not be started ({type(e).__name__})"
    if probe.returncode != 0:
        lines = [ln.strip() for ln in probe.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "display" in ln.lower()), lines[0] if lines else "")
        where = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or "the display"
        return f"Qt cannot open {where} (exit code {probe.returncode}{': ' + why if why else ''})"
    return None


def _run_gui(cfg: PipelineConfig, seconds: float | None) -> int:
    from gui.app import run_gui  # type: ignore[import-not-found]

    return int(run_gui(cfg, seconds=seconds) or 0)


def _say(text: str, *, err: bool = False) -> None:
    """Print, but never fail: after SIGHUP the terminal may be gone (EIO) and the files matter."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def _run_headless(cfg: PipelineConfig) -> int:
    from .pipeline import Pipeline, PipelineError, RecordingExistsError

    pipe = Pipeline(cfg)
    pipe.error.connect(lambda msg: _say(f"livesr: {msg}", err=True))
    pipe.status.connect(lambda msg: _say(f"livesr: {msg}", err=True))
    pipe.warning.connect(lambda msg: _say(f"livesr: warning: {msg}", err=True))
    pipe.blinkingChecked.connect(lambda check: _say(f"livesr: blinking check: {check.get('message')}", err=True))
    try:
        pipe.start()
    except RecordingExistsError as e:
        _say(f"livesr: error: {e}; choose another name or pass --overwrite", err=True)
        return 1
    except PipelineError as e:
        _say(f"livesr: error: {e}", err=True)
        return 1
    stopping = _StopOnSignals()
    try:
        _wait_with_progress(pipe, cfg.seconds)
    except KeyboardInterrupt:
        _say(f"\nlivesr: {stopping.why}, stopping (the recording is being finished) ...", err=True)
    except OSError:  # the progress bar's terminal is gone (SIGHUP): finish the files anyway
        pass
    finally:
        stopping.hold()  # a second signal must not cut the recording short
        metrics = pipe.stop(wait=True)
        stopping.restore()
    if not pipe.wait_started(0) and metrics.frames_acquired == 0:
        return 1  # it never started: the reason was printed above
    _say(metrics.summary(errors=False))
    if cfg.json is not None and pipe.json_written is not None:
        _say(f"metrics written to {pipe.json_written}")
    recording_missing = False
    for rec in (pipe.recorder, pipe.sr_recorder):
        if rec is not None:
            ok = rec.error is None and rec.path.exists()
            _say(rec.summary_line() if ok else f"livesr: {rec.summary_line()}", err=not ok)
            recording_missing = recording_missing or not rec.path.exists()
    if recording_missing:
        return 1
    return 1 if metrics.errors else 0


class _StopOnSignals:
    """SIGTERM (``timeout``, ``kill``) and SIGHUP (terminal closed, ssh dropped) stop the run
    like Ctrl+C: the recording is finished and the JSON written."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self) -> None:
        self.why = "interrupted"
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.why = f"{signal.Signals(signum).name} received"
        raise KeyboardInterrupt

    def hold(self) -> None:
        """Ignore further signals while the run is being finished."""
        for sig in self._previous:
            signal.signal(sig, lambda *_: None)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def _wait_with_progress(pipe: Any, seconds: float | None) -> None:
    """Wait for the run, with a progress bar on an interactive terminal."""
    from tqdm import tqdm

    if not pipe.wait_started(None):  # the pipeline enforces the engine's ready timeout
        return
    t0 = time.monotonic()
    with tqdm(total=seconds, unit="s", disable=None, bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} s {postfix}"
              if seconds else "{desc} {n:.1f} s {postfix}") as bar:
        while not pipe.wait(0.5):
            elapsed = time.monotonic() - t0
            m = pipe.metrics()
            bar.n = min(elapsed, seconds) if seconds else elapsed
            bar.set_postfix_str(f"{m.frames_acquired} frames, {m.outputs} outputs")
            if seconds is not None and elapsed >= seconds:
                break


def _configure_logging(verbose: bool) -> None:
    try:  # pymmcore-plus sets the root logger to DEBUG when imported: import it first
        import pymmcore_plus  # noqa: F401
    except ImportError:
        pass
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return _run_passthrough(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    mm_log = logging.getLogger("pymmcore-plus")
    mm_log.propagate = False  # it has its own handler: one copy of each message
    if not args.verbose:
        # UniMMCore logs a harmless "no Micro-Manager installation" error for Python cameras;
        # for a .cfg the error livesr raises carries pymmcore-plus's reason (-v shows its log)
        mm_log.setLevel(logging.CRITICAL)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        _refuse(args.command, str(e))
    if args.command == "replay" and not args.file.is_file():
        _refuse(args.command, f"no such movie file: {args.file}")
    if args.command in ("live", "mda") and args.mm_config is not None and not args.mm_config.is_file():
        _refuse(args.command, f"no such Micro-Manager config: {args.mm_config}")
    if args.command == "mda":
        from .mda import load_sequence

        try:
            load_sequence(args.sequence)
        except ValueError as e:
            _refuse(args.command, str(e))
    if not cfg.headless:
        problem = _gui_problem()
        if problem is None:
            return _run_gui(cfg, args.seconds)
        print(f"livesr: GUI unavailable: {problem}; running headless", file=sys.stderr)
        cfg = cfg.replace(headless=True)
        if cfg.seconds is None and cfg.mode != "mda" and (cfg.source_kind != "replay" or cfg.loop):
            cfg = cfg.replace(seconds=DEMO_HEADLESS_SECONDS)
    return _run_headless(cfg)


def _refuse(command: str, message: str) -> None:
    """A run that cannot be started as asked: one line, exit code 2 (like argparse)."""
    _say(f"livesr {command}: error: {message}", err=True)
    raise SystemExit(2)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("livesr")
    except Exception:
        return "unknown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
