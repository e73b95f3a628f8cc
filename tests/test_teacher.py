"""Teacher peers: loaded, frozen, publish-only; bitwise unchanged; multi-process == one process.

The module's one-process runs (both update modes, FitNets stage one, a teacher that does not fit)
train in one process (tests/cohort_runs.cli_each, each with its own exit status and output);
the multi-process cohorts compare with them. `dml-cluster train` starts each cohort."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from dml_cluster.checkpoint import CohortCheckpoints, Position
from dml_cluster.cohort import Peer, build_peer, load_teacher, read_weights
from dml_cluster.config import Config, PeerConfig, parse_config
from dml_cluster.control import LocalControl
from dml_cluster.errors import ConfigError
from dml_cluster.method_inputs import MethodInputs
from dml_cluster.methods import Progress, StepView, build_method
from dml_cluster.models import build_model

from .cohort_runs import cli_each, sets
from .conftest import assert_same_states, final_weights, run_cli

DIGITS = (1, 8, 8)


def _save_teacher(path: Path, model: str = "small_cnn", args: dict | None = None) -> Path:
    torch.manual_seed(123)
    net = build_model(model, DIGITS, 10, **(args or {"width": 8}))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def _kd_config(tmp_path: Path, teacher: Path, method: dict | None = None) -> Path:
    raw = {
        "run": {"name": "kd"},
        "data": {"name": "digits", "batch_size": 32},
        "cohort": {
            "peers": [
                {"name": "s0", "model": "mlp", "args": {"hidden": [16]}},
                {"name": "teacher", "model": "small_cnn", "args": {"width": 8},
                 "role": "teacher", "checkpoint": str(teacher)},
                {"name": "s1", "model": "mlp", "args": {"hidden": [16]}},
            ]
        },
        "method": method or {"name": "kd", "peer_weight": 1.0},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "max_steps": 12},
    }  # fmt: skip
    if "metrics" in Config.model_fields:
        raw["metrics"] = {"enabled": False}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_teacher_untouched(run_dir: Path, teacher: Path) -> None:
    saved = torch.load(teacher, weights_only=True)
    final = final_weights(run_dir)["teacher"]
    assert saved.keys() == final.keys()
    for k in saved:  # bitwise, BN running statistics included
        assert torch.equal(saved[k], final[k]), k


@dataclass
class OneProcessRuns:
    """The module's one-process runs: their run folders, teachers and what each run printed."""

    runs: Path
    config: Path  # _kd_config of `teacher`
    teacher: Path
    fitnets_raw: dict  # the FitNets run's configuration, `fitnets_teacher` its teacher
    fitnets_teacher: Path
    bad_teacher: Path  # small_cnn of the wrong width for _kd_config
    done: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> OneProcessRuns:
    root = tmp_path_factory.mktemp("teacher")
    runs = root / "runs"
    teacher = _save_teacher(root / "kd" / "teacher.pt")
    config = _kd_config(root / "kd", teacher)
    fitnets_teacher = _save_teacher(root / "fitnets" / "teacher.pt", "small_cnn", {"width": 16})
    fitnets_raw = _fitnets_raw(root / "fitnets", fitnets_teacher)
    fitnets = root / "fitnets" / "fitnets.yaml"
    fitnets.write_text(yaml.safe_dump(fitnets_raw))
    at = root / "fitnets" / "at.yaml"  # the same cohort and teacher, AT under bf16 autocast
    layers = [["blocks.0", "blocks.1"], ["blocks.2", "blocks.2"]]
    at_method = {"name": "at", "teacher": fitnets_raw["method"]["teacher"], "layers": layers}
    at_run = {**fitnets_raw["run"], "precision": "bf16"}
    at.write_text(yaml.safe_dump({**fitnets_raw, "run": at_run, "method": at_method}))
    bad_teacher = _save_teacher(root / "bad" / "teacher.pt", "small_cnn", {"width": 4})
    bad = _kd_config(root / "bad", bad_teacher)
    commands = {  # the refusal first: it meets a fresh interpreter, as its own process would
        "bad": ["train", str(bad), *sets(f"run.out_dir={root / 'bad' / 'runs'}")],
        "simultaneous": ["train", str(config), *sets(
            f"run.out_dir={runs}", "run.name=simultaneous", "checkpoint.every_steps=5")],
        "sequential": ["train", str(config), *sets(
            f"run.out_dir={runs}", "run.name=sequential", "cohort.update=sequential")],
        "fitnets": ["train", str(fitnets), *sets(f"run.out_dir={runs}", "run.name=fitnets")],
        "at": ["train", str(at), *sets(f"run.out_dir={runs}", "run.name=at")],
    }  # fmt: skip
    done = cli_each(list(commands.values()), root / "one_process.json")
    return OneProcessRuns(
        runs, config, teacher, fitnets_raw, fitnets_teacher, bad_teacher,
        dict(zip(commands, done, strict=True)),
    )  # fmt: skip


def _trained(runs: OneProcessRuns, name: str) -> Path:
    proc = runs.done[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs.runs / name


def test_teacher_is_frozen_and_reported_but_not_in_the_ensemble(one_process: OneProcessRuns):
    run_dir = _trained(one_process, "simultaneous")
    _assert_teacher_untouched(run_dir, one_process.teacher)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peers"]["teacher"]["role"] == "teacher"
    assert len(summary["peers"]["teacher"]["per_class"]) == 10
    teacher_log = run_dir / "peers" / "teacher.jsonl"  # opened at its first record
    assert not teacher_log.exists() or not teacher_log.read_text().strip()  # no loss logged
    last = [json.loads(line) for line in (run_dir / "cohort.jsonl").open()][-1]
    assert last["ensemble"]["members"] == ["s0", "s1"]
    assert "| class | s0 | teacher | s1 | ensemble |" in one_process.done["simultaneous"].stdout


@pytest.mark.parametrize(
    ("transport", "update"), [("zmq", "simultaneous"), ("torch", "sequential")]
)
def test_multi_process_cohort_with_teacher_equals_one_process(
    one_process: OneProcessRuns, out_dir: Path, transport: str, update: str
) -> None:
    """The zmq cohort runs with the tightest credit window (`bus.window=1`: the teacher at most
    one step ahead) and checkpoints every 5 steps, as its one-process run does: the same
    weights, bitwise, and the same checkpoints."""
    expected = _trained(one_process, update)
    tight = ["bus.window=1", "checkpoint.every_steps=5"] if transport == "zmq" else []
    multi = run_cli(
        "train", str(one_process.config), *sets(
            f"run.out_dir={out_dir}", "run.name=multi", f"cohort.update={update}",
            f"bus.transport={transport}", *tight),
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert_same_states(expected, out_dir / "multi")
    _assert_teacher_untouched(out_dir / "multi", one_process.teacher)
    if tight:
        saved = [sorted(p.name for p in (run / "checkpoints").glob("step-*/manifest.json"))
                 for run in (expected, out_dir / "multi")]  # fmt: skip
        assert saved[0] and saved[0] == saved[1]


def test_fitnets_stage_one_trains_only_up_to_the_guided_layer(one_process: OneProcessRuns):
    after = final_weights(_trained(one_process, "fitnets"))["s"]
    cfg = parse_config(one_process.fitnets_raw)
    start = build_peer(cfg, 0, DIGITS, 10, torch.device("cpu")).model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("blocks.0.") for k in changed)
    assert any(k.startswith("blocks.1.") for k in changed)
    # past the guided layer nothing learnt: only BN running statistics may have moved
    assert all(k.startswith("blocks.2.") and "running" in k or "num_batches" in k
               for k in changed if not k.startswith(("blocks.0.", "blocks.1.")))  # fmt: skip
    assert torch.equal(start["fc.weight"], after["fc.weight"])


def test_at_trains_with_a_teacher_in_process_under_bf16(one_process: OneProcessRuns) -> None:
    """The FitNets cohort with method `at` (its teacher, two layer pairs, the first pooling the
    student's 4x4 maps to the teacher's 2x2) and bf16 autocast: the student learns everywhere."""
    after = final_weights(_trained(one_process, "at"))["s"]
    start = build_peer(parse_config(one_process.fitnets_raw), 0, DIGITS, 10, torch.device("cpu"))
    changed = {k for k, v in start.model.state_dict().items() if not torch.equal(v, after[k])}
    assert {k.split(".")[0] for k in changed} == {"blocks", "fc"}
    assert all(torch.isfinite(v).all() for v in after.values())


def _fitnets_raw(tmp_path: Path, teacher: Path) -> dict:
    method = {
        "name": "fitnets", "hint_epochs": 1, "guided_layer": "blocks.1", "hint_layer": "blocks.1",
        "teacher": {"name": "t", "model": "small_cnn", "args": {"width": 16}, "role": "teacher",
                    "checkpoint": str(teacher)},
    }  # fmt: skip
    raw = yaml.safe_load(_kd_config(tmp_path, teacher, method).read_text())
    raw["cohort"]["peers"] = [{"name": "s", "model": "small_cnn", "args": {"width": 4}}]
    raw["run"]["out_dir"] = str(tmp_path / "runs")
    return raw


def _inputs(cfg: Config) -> MethodInputs:
    return MethodInputs(build_method(cfg.method), cfg.run, DIGITS, 10)


def _hint_step(peer: Peer, inputs: MethodInputs, seed: int) -> None:
    """One stage-1 FitNets step of `peer` on a random batch, its inputs as the trainer gives
    them."""
    torch.manual_seed(seed)
    x, y = torch.randn(8, *DIGITS), torch.randint(0, 10, (8,))
    with inputs.recording(0) as features:
        logits = peer.model(x)
    given = inputs.gather([0], lambda _: x.device, lambda _: x, {0: features}, None)[0]
    view = StepView(0, [], [], Progress(0, 0, 10), given.features, given.teacher, None, peer.extras)
    parts = inputs.method(logits, y, view)
    peer.optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    peer.optimizer.step()


def test_fitnets_regressor_is_optimised_and_checkpointed_with_its_student(tmp_path: Path):
    teacher = _save_teacher(tmp_path / "teacher.pt", "small_cnn", {"width": 16})
    cfg = parse_config(_fitnets_raw(tmp_path, teacher))
    inputs = _inputs(cfg)
    peer = build_peer(cfg, 0, DIGITS, 10, torch.device("cpu"), inputs)
    regressor = peer.extras["regressor"]
    optimised = {id(p) for group in peer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in [*peer.model.parameters(), *regressor.parameters()]} == optimised
    before = {k: v.clone() for k, v in regressor.state_dict().items()}
    _hint_step(peer, inputs, seed=1)
    assert not torch.equal(before["weight"], regressor.weight)  # the hint loss trains it
    assert "momentum_buffer" in peer.optimizer.state[regressor.weight]

    checkpoints = CohortCheckpoints(cfg, cfg.run.dir)
    folder = checkpoints.save(Position(0, 1, 1), {0: peer}, [], LocalControl())
    saved = {k: v.clone() for k, v in regressor.state_dict().items()}
    momentum = peer.optimizer.state[regressor.weight]["momentum_buffer"].clone()
    assert set(torch.load(folder / "s.pt", weights_only=True)["extra"]) == {
        f"regressor.{k}" for k in saved
    }
    _hint_step(peer, inputs, seed=2)  # moves the regressor and its momentum on
    assert not torch.equal(saved["weight"], regressor.weight)

    restored = checkpoints.restore({0: peer}, LocalControl())
    assert restored is not None and restored.position.step == 1
    assert peer.extras["regressor"] is regressor  # the module every step's view hands over
    for k, v in saved.items():
        assert torch.equal(regressor.state_dict()[k], v), k
    assert torch.equal(peer.optimizer.state[regressor.weight]["momentum_buffer"], momentum)


def test_fitnets_regressor_starts_alike_in_every_layout(tmp_path: Path) -> None:
    """Peer 1's regressor does not depend on whether its process also built peer 0 (and loaded
    the teacher for it) or built peer 1 alone, as under torchrun."""
    teacher = _save_teacher(tmp_path / "teacher.pt", "small_cnn", {"width": 16})
    raw = _fitnets_raw(tmp_path, teacher)
    raw["cohort"]["peers"] = [{"name": n, "model": "small_cnn", "args": {"width": 4}} for n in "ab"]
    cfg = parse_config(raw)
    cpu = torch.device("cpu")
    together = _inputs(cfg)
    both = [build_peer(cfg, i, DIGITS, 10, cpu, together) for i in range(2)]
    alone = build_peer(cfg, 1, DIGITS, 10, cpu, _inputs(cfg))
    for k, v in alone.extras.state_dict().items():
        assert torch.equal(both[1].extras.state_dict()[k], v), k
    assert not torch.equal(both[0].extras["regressor"].weight, alone.extras["regressor"].weight)


def test_teacher_weights_from_a_cohort_checkpoint(tmp_path: Path) -> None:
    raw = {
        "run": {"out_dir": str(tmp_path / "runs")},
        "cohort": {"peers": [{"name": "a", "model": "mlp"}, {"name": "b", "model": "mlp"}]},
    }
    cfg = parse_config(raw)
    peers = {i: build_peer(cfg, i, DIGITS, 10, torch.device("cpu")) for i in range(2)}
    folder = CohortCheckpoints(cfg, cfg.run.dir).save(Position(1, 0, 5), peers, [], LocalControl())
    expected = peers[1].model.state_dict()
    for source in (folder / "b.pt", folder):  # a peer's file, or the step folder and a name
        weights = read_weights(source, "b")
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match=r"holds peers \['a', 'b'\]"):
        read_weights(folder, "zzz")
    teacher = PeerConfig(name="t", model="mlp", role="teacher", checkpoint=str(folder / "a.pt"))
    loaded = load_teacher(build_model("mlp", DIGITS, 10), teacher).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in peers[0].model.state_dict().items())


def test_teacher_weights_from_plain_files(tmp_path: Path) -> None:
    state = build_model("mlp", DIGITS, 10, hidden=[8]).state_dict()
    torch.save({"model": state, "step": 3}, tmp_path / "m.pt")
    assert read_weights(tmp_path / "m.pt").keys() == state.keys()
    (tmp_path / "step").mkdir()
    torch.save({"model": state}, tmp_path / "step" / "x.pt")
    assert read_weights(tmp_path / "step", "other").keys() == state.keys()  # the only peer there
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="not a readable torch file"):
        read_weights(tmp_path / "junk.pt")


def test_bad_teacher_checkpoint_is_one_line_exit_2(one_process: OneProcessRuns) -> None:
    proc = one_process.done["bad"]  # a small_cnn of width 4 where the config says 8
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not fit model 'small_cnn'" in proc.stderr
