"""`train.init_from: RUN` (`dml-cluster train --init-from RUN`): a new run whose students start
from another run's final weights (`RUN/final/<peer>.pt`, matched by peer name) instead of their
seeded initialisation. Everything else starts afresh: the optimizer (no momentum carried over),
the LR schedule (from `optim.lr`, over this run's `train.epochs`: with cosine a warm restart), the
data order, the random streams. The source run and the step its weights are from are recorded in
the new run's summary (`init_from`) and printed when it starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dml_cluster.config import Config
from dml_cluster.errors import ConfigError

KEY = "train.init_from"


def source_summary(cfg: Config) -> dict[str, Any] | None:
    """The source run's summary, checked against this config (None without `init_from`): a
    finished run (it has a summary), not this run's own folder, a final weights file and the
    same model for every student (by name), no student given `weights` as well. Each problem is
    one ConfigError line naming what to do."""
    if cfg.train.init_from is None:
        return None
    source = Path(cfg.train.init_from)
    if source.resolve() == cfg.run.dir.resolve():
        raise ConfigError(
            f"config error: {KEY}: {source} is this run's own folder; a run starts from another "
            "one's weights: give this one another run.name"
        )
    try:
        summary = json.loads((source / "summary.json").read_text())
        theirs = summary["peers"]
        if not isinstance(theirs, dict):
            raise TypeError(theirs)
    except FileNotFoundError:
        what = "no such folder" if not source.is_dir() else "no summary.json: not a finished run"
        raise ConfigError(f"config error: {KEY}: {source}: {what}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"config error: {KEY}: {source}/summary.json is unreadable") from None
    students = [p for p in cfg.peers if p.role == "student"]
    missing = [
        p.name
        for p in students
        if p.name not in theirs or not (source / "final" / f"{p.name}.pt").is_file()
    ]
    if missing:
        raise ConfigError(
            f"config error: {KEY}: {source} has no final weights for {', '.join(missing)} (its "
            f"peers: {', '.join(theirs)}); students start from the source's peer of the same "
            "name (cohort.peers.N.name)"
        )
    for p in students:
        model = theirs[p.name].get("model") if isinstance(theirs[p.name], dict) else None
        if model != p.model:
            raise ConfigError(
                f"config error: {KEY}: peer {p.name} is {p.model!r} here but {model!r} in "
                f"{source}: the same model is needed to take its weights"
            )
        if p.weights:
            raise ConfigError(
                f"config error: {KEY}: peer {p.name} is also given weights ({p.weights}): give "
                "its initial weights one way"
            )
    return summary


def initial_weights(cfg: Config, name: str) -> Path | None:
    """The file student `name` starts from (None without `init_from`); checked by
    `source_summary` first."""
    if cfg.train.init_from is None:
        return None
    return Path(cfg.train.init_from) / "final" / f"{name}.pt"


def source_record(cfg: Config, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a run's summary records about where its weights came from."""
    if cfg.train.init_from is None or summary is None:
        return None
    keys = ("run", "config_hash", "steps", "epochs")
    record = {k: summary.get(k) for k in keys}
    record["folder"] = str(cfg.train.init_from)
    return record


def starting_line(record: dict[str, Any]) -> str:
    """The line a run started from another run's weights prints."""
    return (
        f"starting from the final weights of {record['folder']} (step {record['steps']}, "
        f"epoch {record['epochs']}, config {record['config_hash']}), with a fresh optimizer and "
        "schedule"
    )
