"""Wire protocol: every message round-trips, every malformed message is a ProtocolError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from realtime.protocol import (
    ALLOWED_DTYPES,
    PROTOCOL_VERSION,
    EndOfStream,
    EngineCounts,
    FrameHeader,
    ProtocolError,
    ResultHeader,
    StatsMessage,
    decode,
    encode_eos,
    encode_frame,
    encode_result,
    encode_stats,
)


def _frame_msg(img=None, **kw):
    img = np.arange(12, dtype=np.uint16).reshape(3, 4) if img is None else img
    h = FrameHeader(seq=kw.pop("seq", 7), t_acq_ns=123, shape=img.shape, dtype=img.dtype.name, **kw)
    return h, img, encode_frame(h, img)


def _header_dict(parts) -> dict:
    return json.loads(bytes(parts[0]))


def _with_header(parts, **changes) -> list:
    d = _header_dict(parts)
    d.update(changes)
    for k, v in list(d.items()):
        if v is _DELETE:
            del d[k]
    return [json.dumps(d).encode()] + list(parts[1:])


_DELETE = object()


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_frame_round_trip_every_allowed_dtype(dtype):
    img = (np.arange(20).reshape(4, 5) % 100).astype(dtype)
    h, _, parts = _frame_msg(img, camera="cam", exposure_ms=10.0, pixel_size_um=0.16, elapsed_ms=1.5)
    h2, img2 = decode(parts)
    assert h2 == h
    assert img2.dtype == img.dtype and np.array_equal(img2, img)


def test_decode_accepts_zmq_frames_zero_copy():
    h, img, parts = _frame_msg()
    frames = [zmq.Frame(bytes(p)) for p in parts]
    h2, img2 = decode(frames)
    assert h2 == h and np.array_equal(img2, img)
    assert not img2.flags.writeable  # a view on the received buffer


def test_result_round_trip():
    out = np.random.default_rng(0).random((6, 8), dtype=np.float32)
    h = ResultHeader(
        seq_first=0, seq_last=19, t_acq_ns=5, shape=(6, 8), engine="sofi",
        timings_ns={"received": 1, "start": 2, "done": 3, "published": 4}, outputs_skipped=2,
    )
    h2, out2 = decode(encode_result(h, out))
    assert h2 == h and np.array_equal(out2, out)


def test_eos_and_stats_round_trip():
    eos = EndOfStream(frames_sent=100, reason="source ended")
    assert decode(encode_eos(eos)) == (eos, None)
    st = StatsMessage(engine="sofi", counts=EngineCounts(frames_received=3, outputs=1, malformed={"json": 2}),
                      final=True, state="final", frames_sent=3)
    assert decode(encode_stats(st)) == (st, None)


def test_header_is_versioned_json():
    _, _, parts = _frame_msg()
    d = _header_dict(parts)
    assert d["version"] == PROTOCOL_VERSION and d["kind"] == "frame" and d["shape"] == [3, 4]


def test_encode_rejects_image_header_mismatch():
    img = np.zeros((3, 4), np.uint16)
    with pytest.raises(ProtocolError):
        encode_frame(FrameHeader(seq=0, t_acq_ns=0, shape=(4, 3), dtype="uint16"), img)
    with pytest.raises(ProtocolError):
        encode_frame(FrameHeader(seq=0, t_acq_ns=0, shape=(3, 4), dtype="float32"), img)
    with pytest.raises(ProtocolError):
        encode_frame(FrameHeader(seq=-1, t_acq_ns=0, shape=(3, 4)), img)


def test_non_contiguous_image_is_sent_correctly():
    img = np.arange(64, dtype=np.uint16).reshape(8, 8)[::2, ::2]
    h = FrameHeader(seq=0, t_acq_ns=0, shape=img.shape)
    _, img2 = decode(encode_frame(h, img))
    assert np.array_equal(img2, img)


# ------------------------------------------------------------------ malformed messages

_, _IMG, _GOOD = _frame_msg()

MALFORMED = {
    "empty list": ([], "parts"),
    "not a list": ("hello", "parts"),
    "non-utf8 header": ([b"\xff\xfe\x00garbage", bytes(_GOOD[1])], "json"),
    "garbage json": ([b"{not json", bytes(_GOOD[1])], "json"),
    "json array": ([b"[1,2,3]", bytes(_GOOD[1])], "json"),
    "NaN in json": ([b'{"version":1,"kind":"eos","frames_sent":NaN}'], "json"),
    "huge header": ([b" " * 70000 + b"{}"], "json"),
    "deeply nested json": ([b"[" * 50000 + b"]" * 50000], "json"),
    "missing version": (_with_header(_GOOD, version=_DELETE), "version"),
    "wrong version": (_with_header(_GOOD, version=PROTOCOL_VERSION + 1), "version"),
    "version 1 (no stream ids)": (_with_header(_GOOD, version=1), "version"),
    "version as string": (_with_header(_GOOD, version=str(PROTOCOL_VERSION)), "version"),
    "unknown kind": (_with_header(_GOOD, kind="pizza"), "kind"),
    "kind not a string": (_with_header(_GOOD, kind=3), "kind"),
    "too few parts": (_GOOD[:1], "parts"),
    "too many parts": (list(_GOOD) + [b"extra"], "parts"),
    "eos with a buffer": (encode_eos(EndOfStream(frames_sent=1)) + [b"x"], "parts"),
    "short buffer": ([_GOOD[0], bytes(_GOOD[1])[:-2]], "length"),
    "long buffer": ([_GOOD[0], bytes(_GOOD[1]) + b"\x00\x00"], "length"),
    "empty buffer": ([_GOOD[0], b""], "length"),
    "shape zero": (_with_header(_GOOD, shape=[0, 4]), "shape"),
    "shape negative": (_with_header(_GOOD, shape=[-3, -4]), "shape"),
    "shape 3d": (_with_header(_GOOD, shape=[1, 3, 4]), "shape"),
    "shape floats": (_with_header(_GOOD, shape=[3.0, 4.0]), "shape"),
    "shape string": (_with_header(_GOOD, shape="3x4"), "shape"),
    "shape bools": (_with_header(_GOOD, shape=[True, True]), "shape"),
    "dtype complex": (_with_header(_GOOD, dtype="complex64"), "dtype"),
    "dtype object": (_with_header(_GOOD, dtype="object"), "dtype"),
    "dtype bool": (_with_header(_GOOD, dtype="bool"), "dtype"),
    "dtype nonsense": (_with_header(_GOOD, dtype="<u2; rm -rf"), "dtype"),
    "dtype wrong size": (_with_header(_GOOD, dtype="uint32"), "length"),
    "seq string": (_with_header(_GOOD, seq="7"), "field"),
    "seq float": (_with_header(_GOOD, seq=7.5), "field"),
    "seq bool": (_with_header(_GOOD, seq=True), "field"),
    "seq negative": (_with_header(_GOOD, seq=-1), "field"),
    "missing seq": (_with_header(_GOOD, seq=_DELETE), "field"),
    "unknown field": (_with_header(_GOOD, evil=1), "field"),
    "exposure string": (_with_header(_GOOD, exposure_ms="10"), "field"),
    "pixel size zero": (_with_header(_GOOD, pixel_size_um=0), "field"),
    "camera number": (_with_header(_GOOD, camera=5), "field"),
    "bad part type": ([_GOOD[0], 12345], "parts"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_message_raises_protocol_error_only(name):
    parts, reason = MALFORMED[name]
    with pytest.raises(ProtocolError) as exc:
        decode(parts)
    assert exc.value.reason == reason, str(exc.value)
    assert str(exc.value)  # a readable message


def test_result_header_consistency_checked():
    h = ResultHeader(seq_first=0, seq_last=3, t_acq_ns=0, shape=(2, 2), engine="x")
    parts = encode_result(h, np.zeros((2, 2), np.float32))
    with pytest.raises(ProtocolError):
        decode(_with_header(parts, seq_first=5))  # seq_last < seq_first
    with pytest.raises(ProtocolError):
        decode(_with_header(parts, timings_ns={"start": "soon"}))
    with pytest.raises(ProtocolError):
        decode(_with_header(parts, timings_ns=[1, 2]))


def test_random_garbage_never_raises_anything_else():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(0, 4))
        parts = [rng.bytes(int(rng.integers(0, 64))) for _ in range(n)]
        with pytest.raises(ProtocolError):
            decode(parts)
    # mutate a valid header byte by byte
    raw = bytearray(_GOOD[0])
    for i in range(0, len(raw), 3):
        bad = bytearray(raw)
        bad[i] = (bad[i] + 1 + int(rng.integers(0, 200))) % 256
        try:
            decode([bytes(bad), bytes(_GOOD[1])])
        except ProtocolError:
            pass


# ----------------------------------------------------------------------------- ResultHeader.info
def test_result_info_round_trips_and_defaults_to_empty():
    img = np.zeros((2, 2), np.float32)
    plain = ResultHeader(seq_first=0, seq_last=3, t_acq_ns=0, shape=(2, 2), engine="x")
    assert decode(encode_result(plain, img))[0].info == {}
    info = {"psf_fwhm_px": 2.19, "psf_source": "default NA 1.4 / 600 nm", "lag": 1, "fit": None,
            "blinking_check.ok": False}
    h = ResultHeader(seq_first=0, seq_last=3, t_acq_ns=0, shape=(2, 2), engine="sofi", info=info)
    assert decode(encode_result(h, img))[0].info == info


@pytest.mark.parametrize("info, words", [
    ({"a": {"nested": 1}}, "must be a string, number, bool or null"),
    ({"a": [1, 2]}, "must be a string, number, bool or null"),
    ({"a": float("nan")}, "finite"),
    ({"a": "x" * 600}, "longer than"),
    ({"": 1}, "non-empty strings"),
    ({f"k{i}": i for i in range(65)}, "at most 64"),
    ([("a", 1)], "must be an object"),
])
def test_bad_result_info_is_a_protocol_error(info, words):
    h = ResultHeader(seq_first=0, seq_last=3, t_acq_ns=0, shape=(2, 2), engine="x", info=info)
    with pytest.raises(ProtocolError, match=words):
        encode_result(h, np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("info", [{"a": {"nested": 1}}, {"a": [1]}, "text", {"": 0}])
def test_received_bad_info_is_a_protocol_error(info):
    raw = json.dumps({"version": PROTOCOL_VERSION, "kind": "result", "seq_first": 0, "seq_last": 3, "t_acq_ns": 0,
                      "shape": [2, 2], "engine": "x", "dtype": "float32", "info": info}).encode()
    with pytest.raises(ProtocolError) as exc:
        decode([raw, np.zeros((2, 2), np.float32).tobytes()])
    assert exc.value.reason == "field"
