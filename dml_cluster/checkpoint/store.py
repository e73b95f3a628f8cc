"""`CohortCheckpoints`: saves the peers one process hosts and restores them, in step with the rest
of the cohort (the protocol is described in dml_cluster.checkpoint)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dml_cluster.checkpoint import agreement, files, pruning
from dml_cluster.checkpoint.files import MANIFEST, Position, RunIdentity, Unverified
from dml_cluster.checkpoint.process_rng import capture_rng, restore_rng
from dml_cluster.checkpoint.standing import Standing, examine
from dml_cluster.cohort import Peer
from dml_cluster.config import Config, hashed_view
from dml_cluster.control import Control, Topic
from dml_cluster.errors import CheckpointError
from dml_cluster.run_folder import write_atomic
from dml_cluster.signals import signal_point


@dataclass(frozen=True)
class Restored:
    """What a resume hands back to the loop (the peers' states are already loaded)."""

    folder: Path
    position: Position
    history: list[dict[str, Any]]


class CohortCheckpoints:
    """Saves and restores the peers one process hosts, in step with the rest of the cohort."""

    def __init__(self, cfg: Config, run_dir: Path, replica: int = 0) -> None:
        """`replica`: this process's replica of its data-parallel peers (only replica 0 writes
        their files and the manifest; every replica loads them)."""
        self.settings = cfg.checkpoint
        self.replica = replica
        self.root = run_dir / "checkpoints"
        self.names = [p.name for p in cfg.peers]
        self.size = len(self.names)
        self.config_hash = cfg.hash()
        # what the folder holds for this config: refused here when it is another config's
        self.standing: Standing = examine(cfg, run_dir) if self.settings.enabled else Standing()
        self.run = RunIdentity(
            self.root, tuple(self.names), self.config_hash, hashed_view(cfg.to_dict()),
            self.standing.continues, cfg.cohort.replicas,
        )  # fmt: skip
        for name in self.names:
            if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(
                    f"config error: peer name {name!r} cannot name a checkpoint file"
                )

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def due(self, steps_done: int) -> bool:
        """Whether a mid-epoch checkpoint is due after `steps_done` steps."""
        every = self.settings.every_steps
        return self.enabled and every is not None and steps_done % every == 0

    def folder(self, step: int) -> Path:
        return self.root / files.step_name(step)

    # -- save -------------------------------------------------------------------------------

    def save(
        self,
        position: Position,
        peers: Mapping[int, Peer],
        history: list[dict[str, Any]],
        control: Control,
        replica_streams: Mapping[int, list[dict[str, Any]]] | None = None,
        wholes: Mapping[int, tuple[dict[str, Any], dict[str, Any]]] | None = None,
    ) -> Path:
        """Write the hosted peers' files, confirm with the cohort, write the manifest, prune.

        A peer that cannot write (disk full) tells the others through the confirmation: every
        process removes its files of this step and raises, the complete checkpoints stay.
        A replica other than 0 writes nothing and confirms nothing (its peer's replica 0 does);
        `replica_streams`: by hosted peer, every replica's stream (data-parallel peers);
        `wholes`: by hosted peer, the (model, optimizer) state dicts gathered whole from a
        sharded peer's replicas (cohort.shard: fsdp), saved in place of its own shards.
        """
        writer = self.replica == 0
        peers = peers if writer else {}
        folder = self.folder(position.step)
        rng = capture_rng()
        digests: dict[int, bytes] = {}
        problem: str | None = None
        try:
            if peers:
                self.root.mkdir(parents=True, exist_ok=True)
                folder.mkdir(exist_ok=True)
            for i, peer in peers.items():
                streams = (replica_streams or {}).get(i)
                gathered = (wholes or {}).get(i)
                state = files.peer_state(peer, position, history, rng, self.run, streams, gathered)
                data = files.serialise(state)
                digests[i] = files.write_peer_file(folder / f"{peer.name}.pt", data)
            signal_point("checkpoint")  # files written, manifest not yet
        except OSError as err:
            problem = err.strerror or str(err)
        mine = agreement.confirmation({i: digests.get(i) for i in peers})
        everyone = agreement.read_confirmations(
            control.all_gather_bytes(Topic.SAVED, position.step, mine), position.step, self.names
        )
        failed = [self.names[i] for i, d in sorted(everyone.items()) if d is None]
        if failed:
            self._withdraw(folder, peers)
            kept = pruning.newest_complete(self.root)
            keeps = f"step {kept}" if kept is not None else "no complete checkpoint yet"
            if problem is not None:
                hosted = ", ".join(self.names[i] for i in peers)
                raise CheckpointError(
                    f"cannot save the checkpoint of step {position.step} for {hosted} in "
                    f"{folder}: {problem}; the run folder keeps {keeps}"
                )
            raise CheckpointError(
                f"peer {', '.join(failed)} could not save the checkpoint of step "
                f"{position.step} (see its error); the run folder keeps {keeps}"
            )
        complete = {i: d for i, d in everyone.items() if d is not None}
        if not writer:
            return folder
        try:
            write_atomic(folder / MANIFEST, files.manifest(position, self.run, complete))
        except OSError as err:
            raise CheckpointError(
                f"cannot write the manifest of step {position.step} in {folder}: "
                f"{err.strerror or err}"
            ) from None
        pruning.prune(self.root, position.step, self.settings.keep)
        return folder

    def _withdraw(self, folder: Path, peers: Mapping[int, Peer]) -> None:
        """Remove this process's files of a step the cohort could not complete."""
        for peer in peers.values():
            path = folder / f"{peer.name}.pt"
            for p in (path, files.digest_path(path)):
                with contextlib.suppress(OSError):
                    p.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: other processes may share the folder

    # -- resume -----------------------------------------------------------------------------

    def restore(
        self,
        peers: Mapping[int, Peer],
        control: Control,
    ) -> Restored | None:
        """Agree with the cohort on the newest complete step whose files verify in every process,
        and load it into `peers`.

        Returns None when training starts at step 0. Every process calls this at the same point;
        an error in one process becomes an error in every process, each with its own message.
        A step some process lacks a file for, or whose files fail verification in some process
        (corrupt, truncated, unreadable, a corrupt manifest), is skipped by every process alike;
        once the cohort has loaded an older step, the reporting process names each skipped step
        and why in a warning line, and the steps after the loaded one are removed. A checkpoint
        of another run (config, cohort) stops the cohort at once, and when no complete step can
        be loaded nothing is changed.
        """
        first = min(peers)
        error: CheckpointError | None = None
        have: list[int] = []
        manifests: dict[int, dict[str, Any] | str] = {}
        try:
            have, manifests = self._scan(peers)
        except CheckpointError as err:
            error = err
        scan = [0 if error is None else 1, first, len(have), *have, *manifests]
        reports = control.all_gather_ints(Topic.RESUME_SCAN, 0, scan)
        self._raise_if_any_failed(reports, error, "read its checkpoints")
        have_files = [set(r[3 : 3 + r[2]]) for r in reports]
        complete = sorted(set().union(*(r[3 + r[2] :] for r in reports)), reverse=True)
        if not complete:
            return None
        if self.settings.resume == "never":
            raise CheckpointError(
                f"{self.root} already holds checkpoints (newest: step {complete[0]}) and "
                f"checkpoint.resume is 'never': choose another run.name, or remove {self.root}"
            )
        skipped: list[tuple[int, str]] = []
        for step in complete:
            lacking = [
                self.names[r[1]] for r, f in zip(reports, have_files, strict=True) if step not in f
            ]
            if lacking:
                skipped.append((step, f"no file for {', '.join(lacking)} (the process hosting it)"))
                continue
            states = self._verify_with_cohort(step, peers, manifests.get(step), control, skipped)
            if states is not None:
                break
        else:
            raise CheckpointError(self._nothing_loads(skipped))
        restored: Restored | None = None
        try:
            restored = self._apply_step(step, peers, states)
        except CheckpointError as err:
            error = err
        reports = control.all_gather_ints(
            Topic.RESUME_LOAD, step, [0 if error is None else 1, first]
        )
        self._raise_if_any_failed(reports, error, f"load the checkpoint of step {step}")
        if control.rank == 0:
            for bad, why in skipped:
                print(
                    f"dml-cluster: warning: checkpoint step {bad} skipped (resuming from step "
                    f"{step}, the steps after it are removed): {why}",
                    file=sys.stderr,
                    flush=True,
                )
            if not all("stream" in s for s in states.values()):
                print(
                    f"dml-cluster: warning: the checkpoint of step {step} predates per-peer "
                    "random streams: each peer's stream starts afresh from (run.seed, peer)",
                    file=sys.stderr,
                    flush=True,
                )
        if self.replica == 0:  # the writers remove what they wrote
            pruning.remove_after(self.root, step)
        return restored

    def _verify_with_cohort(
        self,
        step: int,
        peers: Mapping[int, Peer],
        manifest: dict[str, Any] | str | None,
        control: Control,
        skipped: list[tuple[int, str]],
    ) -> dict[int, dict[str, Any]] | None:
        """The hosted peers' states of `step`, read and verified, if the step verifies in every
        process; None, with the reasons added to `skipped`, if it fails in any. A checkpoint of
        another run stops every process (nothing was changed)."""
        states: dict[int, dict[str, Any]] | None = None
        code, reason, refusal = agreement.VERIFIED, "", None
        try:
            states = self._read_step(step, peers, manifest)
        except Unverified as err:
            code, reason = agreement.UNVERIFIED, str(err)
        except CheckpointError as err:
            code, reason, refusal = agreement.REFUSED, str(err), err
        mine = agreement.verdict(code, min(peers), reason)
        verdicts = [
            agreement.read_verdict(data, step, self.size)
            for data in control.all_gather_bytes(Topic.RESUME_VERIFY, step, mine)
        ]
        if refusal is not None:
            raise refusal
        refused = [self.names[first] for c, first, _ in verdicts if c == agreement.REFUSED]
        if refused:
            raise CheckpointError(
                f"peer {', '.join(refused)} could not load the checkpoint of step {step} (see "
                f"its error); nothing was changed"
            )
        reasons = [why for c, _, why in verdicts if c == agreement.UNVERIFIED]
        if reasons:
            skipped.append((step, "; ".join(dict.fromkeys(reasons))))  # a shared manifest: once
            return None
        return states

    def _nothing_loads(self, skipped: list[tuple[int, str]]) -> str:
        newest, why = skipped[0]
        older = [str(s) for s, _ in skipped[1:]]
        also = f"; older steps {', '.join(older)} cannot be loaded either" if older else ""
        return (
            f"{self.root} holds no checkpoint that can be loaded: step {newest}: {why}{also}: "
            f"restore the damaged or missing files, or remove {self.root} to start over"
        )

    def _raise_if_any_failed(
        self, reports: list[list[int]], mine: CheckpointError | None, what: str
    ) -> None:
        if mine is not None:
            raise mine
        failed = [self.names[r[1]] for r in reports if r[0] != 0]
        if failed:
            raise CheckpointError(
                f"peer {', '.join(failed)} could not {what} (see its error); nothing was changed"
            )

    def _scan(self, peers: Mapping[int, Peer]) -> tuple[list[int], dict[int, dict[str, Any] | str]]:
        """Steps this process has every hosted peer's file for; the manifests it sees, checked
        (a manifest that fails verification: why, as a string; the step is complete, and fails
        verification when the cohort tries it)."""
        have: list[int] = []
        manifests: dict[int, dict[str, Any] | str] = {}
        for step, folder in sorted(pruning.step_folders(self.root).items()):
            if (folder / MANIFEST).is_file():
                try:
                    manifests[step] = files.read_manifest(folder / MANIFEST, step, self.run)
                except Unverified as err:
                    manifests[step] = str(err)
            paths = [folder / f"{p.name}.pt" for p in peers.values()]
            if all(p.is_file() and files.digest_path(p).is_file() for p in paths):
                have.append(step)
        return have, manifests

    def _read_step(
        self,
        step: int,
        peers: Mapping[int, Peer],
        manifest: dict[str, Any] | str | None,
    ) -> dict[int, dict[str, Any]]:
        """The hosted peers' states of `step`, each checked against its digest and the manifest
        (if this process sees one); Unverified if any fails."""
        if isinstance(manifest, str):
            raise Unverified(manifest)
        folder = self.folder(step)
        states = {
            i: files.read_peer_file(folder, p.name, manifest, self.run) for i, p in peers.items()
        }
        positions = {tuple(s["position"]) for s in states.values()}
        if len(positions) != 1 or (
            manifest is not None
            and positions != {(manifest["epoch"], manifest["step_in_epoch"], manifest["step"])}
        ):
            raise Unverified(f"{folder} is corrupt: its files disagree on the position")
        return states

    def _apply_step(
        self, step: int, peers: Mapping[int, Peer], states: dict[int, dict[str, Any]]
    ) -> Restored:
        """Load verified states into the hosted peers (their streams too) and the process's
        global RNGs."""
        folder = self.folder(step)
        for i, peer in peers.items():
            files.apply_state(peer, states[i], folder, self.replica)
        first = states[min(states)]
        restore_rng(first["rng"])
        epoch, in_epoch, done = first["position"]
        return Restored(folder, Position(epoch, in_epoch, done), json.loads(first["history"]))
