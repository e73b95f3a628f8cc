"""One process per peer, started by torch's elastic launcher (torchrun), over real sockets.

The oracle: every peer's final weights equal the one-process engine's on the same config and
seed (in practice bitwise; the bar is 1e-6), for zmq and torch, simultaneous and sequential.
The matrix trains under two torchrun launches (one per cohort size), each peer process running
its configurations one after the other (tests/cohort_runs.py); the references train once per
session (conftest's `references`). `dml-cluster train` itself starts the cohort below and in
test_faults.py, test_curve.py, test_teacher.py and the k8s / multi-node tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cohort_runs import sets, train_many
from .conftest import References, final_weights, max_weight_diff, run_cli

TWO_HETERO = (
    "cohort.size=null", "cohort.model=null",
    "cohort.peers=[{name: mlp, model: mlp, args: {hidden: [64]}}, "
    "{name: cnn, model: small_cnn, args: {width: 8}}]",
)  # fmt: skip
STEPS = ("train.max_steps=24",)  # 22 steps per epoch: crosses an epoch boundary
TRANSPORTS = ("zmq", "torch")
# name: (cohort size, config, overrides); each runs over both transports
MATRIX = {
    "k2-simultaneous": (2, "configs/digits-dml.yaml", (*TWO_HETERO, "cohort.update=simultaneous")),
    "k2-sequential": (2, "configs/digits-dml.yaml", (*TWO_HETERO, "cohort.update=sequential")),
    "semi": (2, "configs/digits-semi.yaml", ()),
    "k3-simultaneous": (3, "configs/digits-k3-hetero.yaml", ("cohort.update=simultaneous",)),
    "k3-sequential": (3, "configs/digits-k3-hetero.yaml", ("cohort.update=sequential",)),
    "dml-e": (3, "configs/digits-dml-e.yaml", ()),
}


class Matrix:
    """Every MATRIX entry over both transports: its run folder and the launch's output."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.output: dict[int, str] = {}
        for size in sorted({size for size, _, _ in MATRIX.values()}):
            runs = [
                [config, *sets(*items, *STEPS, f"bus.transport={transport}",
                               f"run.out_dir={root}", f"run.name={name}-{transport}",
                               "metrics.enabled=false")]
                for name, (k, config, items) in MATRIX.items() if k == size
                for transport in TRANSPORTS
            ]  # fmt: skip
            proc = train_many(runs, root / f"k{size}.json", nproc=size)
            self.output[size] = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"

    def run_dir(self, name: str, transport: str) -> Path:
        run_dir = self.root / f"{name}-{transport}"
        assert (run_dir / "summary.json").exists(), self.output[MATRIX[name][0]]
        return run_dir


# what the `dml-cluster train` test below compares with (the k8s tests compare with it too)
CLI_RUN = ("configs/digits-dml.yaml", "train.max_steps=25", "metrics.enabled=false")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, references: References) -> Matrix:
    references(*[(config, *items, *STEPS) for _, config, items in MATRIX.values()], CLI_RUN)
    return Matrix(tmp_path_factory.mktemp("matrix"))


def _expected(references: References, name: str) -> dict:
    _, config, items = MATRIX[name]
    (run_dir,) = references((config, *items, *STEPS))
    return final_weights(run_dir)


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("cohort", ["k2", "k3"])
def test_processes_match_one_process_engine(
    matrix: Matrix, references: References, cohort: str, transport: str, update: str
) -> None:
    name = f"{cohort}-{update}"
    got = final_weights(matrix.run_dir(name, transport))
    assert len(got) == int(cohort[1])
    assert max_weight_diff(_expected(references, name), got) <= 1e-6


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["semi", "dml-e"])
def test_semi_supervised_and_dml_e_match_across_processes(
    matrix: Matrix, references: References, name: str, transport: str
) -> None:
    got = final_weights(matrix.run_dir(name, transport))
    assert max_weight_diff(_expected(references, name), got) <= 1e-6


def test_the_cli_starts_the_cohort_and_rank_zero_writes_its_summary(
    tmp_path: Path, references: References
) -> None:
    """`dml-cluster train` with a zmq config starts one process per peer through torchrun."""
    config, *items = CLI_RUN
    proc = run_cli(
        "train", config, *sets(*items, "bus.transport=zmq", f"run.out_dir={tmp_path}", "run.name=r")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transport"] == "zmq" and "ensemble" in summary
    assert sorted(p.name for p in (run_dir / "peers").iterdir()) == [
        "small_cnn-0.jsonl", "small_cnn-1.jsonl",
    ]  # fmt: skip
    assert proc.stderr.count("bus inbox tcp://127.0.0.1:") == 2  # one process per peer
    (expected,) = references(CLI_RUN)
    assert max_weight_diff(final_weights(expected), final_weights(run_dir)) <= 1e-6
