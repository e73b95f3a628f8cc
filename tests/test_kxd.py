"""K peers x D data-parallel replicas (cohort.replicas): a K = 2, D = 2 cohort on the CPU (gloo,
4 processes under torchrun) against the K = 2, D = 1 run with the same global batch.

One torchrun launch of 4 processes carries every D = 2 configuration (process starts are the
cost; tests/cohort_runs.py), and this process the rest:

- the launch (one restart allowed): first the MLP cohort (DML_e over the sampled wire) over zmq
  whose replica 0 of peer mlp-1 is SIGKILLed half-way through writing its checkpoint of step 16
  (tests/fault_injection.py): torchrun restarts the group, which resumes it from step 8 and then
  runs the rest once: the same cohort over torch; the same cohort sharded (cohort.shard: fsdp)
  for one epoch over torch, then carried on from its checkpoint of step 22 to step 24 over zmq;
  a semi-supervised MLP cohort (dense wire, labelled-only mimicry, sequential update) over
  torch; and the small CNN with BatchNorm per replica over zmq;
- this process (conftest.cli_here), after it: the D = 1 references of the MLP and the
  semi-supervised cohorts, then every command that must stop at start-up with one line (bad
  inputs, a resume with another D).

Why a tolerance against D = 1 and which: the replicas' mean gradient is DDP's average of two
half-batch gradients, the D = 1 gradient is one sum over the whole batch: the same terms, added in
another order, so float32 rounding differs by a few ulps per step (measured on this machine: max
|dw| 7.5e-8 for the sampled-wire MLP cohort, DDP and FSDP alike, and 9.7e-8 for the
semi-supervised one after their 24 steps). Rounding differences of this kind grow with the steps
but stay orders of magnitude below the weights' own step (lr 0.05 x gradients ~1e-2); 1e-6 leaves
10x the measured difference and is still 1000x below one SGD step, so a wrong shard, a wrong
normalisation or a missing gradient average (each a change of order 1e-3 and more after one step)
cannot pass. The sampled wire keeps this: a replica draws each row's ids with the uniforms of the
row's place in the peer's whole batch, so both runs draw the same ids from distributions ~1e-7
apart (an id could differ only where a uniform falls within that of a class boundary: about one
draw in 10^7, and the test's draws are fixed); rows drawn with their place in the replica's share
instead (replica 1's rows as rows 0..31) draw other ids and end 0.079 apart (measured), and fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dml_cluster.checkpoint.files import RunIdentity, read_manifest
from dml_cluster.config import load_config
from dml_cluster.errors import CheckpointError, ConfigError
from dml_cluster.launch.topology import Topology, check_world

from .cohort_runs import sets, train_many
from .conftest import (
    PER_PROCESS,
    _assert_same_tree,
    assert_same_states,
    cli_here,
    final_weights,
    max_weight_diff,
    saved_states,
)

CONFIG = "configs/digits-dml.yaml"
SEMI = "configs/digits-semi.yaml"
MLP = (
    "cohort.model=mlp",
    "cohort.args={}",
    "train.max_steps=24",
    "metrics.enabled=false",
    "optim.schedule.name=constant",
)
"""22 steps per epoch: the 24 steps cross an epoch boundary (its evaluation and checkpoint). A
constant schedule: a run stopped at the epoch's end may carry on to 24 steps (the fsdp run)."""
CHECKPOINTS = ("checkpoint.every_steps=8", "checkpoint.keep=10")
SEMI_MLP = (*MLP, "method.unlabelled_mimicry=false", "cohort.update=sequential")
"""CE and mimicry on the labelled rows only: both means divide by the all-reduced count."""
BN = (
    "cohort.model=small_cnn",
    "cohort.args={width: 8}",
    "train.max_steps=22",
    "metrics.enabled=false",
)
TOLERANCE = 1e-6  # float32 summation order of the gradient average (module docstring)
D2 = ("cohort.replicas=2",)
FSDP = (*D2, "cohort.shard=fsdp")
SAMPLED = (*MLP, *CHECKPOINTS, "bus.encoding=sampled", "bus.samples=4", "method.name=dml_e")
"""The MLP cohort of the kill, the transports and fsdp: DML_e over the sampled wire (each row's
ids drawn as the D = 1 run draws them: by its place in the peer's whole batch)."""


class Runs:
    """Every run folder of the module's two launches, the launches' output, and the one-line
    refusals' results (in the order of `REFUSED`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

        def run(config: str, name: str, *items: str) -> list[str]:
            return [config, *sets(*items, f"run.out_dir={root}", f"run.name={name}")]

        launch = [
            run(CONFIG, "killed", *SAMPLED, *D2, "bus.transport=zmq"),
            run(CONFIG, "torch", *SAMPLED, *D2, "bus.transport=torch"),
            # sharded: one epoch, then carried on to 24 steps from its checkpoint of step 22
            run(CONFIG, "fsdp", *SAMPLED, *FSDP, "bus.transport=torch", "train.max_steps=22"),
            run(CONFIG, "fsdp", *SAMPLED, *FSDP, "bus.transport=zmq"),
            run(SEMI, "semi", *SEMI_MLP, *D2, "bus.transport=torch"),
            run(CONFIG, "bn", *BN, *D2, "bus.transport=zmq"),
        ]
        fault = "die-saving:mlp-1:16:killed"  # replica 0 of mlp-1 dies writing step 16
        self.launch = train_many(launch, root / "a.json", nproc=4, max_restarts=1, fault=fault)
        self.output = {
            "a": f"exit {self.launch.returncode}\n{self.launch.stderr[-3000:]}\n"
            f"{self.launch.stdout}"
        }
        self.torch_before = _contents(root / "torch")  # what the resume refusal must not change
        references = [run(CONFIG, "d1", *SAMPLED), run(SEMI, "semi-d1", *SEMI_MLP)]
        bad_out = sets(f"run.out_dir={root / 'bad'}")
        refused = [
            *(["train", CONFIG, *args, *bad_out] for args in BAD.values()),
            ["train", *run(CONFIG, "torch", *SAMPLED)],  # D = 2's folder under D = 1
        ]
        done = cli_here([["train", *r] for r in references] + refused)
        self.references, self.refused = done[: len(references)], done[len(references) :]
        self.output["d1"] = "\n".join(f"exit {d.returncode}\n{d.stderr[-2000:]}" for d in done)

    def dir(self, name: str, launch: str) -> Path:
        run_dir = self.root / name
        assert (run_dir / "summary.json").exists(), self.output[launch]
        return run_dir


def _contents(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


BAD = {
    "data.batch_size: 64 does not divide into cohort.replicas 3": sets("cohort.replicas=3"),
    "--nproc 4 (or torchrun --nproc-per-node 4)": [
        "--nproc", "2", *sets("cohort.replicas=2", "bus.transport=zmq"),
    ],
    "cohort.replicas: 2 runs each peer as 2 processes: --nproc 4": sets("cohort.replicas=2"),
    "cohort.shard: fsdp shards each peer over its replicas, and cohort.replicas is 1":
        sets("cohort.shard=fsdp"),
    "cohort.shard: fsdp with run.channels_last": sets(*FSDP, "run.channels_last=true"),
}  # fmt: skip
"""A batch that does not divide by D, --nproc other than K x D, replicas without processes,
fsdp without replicas or with channels_last: the line each says (in part)."""
REFUSED = [
    *BAD,
    "holds checkpoints of another config (cohort.replicas: 2 → 1;",
]
RESUMES_WITH = "each replica's random stream is in them, so only the same cohort.replicas"
"""What the resume refusal says besides (why another D is refused)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("kxd"))


def test_two_replicas_per_peer_end_within_rounding_of_one(runs: Runs) -> None:
    """K = 2, D = 2 against K = 2, D = 1 (one process): the same weights up to the order of the
    gradient average's additions; the semi-supervised cohort too (masked means divided by the
    all-reduced labelled count)."""
    pairs = (("torch", "d1"), ("semi", "semi-d1"), ("fsdp", "d1"))
    for name, reference in pairs:
        replicated = final_weights(runs.dir(name, "a"))
        single = final_weights(runs.dir(reference, "d1"))
        diff = max_weight_diff(replicated, single)
        print(f"max |dw| {name} (D=2) vs {reference} (D=1): {diff:.3g}")
        assert diff < TOLERANCE, diff  # gradient average's summation order
        assert diff > 0  # not the same run: the additions' order differs (else the test is void)


def test_replicated_runs_are_bitwise_equal_across_transports_and_a_kill(runs: Runs) -> None:
    """Two runs of one config: over zmq, killed while saving and restarted by torchrun, and over
    torch: every peer's saved state equal bit for bit (its every replica's stream included)."""
    killed = runs.dir("killed", "a")
    assert "failed (exitcode: -9) local_rank: 2" in runs.launch.stderr  # replica 0 of mlp-1
    assert "resuming at step 8 (epoch 1, step 8 of it)" in runs.launch.stdout
    assert not list(killed.rglob("*.tmp"))
    assert_same_states(killed, runs.dir("torch", "a"))


def test_sharded_peers_train_as_replicated_ones_bitwise_and_resume(runs: Runs) -> None:
    """cohort.shard: fsdp (FSDP2 over each peer's 2 replicas), its first epoch over torch, then
    carried on from its checkpoint of step 22 over zmq: every peer's saved state (model and
    optimizer gathered whole, every replica's stream, the history) and final weights bit for bit
    those of the DDP run. Two replicas make that exact: DDP adds g0/2 + g1/2, FSDP2 (g0 + g1)/2,
    and halving a float32 is exact (no subnormals here); gathered shards are the values."""
    sharded, replicated = runs.dir("fsdp", "a"), runs.dir("torch", "a")
    assert "resuming at step 22 (epoch 2, step 0 of it)" in runs.launch.stdout
    a, b = saved_states(sharded), saved_states(replicated)
    assert a.keys() == b.keys() and {s["step"] for s in a.values()} == {"step-000000024"}
    differ = {*PER_PROCESS, "config_hash"}  # the configs differ in cohort.shard only
    for peer in a:
        assert not any(k.startswith("module.") for k in a[peer]["model"])
        mine = {k: v for k, v in a[peer].items() if k not in differ}
        theirs = {k: v for k, v in b[peer].items() if k not in differ}
        _assert_same_tree(mine, theirs, peer)
    _assert_same_tree(final_weights(sharded), final_weights(replicated), "final")


def test_a_model_fsdp_cannot_shard_is_refused_in_one_line() -> None:
    """FSDP2 shards every parameter on dim 0: a scalar parameter is refused before anything is
    sharded (the build is where a bad model is one line in every launch)."""
    from torch import nn

    from dml_cluster.replicas import Replicas, sharding

    shard = sharding(Replicas(0, 2, sharded=True))
    assert shard is not None and sharding(Replicas(0, 2)) is None
    model = nn.Linear(3, 2)
    model.scale = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ConfigError) as err:
        shard(model, "user.models:scaled")
    assert str(err.value) == (
        "config error: cohort.shard: fsdp cannot shard model 'user.models:scaled': parameter "
        "'scale' is a scalar (fully_shard splits every parameter on dim 0); use cohort.shard: ddp"
    )


def test_one_file_per_peer_holds_every_replica_stream(runs: Runs) -> None:
    """Replica 0 writes its peer's file (the plain model's names, no DDP `module.` prefix), the
    manifest records the replicas, the other replicas write no file of their own."""
    run_dir = runs.dir("torch", "a")
    step = run_dir / "checkpoints" / "step-000000024"
    assert sorted(p.name for p in step.iterdir() if p.suffix == ".pt") == ["mlp-0.pt", "mlp-1.pt"]
    assert json.loads((step / "manifest.json").read_text())["replicas"] == 2
    state = torch.load(step / "mlp-0.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])
    streams = state["replica_streams"]
    assert len(streams) == 2 and not torch.equal(streams[0]["cpu"], streams[1]["cpu"])
    assert sorted(p.name for p in (run_dir / "peers").iterdir()) == ["mlp-0.jsonl", "mlp-1.jsonl"]


def test_batchnorm_per_replica_trains(runs: Runs) -> None:
    """The small CNN with BatchNorm per replica (each normalises its own half of the batch): it
    learns (one epoch of digits; chance is 10 %)."""
    summary = json.loads((runs.dir("bn", "a") / "summary.json").read_text())
    for name, peer in summary["peers"].items():
        assert peer["final_accuracy"] > 0.4, (name, peer["final_accuracy"])


def test_refusals_are_one_line_each_and_write_nothing(runs: Runs) -> None:
    """The bad settings, and checkpoints of D = 2 resumed under D = 1 (refused: one line naming
    both; the weights would load, but each replica's random stream is in the file): one line,
    exit 2, nothing written (no new folder, the D = 2 folder byte for byte as it was)."""
    for line, done in zip(REFUSED, runs.refused, strict=True):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
        assert line in lines[0], lines[0]
    assert RESUMES_WITH in runs.refused[-1].stderr
    assert not (runs.root / "bad").exists()
    resumed = runs.dir("torch", "a")
    assert _contents(resumed) == runs.torch_before
    manifest = resumed / "checkpoints" / "step-000000024" / "manifest.json"
    identity = RunIdentity(resumed / "checkpoints", ("mlp-0", "mlp-1"), "x", replicas=4)
    with pytest.raises(CheckpointError, match="2 replica"):
        read_manifest(manifest, 24, identity)


def test_the_world_must_be_peers_times_replicas() -> None:
    """Under torchrun, WORLD_SIZE other than K x D names both ways to start K x D processes."""
    cfg = load_config(CONFIG, ["cohort.replicas=2"])
    topology = Topology.of(cfg)
    assert [topology.peer_of(r) for r in range(4)] == [0, 0, 1, 1]  # peer-major
    assert topology.exchange_ranks(1) == [1, 3] and topology.replica_ranks(1) == [2, 3]
    check_world(topology, 4)
    with pytest.raises(ConfigError) as err:
        check_world(topology, 2)
    line = str(err.value)
    assert "2 peers x 2 replicas" in line and "--nproc 4" in line
    assert "torchrun --nproc-per-node 4" in line


def test_k8s_render_writes_one_pod_per_process() -> None:
    """`k8s render` of a 2 x 2 cohort: 4 pods of one process each, in every engine's terms."""
    from dml_cluster.k8s import RenderOptions, pod_config, render

    from .conftest import REPO

    cfg, raw = pod_config(REPO / CONFIG, ["cohort.replicas=2", "bus.transport=torch"])
    opts = {"image": "example.org/dml:1", "namespace": "dml"}
    job = render(cfg, raw, RenderOptions(engine="indexed-job", **opts))["indexed-job.yaml"]
    indexed = next(d for d in job if d["kind"] == "Job")
    assert indexed["spec"]["completions"] == indexed["spec"]["parallelism"] == 4
    trainjob = render(cfg, raw, RenderOptions(engine="trainjob", **opts))["trainjob.yaml"]
    train = next(d for d in trainjob if d["kind"] == "TrainJob")
    assert train["spec"]["trainer"]["numNodes"] == 4


def test_replicas_read_the_batch_in_shares_each_sample_augmented_as_in_one() -> None:
    """The D shares of a step's batch are its rows in order, and each row is cropped and flipped
    as the whole batch's augmentation does it (the draws are made for the batch, rows taken)."""
    from dml_cluster.data.augment import augment_batch
    from dml_cluster.data.loader import StepSampler, shard_rows

    whole = list(StepSampler(100, 16, 7, 2, 0, 3))
    shares = [list(StepSampler(100, 16, 7, 2, 0, 3, (r, 4))) for r in range(4)]
    assert [sum((s[step] for s in shares), []) for step in range(3)] == whole
    x = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8)
    kwargs = {"seed": 1, "epoch": 2, "step": 3, "crop_padding": 2, "flip": True}
    expected = augment_batch(x, **kwargs)
    for r in range(4):
        rows = shard_rows(16, (r, 4))
        share = augment_batch(x[rows], rows=rows, batch_size=16, **kwargs)
        assert torch.equal(share, expected[rows])
