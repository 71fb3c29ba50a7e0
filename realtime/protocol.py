"""Wire protocol between acquisition, engine worker and viewers (msgspec + numpy + stdlib only).

One ZeroMQ multipart message is ``[header_json_bytes, pixel_buffer]`` (frames and results) or
``[header_json_bytes]`` (end-of-stream and stats). The header is a small versioned JSON object
so that any language can read it; the pixels travel as a raw buffer so that no copy or
pickling is needed on the hot path.

Each header kind is a frozen ``msgspec.Struct``: a tagged union on ``kind``, unknown fields
forbidden, every field typed with its constraints (``Count`` >= 0, ``Shape`` of two positive
ints, ``Dtype`` from a fixed list, ...). The types *are* the validation: :func:`decode` lets
msgspec check the header and maps its errors to :class:`ProtocolError` (and nothing else).
``ProtocolError.reason`` is a short category ("json", "version", "kind", "field", "shape",
"dtype", "length", "parts") so that receivers can count malformed messages by kind. The
encoders check what they send with the same types, so a receiver never sees what we refused.

Two ids, never mixed up: ``run_id`` is the run a message belongs to (a random 64-bit hex
string made by :func:`new_run_id` when a run starts; "" = not tied to a run), ``stream`` is
the MDA stream within the run (position/channel/z, e.g. "p0/c1/z0"; "" in live mode). Two
runs on one machine can end up on each other's sockets (a fixed port reused, a stale engine);
a receiver that knows its run's id counts a message of another run as malformed with reason
``"foreign"`` (:data:`FOREIGN`) and drops it, so another run's image is never shown.

The engine's counters travel as one :class:`EngineCounts` (inside every :class:`StatsMessage`):
the worker keeps one, the remote client and the pipeline add them up over engines and
restarts with ``+``, and the run's metrics hold the total.

Note on zero-copy: :func:`decode` returns a *read-only* numpy view on the received buffer;
copy it if you need to write into it. :func:`encode_frame` / :func:`encode_result` return a
memoryview on the image: keep the image alive (zmq does, when sent with ``copy=False``).
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import msgspec
import numpy as np

from engines.registry import REFERENCE_ENGINE  # torch-free

__all__ = [
    "ALLOWED_DTYPES",
    "FOREIGN",
    "EndOfStream",
    "EngineCounts",
    "FrameHeader",
    "Header",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ReferenceHeader",
    "ResultHeader",
    "StatsMessage",
    "decode",
    "encode_eos",
    "encode_frame",
    "encode_reference",
    "encode_result",
    "encode_stats",
    "new_run_id",
]

#: 2: every header carries its run; stats carry ``window`` and may say "preparing".
#: 3: ``stream`` -> ``run_id`` and ``stream_key`` -> ``stream``; stats carry ``counts``
#: (EngineCounts); ``frames_dropped`` of results and stats -> ``outputs_skipped``
PROTOCOL_VERSION = 3

#: ProtocolError-style reason under which receivers count messages of another run
FOREIGN = "foreign"

#: A header larger than this is garbage (real headers are a few hundred bytes).
MAX_HEADER_BYTES = 64 * 1024

#: ``ResultHeader.info``: at most this many entries, keys and string values at most this long
MAX_INFO_ENTRIES = 64
MAX_INFO_TEXT = 512


def new_run_id() -> str:
    """A fresh run id: 16 hex digits (64 random bits)."""
    return secrets.token_hex(8)


class ProtocolError(ValueError):
    """A message that does not follow the livesr wire protocol.

    ``reason`` is a short category for counting: "parts", "json", "version", "kind",
    "field", "shape", "dtype", "length" (or "encode" when *we* were asked to send
    something inconsistent).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ----------------------------------------------------------------------------- field types

#: Real-valued pixel types a camera or an engine may send. Byte order on the wire is
#: little-endian; complex, bool, object and string dtypes are rejected.
Dtype = Literal["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                "float16", "float32", "float64"]
ALLOWED_DTYPES: frozenset[str] = frozenset(get_args(Dtype))

#: states a StatsMessage may report: "preparing" (engine loaded, compiling / warming up for
#: the camera's frame size), "ready" (idle, waiting for frames), "running", "final"
StatsState = Literal["preparing", "ready", "running", "final"]
STATS_STATES: tuple[str, ...] = get_args(StatsState)

_MAX_FLOAT = sys.float_info.max
Count = Annotated[int, msgspec.Meta(ge=0)]
Shape = tuple[Annotated[int, msgspec.Meta(gt=0)], Annotated[int, msgspec.Meta(gt=0)]]
#: finite (the bounds also refuse NaN, which JSON would otherwise carry as null)
Finite = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
Positive = Annotated[float, msgspec.Meta(gt=0, le=_MAX_FLOAT)]
RunId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{0,32}$")]
InfoValue = Union[Annotated[str, msgspec.Meta(max_length=MAX_INFO_TEXT)], bool, int, Finite, None]
#: what an engine used and how the data looked: flat and small (it rides on every result)
Info = Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INFO_TEXT)], InfoValue],
                 msgspec.Meta(max_length=MAX_INFO_ENTRIES)]


# ----------------------------------------------------------------------------- headers


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    """Fields every header has; ``kind`` (the tag) says which header it is."""

    kind: ClassVar[str]
    version: int = PROTOCOL_VERSION


def _check_seq_range(seq_first: int, seq_last: int) -> None:
    if seq_last < seq_first:  # (msgspec reports it as a ValidationError while decoding)
        raise ProtocolError("field", f"seq_last ({seq_last}) < seq_first ({seq_first})")


class FrameHeader(_Message, tag="frame", frozen=True):
    """One camera frame (kind "frame"), published by the acquisition thread."""

    kind: ClassVar[str] = "frame"
    seq: Count  # 0-based, consecutive while a sequence runs
    t_acq_ns: Count  # time.time_ns() when the frame was popped from the camera buffer
    shape: Shape
    dtype: Dtype = "uint16"
    camera: str = ""
    exposure_ms: Finite = 0.0
    pixel_size_um: Positive | None = None
    elapsed_ms: Finite | None = None  # camera's ElapsedTime-ms metadata, when present
    run_id: RunId = ""  # the run's id (new_run_id)
    # MDA stream (position/channel/z, e.g. "p0/c1/z0"; "" in live mode): seq counts frames
    # of one stream, and frames of different streams never share an engine window
    stream: str = ""


class ResultHeader(_Message, tag="result", frozen=True):
    """One reconstructed image (kind "result"), published by the engine worker."""

    kind: ClassVar[str] = "result"
    seq_first: Count  # first input frame of the window the output was computed from
    seq_last: Count  # newest input frame of that window
    t_acq_ns: Count  # acquisition time of seq_last (for latency)
    shape: Shape
    engine: str
    dtype: Dtype = "float32"
    timings_ns: dict[str, Count] = {}  # received/start/done/published
    outputs_skipped: Count = 0  # cumulative outputs skipped by the worker to keep up
    run_id: RunId = ""  # the run of the frames it was computed from
    stream: str = ""  # the MDA stream the window came from (FrameHeader.stream)
    # what the engine used and how the data looked (flat: str -> str/int/float/bool/None), e.g.
    # SOFI's "psf_fwhm_px"/"psf_source"/"lag", and the live blinking check as "blinking_check.*"
    info: Info = {}

    def __post_init__(self) -> None:
        _check_seq_range(self.seq_first, self.seq_last)


class ReferenceHeader(_Message, tag="reference", frozen=True):
    """The image a learned engine's output is checked against (kind "reference"), published by
    the engine worker next to the results, at most a few times a second: the companion SOFI of
    the trust signal (``engines.trust``) over frames ``seq_first..seq_last``. Not a result: it
    never counts as an output; a viewer may show it next to the network's image."""

    kind: ClassVar[str] = "reference"
    seq_first: Count
    seq_last: Count
    shape: Shape
    engine: str = REFERENCE_ENGINE
    dtype: Dtype = "float32"
    run_id: RunId = ""
    stream: str = ""
    info: Info = {}  # e.g. "trust.agreement"

    def __post_init__(self) -> None:
        _check_seq_range(self.seq_first, self.seq_last)


class EndOfStream(_Message, tag="eos", frozen=True):
    """Sent by the frame publisher when it stops (kind "eos")."""

    kind: ClassVar[str] = "eos"
    frames_sent: Count
    reason: str = "stopped"
    run_id: RunId = ""


class EngineCounts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an engine worker counted (totals since it started); ``a + b`` adds two up.

    The worker keeps one and sends it in every :class:`StatsMessage`; the remote client adds
    up its engines' (and their restarted processes') with :meth:`total`; the pipeline keeps
    the total of a run's engine processes and puts it in the run's metrics.
    """

    frames_received: Count = 0
    outputs: Count = 0
    outputs_skipped: Count = 0  # outputs that were due but skipped so the engine could keep up
    malformed: dict[str, Count] = {}  # by ProtocolError.reason
    engine_errors: Count = 0
    last_error: str = ""  # the newest engine error

    def __add__(self, other: EngineCounts) -> EngineCounts:
        return EngineCounts(**{f: _plus(getattr(self, f), getattr(other, f)) for f in self.__struct_fields__})

    def __neg__(self) -> EngineCounts:
        return EngineCounts(**{f: _minus(getattr(self, f)) for f in self.__struct_fields__})

    def __sub__(self, other: EngineCounts) -> EngineCounts:
        return self + -other

    @classmethod
    def total(cls, counts: Iterable[EngineCounts]) -> EngineCounts:
        """The sum of several engines' (or engine processes') counts."""
        return sum(counts, cls())


def _plus(a: Any, b: Any) -> Any:
    if isinstance(a, dict):  # malformed: by reason
        return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
    if isinstance(a, str):  # last_error: the newer one
        return b or a
    return a + b


def _minus(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: -v for k, v in a.items()}
    return a if isinstance(a, str) else -a


class StatsMessage(_Message, tag="stats", frozen=True):
    """Worker bookkeeping (kind "stats"), published periodically and once more at the end.

    Carries what cannot ride on a result: the worker's counts (malformed messages, engine
    errors, ...), and the final totals once the stream ended (``final=True``).
    """

    kind: ClassVar[str] = "stats"
    engine: str
    state: StatsState = "running"
    counts: EngineCounts = msgspec.field(default_factory=EngineCounts)
    frames_sent: Count | None = None  # from the EndOfStream, in the final message
    final: bool = False
    run_id: RunId = ""  # the run the worker serves ("" while it waits for one)
    window: Count = 0  # frames the engine needs per output (0: not loaded yet)


Header = Union[FrameHeader, ResultHeader, ReferenceHeader, EndOfStream, StatsMessage]
ImageHeader = Union[FrameHeader, ResultHeader, ReferenceHeader]

_KINDS: dict[str, type[_Message]] = {c.kind: c for c in get_args(Header)}
_IMAGE_KINDS = frozenset(c.kind for c in get_args(ImageHeader))


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, float):  # numpy.float64 is a float: send it as one
        return float(obj)
    raise NotImplementedError(f"{type(obj).__name__} is not a wire type")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {k: msgspec.json.Decoder(c) for k, c in _KINDS.items()}


class _Envelope(msgspec.Struct):
    """The two fields read first (other fields skipped): a header is then decoded as its kind,
    and a message of another version or an unknown kind is counted as such whatever else it holds."""

    version: Any = None
    kind: Any = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


# ----------------------------------------------------------------------------- errors

#: msgspec's words -> ours, for ``info`` (the one free-form field, where users see them)
_INFO_WORDS = (
    ("at `key`", f"info keys must be non-empty strings of at most {MAX_INFO_TEXT} characters"),
    (f"of length <= {MAX_INFO_ENTRIES} - at `$.info`", f"info has more than {MAX_INFO_ENTRIES} entries, "
                                                       f"at most {MAX_INFO_ENTRIES} allowed"),
    ("Expected `object`", "info must be an object"),
    ("of length <= ", f"an info value is longer than {MAX_INFO_TEXT} characters"),
    ("a finite `float`", "info values must be finite"),
    ("Number out of range", "info values must be finite"),
    ("", "info values must be a string, number, bool or null"),
)
_FINITE = re.compile(r"`float` [<>]=? -?" + re.escape(repr(_MAX_FLOAT)))  # our NaN/inf bound
_PATH = re.compile(r"`(\$[^`]*)`$")  # msgspec ends its message with the JSON path: "... - at `$.shape[0]`"


def _protocol_error(e: msgspec.ValidationError, kind: str) -> ProtocolError:
    """The reason (by the field msgspec names) and a readable message for a rejected header."""
    text = _FINITE.sub("a finite `float`", str(e))
    m = _PATH.search(text)
    path = m.group(1) if m else "$"
    if path.startswith("$.shape"):
        return ProtocolError("shape", f"{kind} header: shape must be 2 positive ints ({text})")
    if path == "$.dtype":
        return ProtocolError("dtype", f"{kind} header: dtype must be one of {sorted(ALLOWED_DTYPES)} ({text})")
    if path.startswith("$.info"):
        words = next(w for key, w in _INFO_WORDS if key in text)
        return ProtocolError("field", f"{kind} header: {words} ({text})")
    return ProtocolError("field", f"{kind} header: {text}")


def _parts_error(kind: str, n_parts: int) -> ProtocolError | None:
    expected = 2 if kind in _IMAGE_KINDS else 1
    if n_parts != expected:
        return ProtocolError("parts", f"a {kind!r} message has {expected} part(s), got {n_parts}")
    return None


# ----------------------------------------------------------------------------- encode


def _header_bytes(h: Header) -> bytes:
    """The JSON of a header, checked against its type first (what a receiver will check)."""
    try:
        msgspec.convert(msgspec.to_builtins(h, enc_hook=_enc_hook), type(h))
        return _ENCODER.encode(h)
    except msgspec.ValidationError as e:
        raise _protocol_error(e, h.kind) from None
    except (TypeError, NotImplementedError) as e:
        raise ProtocolError("field", f"{h.kind} header: {e}") from None


def _pixel_buffer(h: ImageHeader, img: np.ndarray) -> memoryview:
    if not isinstance(img, np.ndarray):
        raise ProtocolError("encode", f"image must be a numpy array, got {type(img).__name__}")
    if tuple(img.shape) != tuple(h.shape):
        raise ProtocolError("encode", f"image shape {img.shape} != header shape {tuple(h.shape)}")
    if img.dtype.name != h.dtype:
        raise ProtocolError("encode", f"image dtype {img.dtype} != header dtype {h.dtype}")
    wire = np.dtype(h.dtype).newbyteorder("<")
    arr = np.ascontiguousarray(img, dtype=wire)  # no copy for native little-endian contiguous
    return arr.data.cast("B")


def _encode(cls: type[_Message], h: Header, img: np.ndarray | None = None) -> list:
    if not isinstance(h, cls):
        raise ProtocolError("encode", f"encode_{cls.kind} needs a {cls.__name__}")
    if img is None:
        return [_header_bytes(h)]
    return [_header_bytes(h), _pixel_buffer(h, img)]  # type: ignore[arg-type]


def encode_frame(h: FrameHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for one camera frame; raises ProtocolError if they disagree."""
    return _encode(FrameHeader, h, img)


def encode_result(h: ResultHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for one reconstructed image."""
    return _encode(ResultHeader, h, img)


def encode_reference(h: ReferenceHeader, img: np.ndarray) -> list:
    """``[header, pixels]`` for the image a learned engine's output was checked against."""
    return _encode(ReferenceHeader, h, img)


def encode_eos(h: EndOfStream) -> list:
    """``[header]`` marking the end of a frame stream."""
    return _encode(EndOfStream, h)


def encode_stats(h: StatsMessage) -> list:
    """``[header]`` with worker statistics."""
    return _encode(StatsMessage, h)


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
    raw = _as_buffer(parts[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("json", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        env = _ENVELOPE.decode(raw)
    except msgspec.ValidationError:
        raise ProtocolError("json", "header must be a JSON object") from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise ProtocolError("json", f"header is not UTF-8 JSON ({e})") from None
    version, kind = env.version, env.kind
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ProtocolError("kind", f"unknown message kind {kind!r}")
    parts_error = _parts_error(kind, len(parts))
    if parts_error is not None:
        raise parts_error
    try:
        header = _DECODERS[kind].decode(raw)
    except msgspec.ValidationError as e:
        raise _protocol_error(e, kind) from None
    if header.kind not in _IMAGE_KINDS:
        return header, None
    return header, _image(header, _as_buffer(parts[1]))


def _image(header: ImageHeader, buf: memoryview) -> np.ndarray:
    """A read-only view on the pixel buffer (it must hold exactly the header's shape)."""
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
    return img
