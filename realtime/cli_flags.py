"""Flag groups that several ``livesr`` commands share, and the decorator that adds them.

A group is a function whose signature is its flags (``typer.Option`` with help) and whose
body builds the typed value the command wants (:class:`~realtime.config.SofiOptions`, ...).
``@uses(sofi=sofi_flags)`` splices the group's flags into the command's own signature, so
Typer sees one flat list of flags, and hands the command the built value. Values are only
parsed here (text -> number); what is allowed is decided once, by the config types.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

import typer

from .config import SofiOptions

__all__ = ["crop_value", "lag_value", "remote_flags", "sofi_flags", "uses"]

F = TypeVar("F", bound=Callable[..., Any])

SOFI_PANEL = "SOFI optics and corrections (see README: SOFI on your camera)"
REMOTE_PANEL = "remote engine"


def uses(**groups: Callable[..., Any]) -> Callable[[F], F]:
    """Add each group's flags to the decorated command; the command gets ``name=group(...)``."""

    def decorate(command: F) -> F:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items()
               if name not in groups]
        shared = {name: list(inspect.signature(group, eval_str=True).parameters.values())
                  for name, group in groups.items()}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group(**{p.name: kwargs.pop(p.name) for p in shared[name]})
            return command(**kwargs)

        params = own + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for ps in shared.values() for p in ps]
        params.sort(key=lambda p: p.kind)  # positional arguments first
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}  # evaluated: no name lookups
        del wrapper.__wrapped__  # Typer must read the spliced signature, not the command's
        return wrapper  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------------- parsers (text only)


def lag_value(text: str) -> int | str:
    """``auto`` or an integer (SofiOptions decides which integers are allowed)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"lag must be 'auto' or an integer >= 0, got {text!r}") from None


def crop_value(text: str) -> int | tuple[int, int, int, int]:
    """``N`` (centred N x N) or ``X,Y,W,H`` (camera ROI); PipelineConfig checks the sizes."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"crop must be N or X,Y,W,H integers, got {text!r}") from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) != 4:
        raise typer.BadParameter(f"crop X,Y,W,H needs 4 integers (or one N), got {text!r}")
    return (vals[0], vals[1], vals[2], vals[3])


# ----------------------------------------------------------------------------- groups


def sofi_flags(
    psf_fwhm_nm: Annotated[float | None, typer.Option(
        metavar="NM", rich_help_panel=SOFI_PANEL,
        help="PSF FWHM in the sample, if measured (else from --na/--wavelength-nm)")] = None,
    na: Annotated[float | None, typer.Option(
        rich_help_panel=SOFI_PANEL, help="objective NA (default 1.4)")] = None,
    wavelength_nm: Annotated[float | None, typer.Option(
        metavar="NM", rich_help_panel=SOFI_PANEL, help="emission wavelength (default 600)")] = None,
    pixel_size_um: Annotated[float | None, typer.Option(
        metavar="UM", rich_help_panel=SOFI_PANEL,
        help="camera pixel in the sample (default: what the camera/file reports, else 0.1)")] = None,
    lag: Annotated[str, typer.Option(
        parser=lag_value, metavar="{auto,0,1,2,...}", rich_help_panel=SOFI_PANEL,
        help="time lag of the cumulants in frames (auto: 1 if the camera correlates neighbouring "
             "pixels' noise)")] = SofiOptions.lag,  # type: ignore[assignment]
    bleach_order: Annotated[int, typer.Option(
        rich_help_panel=SOFI_PANEL, metavar="{1,2,3}",
        help="per-pixel polynomial trend removed in each window")] = SofiOptions.bleach_order,
    no_bleach_correction: Annotated[bool, typer.Option(
        "--no-bleach-correction", rich_help_panel=SOFI_PANEL,
        help="do not remove bleaching trends")] = False,
) -> SofiOptions:
    """The SOFI flags of every run command, `livesr engine` and `livesr finetune`."""
    return SofiOptions(psf_fwhm_nm=psf_fwhm_nm, na=na, wavelength_nm=wavelength_nm,
                       pixel_size_um=pixel_size_um, lag=lag,
                       bleach_order=0 if no_bleach_correction else bleach_order)


def remote_flags(
    engine_at: Annotated[list[str] | None, typer.Option(
        metavar="tcp://HOST:PORT", rich_help_panel=REMOTE_PANEL,
        help="stream frames to a `livesr engine` at this address instead of a local engine; "
             "repeat to share the stream between several engines")] = None,
    server_key: Annotated[Path | None, typer.Option(
        rich_help_panel=REMOTE_PANEL, help="the engine's public server.key (CURVE)")] = None,
    client_key: Annotated[Path | None, typer.Option(
        rich_help_panel=REMOTE_PANEL, help="this PC's .key_secret file (CURVE)")] = None,
) -> dict[str, Any]:
    """`--engine-at`, `--server-key`, `--client-key`: PipelineConfig's remote fields."""
    return {"engine_at": tuple(engine_at or ()), "server_key": server_key, "client_key": client_key}
