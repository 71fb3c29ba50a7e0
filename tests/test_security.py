"""CURVE keys, allow-list authentication and the bind policy, on real loopback sockets."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import zmq

from realtime.security import (
    AllowList,
    CurveClient,
    CurveServer,
    SecurityError,
    check_bind_allowed,
    create_keypair,
    find_secret_file,
    is_loopback_endpoint,
    keys_main,
    load_public_key,
    load_secret_pair,
)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """Server pair, an allowed client pair (public key in allow/), a stranger's pair."""
    create_keypair(tmp_path / "server", "server")
    create_keypair(tmp_path / "alice", "alice")
    create_keypair(tmp_path / "mallory", "mallory")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(tmp_path / "alice" / "alice.key", allow)
    return {
        "server_secret": tmp_path / "server" / "server.key_secret",
        "server_public": tmp_path / "server" / "server.key",
        "alice": tmp_path / "alice" / "alice.key_secret",
        "mallory": tmp_path / "mallory" / "mallory.key_secret",
        "mallory_public": tmp_path / "mallory" / "mallory.key",
        "allow": allow,
    }


def _client(ctx: zmq.Context, setup, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.linger = 0
    s.immediate = True  # only hand messages to peers that completed the handshake
    if setup is not None:
        setup(s)
    s.connect(addr)
    return s


def _try_send(sock: zmq.Socket, payload: bytes, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            time.sleep(0.01)
    return False


# ------------------------------------------------------------------------ key files
def test_keys_cli_makes_a_pair_and_refuses_to_overwrite(tmp_path, capsys):
    assert keys_main(["--out", str(tmp_path), "--name", "scope1"]) == 0
    pub, sec = tmp_path / "scope1.key", tmp_path / "scope1.key_secret"
    assert pub.is_file() and sec.is_file()
    assert (sec.stat().st_mode & 0o077) == 0, "secret key must not be readable by others"
    public = load_public_key(pub)
    p2, s2 = load_secret_pair(sec)
    assert public == p2 and len(s2) == 40
    assert "scope1.key" in capsys.readouterr().out

    # a second run must not silently replace the secret everyone trusts
    assert keys_main(["--out", str(tmp_path), "--name", "scope1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_public_key(pub) == public

    assert keys_main(["--out", str(tmp_path), "--name", "../evil"]) == 2
    assert "plain file name" in capsys.readouterr().err


def test_bad_key_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.key"
    junk.write_text("this is not a certificate\n")
    with pytest.raises(SecurityError, match="no valid|not a ZeroMQ"):
        load_public_key(junk)
    with pytest.raises(SecurityError, match="not found"):
        load_public_key(tmp_path / "missing.key")
    create_keypair(tmp_path, "a")
    with pytest.raises(SecurityError, match="public .key file"):
        load_secret_pair(tmp_path / "a.key")
    create_keypair(tmp_path, "b")
    with pytest.raises(SecurityError, match="exactly one"):
        find_secret_file(tmp_path)
    assert find_secret_file(tmp_path, "b").name == "b.key_secret"


# ---------------------------------------------------------------------- bind policy
@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/livesr-frames", True),
        ("inproc://frames", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://no-such-host.invalid:5555", False),
    ],
)
def test_loopback_detection(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_non_loopback_bind_without_keys_is_refused():
    with pytest.raises(SecurityError, match="refusing to bind tcp://0.0.0.0:5555 without CURVE"):
        check_bind_allowed("tcp://0.0.0.0:5555", curve=False)
    check_bind_allowed("tcp://0.0.0.0:5555", curve=True)
    check_bind_allowed("tcp://127.0.0.1:5555", curve=False)


# ------------------------------------------------------------------------ CURVE link
def test_curve_accepts_allowed_key_and_refuses_unknown_key(keys, caplog):
    caplog.set_level(logging.INFO, logger="livesr.security")
    ctx = zmq.Context()
    server = CurveServer(keys["server_secret"], keys["allow"])
    srv = ctx.socket(zmq.PULL)
    srv.linger = 0
    server.setup(srv)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"
    cctx = zmq.Context()
    try:
        stranger = _client(
            cctx, CurveClient.from_files(keys["mallory"], keys["server_public"]), addr
        )
        plaintext = _client(cctx, None, addr)  # no encryption at all
        # neither can hand over a message: the handshake never completes
        assert not _try_send(stranger, b"evil", 0.5)
        assert not _try_send(plaintext, b"evil", 0.1)
        assert srv.poll(200) == 0, "an unauthenticated client delivered a message"
        assert server.stats.refused >= 1
        assert server.stats.accepted == 0
        assert server.stats.last_refused_address == "127.0.0.1"
        mallory_key = load_public_key(keys["mallory_public"]).decode()
        assert server.stats.last_refused_key == mallory_key
        refusals = [r for r in caplog.records if "REFUSED" in r.getMessage()]
        assert refusals and mallory_key in refusals[0].getMessage()
        assert refusals[0].levelno == logging.WARNING

        alice = _client(cctx, CurveClient.from_files(keys["alice"], keys["server_public"]), addr)
        assert _try_send(alice, b"frame", 2.0)
        assert srv.poll(2000) == zmq.POLLIN
        assert srv.recv() == b"frame"
        assert server.stats.accepted == 1
        assert srv.poll(100) == 0, "the stranger's message must never arrive"
        for s in (stranger, plaintext, alice):
            s.close()
    finally:
        srv.close()
        server.close()
        ctx.term()
        cctx.term()


def test_client_pins_the_server_key(keys, tmp_path):
    """A machine with another server key cannot pose as the engine."""
    create_keypair(tmp_path / "fake", "server")
    ctx = zmq.Context()
    impostor = CurveServer(tmp_path / "fake" / "server.key_secret", keys["allow"])
    srv = ctx.socket(zmq.PULL)
    srv.linger = 0
    impostor.setup(srv)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    cctx = zmq.Context()
    try:
        alice = _client(
            cctx,
            CurveClient.from_files(keys["alice"], keys["server_public"]),
            f"tcp://127.0.0.1:{port}",
        )
        assert not _try_send(alice, b"secret frame", 0.5)
        assert srv.poll(100) == 0
        alice.close()
    finally:
        srv.close()
        impostor.close()
        ctx.term()
        cctx.term()


def test_allow_list_picks_up_new_keys_while_running(keys):
    allow = AllowList(keys["allow"])
    mallory = load_public_key(keys["mallory_public"])
    assert mallory not in allow and len(allow) == 1
    shutil.copy(keys["mallory_public"], keys["allow"])
    assert mallory in allow and len(allow) == 2
    (keys["allow"] / "mallory.key").unlink()
    assert mallory not in allow


def test_allow_list_directory_must_exist(tmp_path):
    with pytest.raises(SecurityError, match="allow-list directory not found"):
        AllowList(tmp_path / "nope")


def test_pipeline_refuses_to_expose_its_sockets_without_keys():
    from realtime.config import Addresses, PipelineConfig
    from realtime.pipeline import Pipeline, PipelineError

    cfg = PipelineConfig(addresses=Addresses(frames="tcp://0.0.0.0:0", results="tcp://127.0.0.1:0"))
    with pytest.raises(PipelineError, match=r"refusing to bind tcp://0\.0\.0\.0:\d+ without CURVE"):
        Pipeline(cfg).start()
