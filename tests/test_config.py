"""Config: typed loading, overrides, and a one-line error with exit status 2 for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dml_cluster.config import load_config
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.kd import KDConfig

from .conftest import REPO, run_cli

GOOD = {
    "data": {"name": "digits"},
    "cohort": {"size": 2, "model": "mlp"},
    "method": {"name": "dml"},
}

BAD = [
    # (what to change, the key the message must name, words it must contain)
    ({"cohort": {"size": 2, "model": "mlp", "colour": "red"}}, "cohort.colour", "unknown key"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "number"),
    ({"cohort": {"size": 0, "model": "mlp"}}, "cohort.size", "greater than or equal to 1"),
    ({"data": {"label_fraction": 0.0}}, "data.label_fraction", "greater than 0"),
    ({"data": {"label_fraction": 1.5}}, "data.label_fraction", "less than or equal to 1"),
    ({"method": {"temperature": 0}}, "method.temperature", "greater than 0"),
    ({"method": {"temperature": -2}}, "method.temperature", "greater than 0"),
    ({"cohort": {"size": 2, "model": "resnet9000"}}, "cohort.model", "unknown model"),
    (
        {"cohort": {"peers": [{"model": "mlp"}, {"model": "nope"}]}},
        "cohort.peers.1.model",
        "unknown model",
    ),
    (
        {"method": {"name": "telepathy"}},
        "method.name",
        "unknown method 'telepathy' (known: at, dkd, dml",
    ),
    (
        {"method": {"alpha": 2}},
        "method.alpha",
        "unknown key for method 'dml' (alpha belongs to dkd",
    ),
    ({"method": {"name": "dkd", "kd_weight": 0.5}}, "method.kd_weight", "belongs to fitnets, kd"),
    ({"method": {"name": "dml_e", "colour": 1}}, "method.colour", "dml_e takes weight, temp"),
    ({"data": {"name": "imagenet"}}, "data.name", "unknown dataset"),
    ({"cohort": {"update": "sometimes", "size": 2, "model": "mlp"}}, "cohort.update", "sequential"),
]


def _write(tmp_path: Path, patch: dict) -> Path:
    raw = {**GOOD, **patch}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("patch", "key", "words"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_in_process(tmp_path: Path, patch: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, patch))
    message = str(err.value)
    assert "\n" not in message
    assert key in message and words in message, message


@pytest.mark.parametrize(
    ("patch", "key"), [(BAD[0][0], "cohort.colour"), (BAD[2][0], "cohort.size"),
                       (BAD[5][0], "method.temperature"), (BAD[7][0], "cohort.model")],
)  # fmt: skip
def test_bad_config_cli_one_line_exit_2(tmp_path: Path, patch: dict, key: str) -> None:
    run_dir = tmp_path / "runs"
    proc = run_cli("train", str(_write(tmp_path, patch)), "--set", f"run.out_dir={run_dir}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dml-cluster: config error: ") and key in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists()  # nothing started


def test_cli_errors_for_missing_file_bad_yaml_and_bad_override(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort: [unclosed\n")
    good = _write(tmp_path, {})
    cases = [
        (("config", "show", str(tmp_path / "missing.yaml")), "no such file"),
        (("config", "show", str(bad)), "not valid YAML"),
        (("config", "show", str(good), "--set", "cohort.size=-1"), "cohort.size"),
        (("config", "show", str(good), "--set", "nonsense"), "KEY=VALUE"),
    ]
    for args, words in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_overrides_are_typed_and_reach_lists(tmp_path: Path) -> None:
    path = _write(tmp_path, {"cohort": {"peers": [{"model": "mlp"}, {"model": "small_cnn"}]}})
    cfg = load_config(
        path, ["optim.lr=0.01", "cohort.peers.1.model=resnet8", "train.max_steps=5",
               "data.augment.flip=true", "run.name=x"],
    )  # fmt: skip
    assert cfg.optim.lr == 0.01 and cfg.train.max_steps == 5 and cfg.data.augment.flip is True
    assert [p.model for p in cfg.peers] == ["mlp", "resnet8"]
    assert [p.name for p in cfg.peers] == ["mlp-0", "resnet8-1"]
    with pytest.raises(ConfigError, match="no list item 7"):
        load_config(path, ["cohort.peers.7.model=mlp"])


def test_config_show_prints_resolved_config() -> None:
    proc = run_cli("config", "show", "configs/digits-dml.yaml", "--set", "optim.lr=0.2")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["optim"]["lr"] == 0.2
    assert shown["bus"]["transport"] == "local"  # a default, filled in
    assert "config hash" in proc.stdout


def test_every_shipped_config_is_valid() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_config_hash_ignores_where_results_go() -> None:
    a = load_config(REPO / "configs/digits-dml.yaml")
    b = load_config(REPO / "configs/digits-dml.yaml", ["run.out_dir=/tmp/x", "run.name=y"])
    c = load_config(REPO / "configs/digits-dml.yaml", ["optim.lr=0.3"])
    assert a.hash() == b.hash() != c.hash()


def test_method_defaults_to_dml_with_its_own_settings(tmp_path: Path) -> None:
    no_method = {k: v for k, v in GOOD.items() if k != "method"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(no_method))
    assert load_config(path).method.name == "dml"
    cfg = load_config(path, ["method.weight=0.5"])
    assert (cfg.method.name, cfg.method.weight, cfg.method.temperature) == ("dml", 0.5, 1.0)
    assert KDConfig().temperature == 4.0 and "weight" not in KDConfig.model_fields


def test_every_method_name_has_settings_and_a_loss() -> None:
    from dml_cluster.method_config import method_names
    from dml_cluster.methods import METHODS

    assert sorted(METHODS) == method_names()


def test_config_hash_is_what_decides_the_numbers() -> None:
    from dml_cluster.checkpoint import CohortCheckpoints

    path = REPO / "configs/digits-dml.yaml"
    base = load_config(path)
    same = [
        "run.out_dir=/tmp/x", "run.name=y", "run.log_every=3", "metrics.enabled=false",
        "checkpoint.every_steps=7", "checkpoint.keep=5", "bus.transport=zmq", "bus.ipc=true",
        "bus.timeout_s=5", "bus.port=2000",
    ]  # fmt: skip
    for override in same:
        assert load_config(path, [override]).hash() == base.hash(), override
    for override in ["optim.lr=0.3", "bus.encoding=float16", "run.seed=1", "method.weight=0.5"]:
        assert load_config(path, [override]).hash() != base.hash(), override
    assert CohortCheckpoints(base, base.run.dir).config_hash == base.hash()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.epoch=3", "train.epoch: unknown key (did you mean epochs?)"),
        ("data.batchsize=8", "data.batchsize: unknown key (did you mean batch_size?)"),
        ("cohort.peers.0.modl=mlp", "cohort.peers.0.modl: unknown key (did you mean model?)"),
        ("zzz=1", "zzz: unknown key"),
    ],
)
def test_an_unknown_key_suggests_the_closest_known_one(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "digits-k3-hetero.yaml", [override])
    assert str(err.value) == f"config error: {line}"
