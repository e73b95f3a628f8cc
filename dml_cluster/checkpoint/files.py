"""The checkpoint files: their names, a peer's state and its format, writing a peer's file with
its digest, reading and verifying peer files and manifests, and loading a state into a peer."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dml_cluster.cohort import Peer
from dml_cluster.errors import CheckpointError, first_line
from dml_cluster.run_folder import write_atomic
from dml_cluster.sharding import is_sharded, model_shards, optimizer_shards

FORMAT = 1
"""The format of peer files and manifests. A peer file may carry `stream` (its random stream;
files written before per-peer streams lack it and still load) and `scaler` (fp16)."""
MANIFEST = "manifest.json"


class Unverified(CheckpointError):
    """A checkpoint file or manifest that fails verification (corrupt, truncated, unreadable):
    the cohort falls back to an older step. Any other CheckpointError stops the cohort."""


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` steps done; the next is `step_in_epoch` of `epoch`."""

    epoch: int
    step_in_epoch: int
    step: int


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to belong to this run: its folder, peers and config.

    `config` is the part of the config its hash covers (`config.hashed_view`), recorded in every
    manifest so that a refusal can name the keys that differ; `continues` are the hashes of
    configs whose checkpoints this run may load as its own (dml_cluster.checkpoint.standing: the
    same config with keys added since at their defaults, or a longer schedule)."""

    root: Path
    names: tuple[str, ...]
    config_hash: str
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    continues: frozenset[str] = frozenset()
    replicas: int = 1
    """Processes per peer (cohort.replicas): a peer's file holds every replica's stream."""

    def accepts(self, config_hash: Any) -> bool:
        """Whether checkpoints written under `config_hash` load into this run."""
        return config_hash == self.config_hash or config_hash in self.continues

    @property
    def size(self) -> int:
        return len(self.names)


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint."""
    return f"step-{step:09d}"


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def peer_state(
    peer: Peer,
    position: Position,
    history: list[dict[str, Any]],
    process_rng: dict[str, Any],
    run: RunIdentity,
    replica_streams: list[dict[str, Tensor]] | None = None,
    gathered: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything of `peer` a resume needs, as tensors and plain types. `replica_streams`: a
    data-parallel peer's every replica's random stream, in replica order; `gathered`: a sharded
    peer's (model, optimizer) state dicts, whole (dml_cluster.sharding.whole)."""
    model, optimizer = gathered or (peer.model.state_dict(), peer.optimizer.state_dict())
    state: dict[str, Any] = {
        "format": FORMAT,
        "config_hash": run.config_hash,
        "cohort_size": run.size,
        "peer": peer.name,
        "position": [position.epoch, position.step_in_epoch, position.step],
        "model": model,
        "optimizer": optimizer,
        "scheduler": peer.scheduler.state_dict(),
        "extra": peer.extras.state_dict(),
        "stream": peer.stream.state_dict(),  # the peer's own random stream
        "rng": process_rng,  # the process's (shared by the peers it hosts)
        "history": json.dumps(history),
    }
    if peer.scaler is not None:  # fp16's loss scale and its growth tracker
        state["scaler"] = peer.scaler.state_dict()
    if run.replicas > 1:
        state["replicas"] = run.replicas
        state["replica_streams"] = replica_streams
    return state


def serialise(state: dict[str, Any]) -> memoryview:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer()


def write_peer_file(path: Path, data: bytes | memoryview) -> bytes:
    """Write a peer's file and then its digest file, each atomically; returns the sha256."""
    digest = hashlib.sha256(data).digest()
    write_atomic(path, data)
    write_atomic(digest_path(path), f"{digest.hex()}  {path.name}\n".encode())
    return digest


def manifest(position: Position, run: RunIdentity, digests: dict[int, bytes]) -> bytes:
    """The manifest of a complete step: its position, every peer's digest, the hashed config
    (and, for data-parallel peers, how many replicas each had)."""
    record = {
        "format": FORMAT,
        "step": position.step,
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "config_hash": run.config_hash,
        "cohort_size": run.size,
        "peers": {run.names[i]: digests[i].hex() for i in range(run.size)},
        "config": run.config,
    }
    if run.replicas > 1:
        record["replicas"] = run.replicas
    return json.dumps(record, indent=1).encode()


def check_replicas(saved: Any, run: RunIdentity, where: Path) -> None:
    """A checkpoint of peers with another number of replicas is refused in one line: each
    replica's random stream is in it, and a resume would need as many (the weights would do)."""
    saved = 1 if saved is None else saved
    if saved != run.replicas:
        raise CheckpointError(
            f"{where} was written by a cohort of {saved} replica(s) per peer, this config has "
            f"cohort.replicas {run.replicas}: resume with cohort.replicas {saved}, or start "
            "another run.name (a final/<peer>.pt as cohort.peers.N.weights carries the weights)"
        )


def read_manifest(path: Path, step: int, run: RunIdentity) -> dict[str, Any]:
    """A manifest, checked: Unverified if it is corrupt or of another step; CheckpointError if
    it is of another format, config or cohort (another run's)."""
    try:
        manifest = json.loads(path.read_text())
        fields = (manifest["format"], manifest["step"], manifest["config_hash"])
        size, peers = manifest["cohort_size"], manifest["peers"]
        position = (manifest["epoch"], manifest["step_in_epoch"])
        if not isinstance(peers, dict) or not all(isinstance(d, str) for d in peers.values()):
            raise TypeError("peers")
    except (OSError, ValueError, KeyError, TypeError):
        raise Unverified(f"{path} is corrupt (not a checkpoint manifest)") from None
    if fields[0] != FORMAT:
        raise CheckpointError(
            f"{path} is not a format-{FORMAT} manifest (format {fields[0]!r}): choose another "
            f"run.name, or the dml-cluster version that wrote it"
        )
    if fields[1] != step or not all(isinstance(v, int) for v in position):
        raise Unverified(f"{path} is corrupt (not the manifest of step {step})")
    check_replicas(manifest.get("replicas"), run, run.root)
    if size != run.size or sorted(peers) != sorted(run.names):
        raise CheckpointError(
            f"{run.root} holds checkpoints of a cohort of {size} peers "
            f"({', '.join(sorted(peers))}), this config has {run.size} "
            f"({', '.join(run.names)}): choose another run.name, or the config that wrote them"
        )
    if not run.accepts(fields[2]):
        raise CheckpointError(
            f"{run.root} holds checkpoints of another config (hash {fields[2]}, this "
            f"config {run.config_hash}): choose another run.name, or the config that wrote "
            f"them (`dml-cluster config show` prints a config's hash)"
        )
    return manifest


def read_peer_file(
    folder: Path, name: str, manifest: dict[str, Any] | None, run: RunIdentity
) -> dict[str, Any]:
    """One peer's state: Unverified if its file is unreadable, corrupt or truncated;
    CheckpointError if it is intact but another run's."""
    path = folder / f"{name}.pt"
    digest_file = digest_path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Unverified(f"cannot read {path}: {err.strerror or err}") from None
    try:
        recorded = digest_file.read_text().split()[0]
    except (OSError, ValueError, IndexError) as err:
        why = getattr(err, "strerror", None) or "no sha256 digest in it"
        raise Unverified(f"cannot read the digest of {path} ({digest_file.name}: {why})") from None
    actual = hashlib.sha256(data).hexdigest()
    expected = {recorded} | ({manifest["peers"].get(name)} if manifest else set())
    if expected != {actual}:
        raise Unverified(
            f"{path} is corrupt or truncated ({len(data)} bytes, sha256 {actual[:12]}... does "
            f"not match the recorded digest)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        checks = (state["format"], state["config_hash"], state["cohort_size"], state["peer"])
        tuple(state["position"])
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
        raise Unverified(f"{path} is not a readable checkpoint ({first_line(err)})") from None
    check_replicas(state.get("replicas"), run, run.root)
    format_, config_hash, size, peer = checks
    if (format_, size, peer) != (FORMAT, run.size, name) or not run.accepts(config_hash):
        raise CheckpointError(
            f"{path} belongs to another run (format {checks[0]}, config {checks[1]}, cohort "
            f"of {checks[2]}, peer {checks[3]!r}): choose another run.name"
        )
    return state


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def apply_state(peer: Peer, state: dict[str, Any], folder: Path, replica: int = 0) -> None:
    """Load a verified state into `peer`. A state without a random stream (written before
    peers had their own) leaves the peer's stream as seeded; a data-parallel peer's replica
    `replica` takes its own stream from the file's replicas' streams; a sharded one (cohort.shard:
    fsdp) its share of the model's and the optimizer's state."""
    device = _device_of(peer.model)

    def to_device(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return tree.to(device)
        if isinstance(tree, dict):
            return {k: to_device(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [to_device(v) for v in tree]
        return tree

    model, optimizer = to_device(state["model"]), state["optimizer"]
    try:
        if is_sharded(peer.model):  # each replica keeps its share of the whole state
            model = model_shards(peer.model, model)
            optimizer = optimizer_shards(peer.optimizer, optimizer)
        peer.model.load_state_dict(model)
        peer.optimizer.load_state_dict(optimizer)  # moves its state to the params
        peer.scheduler.load_state_dict(state["scheduler"])
        peer.extras.load_state_dict(to_device(state["extra"]))
        if peer.scaler is not None and "scaler" in state:
            peer.scaler.load_state_dict(state["scaler"])
        if "replica_streams" in state:
            peer.stream.load_state_dict(state["replica_streams"][replica])
        elif "stream" in state:
            peer.stream.load_state_dict(state["stream"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{folder / (peer.name + '.pt')} does not fit peer {peer.name}: {first_line(err)}"
        ) from None
