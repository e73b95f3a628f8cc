"""Cohort checkpoints: every peer's whole training state, saved atomically, and a manifest that
marks a step complete only once every peer of the cohort has its file in place.

Layout under the run folder (files are keyed by the peer's name, never by RANK)::

    checkpoints/step-000000120/<peer>.pt          torch.save of one peer's state
    checkpoints/step-000000120/<peer>.pt.sha256   its digest (`sha256sum -c` reads it)
    checkpoints/step-000000120/manifest.json      the cohort's: position, every peer's digest

Saving: each process writes its peers' files (temporary file, fsync, rename), the cohort confirms
over the control channel (dml_cluster.control) that every file is in place (the digests travel
with the confirmation, as bytes in a self-checking message), then every process writes the same
manifest and prunes to the newest `keep` complete steps. A step without a
manifest is torn (a peer died while saving) and is never loaded.

Resuming: every process lists the steps it has its peers' files for and the steps it sees a
manifest for; the cohort agrees on the newest step that every process has files for and some
process has a manifest for (on a shared folder all see the same manifests; on per-node disks a
process killed between the confirmation and its own manifest still has its file). Every process
then verifies its files of that step (each against its digest and the manifest, then
`torch.load`) and the cohort all-gathers the verdicts: if any process's file or manifest is
corrupt, truncated or unreadable, every process drops the step and tries the next older complete
one. Once one verifies everywhere, every peer loads it, the reporting process prints a warning
line per skipped step naming its bad file, and the steps after the loaded one are deleted (a later
save writes them again). A checkpoint of another run (config, cohort size, format) stops the
cohort at once; so does a folder where no complete step verifies, and then nothing is changed.
These are our own files on local disk, read with `torch.load(weights_only=True)`: tensors and
plain types only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dml_cluster.cohort import Peer
from dml_cluster.config import Config
from dml_cluster.control import Control, Topic
from dml_cluster.errors import CheckpointError
from dml_cluster.run_folder import write_atomic

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

FAULT_ENV = "DML_CLUSTER_FAULT"
"""Chaos-testing hook: `die-saving:<peer>:<step>` makes the process hosting that peer write half
of its file for that step and SIGKILL itself, in the first attempt of a torchrun group only."""

_CONFIRMATION = struct.Struct("<IB32s")
"""One hosted peer in a save confirmation: its index, 1 if its file is in place, its sha256."""

_VERDICT = struct.Struct("<BI")
"""A process's verification report of a step: its verdict and first hosted peer; then why not
(UTF-8, at most _MAX_REASON bytes)."""
_VERIFIED, _UNVERIFIED, _REFUSED = 0, 1, 2
_MAX_REASON = 2000


class _Unverified(CheckpointError):
    """A checkpoint file or manifest that fails verification (corrupt, truncated, unreadable):
    the cohort falls back to an older step. Any other CheckpointError stops the cohort."""


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` steps done; the next is `step_in_epoch` of `epoch`."""

    epoch: int
    step_in_epoch: int
    step: int


@dataclass(frozen=True)
class Restored:
    """What a resume hands back to the loop (the peers' states are already loaded)."""

    folder: Path
    position: Position
    history: list[dict[str, Any]]


# -- random number generators -------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's global RNG states, as tensors and plain types."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss,
        },
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        for device, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, device)


# -- files ---------------------------------------------------------------------------------------


def _remove_step(folder: Path) -> None:
    """Manifest first: a step half deleted is torn, never 'complete with files missing'."""
    with contextlib.suppress(OSError):
        (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)


# -- the cohort's checkpoints --------------------------------------------------------------------


class CohortCheckpoints:
    """Saves and restores the peers one process hosts, in step with the rest of the cohort."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.settings = cfg.checkpoint
        self.root = run_dir / "checkpoints"
        self.names = [p.name for p in cfg.peers]
        self.size = len(self.names)
        self.config_hash = cfg.hash()
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
        return self.root / f"step-{step:09d}"

    # -- save -------------------------------------------------------------------------------

    def save(
        self,
        position: Position,
        peers: Mapping[int, Peer],
        history: list[dict[str, Any]],
        control: Control,
    ) -> Path:
        """Write the hosted peers' files, confirm with the cohort, write the manifest, prune.

        A peer that cannot write (disk full) tells the others through the confirmation: every
        process removes its files of this step and raises, the complete checkpoints stay.
        """
        folder = self.folder(position.step)
        rng = capture_rng()
        digests: dict[int, bytes] = {}
        problem: str | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True)
            for i, peer in peers.items():
                state = self._state(peer, position, history, rng)
                buf = io.BytesIO()
                torch.save(state, buf)
                data = buf.getbuffer()
                digest = hashlib.sha256(data).digest()
                path = folder / f"{peer.name}.pt"
                _fault_point(path, position.step, data)
                write_atomic(path, data)
                write_atomic(_digest_path(path), f"{digest.hex()}  {path.name}\n".encode())
                digests[i] = digest
        except OSError as err:
            problem = err.strerror or str(err)
        mine = _confirmation({i: digests.get(i) for i in peers})
        everyone = self._read_confirmations(
            control.all_gather_bytes(Topic.SAVED, position.step, mine), position.step
        )
        failed = [self.names[i] for i, d in sorted(everyone.items()) if d is None]
        if failed:
            self._withdraw(folder, peers)
            kept = self._newest_complete()
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
        manifest = {
            "format": FORMAT,
            "step": position.step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "config_hash": self.config_hash,
            "cohort_size": self.size,
            "peers": {self.names[i]: everyone[i].hex() for i in range(self.size)},
        }
        try:
            write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as err:
            raise CheckpointError(
                f"cannot write the manifest of step {position.step} in {folder}: "
                f"{err.strerror or err}"
            ) from None
        self._prune(position.step)
        return folder

    def _state(
        self,
        peer: Peer,
        position: Position,
        history: list[dict[str, Any]],
        rng: dict[str, Any],
    ) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": FORMAT,
            "config_hash": self.config_hash,
            "cohort_size": self.size,
            "peer": peer.name,
            "position": [position.epoch, position.step_in_epoch, position.step],
            "model": peer.model.state_dict(),
            "optimizer": peer.optimizer.state_dict(),
            "scheduler": peer.scheduler.state_dict(),
            "extra": peer.extras.state_dict(),
            "rng": rng,
            "history": json.dumps(history),
        }
        if peer.scaler is not None:  # fp16's loss scale and its growth tracker
            state["scaler"] = peer.scaler.state_dict()
        return state

    def _read_confirmations(self, messages: list[bytes], step: int) -> dict[int, bytes | None]:
        """Every peer's digest (None: its file is not in place), checked to cover the cohort
        exactly once."""
        everyone: dict[int, bytes | None] = {}
        for data in messages:
            if len(data) % _CONFIRMATION.size:
                raise CheckpointError(
                    f"a confirmation of the checkpoint of step {step} is {len(data)} bytes long, "
                    f"not a whole number of {_CONFIRMATION.size}-byte records"
                )
            for i, saved, digest in _CONFIRMATION.iter_unpack(data):
                if i >= self.size or i in everyone or saved not in (0, 1):
                    raise CheckpointError(
                        f"a confirmation of the checkpoint of step {step} is malformed "
                        f"(peer index {i}, flag {saved})"
                    )
                everyone[i] = digest if saved else None
        missing = [self.names[i] for i in range(self.size) if i not in everyone]
        if missing:
            raise CheckpointError(
                f"the checkpoint of step {step} was not confirmed for {', '.join(missing)}: "
                f"no process of the cohort reported it"
            )
        return everyone

    def _withdraw(self, folder: Path, peers: Mapping[int, Peer]) -> None:
        """Remove this process's files of a step the cohort could not complete."""
        for peer in peers.values():
            path = folder / f"{peer.name}.pt"
            for p in (path, _digest_path(path)):
                with contextlib.suppress(OSError):
                    p.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: other processes may share the folder

    def _prune(self, newest: int) -> None:
        """Keep the newest `keep` complete steps; drop older ones and older torn ones."""
        steps = self._step_folders()
        complete = sorted(s for s, f in steps.items() if (f / MANIFEST).is_file())
        keep = set(complete[-self.settings.keep :])
        for step, folder in steps.items():
            if step < newest and step not in keep:
                _remove_step(folder)

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
        files: list[int] = []
        manifests: dict[int, dict[str, Any] | str] = {}
        try:
            files, manifests = self._scan(peers)
        except CheckpointError as err:
            error = err
        scan = [0 if error is None else 1, first, len(files), *files, *manifests]
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
        for later, folder in self._step_folders().items():
            if later > step:
                _remove_step(folder)
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
        verdict, reason, refusal = _VERIFIED, "", None
        try:
            states = self._read_step(step, peers, manifest)
        except _Unverified as err:
            verdict, reason = _UNVERIFIED, str(err)
        except CheckpointError as err:
            verdict, reason, refusal = _REFUSED, str(err), err
        mine = _VERDICT.pack(verdict, min(peers)) + reason.encode()[:_MAX_REASON]
        verdicts = [
            self._read_verdict(data, step)
            for data in control.all_gather_bytes(Topic.RESUME_VERIFY, step, mine)
        ]
        if refusal is not None:
            raise refusal
        refused = [self.names[first] for code, first, _ in verdicts if code == _REFUSED]
        if refused:
            raise CheckpointError(
                f"peer {', '.join(refused)} could not load the checkpoint of step {step} (see "
                f"its error); nothing was changed"
            )
        reasons = [why for code, _, why in verdicts if code == _UNVERIFIED]
        if reasons:
            skipped.append((step, "; ".join(dict.fromkeys(reasons))))  # a shared manifest: once
            return None
        return states

    def _read_verdict(self, data: bytes, step: int) -> tuple[int, int, str]:
        """(verdict, the process's first hosted peer, reason) from one verification report."""
        if len(data) >= _VERDICT.size:
            verdict, first = _VERDICT.unpack_from(data)
            if verdict in (_VERIFIED, _UNVERIFIED, _REFUSED) and first < self.size:
                return verdict, first, data[_VERDICT.size :].decode(errors="replace")
        raise CheckpointError(
            f"a verification report of the checkpoint of step {step} is malformed"
        )

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

    def _step_folders(self) -> dict[int, Path]:
        if not self.root.is_dir():
            return {}
        found = {}
        for entry in self.root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir():
                found[int(m.group(1))] = entry
        return found

    def _newest_complete(self) -> int | None:
        complete = [s for s, f in self._step_folders().items() if (f / MANIFEST).is_file()]
        return max(complete, default=None)

    def _scan(self, peers: Mapping[int, Peer]) -> tuple[list[int], dict[int, dict[str, Any] | str]]:
        """Steps this process has every hosted peer's file for; the manifests it sees, checked
        (a manifest that fails verification: why, as a string; the step is complete, and fails
        verification when the cohort tries it)."""
        files: list[int] = []
        manifests: dict[int, dict[str, Any] | str] = {}
        for step, folder in sorted(self._step_folders().items()):
            if (folder / MANIFEST).is_file():
                try:
                    manifests[step] = self._read_manifest(folder / MANIFEST, step)
                except _Unverified as err:
                    manifests[step] = str(err)
            paths = [folder / f"{p.name}.pt" for p in peers.values()]
            if all(p.is_file() and _digest_path(p).is_file() for p in paths):
                files.append(step)
        return files, manifests

    def _read_manifest(self, path: Path, step: int) -> dict[str, Any]:
        """A manifest, checked: _Unverified if it is corrupt or of another step; CheckpointError
        if it is of another format, config or cohort (another run's)."""
        try:
            manifest = json.loads(path.read_text())
            fields = (manifest["format"], manifest["step"], manifest["config_hash"])
            size, peers = manifest["cohort_size"], manifest["peers"]
            position = (manifest["epoch"], manifest["step_in_epoch"])
            if not isinstance(peers, dict) or not all(isinstance(d, str) for d in peers.values()):
                raise TypeError("peers")
        except (OSError, ValueError, KeyError, TypeError):
            raise _Unverified(f"{path} is corrupt (not a checkpoint manifest)") from None
        if fields[0] != FORMAT:
            raise CheckpointError(
                f"{path} is not a format-{FORMAT} manifest (format {fields[0]!r}): choose another "
                f"run.name, or the dml-cluster version that wrote it"
            )
        if fields[1] != step or not all(isinstance(v, int) for v in position):
            raise _Unverified(f"{path} is corrupt (not the manifest of step {step})")
        if size != self.size or sorted(peers) != sorted(self.names):
            raise CheckpointError(
                f"{self.root} holds checkpoints of a cohort of {size} peers "
                f"({', '.join(sorted(peers))}), this config has {self.size} "
                f"({', '.join(self.names)}): choose another run.name, or the config that wrote them"
            )
        if fields[2] != self.config_hash:
            raise CheckpointError(
                f"{self.root} holds checkpoints of another config (hash {fields[2]}, this "
                f"config {self.config_hash}): choose another run.name, or the config that wrote "
                f"them (`dml-cluster config show` prints a config's hash)"
            )
        return manifest

    def _read_step(
        self,
        step: int,
        peers: Mapping[int, Peer],
        manifest: dict[str, Any] | str | None,
    ) -> dict[int, dict[str, Any]]:
        """The hosted peers' states of `step`, each checked against its digest and the manifest
        (if this process sees one); _Unverified if any fails."""
        if isinstance(manifest, str):
            raise _Unverified(manifest)
        folder = self.folder(step)
        states = {i: self._read_peer_file(folder, p.name, manifest) for i, p in peers.items()}
        positions = {tuple(s["position"]) for s in states.values()}
        if len(positions) != 1 or (
            manifest is not None
            and positions != {(manifest["epoch"], manifest["step_in_epoch"], manifest["step"])}
        ):
            raise _Unverified(f"{folder} is corrupt: its files disagree on the position")
        return states

    def _apply_step(
        self, step: int, peers: Mapping[int, Peer], states: dict[int, dict[str, Any]]
    ) -> Restored:
        """Load verified states into the hosted peers and the RNGs."""
        folder = self.folder(step)
        for i, peer in peers.items():
            _apply(peer, states[i], folder)
        first = states[min(states)]
        restore_rng(first["rng"])
        epoch, in_epoch, done = first["position"]
        return Restored(folder, Position(epoch, in_epoch, done), json.loads(first["history"]))

    def _read_peer_file(
        self, folder: Path, name: str, manifest: dict[str, Any] | None
    ) -> dict[str, Any]:
        """One peer's state: _Unverified if its file is unreadable, corrupt or truncated;
        CheckpointError if it is intact but another run's."""
        path = folder / f"{name}.pt"
        digest_path = _digest_path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise _Unverified(f"cannot read {path}: {err.strerror or err}") from None
        try:
            recorded = digest_path.read_text().split()[0]
        except (OSError, ValueError, IndexError) as err:
            why = getattr(err, "strerror", None) or "no sha256 digest in it"
            raise _Unverified(
                f"cannot read the digest of {path} ({digest_path.name}: {why})"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        expected = {recorded} | ({manifest["peers"].get(name)} if manifest else set())
        if expected != {actual}:
            raise _Unverified(
                f"{path} is corrupt or truncated ({len(data)} bytes, sha256 {actual[:12]}... does "
                f"not match the recorded digest)"
            )
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            checks = (state["format"], state["config_hash"], state["cohort_size"], state["peer"])
            tuple(state["position"])
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise _Unverified(f"{path} is not a readable checkpoint ({first})") from None
        if checks != (FORMAT, self.config_hash, self.size, name):
            raise CheckpointError(
                f"{path} belongs to another run (format {checks[0]}, config {checks[1]}, cohort "
                f"of {checks[2]}, peer {checks[3]!r}): choose another run.name"
            )
        return state


def _fault_point(path: Path, step: int, data: memoryview) -> None:
    """See FAULT_ENV: die half-way through writing `path`, as a killed peer would."""
    armed = os.environ.get(FAULT_ENV) == f"die-saving:{path.stem}:{step}"
    if armed and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _confirmation(digests: Mapping[int, bytes | None]) -> bytes:
    """This process's save confirmation: a record per hosted peer (a zero digest: not saved)."""
    return b"".join(
        _CONFIRMATION.pack(i, d is not None, d or bytes(32)) for i, d in sorted(digests.items())
    )


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _apply(peer: Peer, state: dict[str, Any], folder: Path) -> None:
    device = _device_of(peer.model)

    def to_device(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return tree.to(device)
        if isinstance(tree, dict):
            return {k: to_device(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [to_device(v) for v in tree]
        return tree

    try:
        peer.model.load_state_dict(to_device(state["model"]))
        peer.optimizer.load_state_dict(state["optimizer"])  # moves its state to the params
        peer.scheduler.load_state_dict(state["scheduler"])
        peer.extras.load_state_dict(to_device(state["extra"]))
        if peer.scaler is not None and "scaler" in state:
            peer.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"{folder / (peer.name + '.pt')} does not fit peer {peer.name}: {first}"
        ) from None
