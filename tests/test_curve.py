"""A closed bus: loopback-only binding by default, CURVE keys, strangers refused.

The stranger is a real process on the same machine that knows everything public: the peers'
ports, the cohort's public key, the config (so the run id derived from it). Without CURVE its
messages get in but carry the wrong run id (the wire's holds a nonce drawn at start-up) and are
dropped; with CURVE it never gets a message in. Either way the cohort's result is bitwise the
one-process reference.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from dml_cluster.bus.curve import load_curve_keys
from dml_cluster.errors import ConfigError

from .conftest import CHECKPOINTED_EPOCHS, assert_same_states
from .faults_helpers import (
    REPO,
    env,
    settings,
    start,
    wait_for,
    workers,
)

EPOCHS = CHECKPOINTED_EPOCHS  # the epochs of conftest's `checkpointed_reference`


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def keys(runs: Path) -> Path:
    folder = runs / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "dml_cluster", "keys", "generate", str(folder)],
        cwd=REPO, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return folder


# -- keys -----------------------------------------------------------------------------------------


def test_keys_generate_writes_a_cohort_pair_with_a_private_secret(keys: Path) -> None:
    assert sorted(p.name for p in keys.iterdir()) == ["cohort.key", "cohort.key_secret"]
    assert (keys / "cohort.key_secret").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(
        [sys.executable, "-m", "dml_cluster", "keys", "generate", str(keys)],
        cwd=REPO, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 2 and "already holds cohort.key" in again.stderr
    assert "Traceback" not in again.stderr
    loaded = load_curve_keys(keys, "a", ["a", "b"])
    assert loaded.peers == {"a": loaded.public, "b": loaded.public}


def test_a_peer_pair_wins_over_the_cohort_pair_and_bad_keys_are_config_errors(
    keys: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    for name in ("cohort.key", "cohort.key_secret"):
        (folder / name).write_bytes((keys / name).read_bytes())
    pub, sec = zmq.auth.create_certificates(folder, "b")
    own = load_curve_keys(folder, "b", ["a", "b"])
    assert own.public != own.peers["a"] and own.peers["b"] == own.public
    with pytest.raises(ConfigError, match="no folder"):
        load_curve_keys(tmp_path / "nowhere", "a", ["a"])
    os.unlink(sec)
    with pytest.raises(ConfigError, match="does not match the public key of peer b"):
        load_curve_keys(folder, "b", ["b"])  # b.key exists, so the cohort secret does not fit
    (folder / "b.key_secret").write_text("public-key = 'short'\nsecret-key = 'not a key'\n")
    with pytest.raises(ConfigError, match="no valid CURVE key"):
        load_curve_keys(folder, "b", ["b"])


# -- the stranger ---------------------------------------------------------------------------------


def attack(ports: list[int], server_public: str, run_id_hex: str, report: str) -> None:
    """Connect to every inbox with a key outside the cohort and in plaintext; push forged
    messages (right run id, sender = the other peer, steps 0..299); record what the sockets see,
    until SIGTERM."""
    from dml_cluster.bus.wire import Header, Kind

    ctx = zmq.Context()
    seen: dict[str, list[str]] = {}
    sockets = []
    for i, port in enumerate(ports):
        for kind in ("stranger", "plaintext"):
            sock = ctx.socket(zmq.PUSH)
            sock.linger, sock.sndhwm = 0, 0
            if kind == "stranger":
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
                sock.curve_serverkey = server_public.encode()
            monitor = sock.get_monitor_socket()
            sock.connect(f"tcp://127.0.0.1:{port}")
            for step in range(300):
                header = Header(
                    Kind.DATA, 1, bytes.fromhex(run_id_hex), step, 0, 1 - i, 1 - i, 0x1234, 64, 10
                )
                sock.send_multipart([header.pack(), bytes(64 * 10 * 4)])
            sockets.append((f"{kind}@{port}", sock, monitor))
    stop = False

    def finish(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, finish)
    while not stop:
        for name, _, monitor in sockets:
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                seen.setdefault(name, []).append(zmq.Event(event).name)
        Path(report).write_text(json.dumps(seen))
        time.sleep(0.05)
    os._exit(0)


def _two_free_ports() -> int:
    while True:
        base = random.randrange(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue


def _run_under_attack(runs: Path, name: str, *extra: str) -> tuple[int, str, dict, list[str]]:
    """The cohort (2 processes, zmq, fixed ports) with a stranger pushing at both inboxes; on a
    shared machine another process may take a port between choosing and binding it: then again,
    on other ports."""
    for _ in range(3):
        code, output, seen, listening = _attack_once(runs, name, *extra)
        if "Address already in use" not in output:
            break
        shutil.rmtree(runs / name, ignore_errors=True)
        (runs / f"{name}-attack.json").unlink(missing_ok=True)
    return code, output, seen, listening


def _attack_once(runs: Path, name: str, *extra: str) -> tuple[int, str, dict, list[str]]:
    from dml_cluster.config import load_config
    from dml_cluster.launch.identity import run_id

    base = _two_free_ports()
    args = settings(runs, name, "bus.transport=zmq", f"bus.port={base}", *extra, epochs=EPOCHS)
    cfg = load_config(REPO / "configs" / "digits-dml.yaml", args[1::2])
    os.environ["TORCHELASTIC_RUN_ID"] = "none"  # torchrun's default --rdzv-id
    try:
        forged_run_id = run_id(cfg).hex()
    finally:
        del os.environ["TORCHELASTIC_RUN_ID"]
    public = (runs / "keys" / "cohort.key").read_text().split("public-key = ")[1].split('"')[1]
    report = runs / f"{name}-attack.json"
    attacker = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.test_curve import attack; "
         f"attack([{base}, {base + 1}], {public!r}, {forged_run_id!r}, {str(report)!r})"],
        cwd=REPO, env=env(),
    )  # fmt: skip
    cohort = start(*args, "--nproc", "2")
    listening: list[str] = []
    try:
        wait_for(runs / name / "checkpoints" / "step-000000010" / "manifest.json", cohort)
        for peer in workers(cohort).values():
            for conn in peer.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in (base, base + 1):
                    listening.append(conn.laddr.ip)
    except AssertionError:
        pass  # the run ended first (the control run may crash at once); judged below
    finally:
        output, _ = cohort.communicate(timeout=300)
        attacker.terminate()
        attacker.wait(timeout=30)
    seen = json.loads(report.read_text()) if report.exists() else {}
    return cohort.returncode, output, seen, listening


def test_without_curve_a_strangers_guessed_run_id_is_dropped(
    runs: Path, keys: Path, checkpointed_reference: Path
) -> None:
    """An open bus: the stranger's plaintext socket gets in and delivers well-formed messages
    carrying the run id it derives from the config, but the wire's run id holds a nonce the
    cohort drew at start-up: every forged message is dropped as another run's, and the result
    is bitwise the reference."""
    code, output, seen, _ = _run_under_attack(runs, "open")
    assert code == 0, output
    assert any("HANDSHAKE_SUCCEEDED" in events for events in seen.values()), seen
    dropped = [line for line in output.splitlines() if "dropped a message" in line]
    assert dropped and all("message from another run" in line for line in dropped), output
    assert "peers out of sync" not in output
    assert_same_states(runs / "open", checkpointed_reference)


def test_with_curve_a_stranger_is_refused_and_the_result_is_unchanged(
    runs: Path, keys: Path, checkpointed_reference: Path
) -> None:
    code, output, seen, listening = _run_under_attack(runs, "closed", f"bus.curve_keys={keys}")
    assert code == 0, output
    assert listening == ["127.0.0.1", "127.0.0.1"]  # each inbox on loopback only
    for name, events in seen.items():
        assert "HANDSHAKE_SUCCEEDED" not in events, (name, events)
        expected = "HANDSHAKE_FAILED_AUTH" if name.startswith("stranger") else "HANDSHAKE_FAILED"
        assert any(e.startswith(expected) for e in events), (name, events)
    assert len(seen) == 4, seen
    assert "refused a bus connection with a key outside the cohort" in output
    assert "dropped a message" not in output
    assert_same_states(runs / "closed", checkpointed_reference)
