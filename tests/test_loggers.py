"""The experiment loggers (`metrics.loggers`) as their own readers see them.

One short 2-peer run in this process with TensorBoard, W&B (offline) and MLflow (a local file
store) on; each logger's files are read back with that logger's own reader (TensorBoard's event
accumulator, W&B's record format, MLflow's client) and compared with the run's JSONL logs: every
peer's scalars at the steps the run log wrote them. Then the logger runs are opened again for the
same run folder, as a resumed run opens them: they continue the same runs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from dml_cluster.bus.base import BusStats
from dml_cluster.config import load_config
from dml_cluster.metrics.events import Losses, PeerStep, StepEvent

from .conftest import REPO

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install -e '.[test]')")
pytest.importorskip("wandb", reason="the wandb extra (pip install -e '.[test]')")
pytest.importorskip("mlflow", reason="the mlflow extra (pip install -e '.[test]')")

CONFIG = REPO / "configs" / "digits-dml.yaml"
PEERS = ("small_cnn-0", "small_cnn-1")
EVERY = 5
SETS = [
    "train.max_steps=25", f"run.log_every={EVERY}", "metrics.enabled=false",
    "metrics.loggers=[tensorboard,wandb,mlflow]", "metrics.wandb.mode=offline",
]  # fmt: skip


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The run's config, its run log records, and the cohort's run id."""
    from dml_cluster.launch import run_id, run_local

    out = tmp_path_factory.mktemp("loggers")
    cfg = load_config(CONFIG, [*SETS, f"run.out_dir={out}"])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        run_local(cfg)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    train = {p: [json.loads(line) for line in (cfg.run.dir / "peers" / f"{p}.jsonl").open()]
             for p in PEERS}  # fmt: skip
    train = {
        p: {r["step"]: r for r in records if r["event"] == "train"} for p, records in train.items()
    }
    evals = [json.loads(line) for line in (cfg.run.dir / "cohort.jsonl").open()]
    evals = {r["step"]: r for r in evals if r["event"] == "eval"}
    return cfg, train, evals, run_id(cfg).hex()


def expected(train: dict, evals: dict, peer: str) -> dict[str, dict[int, float]]:
    """What every logger must hold for `peer`: tag -> {step: value}, from the JSONL logs."""
    want: dict[str, dict[int, float]] = {}
    for step, record in train[peer].items():
        for key in ("loss", "ce", "lr", "distill"):
            want.setdefault(f"train/{key}", {})[step] = record[key]
        want.setdefault("train/accuracy", {})[step] = record["train_accuracy"]
    for step, record in evals.items():
        for key in ("accuracy", "nll", "ece"):
            want.setdefault(f"eval/{key}", {})[step] = record["peers"][peer][key]
            want.setdefault(f"ensemble/{key}", {})[step] = record["ensemble"][key]
        other = next(p for p in PEERS if p != peer)
        want.setdefault("eval/kl_from_others", {})[step] = record["pairs"][f"{peer}|{other}"]["kl"]
    return want


def assert_holds(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float):
    for tag, points in want.items():
        assert tag in got, f"{tag} missing (have {sorted(got)})"
        assert sorted(got[tag]) == sorted(points), (tag, sorted(got[tag]), sorted(points))
        for step, value in points.items():
            # tolerance: loggers store float32 scalars; the JSONL holds float64
            assert got[tag][step] == pytest.approx(value, rel=rel, abs=1e-7), (tag, step)
    assert set(got["train/samples_per_s"]) == set(want["train/loss"])
    assert all(v > 0 for v in got["train/samples_per_s"].values())


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: {e.step: e.value for e in reader.Scalars(tag)} for tag in reader.Tags()["scalars"]}


def test_tensorboard_holds_every_peers_scalars_at_their_steps(logged: Any) -> None:
    cfg, train, evals, _ = logged
    folders = sorted(p.name for p in (cfg.run.dir / "tb").iterdir())
    assert folders == list(PEERS)
    for peer in PEERS:
        got = tensorboard_scalars(cfg.run.dir / "tb" / peer)
        assert_holds(got, expected(train, evals, peer), rel=1e-6)  # stored as float32


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header (':W&B', magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks (crc32c, length, type:
    1 full, 2 first, 3 middle, 4 last), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(folder: Path, peer: str, cohort: str) -> tuple[Any, dict[str, dict[int, float]]]:
    """A peer's offline W&B run: its run record and its history as tag -> {step: value}."""
    from dml_cluster.metrics.loggers.wandb_sink import run_id

    files = sorted(folder.glob(f"wandb/offline-run-*-{run_id(cohort, peer)}/run-*.wandb"))
    assert files, f"no offline W&B run for {peer}"
    run, history = None, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}  # fmt: skip
                for tag, value in items.items():
                    if "/" in tag:
                        history.setdefault(tag, {})[items["step"]] = value
    return run, history


def test_wandb_offline_runs_hold_every_peers_values(logged: Any) -> None:
    cfg, train, evals, cohort = logged
    for peer in PEERS:
        run, history = wandb_run(cfg.run.dir, peer, cohort)
        assert run.run_group == f"{cfg.run.name}-{cohort}" and run.display_name.endswith(peer)
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["config_hash"] == cfg.hash() and config["run.name"] == cfg.run.name
        assert_holds(history, expected(train, evals, peer), rel=1e-12)


def mlflow_runs(cfg: Any) -> tuple[Any, dict[str, Any], Any]:
    from mlflow.tracking import MlflowClient

    from dml_cluster.metrics.loggers.mlflow_sink import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg.metrics.mlflow, _context(cfg)))
    experiment = client.get_experiment_by_name(cfg.run.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags["dml_cluster.peer"] == "-"]
    peers = {r.data.tags["dml_cluster.peer"]: r for r in runs if r not in parents}
    (parent,) = parents
    return client, peers, parent


def _context(cfg: Any) -> Any:
    from dml_cluster.metrics.loggers.context import LoggerContext

    return LoggerContext.of(cfg, (0, 1), "unused")


def test_mlflow_file_store_holds_every_peers_values(logged: Any) -> None:
    cfg, train, evals, cohort = logged
    client, peers, parent = mlflow_runs(cfg)
    assert sorted(peers) == list(PEERS) and parent.data.tags["dml_cluster.cohort"] == cohort
    for peer, run in peers.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["config_hash"] == cfg.hash() and run.info.status == "FINISHED"
        want = expected(train, evals, peer)
        got = {tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
               for tag in [*want, "train/samples_per_s"]}  # fmt: skip
        assert_holds(got, want, rel=1e-12)


def test_a_resumed_run_continues_the_same_logger_runs(logged: Any) -> None:
    """The loggers opened again for the same run folder (a restart resuming at step 21): the
    same TensorBoard folders (what the stopped attempt logged from step 20 on is purged), the
    same W&B run ids, the same MLflow runs."""
    from dml_cluster.metrics.loggers import experiment_logger

    cfg, train, _, cohort = logged
    client, before, parent = mlflow_runs(cfg)
    logger = experiment_logger(cfg, (0, 1), cohort)
    assert logger is not None
    losses = Losses(total=9.0, ce=8.0, distill=1.0)
    event = StepEvent.of(
        step=20, epoch=0, batch_size=64, step_seconds=0.1, exchange_seconds=0.0,
        wait_seconds=0.0, bus=BusStats(), peers={i: PeerStep(0.05, losses, None) for i in (0, 1)},
        log_ps={}, target=torch.zeros(0),
    )  # fmt: skip
    logger.on_step(event)
    logger.on_end({})
    for peer in PEERS:
        scalars = tensorboard_scalars(cfg.run.dir / "tb" / peer)["train/loss"]
        old = {s: r["loss"] for s, r in train[peer].items() if s < 20}
        # tolerance: TensorBoard's event files store float32
        assert scalars == pytest.approx({**old, 20: 9.0})
        _, history = wandb_run(cfg.run.dir, peer, cohort)
        assert history["train/loss"][20] == 9.0
    assert len(list((cfg.run.dir / "wandb").glob("offline-run-*"))) == 2 * len(PEERS)
    client, after, parent_after = mlflow_runs(cfg)
    assert parent_after.info.run_id == parent.info.run_id
    for peer in PEERS:
        assert after[peer].info.run_id == before[peer].info.run_id
        values = [m.value for m in client.get_metric_history(after[peer].info.run_id, "train/loss")
                  if m.step == 20]  # fmt: skip
        assert values[-1] == 9.0


def test_a_logger_not_installed_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check_loggers` finds (never imports) each named logger; a missing one (here: a module
    name that cannot be installed) is one line naming the extra from `dml-cluster train`, exit
    2, before anything is written (the CLI's entry point, in this process)."""
    from dml_cluster import cli
    from dml_cluster.metrics import loggers

    monkeypatch.setitem(loggers.EXTRAS, "wandb", ("dml_cluster_no_such_module", "wandb"))
    out = tmp_path / "runs"
    for extra in ([], ["--nproc", "2"]):
        monkeypatch.setattr(
            "sys.argv",
            ["dml-cluster", "train", str(CONFIG), "--set", "metrics.loggers=[tensorboard,wandb]",
             "--set", f"run.out_dir={out}", *extra],
        )  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            cli.main()
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "dml-cluster: config error: metrics.loggers: wandb is not installed; install the "
            "extra: pip install 'dml-cluster[wandb]'"
        ]
        assert not out.exists()


def test_a_logger_failing_mid_run_is_one_warning_and_training_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A logger whose log call fails (a server gone) is switched off with one warning line; the
    others keep logging and nothing is raised into the training loop."""
    from dml_cluster.metrics.loggers.context import LoggerContext
    from dml_cluster.metrics.loggers.observer import ExperimentLogger

    class Broken:
        closed = None

        def log(self, peer: int, scalars: dict[str, float], step: int) -> None:
            raise ConnectionError("server unreachable\nmore detail")

        def close(self, finished: bool) -> None:
            Broken.closed = finished

    class Kept:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def log(self, peer: int, scalars: dict[str, float], step: int) -> None:
            self.steps.append(step)

        def close(self, finished: bool) -> None:
            pass

    cfg = load_config(CONFIG, [f"run.log_every={EVERY}"])
    kept = Kept()
    logger = ExperimentLogger(cfg, LoggerContext.of(cfg, (0,), "x"), [Broken(), kept])
    losses = Losses(total=1.0, ce=1.0, distill=0.0)
    for step in range(0, 3 * EVERY):
        logger.on_step(
            StepEvent.of(
                step=step,
                epoch=0,
                batch_size=8,
                step_seconds=0.1,
                exchange_seconds=0.0,
                wait_seconds=0.0,
                bus=BusStats(),
                peers={0: PeerStep(0.1, losses, None)},
                log_ps={},
                target=torch.zeros(0),
            )  # fmt: skip
        )
    assert kept.steps == [0, EVERY, 2 * EVERY] and Broken.closed is False
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "Broken failed at step 0 (server unreachable)" in line and "off" in line
