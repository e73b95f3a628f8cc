"""What every experiment logger is given: the names and grouping of its runs, the config as
hyper-parameters; and what a logger (a `Sink`) does."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dml_cluster.config import Config


@dataclass(frozen=True)
class LoggerContext:
    """What every logger needs to name and group its runs."""

    run_name: str
    cohort_id: str  # the cohort's run id (hex): the group, the same across restarts
    run_dir: Path
    peers: dict[int, str]  # the hosted peers, by index
    params: dict[str, Any]  # the config, flattened (a.b.c -> value), and its hash

    @classmethod
    def of(cls, cfg: Config, hosted: Sequence[int], run_id: str) -> LoggerContext:
        params = dict(flatten(cfg.to_dict()))
        params["config_hash"] = cfg.hash()
        return cls(
            run_name=cfg.run.name,
            cohort_id=run_id,
            run_dir=cfg.run.dir,
            peers={i: cfg.peers[i].name for i in hosted},
            params=params,
        )


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) of a nested config dict; lists are leaves."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


class Sink(Protocol):
    """One logger (TensorBoard, W&B, MLflow): a run per hosted peer."""

    def log(self, peer: int, scalars: dict[str, float], step: int) -> None: ...

    def close(self, finished: bool) -> None:
        """`finished`: the run ended (else it stopped: failed, or preempted to resume)."""
        ...
