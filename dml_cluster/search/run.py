"""`dml-cluster search`: the search, its report, and optionally the winner's retraining."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dml_cluster.errors import ConfigError
from dml_cluster.search.engine import Search
from dml_cluster.search.report import best, read_records, write_report
from dml_cluster.search.retrain import retrain
from dml_cluster.search.settings import SearchConfig


def run_search(
    scfg: SearchConfig,
    *,
    nproc: bool = False,
    retrain_best: bool = False,
    compare: list[Path] = (),  # type: ignore[assignment]
    say: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) the search `scfg`, write its report; returns its folder."""
    for other in compare:  # checked before hours of searching, not after
        read_records(other)
    teacher = Path(scfg.search.teacher.checkpoint)
    if not teacher.is_file():  # before the first round's folder is made
        raise ConfigError(
            f"config error: search.teacher.checkpoint: {teacher}: no such file (train the "
            "teacher first; its final/<peer>.pt is one)"
        )
    search = Search(scfg, nproc=nproc)
    history = search.run(say)
    winner = best(history)
    say(
        f"best: reward {winner['reward']:.4f}, validation accuracy {100 * winner['accuracy']:.2f}%"
        f", {winner['latency_ms']:.3g} ms, {winner['mflops']:.3g} MFLOPs [{winner['describe']}]"
    )
    retrained = None
    if retrain_best:
        retrained = retrain(scfg, winner, search.dir, nproc)
        say(
            f"retrained {len(retrained['seeds'])} seed(s) with KD: test accuracy "
            f"{100 * retrained['mean']:.2f} +- {100 * retrained['std']:.2f} %"
        )
    files = write_report(search.dir, scfg.search.top, list(compare), retrained)
    say(f"report: {files[0]}")
    say(f"best.yaml: {files[-1]}")
    return search.dir
