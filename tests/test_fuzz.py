"""Hostile input: >= 10,000 malformed messages at a live worker, corrupt TIFFs, absurd values.

The worker must stay up, count every bad message under the reason `decode` gives it, and
still turn good frames into outputs afterwards (and in between).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq

from realtime.config import PipelineConfig, free_tcp_address
from realtime.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    FrameHeader,
    ProtocolError,
    ResultHeader,
    StatsMessage,
    decode,
    encode_frame,
    encode_result,
    encode_stats,
)
from realtime.worker import EngineWorker
from conftest import StackOnlyMeanEngine

SHAPE = (16, 16)
WINDOW = 4


MeanEngine = StackOnlyMeanEngine  # reconstruct-only, window 4: no torch start-up in spawned engines


def _header(**fields) -> bytes:
    d = {
        "version": PROTOCOL_VERSION,
        "kind": "frame",
        "seq": 0,
        "t_acq_ns": 1,
        "shape": list(SHAPE),
        "dtype": "uint16",
    }
    d.update(fields)
    return json.dumps(d).encode()


GOOD_PIXELS = np.zeros(SHAPE, np.uint16).tobytes()


def _bad_messages(rng: random.Random, n: int) -> list[tuple[list[bytes], str]]:
    """`n` malformed messages, each with the reason `decode` must give it.

    Random, truncated, oversized and wrong-typed messages, plus well-formed messages of a
    kind that has no business on the frame socket (results, stats).
    """
    npx = len(GOOD_PIXELS)
    good_result = encode_result(
        ResultHeader(seq_first=0, seq_last=3, t_acq_ns=1, shape=(2, 2), engine="x"),
        np.zeros((2, 2), np.float32),
    )
    good_stats = encode_stats(StatsMessage(engine="x"))
    makers = [
        # random bytes, one part (never a JSON object: first byte is not '{')
        (lambda: [bytes([rng.randrange(0x80, 256)]) + rng.randbytes(rng.randrange(0, 200))], "json"),
        (lambda: [b""], "json"),
        (lambda: [b"\xff\xfe" + rng.randbytes(10), GOOD_PIXELS], "json"),  # not UTF-8
        (lambda: [b"[1, 2, 3]", GOOD_PIXELS], "json"),  # JSON, but not an object
        (lambda: [b'{"seq": NaN}', GOOD_PIXELS], "json"),
        # truncated: a valid header cut short
        (lambda: [_header()[: rng.randrange(1, len(_header()) - 1)], GOOD_PIXELS], "json"),
        # wrong version / kind
        (lambda: [_header(version=rng.choice([0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION),
                                                None, float(PROTOCOL_VERSION)])), GOOD_PIXELS], "version"),
        (lambda: [_header(kind=rng.choice(["frames", "", None, 7, "FRAME"])), GOOD_PIXELS], "kind"),
        # wrong number of parts
        (lambda: [_header()], "parts"),
        (lambda: [_header(), GOOD_PIXELS, b"extra"], "parts"),
        # wrong types / values
        (lambda: [_header(seq=rng.choice(["0", 1.5, None, True, [], -1])), GOOD_PIXELS], "field"),
        (lambda: [_header(t_acq_ns=rng.choice(["now", -5, 2.0])), GOOD_PIXELS], "field"),
        (lambda: [_header(exposure_ms="long"), GOOD_PIXELS], "field"),
        (lambda: [_header(pixel_size_um=-0.1), GOOD_PIXELS], "field"),
        (lambda: [_header(surprise=1), GOOD_PIXELS], "field"),
        (lambda: [json.dumps({"version": PROTOCOL_VERSION, "kind": "frame", "seq": 0}).encode(), GOOD_PIXELS], "field"),
        (lambda: [_header(shape=rng.choice([[16], [16, 16, 1], [0, 16], [-16, 16], "16x16", None, [16.0, 16]])), GOOD_PIXELS], "shape"),
        (lambda: [_header(dtype=rng.choice(["complex64", "object", "<U4", "bool", "uint12", 5])), GOOD_PIXELS], "dtype"),
        # buffer does not match the header: truncated, oversized, absurd shape
        (lambda: [_header(), GOOD_PIXELS[: rng.randrange(0, npx)]], "length"),
        (lambda: [_header(), GOOD_PIXELS + rng.randbytes(rng.randrange(1, 64))], "length"),
        (lambda: [_header(shape=[100_000, 100_000]), GOOD_PIXELS], "length"),
        # a well-formed message of the wrong kind on the frame socket
        (lambda: [bytes(p) for p in good_result], "unexpected_kind"),
        (lambda: [bytes(p) for p in good_stats], "unexpected_kind"),
    ]
    # big ones are few (each costs real bandwidth), the rest at random
    nested = b"[" * 100_000 + b"]" * 100_000
    huge_header = b"{" + b" " * (MAX_HEADER_BYTES + 1) + b"}"
    huge_pixels = b"\0" * (4 * 2**20)  # 4 MiB for a 512-byte frame
    rare = [
        ([nested], "json"),  # deeply nested JSON
        ([huge_header, GOOD_PIXELS], "json"),  # oversized header
        ([_header(), huge_pixels], "length"),  # oversized pixel buffer
    ]
    out = [rare[i % len(rare)] for i in range(30)]
    for i in range(n - len(out)):
        make, reason = makers[i] if i < len(makers) else rng.choice(makers)
        out.append((make(), reason))
    rng.shuffle(out)
    return out


def _expected_reason(parts: list[bytes]) -> str:
    """What the receiving worker will count this message as."""
    try:
        header, _ = decode(parts)
    except ProtocolError as e:
        return e.reason
    assert not isinstance(header, FrameHeader), "the fuzzer produced a valid frame"
    return "unexpected_kind"


def _frame(seq: int, value: int) -> list:
    img = np.full(SHAPE, value, np.uint16)
    return encode_frame(FrameHeader(seq=seq, t_acq_ns=time.time_ns(), shape=SHAPE), img)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_worker_survives_10k_malformed_messages_and_counts_each(tmp_path):
    rng = random.Random(1234)
    bad = _bad_messages(rng, 10_000)
    expected = Counter(reason for _, reason in bad)
    # the labels above must be what the protocol itself says (keeps the test honest)
    for parts, reason in bad:
        assert _expected_reason(parts) == reason, (reason, parts[0][:80])
    assert sum(expected.values()) == 10_000 and len(expected) >= 8

    frames_addr, results_addr = free_tcp_address(), free_tcp_address()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.bind(frames_addr)
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(results_addr)
    worker = EngineWorker(MeanEngine(), frames_addr, results_addr, exit_on_eos=False)
    worker.run_in_thread()
    try:
        assert worker.wait_ready(10)
        t0 = time.perf_counter()
        # good frames interleaved with the garbage: windows must not notice the garbage
        good_before = 8
        for i, (parts, _) in enumerate(bad):
            if i % (len(bad) // good_before) == 0:
                push.send_multipart(_frame(i // (len(bad) // good_before), 10))
            push.send_multipart(parts)
        sent_s = time.perf_counter() - t0
        assert _wait(lambda: sum(worker.stats.malformed.values()) >= 10_000, 30), worker.stats
        assert worker.is_alive(), "the worker died on malformed input"
        assert dict(worker.stats.malformed) == dict(expected)
        assert worker.stats.frames_received == good_before

        # afterwards: good frames still become outputs, with the right pixels
        for seq in range(good_before, good_before + 12):
            push.send_multipart(_frame(seq, seq))
            time.sleep(0.005)
        assert _wait(lambda: worker.stats.frames_received == good_before + 12, 10)
        results = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not results or results[-1][0].seq_last < good_before + 11):
            if sub.poll(100):
                h, img = decode(sub.recv_multipart())
                if isinstance(h, ResultHeader):
                    results.append((h, img.copy()))
        assert results, "no outputs after the fuzzing"
        h, img = results[-1]
        assert h.seq_last == good_before + 11 and h.seq_first == h.seq_last - WINDOW + 1
        # mean of the last WINDOW frames, whose pixels all equal their seq numbers
        assert np.allclose(img, np.mean(range(h.seq_first, h.seq_last + 1)))
        assert worker.stats.engine_errors == 0
        assert dict(worker.stats.malformed) == dict(expected), "good frames were miscounted"
        print(f"fuzz: 10000 bad messages sent in {sent_s:.2f} s; counts {dict(expected)}")
    finally:
        worker.stop()
        worker.join(5)
        push.close()
        sub.close()
        ctx.term()


# ------------------------------------------------------------------------ corrupt files
def _valid_tiff(path: Path, n: int = 6) -> bytes:
    import tifffile

    data = np.random.default_rng(0).integers(100, 2000, (n, 16, 16), dtype=np.uint16)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX"})
    return path.read_bytes()


def test_corrupt_tiffs_get_a_clear_error_never_a_crash(tmp_path):
    cameras = pytest.importorskip("acquisition.cameras")
    good = _valid_tiff(tmp_path / "good.tif")
    rng = random.Random(7)
    outcomes = Counter()
    for i in range(60):
        p = tmp_path / f"bad{i}.tif"
        if i % 3 == 0:  # truncated anywhere
            p.write_bytes(good[: rng.randrange(0, len(good))])
        elif i % 3 == 1:  # bytes flipped anywhere (header included)
            b = bytearray(good)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(0, len(b))] = rng.randrange(256)
            p.write_bytes(bytes(b))
        else:  # not a TIFF at all
            p.write_bytes(rng.randbytes(rng.randrange(0, 4096)))
        try:
            stack = cameras.load_replay_stack(p)
        except cameras.ReplayFileError as e:
            assert str(p) in str(e) and e.problem, "the message must name the file and the problem"
            outcomes["refused"] += 1
        else:  # a flipped pixel value is still a valid movie
            assert stack is not None
            outcomes["loaded"] += 1
    assert outcomes["refused"] >= 20, outcomes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": 0}, "size must be an integer >= 4"),
        ({"size": 2.5}, "size must be an integer >= 4"),
        ({"fps": -5.0}, "fps must be > 0"),
        ({"fps": float("nan")}, "fps must be > 0"),
        ({"fps": 1e9}, "fps must be > 0"),
        ({"seconds": -1.0}, "seconds must be >= 0"),
        ({"window": 1}, "window must be an integer >= 2"),
        ({"stride": 0}, "stride must be an integer >= 1"),
        ({"worker_mode": "fork-bomb"}, "worker_mode must be"),
    ],
)
def test_absurd_config_values_are_refused_clearly(changes, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**changes).validate()
