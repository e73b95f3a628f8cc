"""Models a user brings: torchvision builders, timm models and the user's own factories beside
the built-in ones, in one cohort and under FitNets; a peer's `weights`; every bad model input is
one line, exit 2, and leaves nothing in the run folder.

The CLI runs share one process (tests/cohort_runs.py `cli_each`); runs are tiny (digits, three
steps, metrics off)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dml_cluster.cohort import build_peer
from dml_cluster.config import parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model, check_model_name, is_builtin, timm_source

from .cohort_runs import cli_each, sets, train_many
from .conftest import assert_same_states, final_weights
from .faults_helpers import snapshot
from .model_factories import tiny_net

DIGITS = (1, 8, 8)
FACTORY = "tests.model_factories:tiny_net"
PAIR = [  # a torchvision model and a factory's, in one process and one process each
    {"name": "tv", "model": "torchvision.shufflenet_v2_x0_5"},
    {"name": "own", "model": FACTORY},
]
MIXED = [
    {"name": "tv", "model": "torchvision.mobilenet_v3_small"},
    {"name": "timm", "model": "timm.test_resnet"},
    {"name": "own", "model": FACTORY, "args": {"width": 16}},
    {"name": "cnn", "model": "small_cnn", "args": {"width": 8}},
]


def _config(
    root: Path, name: str, peers: list[dict[str, Any]], method: dict[str, Any] | None = None
) -> str:
    raw = {
        "run": {"name": name, "out_dir": str(root / "runs")},
        "data": {"name": "digits"},
        "cohort": {"peers": peers},
        "method": method or {"name": "dml"},
        "train": {"epochs": 1, "max_steps": 3},
        "metrics": {"enabled": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _fitnets(root: Path, guided: str, hint: str) -> dict[str, Any]:
    teacher = root / "teacher.pt"
    if not teacher.exists():
        torch.save(build_model("timm.test_resnet", DIGITS, 10).state_dict(), teacher)
    teacher_peer = {"name": "teacher", "model": "timm.test_resnet", "role": "teacher"}
    return {
        "name": "fitnets",
        "guided_layer": guided,
        "hint_layer": hint,
        "teacher": teacher_peer | {"checkpoint": str(teacher)},
    }


def _bad_cases(root: Path) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any], str]]:
    """name -> (peers, method, what the one line says)."""
    (root / "junk.pt").write_bytes(b"not a torch file")
    torch.save([1, 2, 3], root / "list.pt")
    torch.save(build_model("small_cnn", DIGITS, 10).state_dict(), root / "cnn.pt")
    own = {"name": "own", "model": FACTORY}
    cnn = {"name": "cnn", "model": "small_cnn"}
    dml: dict[str, Any] = {}
    return {
        "tv-unknown": ([{"model": "torchvision.resnet81"}, cnn], dml, "did you mean resnet18"),
        "timm-unknown": ([{"model": "timm.tset_resnet"}, cnn], dml, "did you mean test_resnet"),
        "no-module": ([{"model": "tests.no_such_module:net"}, cnn], dml, "no module named"),
        "no-attribute": (
            [{"model": "tests.model_factories:tiny_nett"}, cnn],
            dml,
            "did you mean tiny_net",
        ),
        "not-callable": (
            [{"model": "tests.model_factories:NOT_CALLABLE"}, cnn],
            dml,
            "is not callable",
        ),
        "not-a-module": (
            [{"model": "tests.model_factories:not_a_module"}, cnn],
            dml,
            "cohort.peers.0.model: model 'tests.model_factories:not_a_module' built a str, not",
        ),
        "factory-raises": (
            [{"model": "tests.model_factories:broken"}, cnn],
            dml,
            "raised ValueError: boom",
        ),
        "too-small": ([{"model": "torchvision.squeezenet1_1"}, cnn], dml, "cannot take a batch"),
        "download": (
            [{"model": "torchvision.resnet18", "args": {"weights": "DEFAULT"}}, cnn],
            dml,
            "never downloaded",
        ),
        "num-classes": (
            [{"model": "timm.test_resnet", "args": {"num_classes": 3}}, cnn],
            dml,
            "args.num_classes: the number comes from the data",
        ),
        "weights-missing": (
            [own | {"weights": str(root / "none.pt")}, cnn],
            dml,
            "none.pt: no such file",
        ),
        "weights-junk": (
            [own | {"weights": str(root / "junk.pt")}, cnn],
            dml,
            "not a readable torch file",
        ),
        "weights-list": ([own | {"weights": str(root / "list.pt")}, cnn], dml, "no model state"),
        "weights-misfit": (
            [own | {"weights": str(root / "cnn.pt")}, cnn],
            dml,
            "does not fit model",
        ),
        "guided-layer": (
            [{"model": "torchvision.mobilenet_v3_small"}],
            _fitnets(root, "feature.1", "layer1"),
            "has no module 'feature.1' (close: features.1",
        ),
        "hint-layer": (
            [{"model": "torchvision.mobilenet_v3_small"}],
            _fitnets(root, "features.1", "layer5"),
            "has no module 'layer5' (close: layer4",
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every CLI run of the module, in one process: the good ones, then each bad input."""
    root = tmp_path_factory.mktemp("external")
    torch.save(tiny_net(10, DIGITS, width=16).state_dict(), root / "own.pt")
    mixed = [p | {"weights": str(root / "own.pt")} if p["name"] == "own" else p for p in MIXED]
    good = {
        "mixed": _config(root, "mixed", mixed),
        "pair": _config(root, "pair", PAIR),
        "fitnets": _config(
            root,
            "fitnets",
            [{"name": "student", "model": "torchvision.mobilenet_v3_small"}],
            _fitnets(root, "features.1", "layer1"),
        ),
    }
    bad = _bad_cases(root)
    configs = good | {
        name: _config(root, name, peers, method) for name, (peers, method, _) in bad.items()
    }
    done = cli_each([["train", path] for path in configs.values()], root / "spec.json")
    results = dict(zip(configs, done, strict=True))
    return {"root": root, "results": results, "bad": bad}


def test_a_mixed_cohort_trains_from_a_config(runs: dict[str, Any]) -> None:
    """torchvision, timm, a factory from tests/ and a built-in model learn from each other."""
    proc = runs["results"]["mixed"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = runs["root"] / "runs" / "mixed"
    weights = final_weights(run_dir)
    assert sorted(weights) == sorted(p["name"] for p in MIXED)
    assert weights["own"].keys() == tiny_net(10, DIGITS, width=16).state_dict().keys()
    start = torch.load(runs["root"] / "own.pt", weights_only=True)
    assert any(not torch.equal(start[k], v) for k, v in weights["own"].items())  # it learned
    cohort = [json.loads(line) for line in (run_dir / "cohort.jsonl").read_text().splitlines()]
    evals = [r["ensemble"] for r in cohort if "ensemble" in r]
    assert evals and evals[-1]["members"] == [p["name"] for p in MIXED]


def test_a_mixed_cohort_in_one_process_per_peer_ends_bitwise_as_in_one(
    runs: dict[str, Any],
) -> None:
    """torch.distributed (gloo), a process per peer: the same final weights, bitwise (each
    peer's initialisation and its build-time probe depend on nothing of the layout)."""
    root = runs["root"]
    assert runs["results"]["pair"].returncode == 0, runs["results"]["pair"].stderr[-2000:]
    settings = sets("run.name=pair-torch", "bus.transport=torch")
    proc = train_many([[str(root / "pair.yaml"), *settings]], root / "pair.json", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_states(root / "runs" / "pair", root / "runs" / "pair-torch")


def test_fitnets_takes_module_names_of_torchvision_and_timm_models(runs: dict[str, Any]) -> None:
    proc = runs["results"]["fitnets"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = final_weights(runs["root"] / "runs" / "fitnets")
    assert "student" in weights


@pytest.mark.parametrize(
    "case",
    [
        "tv-unknown", "timm-unknown", "no-module", "no-attribute", "not-callable",
        "not-a-module", "factory-raises", "too-small", "download", "num-classes", "weights-missing",
        "weights-junk", "weights-list", "weights-misfit", "guided-layer", "hint-layer",
    ],
)  # fmt: skip
def test_a_bad_model_input_is_one_line_and_writes_nothing(runs: dict[str, Any], case: str) -> None:
    proc = runs["results"][case]
    expected = runs["bad"][case][2]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    run_dir = runs["root"] / "runs" / case
    assert not run_dir.exists(), snapshot(run_dir)  # not even the folder the claim made


def test_timm_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets without it
    timm_source._timm.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs timm.*pip install 'dml-cluster\[timm\]'"):
            check_model_name("timm.resnet18")
    finally:
        timm_source._timm.cache_clear()


def test_weights_are_the_students_initial_weights(tmp_path: Path) -> None:
    """A student with `weights` starts from that state_dict, exactly; the size+model form gives
    every copy the same file."""
    state = tiny_net(10, DIGITS, width=4).state_dict()
    torch.save({"model": state}, tmp_path / "w.pt")
    cohort = {"size": 2, "model": FACTORY, "args": {"width": 4}, "weights": str(tmp_path / "w.pt")}
    cfg = parse_config({"cohort": cohort})
    for i in range(2):
        model = build_peer(cfg, i, DIGITS, 10, torch.device("cpu")).model
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_teacher_takes_no_weights_key() -> None:
    teacher = {"model": "mlp", "role": "teacher", "checkpoint": "t.pt", "weights": "w.pt"}
    with pytest.raises(ConfigError, match="weights is for students"):
        parse_config({"cohort": {"peers": [teacher, {"model": "mlp"}]}, "method": {"name": "kd"}})


def test_one_channel_images_are_repeated_for_torchvision_models() -> None:
    """A grey batch gives the logits of its three-channel copy; the state_dict is torchvision's."""
    torch.manual_seed(0)
    grey = build_model("torchvision.shufflenet_v2_x0_5", (1, 16, 16), 10).eval()
    rgb = build_model("torchvision.shufflenet_v2_x0_5", (3, 16, 16), 10).eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(grey(x), rgb(x.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize(
    "name", ["torchvision.resnet18", "torchvision.mobilenet_v3_small", "timm.resnet18d"]
)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_imagenet_models_take_small_images(name: str, shape: tuple[int, int, int]) -> None:
    """What the README says of sizes: these build and pass their probe on (Fashion-)MNIST and
    CIFAR sizes."""
    assert build_model(name, shape, 10) is not None


def test_builtin_or_not() -> None:
    assert is_builtin("small_cnn")
    assert not is_builtin("torchvision.resnet18") and not is_builtin(FACTORY)
