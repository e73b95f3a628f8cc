"""One process per peer, started by torch's elastic launcher (torchrun), over real sockets.

The oracle: every peer's saved state (final weights; model, optimizer, schedule, extra modules,
loss scaler and random stream in the last checkpoint) equals the one-process engine's on the
same config and seed, bit for bit (`torch.equal`), for zmq and torch, simultaneous and
sequential; models that draw random numbers in training too (dropout, drop-path: each peer draws
from its own stream, dml_cluster.streams), also after a SIGKILL and a resume in another layout;
bf16 autocast and channels_last models on the CPU too. The matrix trains under two torchrun
launches (one per cohort size), each peer process running its configurations one after the
other (tests/cohort_runs.py); the references train once per session (conftest's `references`).
`dml-cluster train` itself starts the cohort below and in test_faults.py, test_curve.py,
test_teacher.py and the k8s / multi-node tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cohort_runs import sets, train_many
from .conftest import References, assert_same_states, final_weights, run_cli

TWO_HETERO = (
    "cohort.size=null", "cohort.model=null",
    "cohort.peers=[{name: mlp, model: mlp, args: {hidden: [64]}}, "
    "{name: cnn, model: small_cnn, args: {width: 8}}]",
)  # fmt: skip
STOCHASTIC = (
    "cohort.size=null", "cohort.model=null",
    "cohort.peers=[{name: tv, model: torchvision.mobilenet_v3_small, args: {width_mult: 0.25}}, "
    "{name: timm, model: timm.test_resnet, args: {drop_path_rate: 0.25}}, "
    "{name: own, model: 'tests.model_factories:dropout_net'}]",
    "train.max_steps=4",
)  # fmt: skip
"""Dropout (torchvision's classifier, the factory's), drop-path (timm): random in training."""
STEPS = ("train.max_steps=24",)  # 22 steps per epoch: crosses an epoch boundary
ENCODED = ("train.max_steps=3",)
"""The encodings' cohorts: three steps and the evaluation after the last."""
TOPK = ("bus.encoding=topk", "bus.k=3")
"""Each row's 3 most likely of 10 classes, the rest spread evenly (bfloat16 values)."""
SAMPLED = ("bus.encoding=sampled", "bus.samples=12", "method.temperature=2")
"""12 ids drawn from each row at T = 2, with counts (bfloat16 values)."""
GPU_READY = ("cohort.args.width=8", "train.max_steps=8")
TRANSPORTS = ("zmq", "torch")
# name: (cohort size, config, overrides); each runs over both transports (ONE_TRANSPORT: one)
MATRIX = {
    "k2-simultaneous": (2, "configs/digits-dml.yaml", (*TWO_HETERO, "cohort.update=simultaneous")),
    "k2-sequential": (2, "configs/digits-dml.yaml", (*TWO_HETERO, "cohort.update=sequential")),
    "semi": (2, "configs/digits-semi.yaml", ()),
    "k3-simultaneous": (3, "configs/digits-k3-hetero.yaml", ("cohort.update=simultaneous",)),
    "k3-sequential": (3, "configs/digits-k3-hetero.yaml", ("cohort.update=sequential",)),
    "dml-e": (3, "configs/digits-dml-e.yaml", ()),
    # every encoding is applied in every layout (bus/encoding.py): the one-process engine
    # reads what processes read, bit for bit
    "bfloat16": (2, "configs/digits-dml.yaml", (*TWO_HETERO, *ENCODED, "bus.encoding=bfloat16")),
    "float16": (
        2,
        "configs/digits-dml.yaml",
        (*TWO_HETERO, *ENCODED, "bus.encoding=float16", "cohort.update=sequential"),
    ),
    "topk": (2, "configs/digits-dml.yaml", (*TWO_HETERO, *ENCODED, *TOPK)),
    "topk-dml-e": (3, "configs/digits-dml-e.yaml", (*ENCODED, *TOPK, "cohort.update=sequential")),
    # sequential rounds draw ids of their own; the evaluation travels in 4 chunks of 100 rows
    "sampled": (
        2,
        "configs/digits-dml.yaml",
        (*TWO_HETERO, *ENCODED, *SAMPLED, "cohort.update=sequential", "data.eval_batch_size=100"),
    ),
    "stochastic-simultaneous": (3, "configs/digits-dml.yaml", STOCHASTIC),
    "stochastic-sequential": (
        3,
        "configs/digits-dml.yaml",
        (*STOCHASTIC, "cohort.update=sequential"),
    ),
    # CPU autocast and memory layout (dml_cluster/precision.py): bitwise in every layout too
    "bf16": (2, "configs/digits-dml.yaml", (*GPU_READY, "run.precision=bf16")),
    "channels-last": (2, "configs/digits-dml.yaml", (*GPU_READY, "run.channels_last=true")),
}
ONE_TRANSPORT = {
    "stochastic-simultaneous": "zmq",
    "stochastic-sequential": "torch",
    "bf16": "torch",
    "channels-last": "zmq",
}
"""The stochastic cohort once per transport (launches are the suite's cost): zmq simultaneous,
torch sequential (its refresh forward draws too); the resumed run below is zmq simultaneous."""
KILLED = "stochastic-simultaneous"
"""The cohort the one-process engine trains until a SIGKILL while saving step 4 (timm's file
half written), and that then resumes from step 2 as one process per peer over zmq."""
KILL = ("checkpoint.every_steps=2", "checkpoint.keep=10")
# what the `dml-cluster train` test below compares with (the k8s tests compare with it too)
CLI_RUN = ("configs/digits-dml.yaml", "train.max_steps=25", "metrics.enabled=false")


class Matrix:
    """Every MATRIX entry over its transports, and the stochastic cohort killed in one process
    and resumed in three: their run folders and the launches' output."""

    def __init__(self, root: Path, references: References) -> None:
        self.root = root
        self.output: dict[int, str] = {}
        _, config, items = MATRIX[KILLED]
        resumed = [config, *sets(*STEPS, *items, *KILL, f"run.out_dir={root}", "run.name=resumed",
                                 "metrics.enabled=false")]  # fmt: skip
        # the one-process references of the matrix, then (same process) the run that dies
        _, self.killed = references.then_killed(
            [*[(config, *STEPS, *items) for _, config, items in MATRIX.values()], CLI_RUN],
            [*resumed, *sets("bus.transport=local")],
            fault="die-saving:timm:4:resumed",
        )
        self.killed_steps = sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir())
        for size in sorted({size for size, _, _ in MATRIX.values()}):
            runs = [
                [config, *sets(*STEPS, *items, f"bus.transport={transport}",
                               f"run.out_dir={root}", f"run.name={name}-{transport}",
                               "metrics.enabled=false")]
                for name, (k, config, items) in MATRIX.items() if k == size
                for transport in TRANSPORTS if ONE_TRANSPORT.get(name, transport) == transport
            ]  # fmt: skip
            if size == 3:
                runs.append([*resumed, *sets("bus.transport=zmq")])
            proc = train_many(runs, root / f"k{size}.json", nproc=size)
            self.output[size] = f"exit {proc.returncode}\n{proc.stderr[-3000:]}\n{proc.stdout}"

    def run_dir(self, name: str, transport: str) -> Path:
        run_dir = self.root / f"{name}-{transport}"
        assert (run_dir / "summary.json").exists(), self.output[MATRIX[name][0]]
        return run_dir


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, references: References) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("matrix"), references)


def _expected(references: References, name: str) -> Path:
    _, config, items = MATRIX[name]
    (run_dir,) = references((config, *STEPS, *items))
    return run_dir


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("cohort", ["k2", "k3"])
def test_processes_match_one_process_engine(
    matrix: Matrix, references: References, cohort: str, transport: str, update: str
) -> None:
    name = f"{cohort}-{update}"
    got = matrix.run_dir(name, transport)
    assert len(final_weights(got)) == int(cohort[1])
    assert_same_states(_expected(references, name), got)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["semi", "dml-e"])
def test_semi_supervised_and_dml_e_match_across_processes(
    matrix: Matrix, references: References, name: str, transport: str
) -> None:
    assert_same_states(_expected(references, name), matrix.run_dir(name, transport))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("encoding", ["bfloat16", "float16", "topk", "topk-dml-e", "sampled"])
def test_every_encoding_trains_alike_in_one_process_and_in_processes(
    matrix: Matrix, references: References, encoding: str, transport: str
) -> None:
    """bus.encoding encodes what peers read in the one-process engine as between processes:
    bfloat16 (simultaneous) and float16 (sequential) predictions, top-k rows (DML
    simultaneous; DML_e's probability ensemble of three, sequential), sampled ids (DML at T = 2,
    sequential; the evaluation in chunks), weights and evaluations."""
    got = matrix.run_dir(encoding, transport)
    assert_same_states(_expected(references, encoding), got)


@pytest.mark.parametrize("name", ["bf16", "channels-last"])
def test_bf16_and_channels_last_match_across_processes(
    matrix: Matrix, references: References, name: str
) -> None:
    """bf16 autocast (torch transport) and channels_last (zmq) on the CPU: every peer's state
    equals the one-process engine's; the peers trained on the CPU, with finite losses."""
    got = matrix.run_dir(name, ONE_TRANSPORT[name])
    assert_same_states(_expected(references, name), got)
    log = got / "peers" / "small_cnn-0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all(r["device"] == "cpu" for r in records)  # the peer's device
    losses = [r["ce"] for r in records if r["event"] == "train"]
    assert losses and all(loss == loss for loss in losses), losses  # no NaN: it trains


@pytest.mark.parametrize("name", ["stochastic-simultaneous", "stochastic-sequential"])
def test_peers_that_draw_random_numbers_match_across_layouts(
    matrix: Matrix, references: References, name: str
) -> None:
    """torchvision's mobilenet_v3_small (dropout), a timm ResNet with drop-path and a factory
    model with nn.Dropout: each peer draws from its own stream, in any layout."""
    got = matrix.run_dir(name, ONE_TRANSPORT[name])
    assert_same_states(_expected(references, name), got)


def test_a_stochastic_cohort_killed_in_one_process_resumes_in_three(
    matrix: Matrix, references: References
) -> None:
    """SIGKILL while saving step 4 in the one-process engine; the cohort resumes from step 2
    with a process per peer (zmq), each peer's stream from its file, and ends as the
    uninterrupted run."""
    assert matrix.killed_steps == ["step-000000002", "step-000000004"]  # 4: torn (no manifest)
    run_dir = matrix.root / "resumed"
    assert (run_dir / "summary.json").exists(), matrix.output[3]
    assert "resuming at step 2 (epoch 1, step 2 of it)" in matrix.output[3]
    assert_same_states(_expected(references, KILLED), run_dir)


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
    assert_same_states(expected, run_dir)
