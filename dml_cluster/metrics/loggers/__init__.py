"""Experiment loggers as observers: TensorBoard, Weights & Biases, MLflow
(`metrics.loggers: [tensorboard, wandb, mlflow]`, none by default).

Each logger is an optional extra (`pip install 'dml-cluster[tensorboard]'`, `[wandb]`,
`[mlflow]`) whose package is imported only when the config names it; a logger named but not
installed is one line naming the extra (`check_loggers`, before anything starts). Nothing
contacts a server unless configured: TensorBoard writes event files, W&B runs offline by default,
MLflow writes a local file store by default.

One logger run per peer, written by the one process that hosts the peer, grouped by the cohort's
run id (the config's: the same across restarts, so a resumed run continues the same logger
runs): TensorBoard `<dir>/<peer>/` with the same tags in every folder, W&B runs of one `group`,
MLflow runs nested under one parent run. See observer.py for what is logged, and when.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING

from dml_cluster.errors import ConfigError, typed_first_line

if TYPE_CHECKING:
    from dml_cluster.config import Config
    from dml_cluster.metrics.loggers.context import LoggerContext, Sink
    from dml_cluster.metrics.loggers.observer import ExperimentLogger

# logger -> (the module it needs, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def check_loggers(cfg: Config) -> None:
    """Every logger the config names is installed (found, not imported), else one line naming
    the extra that installs it."""
    for name in cfg.metrics.loggers:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"config error: metrics.loggers: {name} is not installed; install the extra: "
                f"pip install 'dml-cluster[{extra}]'"
            )


def experiment_logger(cfg: Config, hosted: Sequence[int], run_id: str) -> ExperimentLogger | None:
    """The observer writing the hosted peers' logger runs; None when no logger is named."""
    if not cfg.metrics.loggers:
        return None
    check_loggers(cfg)
    from dml_cluster.metrics.loggers.context import LoggerContext
    from dml_cluster.metrics.loggers.observer import ExperimentLogger

    context = LoggerContext.of(cfg, hosted, run_id)
    return ExperimentLogger(cfg, context, open_sinks(cfg, context))


def open_sinks(cfg: Config, context: LoggerContext) -> list[Sink]:
    """Each named logger's runs for the hosted peers (the extras' packages imported here)."""
    sinks: list[Sink] = []
    name = ""
    try:
        for name in cfg.metrics.loggers:
            if name == "tensorboard":
                from dml_cluster.metrics.loggers.tensorboard_sink import TensorBoardSink

                sinks.append(TensorBoardSink(cfg.metrics.tensorboard, context))
            elif name == "wandb":
                from dml_cluster.metrics.loggers.wandb_sink import WandbSink

                sinks.append(WandbSink(cfg.metrics.wandb, context))
            elif name == "mlflow":
                from dml_cluster.metrics.loggers.mlflow_sink import MlflowSink

                sinks.append(MlflowSink(cfg.metrics.mlflow, context))
    except BaseException as err:
        for sink in sinks:
            with suppress(Exception):
                sink.close(finished=False)
        if isinstance(err, Exception) and not isinstance(err, ConfigError):
            raise ConfigError(
                f"metrics.loggers: {name}: cannot start its runs: {typed_first_line(err)}"
            ) from None
        raise
    return sinks
