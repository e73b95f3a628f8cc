"""Where a run folder stands when a run starts in it, read before anything is built or written:
a fresh start, a resume, a finished run (nothing to do), a resume under a changed length of
training, or a refusal that names the config keys that differ from the checkpoints' config.

The checkpoints' config is the one recorded in the newest complete manifest (its hashed part;
manifests of earlier versions lack it, and then the run folder's `config.yaml` is used when its
hash is the checkpoints'). Two configs whose hashes differ may still continue one another:

- keys added to the config since the checkpoints were written, at their defaults: the old config
  read by today's code hashes as this one, so its checkpoints are this run's;
- `train.epochs` / `train.max_steps` alone, under a schedule that does not depend on the length
  of training (`constant`, `step`, `multistep`): every step so far is the one a run planned this
  long from the start would have taken (same batches, same learning rates), so the run carries
  on as that run. `cosine` spans `train.epochs`: its learning rates so far belong to the old
  length, and continuing would be a run no config describes; it is refused, naming
  `--init-from` (a new run from this one's final weights) instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dml_cluster.checkpoint import pruning
from dml_cluster.checkpoint.files import MANIFEST, Position, step_name
from dml_cluster.config import Config, config_diff, config_hash, hashed_view
from dml_cluster.errors import CheckpointError
from dml_cluster.run_folder import CONFIG_FILE

LENGTH_KEYS = frozenset({"train.epochs", "train.max_steps"})
"""The keys a run may change and carry on from its checkpoints (under a length-free schedule)."""

LENGTH_FREE_SCHEDULES = ("constant", "step", "multistep")
"""LR schedules whose value at an epoch does not depend on `train.epochs`."""

SUMMARY = "summary.json"


@dataclass(frozen=True)
class Standing:
    """What the run folder holds for this config.

    `position`: the newest complete checkpoint's (None: none, or none this config can use);
    `continues`: config hashes other than this config's whose checkpoints it loads; `changed`:
    the `key: old → new` lines of a changed length of training (empty otherwise); `at_end`:
    training is complete for this config (`position` at its end, or with checkpoints off a
    summary of this config)."""

    position: Position | None = None
    continues: frozenset[str] = frozenset()
    changed: tuple[str, ...] = ()
    at_end: bool = False

    def note(self, run_dir: Path, schedule: str) -> str | None:
        """The line saying that the run carries on under a changed length (None: it does not)."""
        if not self.changed:
            return None
        return (
            f"continuing {run_dir} with {'; '.join(self.changed)} (the {schedule} schedule does "
            "not depend on the length of training: the steps so far are those of a run planned "
            "this long from the start)"
        )


def examine(cfg: Config, run_dir: Path) -> Standing:
    """Where the run folder `run_dir` (`cfg.run.dir`) stands for `cfg`; a CheckpointError (one
    line, exit 2) when its checkpoints belong to another config this one cannot continue. A
    manifest that cannot be read is left to the resume, which verifies it and falls back to an
    older step."""
    if not cfg.checkpoint.enabled:
        return _without_checkpoints(cfg, run_dir)
    root = run_dir / "checkpoints"
    newest = pruning.newest_complete(root)
    if newest is None or cfg.checkpoint.resume == "never":
        return Standing()
    try:
        manifest = json.loads((root / step_name(newest) / MANIFEST).read_text())
        recorded = manifest["config_hash"]
        position = Position(manifest["epoch"], manifest["step_in_epoch"], manifest["step"])
        peers = sorted(manifest["peers"])
    except (OSError, ValueError, KeyError, TypeError):
        return Standing()
    if not all(isinstance(v, int) for v in vars(position).values()):
        return Standing()
    if peers != sorted(p.name for p in cfg.peers):
        return Standing()  # another cohort: the resume refuses it in its own words
    changed: tuple[str, ...] = ()
    continues: frozenset[str] = frozenset()
    if recorded != cfg.hash():
        old = _recorded_config(run_dir, manifest, recorded)
        changed = _continuable(cfg, run_dir, old, recorded)
        continues = frozenset({recorded})
    train = cfg.train
    past = position.epoch > train.epochs or (
        train.max_steps is not None and position.step > train.max_steps
    )
    if past:
        raise CheckpointError(
            f"{run_dir} has trained {position.step} steps ({position.epoch} epochs), past "
            f"the end of this config ({'; '.join(changed)}): a run cannot be shortened; choose "
            "another run.name, or start a new run from its final weights with --init-from "
            f"{run_dir}"
        )
    at_end = position.epoch >= train.epochs or (
        train.max_steps is not None and position.step >= train.max_steps
    )
    return Standing(position, continues, changed, at_end)


def finished_line(cfg: Config, standing: Standing, hosted: Sequence[str], reporter: bool) -> str:
    """The one line saying that the run in `cfg.run.dir` is complete and nothing is to be done,
    or '' when it is not: training at its end and its results (the hosted peers' final weights;
    for the reporting process the summary of that step) in place. A run that saved its last
    checkpoint but not its results resumes there and writes them, and so does one whose length
    of training changed (the results then are the new config's; the trainer refuses a run cut
    at train.max_steps mid-epoch)."""
    run_dir = cfg.run.dir
    if not standing.at_end or standing.position is None or standing.changed:
        return ""
    if not all((run_dir / "final" / f"{name}.pt").is_file() for name in hosted):
        return ""
    summary = read_summary(run_dir) if reporter else {}
    if summary is None or (reporter and summary.get("steps") != standing.position.step):
        return ""
    at = standing.position
    return (
        f"{run_dir} is a finished run ({at.epoch} epochs, {at.step} steps; results: "
        f"{run_dir / SUMMARY}, {run_dir / 'final'}/): nothing to do, nothing changed. A new run: "
        f"--set run.name=NEW; to train longer: --set train.epochs=N (schedules "
        f"{', '.join(LENGTH_FREE_SCHEDULES)}) or --init-from {run_dir} --set run.name=NEW"
    )


def _continuable(
    cfg: Config, run_dir: Path, recorded: dict[str, Any] | None, recorded_hash: str
) -> tuple[str, ...]:
    """The changed length-of-training lines when `cfg` may continue checkpoints of the recorded
    config (empty: the same config, keys added since at their defaults); else CheckpointError
    naming the keys that differ and what to do."""
    this = cfg.hash()
    if recorded is None:
        raise CheckpointError(
            f"{run_dir} holds checkpoints of another config (hash {recorded_hash}, this config "
            f"{this}; the run folder does not record that config): choose another run.name, or "
            "the config that wrote them (`dml-cluster config show` prints a config's hash)"
        )
    fuller = _validated(recorded)
    shown = (fuller, cfg.to_dict()) if fuller is not None else None
    diff = config_diff(_upgraded(recorded), hashed_view(cfg.to_dict()), shown)
    if not diff:
        return ()
    shown = "; ".join(diff)
    if {line.split(":", 1)[0] for line in diff} <= LENGTH_KEYS:
        schedule = cfg.optim.schedule.name
        if schedule in LENGTH_FREE_SCHEDULES:
            return tuple(diff)
        raise CheckpointError(
            f"{run_dir} holds checkpoints of another config ({shown}): the {schedule} schedule "
            "spans train.epochs, so the learning rates so far belong to the old length and "
            "the run cannot carry on as one planned this long; start a new run from its final "
            f"weights (a fresh optimizer and schedule): --init-from {run_dir} --set "
            "run.name=NEW"
        )
    # a data-parallel checkpoint holds each replica's random stream: it resumes with as many
    why = (
        "; each replica's random stream is in them, so only the same cohort.replicas resumes them"
        if any(line.startswith("cohort.replicas:") for line in diff)
        else ""
    )
    raise CheckpointError(
        f"{run_dir} holds checkpoints of another config ({shown}; hash {recorded_hash}, this "
        f"config {this}): resume it with the config that wrote them ({run_dir / CONFIG_FILE}"
        f"{why}), "
        f"choose another run.name for a new run, or start one from its final weights with "
        f"--init-from {run_dir}"
    )


def _recorded_config(
    run_dir: Path, manifest: dict[str, Any], recorded: str
) -> dict[str, Any] | None:
    """The hashed part of the config that wrote the checkpoints: the manifest's, else the run
    folder's config.yaml when it hashes as the checkpoints do; None if neither is that config."""
    candidates: list[Any] = [manifest.get("config")]
    with contextlib.suppress(OSError, yaml.YAMLError, UnicodeDecodeError):
        candidates.append(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    for config in candidates:
        try:
            if isinstance(config, dict) and config and config_hash(config) == recorded:
                return hashed_view(config)
        except (KeyError, TypeError, AttributeError):
            continue
    return None


def _upgraded(recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded config as today's code reads it (keys added since at their defaults), when
    it still validates; else as recorded (its removed or renamed keys then show in the diff)."""
    fuller = _validated(recorded)
    return recorded if fuller is None else hashed_view(fuller)


def _validated(recorded: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded config with every key (defaults filled in), or None if it does not
    validate today."""
    try:
        return Config.model_validate(recorded).to_dict()
    except ValidationError:
        return None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json (None: none, or unreadable)."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _without_checkpoints(cfg: Config, run_dir: Path) -> Standing:
    """With checkpoints off, a run is complete when its summary is of this config."""
    summary = read_summary(run_dir)
    if summary is None or summary.get("config_hash") != cfg.hash():
        return Standing()
    steps, epochs = summary.get("steps"), summary.get("epochs")
    if not isinstance(steps, int) or not isinstance(epochs, int):
        return Standing()
    return Standing(Position(epochs, 0, steps), at_end=True)
