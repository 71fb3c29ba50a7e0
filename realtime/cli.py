"""``livesr`` command line: one Typer app, each command a function whose signature is its flags.

    livesr demo   [options]            simulated blinking sample (GUI if available)
    livesr replay FILE.tif [options]   stream a recorded movie as if it were a camera
    livesr live --config FILE.cfg      a real Micro-Manager camera
    livesr mda SEQ.yaml [--config FILE.cfg]   a useq MDA sequence, live SR per position/channel/z
    livesr train|finetune|evaluate|bench|export|engine|keys ...   (realtime/cli_tools.py)

The run commands only map flags onto :class:`realtime.config.PipelineConfig`, which decides
what is allowed (``validate``); everything else lives in :class:`realtime.pipeline.Pipeline`.
Headless runs print a one-screen summary and write ``--json``. Building the app imports
neither torch nor Qt: heavy imports stay inside the command bodies.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Sequence

import typer

try:  # typer >= 0.23 vendors click and does not re-export its exception base class
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import ClickException  # type: ignore[no-redef]

from engines.registry import BACKEND_CHOICES, PRECISIONS

from .cli_flags import crop_value, remote_flags, sofi_flags, uses
from .config import Addresses, PipelineConfig, SofiOptions

__all__ = ["DEMO_HEADLESS_SECONDS", "Refused", "app", "main", "parse_config", "run_app"]

DEMO_HEADLESS_SECONDS = 10.0

app = typer.Typer(
    name="livesr", rich_markup_mode="rich", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
    help="Live super-resolution (SOFI, ConvGRU, streaming ConvLSTM) while a camera acquires.",
)


class Refused(Exception):
    """A command that cannot run as asked: main() prints one line and exits 2."""


def _version(show: bool) -> None:
    if show:
        try:
            from importlib.metadata import version

            text = version("livesr")
        except Exception:
            text = "unknown"
        print(f"livesr {text}")
        raise typer.Exit()


@app.callback()
def _livesr(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Live super-resolution (SOFI, ConvGRU, streaming ConvLSTM) while a camera acquires."""


# ----------------------------------------------------------------------------- run flags

RUN, ENGINE, OUTPUT = "run", "engine", "output"


def run_flags(
    headless: Annotated[bool, typer.Option(
        "--headless", rich_help_panel=RUN, help="no GUI: run, print a summary, write --json")] = False,
    seconds: Annotated[float | None, typer.Option(
        rich_help_panel=RUN, help=f"acquisition time (headless default: {DEMO_HEADLESS_SECONDS:g} s for "
        "the simulator, the whole movie for a replay; GUI: until closed)")] = None,
    size: Annotated[int, typer.Option(
        rich_help_panel=RUN, help="simulated camera: image size in pixels")] = PipelineConfig.size,
    fps: Annotated[float | None, typer.Option(
        rich_help_panel=RUN,
        help="frame rate (default: 100 for the simulator, the file's own rate for a replay)")] = None,
    exposure: Annotated[float | None, typer.Option(
        metavar="MS", rich_help_panel=RUN, help="camera exposure in ms")] = None,
    crop: Annotated[str | None, typer.Option(
        parser=crop_value, metavar="N|X,Y,W,H", rich_help_panel=RUN,
        help="camera ROI: N (centred N x N) or X,Y,W,H")] = None,
    engine: Annotated[str, typer.Option(
        rich_help_panel=ENGINE, help="sofi | convgru | convlstm")] = PipelineConfig.engine,
    window: Annotated[int | None, typer.Option(
        rich_help_panel=ENGINE, help="frames per output (default: the engine's, 20 for sofi)")] = None,
    stride: Annotated[int, typer.Option(
        rich_help_panel=ENGINE, help="one output every K frames")] = PipelineConfig.stride,
    backend: Annotated[str, typer.Option(
        metavar="NAME", rich_help_panel=ENGINE,
        help=" | ".join(BACKEND_CHOICES) + " (neural engines only)")] = PipelineConfig.backend,
    device: Annotated[str, typer.Option(
        rich_help_panel=ENGINE, help="cpu | cuda | cuda:N | auto")] = PipelineConfig.device,
    precision: Annotated[str, typer.Option(
        rich_help_panel=ENGINE, help=" | ".join(PRECISIONS))] = PipelineConfig.precision,
    weights: Annotated[str | None, typer.Option(
        rich_help_panel=ENGINE, help="weights file for a neural engine")] = None,
    threads: Annotated[int | None, typer.Option(
        rich_help_panel=ENGINE, help="engine compute threads (default: half the cores, 1-4)")] = None,
    worker: Annotated[str, typer.Option(
        rich_help_panel=ENGINE,
        help="process | thread: run the engine in its own process or a thread")] = PipelineConfig.worker_mode,
    trust_window: Annotated[int, typer.Option(
        metavar="N", rich_help_panel=ENGINE,
        help="a network's outputs are checked against SOFI of the last N frames (see README: "
             "Can I trust the network?)")] = PipelineConfig.trust_window,
    no_trust: Annotated[bool, typer.Option(
        "--no-trust", rich_help_panel=ENGINE,
        help="do not check a network's outputs (saves one streaming SOFI)")] = False,
    record: Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel=OUTPUT,
        help="record every frame: PATH.ome.tif (OME-TIFF) or PATH.ome.zarr (OME-Zarr)")] = None,
    save_sr: Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel=OUTPUT,
        help="save every super-resolved image (.ome.tif or .ome.zarr; half the pixel size, source "
             "frame range of each image in the metadata)")] = None,
    on_recording_failure: Annotated[str, typer.Option(
        rich_help_panel=OUTPUT, help="stop | continue: when the recording cannot be written (full "
        "disk), stop the run, or continue without recording")] = PipelineConfig.recording_failure,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", rich_help_panel=OUTPUT, help="replace existing --record/--save-sr files")] = False,
    json: Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel=OUTPUT, help="write the run's metrics as JSON")] = None,
    frames_addr: Annotated[str, typer.Option(
        rich_help_panel=OUTPUT,
        help="ZeroMQ endpoint this run binds for frames (port 0: a free port)")] = Addresses.frames,
    results_addr: Annotated[str, typer.Option(
        rich_help_panel=OUTPUT,
        help="ZeroMQ endpoint this run binds for results (port 0: a free port)")] = Addresses.results,
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", rich_help_panel=OUTPUT, help="log what the pipeline does")] = False,
) -> dict[str, Any]:
    """The flags of every run command, as PipelineConfig fields (plus `verbose`)."""
    roi = crop if isinstance(crop, tuple) else None
    return dict(
        headless=headless, seconds=seconds, size=size, fps=fps, exposure_ms=exposure,
        crop=None if roi else crop, roi=roi, engine=engine, window=window, stride=stride,
        backend=backend, device=device, precision=precision, weights=weights, threads=threads,
        worker_mode=worker, trust_window=trust_window, trust=not no_trust, record=record,
        save_sr=save_sr, recording_failure=on_recording_failure, overwrite=overwrite, json=json,
        addresses=Addresses(frames=frames_addr, results=results_addr), verbose=verbose,
    )


def _pipeline_config(flags: dict[str, Any], sofi: SofiOptions, remote: dict[str, Any], *,
                     source: str, fps: float | None, ends_by_itself: bool = False, mode: str = "live",
                     sequence: Path | None = None, loop: bool = False) -> PipelineConfig:
    """The validated PipelineConfig of a run command (raises Refused with PipelineConfig's reasons).

    A headless run that would not end by itself (a camera, a looped movie) gets
    DEMO_HEADLESS_SECONDS unless --seconds says otherwise.
    """
    fields = {k: v for k, v in flags.items() if k != "verbose"}
    if fields["seconds"] is None and fields["headless"] and not ends_by_itself:
        fields["seconds"] = DEMO_HEADLESS_SECONDS
    fields.update(source=source, fps=fps, mode=mode, sequence=sequence, loop=loop, sofi=sofi, **remote)
    try:
        return PipelineConfig(**fields).validate()
    except ValueError as e:
        raise Refused(str(e)) from None


# ----------------------------------------------------------------------------- run commands

SIM_FPS = 100.0  # the simulated camera's rate unless --fps says otherwise


@app.command(rich_help_panel="run")
@uses(flags=run_flags, sofi=sofi_flags, remote=remote_flags)
def demo(*, flags: dict[str, Any], sofi: SofiOptions, remote: dict[str, Any]) -> int:
    """Simulated camera -> live engine."""
    fps = flags["fps"] if flags["fps"] is not None else SIM_FPS
    return _run(_pipeline_config(flags, sofi, remote, source="sim", fps=fps), flags["verbose"])


@app.command(rich_help_panel="run")
@uses(flags=run_flags, sofi=sofi_flags, remote=remote_flags)
def replay(
    file: Annotated[Path, typer.Argument(help="TIFF movie (T, H, W)", show_default=False)],
    *,
    loop: Annotated[bool, typer.Option("--loop", rich_help_panel=RUN, help="loop the movie")] = False,
    once: Annotated[bool, typer.Option("--once", rich_help_panel=RUN,
                                       help="play the movie once (the default)")] = False,
    flags: dict[str, Any], sofi: SofiOptions, remote: dict[str, Any],
) -> int:
    """Replay a TIFF movie through the live pipeline, as if it were a camera."""
    if loop and once:
        raise Refused("--once: not allowed with --loop")
    cfg = _pipeline_config(flags, sofi, remote, source=str(file), fps=flags["fps"], loop=loop,
                           ends_by_itself=not loop)
    return _run(cfg, flags["verbose"])


@app.command(rich_help_panel="run")
@uses(flags=run_flags, sofi=sofi_flags, remote=remote_flags)
def live(
    *,
    mm_config: Annotated[Path, typer.Option(
        "--config", metavar="FILE.cfg", rich_help_panel=RUN, show_default=False,
        help="Micro-Manager hardware configuration")],
    flags: dict[str, Any], sofi: SofiOptions, remote: dict[str, Any],
) -> int:
    """Live camera from a Micro-Manager .cfg."""
    return _run(_pipeline_config(flags, sofi, remote, source=str(mm_config), fps=flags["fps"]),
                flags["verbose"])


@app.command(rich_help_panel="run")
@uses(flags=run_flags, sofi=sofi_flags, remote=remote_flags)
def mda(
    sequence: Annotated[Path, typer.Argument(metavar="SEQUENCE.yaml", show_default=False,
                                             help="useq-schema MDASequence file")],
    *,
    mm_config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE.cfg", rich_help_panel=RUN,
        help="Micro-Manager hardware configuration (default: the simulated camera)")] = None,
    flags: dict[str, Any], sofi: SofiOptions, remote: dict[str, Any],
) -> int:
    """Run a useq-schema MDA sequence (YAML/JSON, as `mmcore run`) and reconstruct every
    position/channel/z stream live."""
    source = "sim" if mm_config is None else str(mm_config)
    fps = flags["fps"] if flags["fps"] is not None or mm_config is not None else SIM_FPS
    cfg = _pipeline_config(flags, sofi, remote, source=source, fps=fps, mode="mda", sequence=sequence,
                           ends_by_itself=True)
    return _run(cfg, flags["verbose"])


#: set by parse_config: the run commands hand their config over instead of running
_parsed: ContextVar[list[PipelineConfig] | None] = ContextVar("livesr_parsed", default=None)


def _run(cfg: PipelineConfig, verbose: bool) -> int:
    """Check that the inputs exist, then open the GUI where one can open, else run headless."""
    parsed = _parsed.get()
    if parsed is not None:
        parsed.append(cfg)
        return 0
    _configure_logging(verbose)
    if cfg.source_kind == "replay" and not Path(cfg.source).is_file():
        raise Refused(f"no such movie file: {cfg.source}")
    if cfg.source_kind == "mm" and not Path(cfg.source).is_file():
        raise Refused(f"no such Micro-Manager config: {cfg.source}")
    if cfg.sequence is not None:
        from .mda import load_sequence

        try:
            load_sequence(cfg.sequence)
        except ValueError as e:
            raise Refused(str(e)) from None
    if not cfg.headless:
        problem = _gui_problem()
        if problem is None:
            return _run_gui(cfg, cfg.seconds)
        print(f"livesr: GUI unavailable: {problem}; running headless", file=sys.stderr)
        cfg = cfg.replace(headless=True)
        if cfg.seconds is None and cfg.mode != "mda" and (cfg.source_kind != "replay" or cfg.loop):
            cfg = cfg.replace(seconds=DEMO_HEADLESS_SECONDS)
    return _run_headless(cfg)
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
    from gui.app import run_gui

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
    mm_log = logging.getLogger("pymmcore-plus")
    mm_log.propagate = False  # it has its own handler: one copy of each message
    if not verbose:
        # UniMMCore logs a harmless "no Micro-Manager installation" error for Python cameras;
        # for a .cfg the error livesr raises carries pymmcore-plus's reason (-v shows its log)
        mm_log.setLevel(logging.CRITICAL)



# ----------------------------------------------------------------------------- the other tools

from . import cli_tools  # noqa: E402  (its commands need `Refused` and the flag groups)

for _tool in cli_tools.COMMANDS:
    app.command(rich_help_panel="tools")(_tool)
for _name, _tool in cli_tools.HIDDEN.items():
    app.command(_name, hidden=True)(_tool)


# ----------------------------------------------------------------------------- entry points


def main(argv: Sequence[str] | None = None) -> int:
    """`livesr ARGV`: the command's exit code; a bad command line or a run that cannot start
    as asked is one ``livesr COMMAND: error: ...`` line on stderr and SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for (command, flag), mode in cli_tools.MODE_FLAGS.items():  # `bench --pipeline`: other flags
        if argv[:1] == [command] and flag in argv:
            argv = [mode, *(a for a in argv[1:] if a != flag)]
    return run_app(app, argv, "livesr")


def run_app(typer_app: typer.Typer, argv: Sequence[str], prog: str) -> int:
    """Run a Typer app as a function: its exit code; errors are one ``PROG CMD: error:`` line
    and SystemExit(2) (also for the small `python -m` tools that have a Typer app)."""
    argv = list(argv)
    try:
        rc = typer.main.get_command(typer_app).main(args=argv, prog_name=prog, standalone_mode=False)
    except cli_tools.ToolUnavailable as e:
        _say(str(e), err=True)
        return 2
    except Refused as e:
        _refuse(_command_path(prog, argv), str(e))
    except ClickException as e:
        ctx = getattr(e, "ctx", None)
        _refuse(ctx.command_path if ctx is not None else _command_path(prog, argv), e.format_message())
    except typer.Abort:
        return 1
    return int(rc) if isinstance(rc, (int, bool)) else 0


def parse_config(argv: Sequence[str]) -> PipelineConfig:
    """The validated PipelineConfig that `livesr ARGV` (a run command) would run, without
    running it or checking that its input files exist (errors as in :func:`main`)."""
    parsed: list[PipelineConfig] = []
    token = _parsed.set(parsed)
    try:
        main(argv)
    finally:
        _parsed.reset(token)
    if not parsed:
        raise SystemExit(2)  # --help, or not a run command
    return parsed[0]


def _command_path(prog: str, argv: Sequence[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), None) if prog == "livesr" else None
    return f"{prog} {command}" if command else prog


def _refuse(command_path: str, message: str) -> None:
    """A command that cannot run as asked: one line, exit code 2 (as a usage error)."""
    _say(f"{command_path}: error: {message}", err=True)
    raise SystemExit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
