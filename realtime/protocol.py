"""Wire protocol between acquisition, engine worker and viewers (numpy + json + stdlib only).

One ZeroMQ multipart message is ``[header_json_bytes, pixel_buffer]`` (frames and results) or
``[header_json_bytes]`` (end-of-stream and stats). The header is a small versioned JSON object
so that any language can read it; the pixels travel as a raw buffer so that no copy or
pickling is needed on the hot path.

Every message coming off a socket is untrusted: :func:`decode` validates the version, kind,
every field's type, the shape, the dtype and the buffer length, and raises
:class:`ProtocolError` (and nothing else) for anything malformed. ``ProtocolError.reason``
is a short category ("json", "version", "kind", "field", "shape", "dtype", "length",
"parts") so that receivers can count malformed messages by kind.

Every message carries the ``stream`` id of the run it belongs to (a random 64-bit hex string
made by :func:`new_stream_id` when a run starts; "" = not tied to a run). Two runs on one
machine can end up on each other's sockets (a fixed port reused, a stale engine); a receiver
that knows its run's id counts a message of another stream as malformed with reason
``"foreign"`` (:data:`FOREIGN`) and drops it, so another run's image is never shown.

Note on zero-copy: :func:`decode` returns a *read-only* numpy view on the received buffer;
copy it if you need to write into it. :func:`encode_frame` / :func:`encode_result` return a
memoryview on the image: keep the image alive (zmq does, when sent with ``copy=False``).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field, fields
from typing import Any, Union

import numpy as np

__all__ = [
    "ALLOWED_DTYPES",
    "FOREIGN",
    "EndOfStream",
    "FrameHeader",
    "Header",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ReferenceHeader",
    "ResultHeader",
    "StatsMessage",
    "decode",
    "encode",
    "encode_eos",
    "encode_frame",
    "encode_reference",
    "encode_result",
    "encode_stats",
    "new_stream_id",
]

#: 2: every header carries ``stream``; stats carry ``window`` and may say "preparing"
PROTOCOL_VERSION = 2

#: ProtocolError-style reason under which receivers count messages of another run's stream
FOREIGN = "foreign"

#: states a StatsMessage may report: "preparing" (engine loaded, compiling / warming up for
#: the camera's frame size), "ready" (idle, waiting for frames), "running", "final"
STATS_STATES = ("preparing", "ready", "running", "final")


def new_stream_id() -> str:
    """A fresh per-run stream id: 16 hex digits (64 random bits)."""
    return secrets.token_hex(8)

#: Real-valued pixel types a camera or an engine may send. Byte order on the wire is
#: little-endian; complex, bool, object and string dtypes are rejected.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
    }
)

#: A header larger than this is garbage (real headers are a few hundred bytes).
MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A message that does not follow the livesr wire protocol.

    ``reason`` is a short category for counting: "parts", "json", "version", "kind",
    "field", "shape", "dtype", "length" (or "encode" when *we* were asked to send
    something inconsistent).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class FrameHeader:
    """One camera frame (kind "frame"), published by the acquisition thread."""

    seq: int  # 0-based, consecutive while a sequence runs
    t_acq_ns: int  # time.time_ns() when the frame was popped from the camera buffer
    shape: tuple[int, int]
    dtype: str = "uint16"
    camera: str = ""
    exposure_ms: float = 0.0
    pixel_size_um: float | None = None
    elapsed_ms: float | None = None  # camera's ElapsedTime-ms metadata, when present
    stream: str = ""  # the run's stream id (new_stream_id)
    # MDA stream (position/channel/z, e.g. "p0/c1/z0"; "" in live mode): seq counts frames
    # of one stream, and frames of different keys never share an engine window
    stream_key: str = ""

    kind = "frame"


@dataclass(frozen=True)
class ResultHeader:
    """One reconstructed image (kind "result"), published by the engine worker."""

    seq_first: int  # first input frame of the window the output was computed from
    seq_last: int  # newest input frame of that window
    t_acq_ns: int  # acquisition time of seq_last (for latency)
    shape: tuple[int, int]
    engine: str
    dtype: str = "float32"
    timings_ns: dict[str, int] = field(default_factory=dict)  # received/start/done/published
    frames_dropped: int = 0  # cumulative outputs skipped by the worker to keep up
    stream: str = ""  # stream id of the frames it was computed from
    stream_key: str = ""  # the stream the window came from (FrameHeader.stream_key)
    # what the engine used and how the data looked (flat: str -> str/int/float/bool/None), e.g.
    # SOFI's "psf_fwhm_px"/"psf_source"/"lag", and the live blinking check as "blinking_check.*"
    info: dict[str, Any] = field(default_factory=dict)

    kind = "result"


@dataclass(frozen=True)
class ReferenceHeader:
    """The image a learned engine's output is checked against (kind "reference"), published by
    the engine worker next to the results, at most a few times a second: the companion SOFI of
    the trust signal (``engines.trust``) over frames ``seq_first..seq_last``. Not a result: it
    never counts as an output; a viewer may show it next to the network's image."""

    seq_first: int
    seq_last: int
    shape: tuple[int, int]
    engine: str = "sofi"
    dtype: str = "float32"
    stream: str = ""
    stream_key: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # e.g. "trust.agreement"

    kind = "reference"


@dataclass(frozen=True)
class EndOfStream:
    """Sent by the frame publisher when it stops (kind "eos")."""

    frames_sent: int
    reason: str = "stopped"
    stream: str = ""

    kind = "eos"


@dataclass(frozen=True)
class StatsMessage:
    """Worker bookkeeping (kind "stats"), published periodically and once more at the end.

    Carries what cannot ride on a result: malformed-message counts, engine errors, and the
    final totals once the stream ended (``final=True``).
    """

    engine: str
    state: str = "running"  # one of STATS_STATES
    frames_received: int = 0
    outputs: int = 0
    frames_dropped: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    engine_errors: int = 0
    last_error: str = ""
    frames_sent: int | None = None  # from the EndOfStream, in the final message
    final: bool = False
    stream: str = ""  # the stream the worker serves ("" while it waits for one)
    window: int = 0  # frames the engine needs per output (0: not loaded yet)

    kind = "stats"


Header = Union[FrameHeader, ResultHeader, ReferenceHeader, EndOfStream, StatsMessage]

_KINDS: dict[str, type] = {
    "frame": FrameHeader,
    "result": ResultHeader,
    "reference": ReferenceHeader,
    "eos": EndOfStream,
    "stats": StatsMessage,
}
_HAS_BUFFER = {"frame": True, "result": True, "reference": True, "eos": False, "stats": False}


# ----------------------------------------------------------------------------- field checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_seq_range(seq_first: Any, seq_last: Any) -> tuple[int, int]:
    first, last = _check_int("seq_first", seq_first), _check_int("seq_last", seq_last)
    if last < first:
        raise ProtocolError("field", f"seq_last ({last}) < seq_first ({first})")
    return first, last


def _check_int(name: str, v: Any, minimum: int | None = 0) -> int:
    if not _is_int(v):
        raise ProtocolError("field", f"{name} must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ProtocolError("field", f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _check_number(name: str, v: Any, *, optional: bool = False, positive: bool = False) -> Any:
    if v is None and optional:
        return None
    if not _is_number(v):
        raise ProtocolError("field", f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ProtocolError("field", f"{name} must be > 0, got {v}")
    return float(v)


def _check_str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError("field", f"{name} must be a string, got {type(v).__name__}")
    return v


def _check_shape(v: Any) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ProtocolError("shape", f"shape must be a list of 2 ints, got {v!r}")
    if not all(_is_int(s) and s > 0 for s in v):
        raise ProtocolError("shape", f"shape entries must be positive ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def _check_dtype(v: Any) -> str:
    if not isinstance(v, str) or v not in ALLOWED_DTYPES:
        raise ProtocolError("dtype", f"dtype must be one of {sorted(ALLOWED_DTYPES)}, got {v!r}")
    return v


def _check_stream(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 32 or any(c not in "0123456789abcdef" for c in v):
        raise ProtocolError("field", f"stream must be a lowercase hex id of <= 32 digits, got {v!r}")
    return v


def _check_int_dict(name: str, v: Any) -> dict[str, int]:
    if not isinstance(v, dict):
        raise ProtocolError("field", f"{name} must be an object, got {type(v).__name__}")
    out = {}
    for k, x in v.items():
        out[_check_str(f"{name} key", k)] = _check_int(f"{name}[{k!r}]", x, minimum=0)
    return out


#: ``ResultHeader.info``: at most this many entries, keys and string values at most this long
MAX_INFO_ENTRIES = 64
MAX_INFO_TEXT = 512


def _check_info(v: Any) -> dict[str, Any]:
    """A flat dict of str -> str / int / finite float / bool / None (small: it rides on every result)."""
    if not isinstance(v, dict):
        raise ProtocolError("field", f"info must be an object, got {type(v).__name__}")
    if len(v) > MAX_INFO_ENTRIES:
        raise ProtocolError("field", f"info has {len(v)} entries, at most {MAX_INFO_ENTRIES} allowed")
    out: dict[str, Any] = {}
    for k, x in v.items():
        if not isinstance(k, str) or not k or len(k) > MAX_INFO_TEXT:
            raise ProtocolError("field", f"info keys must be non-empty strings, got {k!r}")
        if isinstance(x, str):
            if len(x) > MAX_INFO_TEXT:
                raise ProtocolError("field", f"info[{k!r}] is longer than {MAX_INFO_TEXT} characters")
        elif isinstance(x, float):
            if not math.isfinite(x):
                raise ProtocolError("field", f"info[{k!r}] must be finite, got {x!r}")
        elif x is not None and not isinstance(x, (bool, int)):
            raise ProtocolError("field", f"info[{k!r}] must be a string, number, bool or null, got {type(x).__name__}")
        out[k] = x
    return out


def _validate(h: Header) -> Header:
    """Check every field of a header; return it (normalised) or raise ProtocolError."""
    if isinstance(h, FrameHeader):
        return FrameHeader(
            seq=_check_int("seq", h.seq),
            t_acq_ns=_check_int("t_acq_ns", h.t_acq_ns),
            shape=_check_shape(h.shape),
            dtype=_check_dtype(h.dtype),
            camera=_check_str("camera", h.camera),
            exposure_ms=_check_number("exposure_ms", h.exposure_ms),
            pixel_size_um=_check_number("pixel_size_um", h.pixel_size_um, optional=True, positive=True),
            elapsed_ms=_check_number("elapsed_ms", h.elapsed_ms, optional=True),
            stream=_check_stream(h.stream),
            stream_key=_check_str("stream_key", h.stream_key),
        )
    if isinstance(h, ResultHeader):
        first, last = _check_seq_range(h.seq_first, h.seq_last)
        return ResultHeader(
            seq_first=first,
            seq_last=last,
            t_acq_ns=_check_int("t_acq_ns", h.t_acq_ns),
            shape=_check_shape(h.shape),
            engine=_check_str("engine", h.engine),
            dtype=_check_dtype(h.dtype),
            timings_ns=_check_int_dict("timings_ns", h.timings_ns),
            frames_dropped=_check_int("frames_dropped", h.frames_dropped),
            stream=_check_stream(h.stream),
            stream_key=_check_str("stream_key", h.stream_key),
            info=_check_info(h.info),
        )
    if isinstance(h, ReferenceHeader):
        first, last = _check_seq_range(h.seq_first, h.seq_last)
        return ReferenceHeader(
            seq_first=first, seq_last=last, shape=_check_shape(h.shape), engine=_check_str("engine", h.engine),
            dtype=_check_dtype(h.dtype), stream=_check_stream(h.stream),
            stream_key=_check_str("stream_key", h.stream_key), info=_check_info(h.info))
    if isinstance(h, EndOfStream):
        return EndOfStream(
            frames_sent=_check_int("frames_sent", h.frames_sent),
            reason=_check_str("reason", h.reason),
            stream=_check_stream(h.stream),
        )
    if isinstance(h, StatsMessage):
        if h.state not in STATS_STATES:
            raise ProtocolError("field", f"state must be one of {'/'.join(STATS_STATES)}, got {h.state!r}")
        if not isinstance(h.final, bool):
            raise ProtocolError("field", "final must be a bool")
        return StatsMessage(
            engine=_check_str("engine", h.engine),
            state=h.state,
            frames_received=_check_int("frames_received", h.frames_received),
            outputs=_check_int("outputs", h.outputs),
            frames_dropped=_check_int("frames_dropped", h.frames_dropped),
            malformed=_check_int_dict("malformed", h.malformed),
            engine_errors=_check_int("engine_errors", h.engine_errors),
            last_error=_check_str("last_error", h.last_error),
            frames_sent=None if h.frames_sent is None else _check_int("frames_sent", h.frames_sent),
            final=h.final,
            stream=_check_stream(h.stream),
            window=_check_int("window", h.window),
        )
    raise ProtocolError("kind", f"not a protocol header: {type(h).__name__}")


# ----------------------------------------------------------------------------- encode


def _header_bytes(h: Header) -> bytes:
    h = _validate(h)
    d: dict[str, Any] = {"version": PROTOCOL_VERSION, "kind": h.kind}
    for f in fields(h):
        v = getattr(h, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _pixel_buffer(h: FrameHeader | ResultHeader | ReferenceHeader, img: np.ndarray) -> memoryview:
    if not isinstance(img, np.ndarray):
        raise ProtocolError("encode", f"image must be a numpy array, got {type(img).__name__}")
    if tuple(img.shape) != tuple(h.shape):
        raise ProtocolError("encode", f"image shape {img.shape} != header shape {tuple(h.shape)}")
    if img.dtype.name != h.dtype:
        raise ProtocolError("encode", f"image dtype {img.dtype} != header dtype {h.dtype}")
    wire = np.dtype(h.dtype).newbyteorder("<")
    arr = np.ascontiguousarray(img, dtype=wire)  # no copy for native little-endian contiguous
    return memoryview(arr).cast("B")


def encode_frame(h: FrameHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for one camera frame; raises ProtocolError if they disagree."""
    if not isinstance(h, FrameHeader):
        raise ProtocolError("encode", "encode_frame needs a FrameHeader")
    return [_header_bytes(h), _pixel_buffer(h, img)]


def encode_result(h: ResultHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for one reconstructed image."""
    if not isinstance(h, ResultHeader):
        raise ProtocolError("encode", "encode_result needs a ResultHeader")
    return [_header_bytes(h), _pixel_buffer(h, img)]


def encode_reference(h: ReferenceHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for the image a learned engine's output was checked against."""
    if not isinstance(h, ReferenceHeader):
        raise ProtocolError("encode", "encode_reference needs a ReferenceHeader")
    return [_header_bytes(h), _pixel_buffer(h, img)]


def encode_eos(h: EndOfStream) -> list:
    """``[header]`` marking the end of a frame stream."""
    if not isinstance(h, EndOfStream):
        raise ProtocolError("encode", "encode_eos needs an EndOfStream")
    return [_header_bytes(h)]


def encode_stats(h: StatsMessage) -> list:
    """``[header]`` with worker statistics."""
    if not isinstance(h, StatsMessage):
        raise ProtocolError("encode", "encode_stats needs a StatsMessage")
    return [_header_bytes(h)]


def encode(h: Header, img: np.ndarray | None = None) -> list:
    """Encode any header (with its image for frames and results)."""
    if isinstance(h, FrameHeader):
        return encode_frame(h, img)  # type: ignore[arg-type]
    if isinstance(h, ResultHeader):
        return encode_result(h, img)  # type: ignore[arg-type]
    if isinstance(h, ReferenceHeader):
        return encode_reference(h, img)  # type: ignore[arg-type]
    if img is not None:
        raise ProtocolError("encode", f"a {type(h).__name__} carries no image")
    if isinstance(h, EndOfStream):
        return encode_eos(h)
    return encode_stats(h)  # raises for non-headers


# ----------------------------------------------------------------------------- decode


def _as_buffer(part: Any) -> memoryview:
    """bytes / bytearray / memoryview / zmq.Frame (duck-typed: no zmq import here)."""
    if isinstance(part, (bytes, bytearray)):
        return memoryview(part)
    if isinstance(part, memoryview):
        return part.cast("B") if part.format != "B" or part.ndim != 1 else part
    buf = getattr(part, "buffer", None)  # zmq.Frame
    if buf is not None:
        mv = memoryview(buf)
        return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    raise ProtocolError("parts", f"message part of type {type(part).__name__} is not a buffer")


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in JSON")


def _parse_header(raw: memoryview) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("json", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        text = bytes(raw).decode("utf-8")
        d = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError("json", f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise ProtocolError("json", f"header must be a JSON object, got {type(d).__name__}")
    return d


def decode(parts: list) -> tuple[Header, np.ndarray | None]:
    """Validate and decode one multipart message into ``(header, image_or_None)``.

    Raises :class:`ProtocolError` for anything malformed, and never any other exception.
    """
    try:
        return _decode(parts)
    except ProtocolError:
        raise
    except Exception as e:  # last line of defence: a receiver must never crash on input
        raise ProtocolError("field", f"undecodable message ({type(e).__name__}: {e})") from None


def _decode(parts: list) -> tuple[Header, np.ndarray | None]:
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ProtocolError("parts", "expected a non-empty list of message parts")
    d = _parse_header(_as_buffer(parts[0]))

    version = d.pop("version", None)
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    kind = d.pop("kind", None)
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ProtocolError("kind", f"unknown message kind {kind!r}")
    cls = _KINDS[kind]

    expected_parts = 2 if _HAS_BUFFER[kind] else 1
    if len(parts) != expected_parts:
        raise ProtocolError(
            "parts", f"a {kind!r} message has {expected_parts} part(s), got {len(parts)}"
        )

    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ProtocolError("field", f"unknown field(s) in {kind!r} header: {sorted(unknown)}")
    missing = {f.name for f in fields(cls) if f.name not in d and _required(f)}
    if missing:
        raise ProtocolError("field", f"missing field(s) in {kind!r} header: {sorted(missing)}")
    # shape/dtype get their own categories before generic field checks
    if "shape" in d:
        d["shape"] = _check_shape(d["shape"])
    if "dtype" in d:
        d["dtype"] = _check_dtype(d["dtype"])
    header = _validate(cls(**d))

    if not _HAS_BUFFER[kind]:
        return header, None
    buf = _as_buffer(parts[1])
    dt = np.dtype(header.dtype).newbyteorder("<")
    h, w = header.shape
    expected = h * w * dt.itemsize
    if len(buf) != expected:
        raise ProtocolError(
            "length",
            f"pixel buffer has {len(buf)} bytes, shape {header.shape} {header.dtype} needs {expected}",
        )
    img = np.frombuffer(buf, dtype=dt).reshape(header.shape)
    if not dt.isnative:
        img = img.astype(dt.newbyteorder("="))
    img.flags.writeable = False  # shares memory with the message: nobody may scribble on it
    return header, img


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING
