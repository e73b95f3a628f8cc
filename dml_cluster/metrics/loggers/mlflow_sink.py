"""MLflow: a parent run for the cohort (tagged with its run id) and a nested run per peer
(`mlflow.parentRunId`), in the experiment `run.name` (or the configured one). The tracking store
is a local folder by default (`<run dir>/mlruns`, MLflow's file store) or a server the config
names. Runs are found again by their tags, so a resumed run continues the same runs. Processes
of one cohort that start together may each create a parent: the earliest one is kept, the
others are deleted."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from dml_cluster.config import MlflowConfig
from dml_cluster.metrics.loggers.context import LoggerContext

COHORT_TAG = "dml_cluster.cohort"
PEER_TAG = "dml_cluster.peer"
PARENT_TAG = "mlflow.parentRunId"
PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch
PARAM_CHARS = 6000  # and on a param value's length


def tracking_uri(settings: MlflowConfig, context: LoggerContext) -> str:
    """A server URI as given; a local folder (the default <run dir>/mlruns) as a file: URI, the
    file store, which MLflow 3 asks to be opted into (naming a folder is that choice)."""
    uri = settings.tracking_uri or str(context.run_dir / "mlruns")
    if "://" in uri and not uri.startswith("file:"):
        return uri
    folder = Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return folder.as_uri()


class MlflowSink:
    def __init__(self, settings: MlflowConfig, context: LoggerContext) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri(settings, context))
        self.context = context
        self.experiment = self._experiment(settings.experiment or context.run_name)
        self.parent = self._parent()
        self.runs = {i: self._peer_run(name) for i, name in context.peers.items()}

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another peer process created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _search(self, extra: str) -> list:
        query = f"tags.`{COHORT_TAG}` = '{self.context.cohort_id}' and {extra}"
        runs = self.client.search_runs([self.experiment], query, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _parent(self) -> str:
        query = f"tags.`{PEER_TAG}` = '-'"
        found = self._search(query)
        if found:
            return found[0].info.run_id
        tags = {COHORT_TAG: self.context.cohort_id, PEER_TAG: "-"}
        mine = self.client.create_run(self.experiment, run_name=self.context.run_name, tags=tags)
        winner = self._search(query)[0].info.run_id
        if winner != mine.info.run_id:
            self.client.delete_run(mine.info.run_id)
        else:
            self._params(winner)
        return winner

    def _peer_run(self, peer: str) -> str:
        found = self._search(f"tags.`{PEER_TAG}` = '{peer}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {COHORT_TAG: self.context.cohort_id, PEER_TAG: peer, PARENT_TAG: self.parent}
        run = self.client.create_run(
            self.experiment, run_name=f"{self.context.run_name}/{peer}", tags=tags
        )
        self._params(run.info.run_id)
        return run.info.run_id

    def _params(self, run_id: str) -> None:
        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in self.context.params.items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start : start + PARAMS_PER_CALL])
        self.client.log_batch(
            run_id, tags=[RunTag("config_hash", self.context.params["config_hash"])]
        )

    def log(self, peer: int, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        self.client.log_batch(self.runs[peer], metrics=metrics)

    def close(self, finished: bool) -> None:
        status = "FINISHED" if finished else "KILLED"
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, status)
        if 0 in self.runs:  # the first peer's process closes the cohort's run
            self.client.set_terminated(self.parent, status)
