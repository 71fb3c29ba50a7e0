"""``livesr`` command line: run the live pipeline, or hand over to the other tools.

    livesr demo   [options]            simulated blinking sample (GUI if available)
    livesr replay FILE.tif [options]   stream a recorded movie as if it were a camera
    livesr live --config FILE.cfg      a real Micro-Manager camera
    livesr train|evaluate|bench|export|engine|keys ...   (passed to their own modules)

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

from .config import Addresses, PipelineConfig, SofiOptions, add_sofi_arguments

__all__ = ["build_parser", "config_from_args", "main"]

#: subcommand -> ("module", "function", what it does); the function gets the remaining argv
PASSTHROUGH: dict[str, tuple[str, str, str]] = {
    "train": ("engines.training", "main", "train a neural engine"),
    "evaluate": ("engines.evaluation", "main", "score engines against ground truth"),
    "bench": ("benchmarks.latency", "main", "latency / throughput benchmark"),
    "export": ("engines.backends", "export_main", "export an engine to a compiled backend"),
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
    e.add_argument("--backend", default=d.backend, help="eager | compiled | tensorrt | auto (default %(default)s)")
    e.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N | auto (default %(default)s)")
    e.add_argument("--precision", default=d.precision, choices=["fp32", "fp16", "bf16"])
    e.add_argument("--weights", default=None, help="weights file for a neural engine")
    e.add_argument("--threads", type=_positive_int("threads", 1), default=None,
                   help="engine compute threads (default: half the cores, 1-4)")
    e.add_argument("--worker", choices=["process", "thread"], default=d.worker_mode,
                   help="run the engine in its own process (default) or a thread")
    add_sofi_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--record", type=Path, default=None, metavar="PATH", help="record every frame to an OME-TIFF")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --record file")
    o.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the run's metrics as JSON")
    o.add_argument("--frames-addr", default=d.addresses.frames,
                   help="ZeroMQ endpoint for frames (default %(default)s; port 0 = any free port)")
    o.add_argument("--results-addr", default=d.addresses.results,
                   help="ZeroMQ endpoint for results (default %(default)s; port 0 = any free port)")
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
    for name, (module, func, what) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{what} (see `livesr {name} --help`)", add_help=False)
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """Map parsed flags onto a PipelineConfig (raises ValueError for absurd combinations)."""
    if args.command == "demo":
        source, fps = "sim", args.fps if args.fps is not None else 100.0
    elif args.command == "replay":
        source, fps = str(args.file), args.fps
    else:
        source, fps = str(args.mm_config), args.fps
    seconds = args.seconds
    loop = bool(getattr(args, "loop", False))
    if seconds is None and args.headless and (args.command != "replay" or loop):
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
        json=args.json, headless=args.headless, overwrite=args.overwrite,
        addresses=Addresses(frames=args.frames_addr, results=args.results_addr),
        engine_at=tuple(args.engine_at or ()), server_key=args.server_key,
        client_key=args.client_key, sofi=SofiOptions.from_args(args),
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
    return None


def _run_gui(cfg: PipelineConfig, seconds: float | None) -> int:
    from gui.app import run_gui  # type: ignore[import-not-found]

    return int(run_gui(cfg, seconds=seconds) or 0)


def _run_headless(cfg: PipelineConfig) -> int:
    from .pipeline import Pipeline, PipelineError

    pipe = Pipeline(cfg)
    pipe.error.connect(lambda msg: print(f"livesr: {msg}", file=sys.stderr))
    pipe.warning.connect(lambda msg: print(f"livesr: warning: {msg}", file=sys.stderr))
    pipe.blinkingChecked.connect(lambda check: print(f"livesr: blinking check: {check.get('message')}", file=sys.stderr))
    try:
        pipe.start()
    except PipelineError as e:
        print(f"livesr: error: {e}", file=sys.stderr)
        return 1
    previous = _interrupt_on_sigterm()
    try:
        _wait_with_progress(pipe, cfg.seconds)
    except KeyboardInterrupt:
        print("\nlivesr: interrupted, stopping (the recording is being finished) ...", file=sys.stderr)
    finally:
        metrics = pipe.stop(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(metrics.summary())
    if cfg.json is not None:
        print(f"metrics written to {cfg.json}")
    if cfg.record is not None:
        print(f"recording written to {cfg.record}")
    return 1 if metrics.errors else 0


def _interrupt_on_sigterm() -> Any:
    """Treat SIGTERM (``timeout``, ``kill``) like Ctrl+C: stop cleanly, finish the recording."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _wait_with_progress(pipe: Any, seconds: float | None) -> None:
    """Wait for the run, with a progress bar on an interactive terminal."""
    from tqdm import tqdm

    if not pipe.wait_started(pipe.config.engine_ready_timeout_s + 30.0):
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
    if not args.verbose and args.command != "live":
        # UniMMCore logs a harmless "no Micro-Manager installation" error for Python cameras
        logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "replay" and not args.file.is_file():
        parser.error(f"no such movie file: {args.file}")
    if args.command == "live" and not args.mm_config.is_file():
        parser.error(f"no such Micro-Manager config: {args.mm_config}")
    if not cfg.headless:
        problem = _gui_problem()
        if problem is None:
            return _run_gui(cfg, args.seconds)
        print(f"livesr: GUI unavailable: {problem}; running headless", file=sys.stderr)
        cfg = cfg.replace(headless=True)
        if cfg.seconds is None and (cfg.source_kind != "replay" or cfg.loop):
            cfg = cfg.replace(seconds=DEMO_HEADLESS_SECONDS)
    return _run_headless(cfg)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("livesr")
    except Exception:
        return "unknown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
