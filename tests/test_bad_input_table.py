"""Bad input to every command (issue 21): exit status 2, exactly one line on stderr, no
traceback, and the folder it ran in left as it was (every file's digest before and after).

Each row runs `dml_cluster.cli.main` in this process (what `dml-cluster ARGS` runs) with the
working directory in a fresh folder of inputs; the one failure only a cohort of processes meets
(a metrics port in use under `--nproc 2`) is a real launch."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from dml_cluster import cli

from .conftest import CLI, cli_env
from .faults_helpers import snapshot

GOOD = {
    "run": {"name": "good", "out_dir": "runs"},
    "data": {"name": "digits"},
    "cohort": {"size": 2, "model": "small_cnn", "args": {"width": 4}},
    "train": {"epochs": 1, "max_steps": 2},
    "metrics": {"enabled": False},
}
SEARCH = {
    "run": {"name": "srch", "out_dir": "runs"},
    "data": {"name": "digits", "train_subset": {"fraction": 0.8, "seed": 0}},
    "method": {"name": "kd"},
    "search": {
        "teacher": {"model": "small_cnn", "checkpoint": "teacher.pt"},
        "rounds": 1,
        "candidates": 2,
        "proxy_epochs": 1,
        "cost": {"metric": "flops", "target": 0.1},
    },
}


@dataclass(frozen=True)
class Row:
    """`dml-cluster ARGS` and a phrase its one line must hold."""

    args: tuple[str, ...]
    says: str

    @property
    def id(self) -> str:
        return " ".join(self.args)


def _rows(*rows: tuple[str, str]) -> list[Row]:
    return [Row(tuple(args.split()), says) for args, says in rows]


ROWS = _rows(
    # train: the config, its overrides, the launcher's options, the data, the run folder
    ("train missing.yaml", "missing.yaml"),
    ("train notyaml.yaml", "notyaml.yaml"),
    ("train list.yaml", "list.yaml"),
    ("train good.yaml --set optim.lrr=0.1", "optim.lrr"),
    ("train good.yaml --set optim.lr", "optim.lr"),
    ("train good.yaml --set train.epochs=-1", "train.epochs"),
    ("train good.yaml --set cohort.model=resnet_nope", "resnet_nope"),
    ("train good.yaml --set data.name=nope", "data.name"),
    ("train good.yaml --nproc 0", "--nproc 0"),
    ("train good.yaml --nproc 3", "--nproc 2"),
    ("train good.yaml --max-restarts -1", "--max-restarts -1"),
    ("train good.yaml --nproc x", "--nproc"),
    ("train good.yaml --bogus", "--bogus"),
    ("train good.yaml --set data.batch_size=100000", "data.batch_size"),
    ("train good.yaml --set run.out_dir=/proc/nope", "not writable"),
    ("train good.yaml --set data.name=imagefolder --set data.root=nothing", "data.root"),
    # search
    ("search missing.yaml", "missing.yaml"),
    ("search good.yaml", "search"),
    ("search search.yaml --set search.rounds=0", "search.rounds"),
    ("search search.yaml --set search.nope=1", "search.nope"),
    ("search search.yaml", "teacher.pt"),
    ("search search.yaml --compare runs/nonexistent", "runs/nonexistent"),
    # report
    ("report runs/nonexistent", "no such run folder"),
    ("report empty", "not a run folder"),
    ("report broken", "not a JSON record"),
    ("report good.yaml", "good.yaml"),
    # analyze
    ("analyze runs/nonexistent", "runs/nonexistent"),
    ("analyze empty", "empty"),
    ("analyze empty --sigma a,b", "--sigma"),
    ("analyze empty --sigma 0", "--sigma"),
    ("analyze empty --draws 0", "--draws"),
    ("analyze empty --config missing.yaml", "missing.yaml"),
    ("analyze empty --config good.yaml --draws 0", "--draws"),
    # k8s render
    ("k8s render good.yaml", "--image"),
    ("k8s render missing.yaml --image i:1", "missing.yaml"),
    ("k8s render good.yaml --image i:1 --label novalue", "--label"),
    ("k8s render good.yaml --image i:1 --engine nope", "--engine"),
    (
        "k8s render good.yaml --image i:1 --set bus.transport=zmq --gpus-per-peer -1",
        "--gpus-per-peer",
    ),
    ("k8s render good.yaml --image i:1 --set optim.lrr=1", "optim.lrr"),
    (
        "k8s render good.yaml --image i:1 --set bus.transport=zmq --dashboard missing.json",
        "missing.json",
    ),
    ("k8s render good.yaml --image i:1", "bus.transport"),
    # keys
    ("keys generate good.yaml", "good.yaml"),
    ("keys generate keys --name ../up", "--name"),
    ("keys generate", "FOLDER"),
    # config show
    ("config show missing.yaml", "missing.yaml"),
    ("config show good.yaml --set nope=1", "nope"),
    ("config show notyaml.yaml", "notyaml.yaml"),
    ("config nope", "nope"),
    # tokenizer train
    ("tokenizer train missing.txt --vocab 300", "missing.txt"),
    ("tokenizer train text.txt --vocab 0", "--vocab"),
    ("tokenizer train binary.bin --vocab 300", "binary.bin"),
    ("tokenizer train text.txt --vocab 300 --out empty", "empty"),
    # generate
    ("generate runs/nonexistent --peer a", "runs/nonexistent"),
    ("generate empty --peer a", "empty"),
    ("generate empty", "--peer"),
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the rows name; each row gets a copy (a row's output must never land here)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "good.yaml").write_text(yaml.safe_dump(GOOD))
    (root / "search.yaml").write_text(yaml.safe_dump(SEARCH))
    (root / "notyaml.yaml").write_text("run: {name: [unclosed\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "cohort.jsonl").write_text('{"event": "eval"}\nnot json\n')
    (root / "text.txt").write_text("a few words of text, a few words again\n" * 20)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    return root


@pytest.fixture
def process_state() -> Iterator[None]:
    """What a command sets for its whole process (signal handlers, torch switches): put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    signal.set_wakeup_fd(wakeup)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _one_line_exit_2(code: object, err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dml-cluster: "), err
    assert code == 2, (code, err)
    return lines[0]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    row: Row,
    inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    process_state: None,
) -> None:
    import shutil

    here = tmp_path / "here"
    shutil.copytree(inputs, here)
    monkeypatch.chdir(here)
    before = snapshot(here), sorted(p.name for p in here.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["dml-cluster", *row.args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    line = _one_line_exit_2(stop.value.code, capsys.readouterr().err)
    assert row.says in line, line
    assert (snapshot(here), sorted(p.name for p in here.rglob("*"))) == before


def test_a_metrics_port_in_use_under_nproc_is_one_line_and_leaves_no_run_folder(
    inputs: Path, tmp_path: Path
) -> None:
    """Peer 0's port is taken: the cohort agrees to stop before anything is written (peer 1
    served its endpoint and takes its file back); one line, from peer 0, exit 2."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "train", str(inputs / "good.yaml"), "--nproc", "2",
             "--set", f"run.out_dir={tmp_path / 'runs'}", "--set", "metrics.enabled=true",
             "--set", f"metrics.port={port}", "--set", "bus.transport=zmq"],
            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    line = _one_line_exit_2(proc.returncode, proc.stderr)
    assert "cannot serve on" in line and f":{port}:" in line, line
    assert not (tmp_path / "runs").exists()
