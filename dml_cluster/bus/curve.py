"""CURVE for the zmq bus: encryption and authentication (pyzmq's zmq.auth), keys read from files.

A key folder (in deployment, a Kubernetes Secret mounted as files) holds one key pair for the
whole cohort, `cohort.key` + `cohort.key_secret`, and/or one per peer, `<peer>.key` +
`<peer>.key_secret` (a peer's own pair wins over the cohort's). `dml-cluster keys generate DIR`
writes a cohort pair.

Every inbox (PULL; it binds) is a CURVE server with its peer's secret key and admits only
clients presenting one of the cohort's public keys (a ZAP handler in a ThreadAuthenticator).
Every outbox (PUSH) is a CURVE client that insists on the receiving peer's public key. So a
process without the keys can neither put a message into a peer's inbox nor, by publishing its
own endpoint in the rendezvous store, receive one; and nothing on the wire is readable.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dml_cluster.errors import ConfigError, InputError
from dml_cluster.run_folder import missing_folders, remove_if_empty

COHORT = "cohort"
"""The file stem of the key pair shared by the whole cohort."""


@dataclass(frozen=True)
class CurveKeys:
    """This peer's key pair and every cohort peer's public key (z85-encoded, as zmq takes them)."""

    public: bytes
    secret: bytes
    peers: dict[str, bytes]


def _read(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config error: bus.curve_keys: cannot read {path}: {err}") from None
    for key in (public, secret) if want_secret else (public,):
        if key is None or len(key) != 40:
            raise ConfigError(f"config error: bus.curve_keys: {path} holds no valid CURVE key")
        try:
            z85.decode(key)
        except ValueError:
            raise ConfigError(
                f"config error: bus.curve_keys: {path} holds no valid CURVE key"
            ) from None
    if want_secret and zmq.curve_public(secret) != public:
        raise ConfigError(
            f"config error: bus.curve_keys: {path}: the secret and public keys differ"
        )
    return public, secret


def _pair_file(folder: Path, name: str, suffix: str) -> Path:
    own = folder / f"{name}{suffix}"
    return own if own.is_file() else folder / f"{COHORT}{suffix}"


def load_curve_keys(folder: str | Path, me: str, names: Sequence[str]) -> CurveKeys:
    """Peer `me`'s pair and the public keys of `names`, from `folder`; ConfigError if missing."""
    folder = Path(folder)
    hint = f"create them with `dml-cluster keys generate {folder}`"
    if not folder.is_dir():
        raise ConfigError(f"config error: bus.curve_keys: no folder {folder} ({hint})")
    peers: dict[str, bytes] = {}
    for name in names:
        path = _pair_file(folder, name, ".key")
        if not path.is_file():
            raise ConfigError(
                f"config error: bus.curve_keys: no public key for peer {name} in {folder} "
                f"(expected {name}.key or {COHORT}.key; {hint})"
            )
        peers[name] = _read(path, want_secret=False)[0]
    path = _pair_file(folder, me, ".key_secret")
    if not path.is_file():
        raise ConfigError(
            f"config error: bus.curve_keys: no secret key for peer {me} in {folder} "
            f"(expected {me}.key_secret or {COHORT}.key_secret; {hint})"
        )
    public, secret = _read(path, want_secret=True)
    if public != peers[me]:
        raise ConfigError(
            f"config error: bus.curve_keys: {path} does not match the public key of peer {me}"
        )
    assert secret is not None
    return CurveKeys(public, secret, peers)


def generate_keys(folder: str | Path, name: str = COHORT) -> tuple[Path, Path]:
    """Write a new key pair `<name>.key` / `<name>.key_secret` (secret readable by owner only)."""
    folder = Path(folder)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(
            f"keys: --name {name!r}: a key pair's name is 'cohort' or a peer's name (letters, "
            "digits, '_', '.', '-'; no path)"
        )
    secret_path = folder / f"{name}.key_secret"
    if secret_path.exists() or (folder / f"{name}.key").exists():
        raise ConfigError(f"keys: {folder} already holds {name}.key / {name}.key_secret")
    made = missing_folders(folder)
    old = os.umask(0o077)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(folder, name)
    except OSError as err:
        remove_if_empty(made)
        raise InputError(f"keys: cannot write into {folder}: {err.strerror or err}") from None
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


class _CohortOnly:
    """The ZAP decision: a client is admitted only with one of the cohort's public keys."""

    def __init__(self, allowed: set[bytes], who: str) -> None:
        self.allowed, self.who = allowed, who
        self.refused = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        if first:
            print(
                f"dml-cluster: {self.who} refused a bus connection with a key outside the cohort",
                file=sys.stderr,
                flush=True,
            )
        return False


class CurveGuard:
    """Runs the authenticator of one zmq context and configures its sockets."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys, who: str) -> None:
        self.keys = keys
        self.policy = _CohortOnly(set(keys.peers.values()), who)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self.policy)

    @property
    def refused(self) -> int:
        """Connections refused so far (a key outside the cohort)."""
        return self.policy.refused

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` (before it binds) a CURVE server with this peer's keys."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, peer: str) -> None:
        """Make `sock` (before it connects) a CURVE client that only talks to `peer`."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = self.keys.peers[peer]

    def stop(self) -> None:
        self._auth.stop()
