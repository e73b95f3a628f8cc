"""A run folder started again (issue 21, items 1 and 2): a finished run says so in one line, exits
0 and changes no file (one process, the `--nproc` launcher, every peer of a real two-process
cohort); checkpoints of another config are refused naming the keys that differ; a longer run
under a length-free schedule carries on bitwise as if planned that long; `--init-from` starts a
new run from another run's final weights; keys added to the config at their defaults do not
orphan a run folder."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dml_cluster.checkpoint.standing import examine
from dml_cluster.cohort import build_peer
from dml_cluster.config import config_diff, config_hash, hashed_view, load_config
from dml_cluster.errors import CheckpointError, ConfigError
from dml_cluster.init_from import source_summary

from .cohort_runs import sets
from .conftest import REPO, final_weights
from .faults_helpers import snapshot

CONFIG = str(REPO / "configs" / "digits-dml.yaml")
TINY = (
    "data.train_subset.per_class=10", "data.batch_size=32", "train.epochs=2",
    "metrics.enabled=false", "cohort.args.width=4",
)  # fmt: skip
STEP = ("optim.schedule.name=step", "optim.schedule.step_epochs=1")  # a length-free schedule


def settings(out: Path, name: str, *more: str) -> list[str]:
    return [*TINY, f"run.out_dir={out}", f"run.name={name}", *more]


@pytest.fixture
def quiet_process() -> Iterator[None]:
    """What an in-process run changes in this process (signal handlers, torch's threads and
    determinism), put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(strict)


def dml(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """`dml-cluster ARGS` in this process: its exit status and every line it wrote."""
    from dml_cluster.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["dml-cluster", *args]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, (out + err).splitlines()


def train_local(*items: str) -> dict[str, Any]:
    from dml_cluster.launch import run_local

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return run_local(load_config(CONFIG, list(items)))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


ZMQ = "bus.transport=zmq"


def launch_entries(folder: Path) -> list[list[str]]:
    """Finished two-epoch runs, one process each (in this process): `cosine` (the config's
    schedule) and `step` (a length-free schedule); a record of `cosine`'s files; then the entries
    of the session's two-peer launch (conftest's `two_peer_launch`; the test below): `cosine`
    started again, `step` given a third epoch, `step3` planned three epochs from the start, and
    `warm` from `cosine`'s final weights."""
    train_local(*settings(folder, "cosine"))
    train_local(*settings(folder, "step", *STEP))
    (folder / "cosine.before.json").write_text(json.dumps(snapshot(folder / "cosine")))
    return [
        [CONFIG, *sets(*settings(folder, "cosine", ZMQ))],
        [CONFIG, *sets(*settings(folder, "step", *STEP, "train.epochs=3", ZMQ))],
        [CONFIG, *sets(*settings(folder, "step3", *STEP, "train.epochs=3", ZMQ))],
        [CONFIG, *sets(*settings(folder, "warm", "train.epochs=1", ZMQ)), "--init-from",
         str(folder / "cosine")],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(two_peer_launch: Path) -> Path:
    """The folder of `launch_entries`' runs, its launch done (`cosine` finished in two epochs;
    `step` carried on to three under the launch)."""
    return two_peer_launch / "test_finished_runs"


def test_finished_run_started_again_changes_nothing(
    runs: Path, capsys: pytest.CaptureFixture[str], quiet_process: None
) -> None:
    """One process, then the `--nproc 2` launcher: one line each (where the results are, how to
    start a new run or train longer), exit 0, every file byte for byte as it was."""
    folder = runs / "cosine"
    before = snapshot(folder)
    for more in ([], ["--nproc", "2"]):
        code, lines = dml(capsys, "train", CONFIG, *sets(*settings(runs, "cosine")), *more)
        assert code == 0 and len(lines) == 1, lines
        assert lines[0].startswith(f"{folder} is a finished run (2 epochs, 6 steps;"), lines
        assert f"{folder / 'summary.json'}" in lines[0] and "--set run.name=NEW" in lines[0]
        assert f"--init-from {folder}" in lines[0] and "train.epochs=N" in lines[0]
        assert snapshot(folder) == before


def test_config_mismatch_names_the_keys_and_what_to_do(
    runs: Path, capsys: pytest.CaptureFixture[str], quiet_process: None
) -> None:
    folder = runs / "cosine"
    before = snapshot(folder)
    code, lines = dml(capsys, "train", CONFIG, *sets(*settings(runs, "cosine", "train.epochs=5")))
    assert code == 2 and len(lines) == 1, lines
    assert "(train.epochs: 2 → 5): the cosine schedule spans train.epochs" in lines[0], lines
    assert f"--init-from {folder} --set run.name=NEW" in lines[0]
    changed = settings(runs, "cosine", "train.epochs=5", "optim.lr=0.1")
    code, lines = dml(capsys, "train", CONFIG, *sets(*changed), "--nproc", "2")
    assert code == 2 and len(lines) == 1, lines  # refused before any peer process starts
    assert "(optim.lr: 0.05 → 0.1; train.epochs: 2 → 5; hash " in lines[0], lines
    assert f"({folder / 'config.yaml'})" in lines[0] and f"--init-from {folder}" in lines[0]
    code, lines = dml(
        capsys, "train", CONFIG, *sets(*settings(runs, "step", *STEP, "train.epochs=1"))
    )
    assert code == 2 and len(lines) == 1, lines
    assert "past the end of this config (train.epochs: " in lines[0], lines  # 2 or 3 → 1
    assert snapshot(folder) == before
    cut = settings(runs, "cut", *STEP, "train.epochs=3", "train.max_steps=4")  # 3 steps an epoch
    train_local(*cut)
    before = snapshot(runs / "cut")
    with pytest.raises(
        CheckpointError, match="stopped at train.max_steps in the middle of an epoch"
    ):
        train_local(*cut, "train.max_steps=6")
    assert snapshot(runs / "cut") == before
    assert config_diff({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}, "c": "x"}) == [
        'a.b.1: 2 → 3', 'c: (absent) → "x"'
    ]  # fmt: skip


def test_torchrun_peers_finish_extend_and_init_from(runs: Path) -> None:
    """One real two-process cohort (each process a peer, as torchrun or Kubernetes start them)
    for four runs (`launch_entries`): the finished run changes nothing and says so once; the
    `step` run given a third epoch carries on and ends bitwise as `step3`, the run planned three
    epochs from the start; `warm` starts from `cosine`'s final weights and records it."""
    launch = runs.parent
    code, stdout = (launch / "launch.code").read_text(), (launch / "launch.out").read_text()
    assert code == "0", (launch / "launch.err").read_text()[-3000:]
    finished = runs / "cosine"
    assert snapshot(finished) == json.loads((runs / "cosine.before.json").read_text())
    assert stdout.count(f"{finished} is a finished run") == 1, stdout
    assert stdout.count("continuing") == 1 and "train.epochs: 2 → 3" in stdout
    assert f"resuming at step 6 (epoch 3, step 0 of it) from {runs / 'step'}" in stdout
    starting = f"starting from the final weights of {finished} (step 6, epoch 2, config "
    assert stdout.count(starting) == 1, stdout
    record = json.loads((runs / "warm" / "summary.json").read_text())["init_from"]
    source_hash = load_config(CONFIG, settings(runs, "cosine")).hash()
    assert record == {
        "run": "cosine", "config_hash": source_hash, "steps": 6, "epochs": 2,
        "folder": str(finished),
    }  # fmt: skip
    from dml_cluster.report import load_run, summary_markdown

    page = summary_markdown(load_run(runs / "warm"), {})
    assert f"- **initialised from**: the final weights of {finished} (step 6)" in page
    longer, planned = final_weights(runs / "step"), final_weights(runs / "step3")
    assert longer.keys() == planned.keys()
    for peer, state in longer.items():
        assert all(torch.equal(state[k], planned[peer][k]) for k in state), peer
    summary = json.loads((runs / "step" / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["transport"] == "zmq"
    assert (
        summary["config_hash"]
        == json.loads((runs / "step3" / "summary.json").read_text())["config_hash"]
    )


def test_init_from_loads_the_final_weights_and_checks_the_source(runs: Path) -> None:
    source = runs / "cosine"
    cfg = load_config(CONFIG, settings(runs, "warm", f"train.init_from={source}"))
    for i, name in enumerate(["small_cnn-0", "small_cnn-1"]):
        model = build_peer(cfg, i, (1, 8, 8), 10, torch.device("cpu")).model.state_dict()
        final = torch.load(source / "final" / f"{name}.pt", weights_only=True)
        assert all(torch.equal(model[k], final[k]) for k in final)
    refusals = {
        "cohort.model=mlp": "no final weights for mlp-0, mlp-1 (its peers: small_cnn-0, small_cnn-1)",  # noqa: E501
        f"train.init_from={runs / 'nope'}": "nope: no such folder",
        "run.name=cosine": "is this run's own folder",
    }
    for override, expected in refusals.items():
        more = [] if override.startswith("train.") else [f"train.init_from={source}"]
        cfg = load_config(CONFIG, [*settings(runs, "other", *more), override])
        with pytest.raises(ConfigError, match=re.escape(expected)):
            source_summary(cfg)
    cfg = load_config(
        CONFIG, settings(runs, "other", f"train.init_from={source}", "cohort.args.width=8")
    )
    with pytest.raises(ConfigError, match=r"train.init_from .*small_cnn-0.pt does not fit model"):
        build_peer(cfg, 0, (1, 8, 8), 10, torch.device("cpu"))
    assert not (runs / "other").exists()


def test_keys_added_since_at_their_defaults_keep_a_run_folder(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder written before a key existed (here: `optim.nesterov`, recorded only in its
    config.yaml, as before manifests recorded the config) resumes under today's config, whose
    hash differs; with its results gone it resumes at its end and writes them."""
    folder = runs / "older"
    shutil.copytree(runs / "cosine", folder)
    cfg = load_config(CONFIG, settings(runs, "older"))
    old = cfg.to_dict()
    del old["optim"]["nesterov"]  # a config of a version that did not have the key
    assert config_hash(old) != cfg.hash() and hashed_view(old) != hashed_view(cfg.to_dict())
    (folder / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    for manifest in folder.glob("checkpoints/*/manifest.json"):
        record = json.loads(manifest.read_text())
        del record["config"]
        manifest.write_text(json.dumps(record | {"config_hash": config_hash(old)}))
    standing = examine(cfg, folder)
    assert standing.continues == {config_hash(old)} and standing.changed == ()
    shutil.rmtree(folder / "final")
    (folder / "summary.json").unlink()
    capsys.readouterr()
    train_local(*settings(runs, "older"))
    out = capsys.readouterr().out
    assert "resuming at step 6 (the end of training (2 epochs): writing the results)" in out, out
    assert json.loads((folder / "summary.json").read_text())["steps"] == 6
    assert final_weights(folder).keys() == {"small_cnn-0", "small_cnn-1"}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict() | {"seed": 1}))
    with pytest.raises(CheckpointError, match="the run folder does not record that config"):
        examine(cfg, folder)
