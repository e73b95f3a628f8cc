"""Weights & Biases: one run per peer, in the group named by the cohort's run id, with the run
id `<cohort>-<peer>` (the same across restarts: a resumed run continues it, `resume="allow"`).
Offline by default (files under `dir`, upload later with `wandb sync`); online only when the
config says so. Values are plotted against the training step (`step`, a metric of its own, so
a resumed run may log a step again)."""

from __future__ import annotations

import re
from pathlib import Path

import wandb

from dml_cluster.config import WandbConfig
from dml_cluster.metrics.loggers.context import LoggerContext


def run_id(cohort_id: str, peer: str) -> str:
    """The W&B run id of a peer: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{cohort_id}-{peer}")[:128]


class WandbSink:
    def __init__(self, settings: WandbConfig, context: LoggerContext) -> None:
        folder = Path(settings.dir) if settings.dir else context.run_dir
        folder.mkdir(parents=True, exist_ok=True)
        quiet = wandb.Settings(
            silent=True, console="off", disable_git=True, save_code=False,
            x_disable_stats=True, x_disable_machine_info=True,
        )  # fmt: skip
        self.runs: dict[int, wandb.Run] = {}
        for i, name in context.peers.items():
            run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                group=f"{context.run_name}-{context.cohort_id}",
                job_type="peer",
                name=f"{context.run_name}/{name}",
                id=run_id(context.cohort_id, name),
                resume="allow",
                mode=settings.mode,
                dir=str(folder),
                config=context.params,
                reinit="create_new",
                settings=quiet,
            )
            run.define_metric("step")
            for prefix in ("train", "eval", "ensemble"):
                run.define_metric(f"{prefix}/*", step_metric="step")
            self.runs[i] = run

    def log(self, peer: int, scalars: dict[str, float], step: int) -> None:
        self.runs[peer].log({"step": step, **scalars})

    def close(self, finished: bool) -> None:
        for run in self.runs.values():
            run.finish(exit_code=0 if finished else 1)
