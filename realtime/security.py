"""CURVE encryption and client allow-lists for engines reached over a network.

A microscope PC streams raw camera frames to a GPU machine; anyone who can reach that
port could otherwise read the frames or inject their own. ZeroMQ CURVE encrypts the
link and authenticates both ends with key pairs; a ZAP handler
(`zmq.auth.thread.ThreadAuthenticator`) accepts only clients whose public key sits in an
allow-list directory, and logs every refusal so an operator can see who was turned away.

Key files are the ones `zmq.auth.create_certificates` writes: ``NAME.key`` (public, safe
to copy) and ``NAME.key_secret`` (keep private). `livesr keys` makes them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket as _socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("livesr.security")

#: ZAP domain the engine's server sockets use; the authenticator answers only for it.
ZAP_DOMAIN = "livesr"

SocketSetup = Callable[[zmq.Socket], None]


class SecurityError(ValueError):
    """A key file, allow-list or bind address that cannot be used safely."""


# --------------------------------------------------------------------------- key files
def create_keypair(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` + ``NAME.key_secret`` into `out_dir`; refuse to overwrite.

    Overwriting a secret key would silently lock out every peer that trusts the old one.
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SecurityError(f"key name {name!r} must be a plain file name (no slashes)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise SecurityError(f"{p} already exists; choose another --name or --out")
    pub, sec = zmq.auth.create_certificates(str(out), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def load_public_key(path: str | os.PathLike) -> bytes:
    """Z85 public key from a ``.key`` or ``.key_secret`` file, with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"key file not found: {p}")
    try:
        public, _ = zmq.auth.load_certificate(str(p))
    except Exception as e:  # zmq raises ValueError/OSError with terse messages
        raise SecurityError(f"{p} is not a ZeroMQ certificate file: {e}") from e
    if not public or len(public) != 40:
        raise SecurityError(f"{p} holds no valid 40-character Z85 public key")
    return public


def load_secret_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"secret key file not found: {p}")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except Exception as e:
        raise SecurityError(f"{p} is not a ZeroMQ certificate file: {e}") from e
    if not secret:
        raise SecurityError(
            f"{p} holds no secret key (you passed a public .key file; use the .key_secret)"
        )
    return public, secret


def _find_key_file(keys: str | os.PathLike, suffix: str, what: str, name: str | None) -> Path:
    """Resolve `keys`: a key file itself, or a directory holding `name`+suffix or exactly one."""
    p = Path(keys)
    if p.is_file():
        return p
    if not p.is_dir():
        raise SecurityError(f"{what} path not found: {p}")
    if name is not None:
        f = p / f"{name}{suffix}"
        if not f.is_file():
            raise SecurityError(f"no {f.name} in {p}")
        return f
    found = sorted(p.glob(f"*{suffix}"))
    if len(found) != 1:
        names = ", ".join(f.name for f in found) or "none"
        raise SecurityError(
            f"{p} must hold exactly one *{suffix} file (found: {names}); pass the file itself instead"
        )
    return found[0]


def find_secret_file(keys: str | os.PathLike, name: str | None = None) -> Path:
    """Resolve `keys` (a ``.key_secret`` file, or a directory holding exactly one)."""
    return _find_key_file(keys, ".key_secret", "keys", name)


def find_public_file(keys: str | os.PathLike, name: str | None = None) -> Path:
    """Resolve a public ``.key`` file (or a directory holding exactly one)."""
    return _find_key_file(keys, ".key", "public key", name)


# ----------------------------------------------------------------------- bind policy
def is_loopback_endpoint(endpoint: str) -> bool:
    """True when only this machine can reach `endpoint` (ipc, inproc, 127/8, ::1)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith(("tcp://", "ws://", "wss://")):
        return False
    host = urlsplit(endpoint).hostname
    if host is None:  # tcp://*:5555 -> hostname None
        return False
    host = host.strip("[]")
    if host in ("*", "0.0.0.0", "::", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a host name: every address it resolves to must be loopback
    try:
        infos = _socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind_allowed(endpoint: str, *, curve: bool, hint: str | None = None) -> None:
    """Refuse to expose an unencrypted socket beyond this machine.

    Raw frames are research data and the engine accepts anything that parses; on a
    shared network neither should be open to whoever finds the port.
    """
    if curve or is_loopback_endpoint(endpoint):
        return
    if hint is None:
        hint = (
            "Make keys with `livesr keys --out DIR --name server` (and one pair per client), "
            f"then run `livesr engine --bind {endpoint} --keys DIR --allow CLIENT_KEYS_DIR`; "
            "or bind 127.0.0.1 and tunnel (ssh -L)."
        )
    raise SecurityError(
        f"refusing to bind {endpoint} without CURVE keys: the address is reachable from "
        f"other machines. {hint}"
    )


# ----------------------------------------------------------------- allow-list + ZAP
class AllowList:
    """Public keys of accepted clients, re-read when the directory changes.

    Re-reading means an operator can add a client by copying its ``.key`` into the
    directory while the engine runs, and remove one by deleting the file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SecurityError(f"allow-list directory not found: {self.directory}")
        self._stamp: tuple | None = None
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()
        self.refresh()
        if not self._keys:
            log.warning(
                "allow-list %s holds no *.key files: every client will be refused",
                self.directory,
            )

    def _current_stamp(self) -> tuple:
        files = sorted(self.directory.glob("*.key"))
        return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)

    def refresh(self) -> set[bytes]:
        with self._lock:
            try:
                stamp = self._current_stamp()
            except OSError as e:
                log.error("cannot read allow-list %s: %s", self.directory, e)
                return self._keys
            if stamp != self._stamp:
                keys: set[bytes] = set()
                for f in sorted(self.directory.glob("*.key")):
                    try:
                        keys.add(load_public_key(f))
                    except SecurityError as e:
                        log.error("allow-list: skipping %s", e)
                self._keys, self._stamp = keys, stamp
            return self._keys

    def __contains__(self, z85_key: bytes) -> bool:
        return z85_key in self.refresh()

    def __len__(self) -> int:
        return len(self.refresh())


@dataclass
class AuthStats:
    """Counts of ZAP decisions, so tests and the CLI can show what happened."""

    accepted: int = 0
    refused: int = 0
    last_refused_address: str = ""
    last_refused_key: str = ""


class AllowListAuthenticator(ThreadAuthenticator):
    """ThreadAuthenticator that checks CURVE clients against an `AllowList`.

    Refusals are logged at WARNING (pyzmq logs them at DEBUG only) with the peer's
    address and key, and counted in `stats`; `on_refused(address, key)` is called too.
    """

    #: seconds between repeated refusal log lines for the same client
    log_every_s: float = 30.0

    def __init__(
        self,
        context: zmq.Context,
        allow: AllowList,
        *,
        domain: str = ZAP_DOMAIN,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        super().__init__(context=context, log=logging.getLogger("livesr.security.zap"))
        self.allow_list = allow
        self.domain = domain
        self.stats = AuthStats()
        self.on_refused = on_refused
        self._address = ""
        self._refusals: dict[tuple[str, str], tuple[float | None, int]] = {}

    # the public hook pyzmq offers: an object with callback(domain, key) -> bool
    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allow_list
        k = key.decode("ascii", "replace")
        if ok:
            self.stats.accepted += 1
            log.info("engine: accepted client key %s from %s", k, self._address or "?")
        else:
            self.stats.refused += 1
            self.stats.last_refused_address = self._address
            self.stats.last_refused_key = k
            # a refused client retries several times a second: log each (address, key)
            # once, then at most every `log_every_s` with the count in between
            now = time.monotonic()
            who = (self._address, k)
            last, count = self._refusals.get(who, (None, 0))
            count += 1
            if last is None or now - last >= self.log_every_s:
                log.warning(
                    "engine: REFUSED client from %s: public key %s is not in %s%s",
                    self._address or "?",
                    k,
                    self.allow_list.directory,
                    f" ({count} attempts)" if count > 1 else "",
                )
                self._refusals[who] = (now, 0)
            else:
                self._refusals[who] = (last, count)
            if self.on_refused is not None:
                try:
                    self.on_refused(self._address, k)
                except Exception:  # a reporting hook must not break authentication
                    log.exception("on_refused hook failed")
        return ok

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # remember the peer address for the log line (the callback API omits it)
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        mechanism = msg[5] if len(msg) > 5 else b""
        if mechanism != b"CURVE":
            # a plaintext (NULL) client hitting a CURVE socket never reaches ZAP, but a
            # PLAIN one could: refuse anything that is not CURVE explicitly
            self.stats.refused += 1
            log.warning(
                "engine: REFUSED %s client from %s (CURVE required)",
                mechanism.decode("ascii", "replace") or "unknown",
                self._address or "?",
            )
            if len(msg) > 1:
                self._send_zap_reply(msg[1], b"400", b"CURVE required")
            return
        await super().handle_zap_message(msg)

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain=self.domain, credentials_provider=self)


# ------------------------------------------------------------- socket configurators
class CurveServer:
    """Socket setup for the engine's bound sockets: CURVE server + allow-list ZAP.

    One authenticator serves one zmq.Context; `setup(sock)` starts it the first time it
    sees a socket of that context (the ZAP endpoint is per context). Call `close()` before
    terminating the context, or the authenticator's sockets keep it open.
    """

    def __init__(
        self,
        secret_file: str | os.PathLike,
        allow_dir: str | os.PathLike,
        *,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        self.public, self.secret = load_secret_pair(secret_file)
        self.allow = AllowList(allow_dir)
        self.on_refused = on_refused
        self.authenticator: AllowListAuthenticator | None = None
        self._lock = threading.Lock()

    @property
    def stats(self) -> AuthStats:
        return self.authenticator.stats if self.authenticator else AuthStats()

    def start(self, context: zmq.Context) -> AllowListAuthenticator:
        with self._lock:
            if self.authenticator is None:
                auth = AllowListAuthenticator(context, self.allow, on_refused=self.on_refused)
                auth.start()
                self.authenticator = auth
            elif self.authenticator.context is not context:
                raise SecurityError("CurveServer serves one zmq.Context; make one per context")
            return self.authenticator

    def __call__(self, sock: zmq.Socket) -> None:
        self.setup(sock)

    def setup(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server checked by the allow-list (call before bind)."""
        self.start(sock.context)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        with self._lock:
            if self.authenticator is not None:
                self.authenticator.stop()
                self.authenticator = None


@dataclass(frozen=True)
class CurveClient:
    """Socket setup for the microscope side: CURVE client that pins the server's key.

    Pinning the server key means a machine impersonating the engine cannot complete the
    handshake, so frames never reach it.
    """

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(
        cls, client_secret: str | os.PathLike, server_public: str | os.PathLike
    ) -> CurveClient:
        pub, sec = load_secret_pair(client_secret)
        return cls(pub, sec, load_public_key(server_public))

    def __call__(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def combine(*setups: SocketSetup | None) -> SocketSetup | None:
    """One socket_setup hook that applies several in order (None entries skipped)."""
    real = [s for s in setups if s is not None]
    if not real:
        return None

    def _setup(sock: zmq.Socket) -> None:
        for s in real:
            s(sock)

    return _setup


# ------------------------------------------------------------------------------ CLI
def keys_main(argv: Sequence[str] | None = None) -> int:
    """`livesr keys ARGS` (kept for callers of this module)."""
    from .cli import main as livesr

    return livesr(["keys", *(sys.argv[1:] if argv is None else argv)])


__all__ = [
    "ZAP_DOMAIN",
    "AllowList",
    "AllowListAuthenticator",
    "AuthStats",
    "CurveClient",
    "CurveServer",
    "SecurityError",
    "check_bind_allowed",
    "combine",
    "create_keypair",
    "find_public_file",
    "find_secret_file",
    "is_loopback_endpoint",
    "keys_main",
    "load_public_key",
    "load_secret_pair",
]
