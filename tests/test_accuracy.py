"""What the accuracy benchmark relies on: the stratified training subset, paired initialisation
and batch order across methods, and DML_e's two ensembles."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dml_cluster import losses
from dml_cluster.cohort import build_peer
from dml_cluster.config import load_config, parse_config
from dml_cluster.data.split import subset_indices, training_subset
from dml_cluster.errors import ConfigError, DataError
from dml_cluster.method_config.dml import DMLConfig
from dml_cluster.method_inputs import MethodInputs
from dml_cluster.methods import StepView, build_method

from .cohort_runs import train_each
from .conftest import REPO, final_weights

LABELS = torch.arange(1000) % 10
LABELS = LABELS[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]


def test_subset_is_stratified_and_seeded() -> None:
    keep = subset_indices(LABELS, 7, per_class=30)
    assert torch.bincount(LABELS[keep]).tolist() == [30] * 10
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == 300
    assert torch.equal(keep, subset_indices(LABELS, 7, per_class=30))
    assert not torch.equal(keep, subset_indices(LABELS, 8, per_class=30))
    # a smaller subset of the same seed is not required to nest; a fraction keeps round(f * n_c)
    assert torch.bincount(LABELS[subset_indices(LABELS, 7, fraction=0.25)]).tolist() == [25] * 10
    with pytest.raises(DataError, match="per_class: 101 samples of class 0 asked"):
        subset_indices(LABELS, 7, per_class=101)


def test_subset_config_picks_its_seed_or_the_runs() -> None:
    def cfg(subset: dict) -> object:
        raw = {"cohort": {"size": 2, "model": "mlp"}, "data": {"train_subset": subset}}
        return parse_config(raw).data.train_subset

    fixed = cfg({"per_class": 30, "seed": 0})
    assert torch.equal(training_subset(LABELS, fixed, 5), training_subset(LABELS, fixed, 6))
    by_run = cfg({"per_class": 30})
    assert torch.equal(training_subset(LABELS, by_run, 5), subset_indices(LABELS, 5, per_class=30))
    assert training_subset(LABELS, None, 5) is None
    for bad in ({"per_class": 3, "fraction": 0.1}, {"seed": 1}, {"per_class": 0}):
        with pytest.raises(ConfigError, match="data.train_subset"):
            cfg(bad)


def _cohort(method: dict, peers: list[dict], seed: int = 3) -> object:
    raw = {"run": {"seed": seed}, "cohort": {"peers": peers}, "method": method}
    return parse_config(raw)


def test_peer_k_starts_alike_whatever_the_method(tmp_path: Path) -> None:
    student = {"model": "small_cnn", "args": {"width": 4}}
    teacher_file = tmp_path / "teacher.pt"
    torch.save(build_peer(_cohort({"name": "independent"}, [student] * 3), 2, (1, 8, 8), 10,
                          torch.device("cpu")).model.state_dict(), teacher_file)  # fmt: skip
    teacher = {**student, "name": "t", "role": "teacher", "checkpoint": str(teacher_file)}
    cohorts = {
        "independent": _cohort({"name": "independent"}, [student] * 2),
        "dml": _cohort({"name": "dml"}, [student] * 2),
        "dml_e": _cohort({"name": "dml_e", "ensemble": "logits"}, [student] * 3),
        "kd (teacher listed last)": _cohort({"name": "kd"}, [student, student, teacher]),
    }
    first = {}
    for name, cfg in cohorts.items():
        for k in (0, 1):
            method = MethodInputs(build_method(cfg.method), cfg.run, (1, 8, 8), 10)
            peer = build_peer(cfg, k, (1, 8, 8), 10, torch.device("cpu"), method)
            state = peer.model.state_dict()
            reference = first.setdefault(k, state)
            assert all(torch.equal(reference[n], state[n]) for n in state), (name, k)
    assert not torch.equal(first[0]["fc.weight"], first[1]["fc.weight"])
    other_seed = build_peer(_cohort({"name": "dml"}, [student] * 2, seed=4), 0, (1, 8, 8), 10,
                            torch.device("cpu")).model.state_dict()  # fmt: skip
    assert not torch.equal(first[0]["fc.weight"], other_seed["fc.weight"])


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.timeout(180)
def test_paired_runs_see_the_same_batches(tmp_path: Path) -> None:
    """Independent, DML with weight 0 and KD with kd_weight 0 (teacher listed after the
    students) are all plain CE: trained for two epochs on a subset they end bitwise equal, so
    the method changes neither peer k's initial weights nor the batches it sees."""
    common = {
        "run": {"seed": 5, "out_dir": str(tmp_path / "runs")},
        "data": {"name": "digits", "batch_size": 32, "train_subset": {"per_class": 20}},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2},
        "metrics": {"enabled": False},
        "checkpoint": {"enabled": False},
    }
    student = {"model": "mlp", "args": {"hidden": [16]}}

    def config(name: str, cohort: dict, method: dict) -> str:
        run = {**common["run"], "name": name}
        return _write(tmp_path / f"{name}.yaml", {**common, "run": run, "cohort": cohort,
                                                  "method": method})  # fmt: skip

    teacher = {**student, "name": "t", "role": "teacher",
               "checkpoint": str(tmp_path / "runs" / "alone" / "final" / "mlp-1.pt")}  # fmt: skip
    alone = config("alone", {"size": 2, **student}, {"name": "independent"})
    dml = config("dml", {"size": 2, **student}, {"name": "dml", "weight": 0.0})
    students = [{**student, "name": "s0"}, {**student, "name": "s1"}]
    kd = config("kd", {"peers": [*students, teacher]}, {"name": "kd", "kd_weight": 0.0})
    procs = train_each([[alone], [dml], [kd]], tmp_path / "spec.json")
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr[-2000:] for p in procs]
    runs = {n: final_weights(tmp_path / "runs" / n) for n in ("alone", "dml", "kd")}
    assert load_config(alone).data.train_subset.per_class == 20
    summary = json.loads((tmp_path / "runs" / "alone" / "summary.json").read_text())
    assert summary["steps"] == 2 * (200 // 32)  # the subset, not the 1,000-odd digits
    for k, kd_name in ((0, "s0"), (1, "s1")):
        for other in (runs["dml"][f"mlp-{k}"], runs["kd"][kd_name]):
            mine = runs["alone"][f"mlp-{k}"]
            assert all(torch.equal(mine[n], other[n]) for n in mine)


def test_logits_ensemble_is_the_normalised_geometric_mean_and_sharper() -> None:
    g = torch.Generator().manual_seed(0)
    others = [F.log_softmax(2 * torch.randn(256, 10, generator=g, dtype=torch.float64), 1)
              for _ in range(3)]  # fmt: skip
    by_hand = torch.softmax(torch.stack(others).mean(0), dim=1)
    target = losses.ENSEMBLES["logits"](others)
    assert torch.allclose(target.exp(), by_hand, rtol=0, atol=1e-12)
    probs = losses.ENSEMBLES["probs"](others)
    assert torch.allclose(probs.exp(), torch.stack(others).exp().mean(0), atol=1e-12)
    assert losses.entropy(target) < losses.entropy(probs)  # on average, not on every row


def test_dml_e_logits_pulls_towards_the_geometric_mean() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    others = [F.log_softmax(torch.randn(8, 5, dtype=torch.float64, generator=g), 1)
              for _ in range(2)]  # fmt: skip
    y = torch.randint(0, 5, (8,), generator=g)
    parts = build_method(DMLConfig(name="dml_e", ensemble="logits"))(z, y, StepView.of(others))
    (grad,) = torch.autograd.grad(parts.distill, z)
    target = torch.softmax(torch.stack(others).mean(0), 1)
    assert torch.allclose(grad, (torch.softmax(z, 1) - target).detach() / 8, atol=1e-12)
    probs = build_method(DMLConfig(name="dml_e"))(z, y, StepView.of(others)).distill
    assert not torch.isclose(parts.distill, probs)  # differs by more than float rounding
    with pytest.raises(ConfigError, match="ensemble is a setting of dml_e only"):
        parse_config({"cohort": {"size": 2, "model": "mlp"},
                      "method": {"name": "dml", "ensemble": "logits"}})  # fmt: skip


CIFAR_RECIPES = {
    # config: (models, epochs, batch, lr, nesterov, schedule, method)
    "configs/cifar100-dml-resnet32.yaml": (["resnet32"] * 2, 200, 64, 0.1, True, "step", "dml"),
    "configs/cifar100-resnet32x4-teacher.yaml": (["resnet32x4"], 240, 64, 0.05, False,
                                                  "multistep", "independent"),
    "configs/cifar100-resnet8x4.yaml": (["resnet8x4"], 240, 64, 0.05, False, "multistep",
                                        "independent"),
    "configs/cifar100-kd-res32x4-res8x4.yaml": (["resnet8x4", "resnet32x4"], 240, 64, 0.05, False,
                                                "multistep", "kd"),
    "configs/cifar100-dkd-res32x4-res8x4.yaml": (["resnet8x4", "resnet32x4"], 240, 64, 0.05,
                                                 False, "multistep", "dkd"),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(CIFAR_RECIPES))
def test_cifar100_recipes_validate(path: str) -> None:
    models, epochs, batch, lr, nesterov, schedule, method = CIFAR_RECIPES[path]
    cfg = load_config(REPO / path)
    assert [p.model for p in cfg.peers] == models and cfg.method.name == method
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr) == (epochs, batch, lr)
    assert cfg.optim.nesterov is nesterov and cfg.optim.weight_decay == 5e-4
    assert cfg.optim.schedule.name == schedule and cfg.optim.schedule.gamma == 0.1
    if schedule == "multistep":
        assert cfg.optim.schedule.milestones == [150, 180, 210]
    assert cfg.data.name == "cifar100" and cfg.data.augment.crop_padding == 4
    assert cfg.data.augment.flip is True


def test_multistep_schedule_divides_at_the_milestones() -> None:
    from dml_cluster.optimizer import build_scheduler

    cfg = load_config(REPO / "configs/cifar100-resnet8x4.yaml").optim.schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = build_scheduler(opt, cfg, 240)
    lrs = []
    for _ in range(240):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[149] == pytest.approx(0.05) and lrs[150] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(5e-4) and lrs[239] == pytest.approx(5e-5)
    with pytest.raises(ConfigError, match="multistep schedule needs milestones"):
        parse_config({"cohort": {"size": 1, "model": "mlp"},
                      "optim": {"schedule": {"name": "multistep"}}})  # fmt: skip


def test_cifar100_suite_lists_one_command_per_run(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("accuracy", REPO / "benchmarks/accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    sys.modules["accuracy"] = accuracy  # its dataclasses look their module up
    spec.loader.exec_module(accuracy)
    accuracy.main(["--suite", "cifar100", "--root", "/data/c100", "--out", "R", "--dry-run",
                   "--json", "/nonexistent/none.json"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[2] for line in lines] == [
        "configs/cifar100-resnet32x4-teacher.yaml",
        "configs/cifar100-dml-resnet32.yaml",
        "configs/cifar100-dml-resnet32.yaml",
        "configs/cifar100-resnet8x4.yaml",
        "configs/cifar100-kd-res32x4-res8x4.yaml",
        "configs/cifar100-dkd-res32x4-res8x4.yaml",
    ]
    assert all("--set data.root=/data/c100" in line for line in lines)
    teacher = "--set cohort.peers.1.checkpoint=R/cifar100-teacher-s0/final/teacher.pt"
    assert all(teacher in line for line in lines[-2:])
