"""The run's id: what the metrics label a run with, and what every bus message carries."""

from __future__ import annotations

import hashlib
import os
import secrets

from dml_cluster.config import Config
from dml_cluster.control import Control, Topic
from dml_cluster.errors import PeerError

NONCE_BYTES = 16


def run_id(cfg: Config, nonce: bytes = b"") -> bytes:
    """8 bytes naming this run: the config, the name and the launch, and on the wire a random
    `nonce` the cohort agreed on at start-up (`agree_on_nonce`), so that a process knowing the
    config cannot forge a message the peers would take. Without a nonce: the config's id (the
    metrics' run_id label, the same across restarts)."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return hashlib.sha256(f"{cfg.run.name}/{cfg.hash()}/{launch}".encode() + nonce).digest()[:8]


def agree_on_nonce(control: Control) -> bytes:
    """Rank 0 draws a nonce for this launch (a restarted group draws a new one) and the cohort
    takes it over the control channel."""
    mine = secrets.token_bytes(NONCE_BYTES) if control.rank == 0 else b""
    nonce = control.all_gather_bytes(Topic.RUN_NONCE, 0, mine)[0]
    if len(nonce) != NONCE_BYTES:
        raise PeerError(f"rank 0 sent a run-id nonce of {len(nonce)} bytes, not {NONCE_BYTES}")
    return nonce
