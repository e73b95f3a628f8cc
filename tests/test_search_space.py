"""The search space, the `searched` model and the reward (unit tests, no training)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model
from dml_cluster.models.searched import SearchedNet
from dml_cluster.search.reward import reward
from dml_cluster.search.settings import SpaceSettings
from dml_cluster.search.space import DECISIONS, Arch

SPACE = SpaceSettings().build()
SHAPES = [(1, 28, 28), (3, 32, 32)]


def _tokens(decision: str, choice: int, base: int = 0) -> list[int]:
    """Every block takes `choice` for `decision` and choice `base` (or the last one) elsewhere."""
    tokens = []
    for _ in range(SPACE.blocks):
        for d in DECISIONS:
            n = len(SPACE.choices(d))
            tokens.append(choice if d == decision else min(base, n - 1))
    return tokens


def _variants() -> list[tuple[str, int, int]]:
    """Every value of every decision, once with the other decisions at their first choice and
    once at their last (so that e.g. every op meets expansion 6, SE and identity skips)."""
    return [
        (d, c, base) for d in DECISIONS for c in range(len(SPACE.choices(d))) for base in (0, 9)
    ]


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_every_decision_value_builds_a_model_that_trains(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    for decision, choice, base in _variants():
        arch = SPACE.decode(_tokens(decision, choice, base))
        model = build_model("searched", shape, 10, arch=arch.to_dict())
        x = torch.randn(2, *shape)
        logits = model(x)
        assert logits.shape == (2, 10), (decision, choice)
        logits.logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (decision, choice)


def test_decoded_blocks_follow_the_plan_and_the_choices() -> None:
    arch = SPACE.decode(_tokens("width", 3, base=2))  # width 1.25, op mbconv, layers 3
    assert [b.stride for b in arch.blocks] == list(SPACE.strides)
    assert [b.channels for b in arch.blocks] == [20, 32, 40, 60, 80]
    assert all(b.op == "mbconv" and b.layers == 3 for b in arch.blocks)
    model = SearchedNet((1, 28, 28), 10, arch)
    assert len(model.blocks) == 3 * SPACE.blocks


def test_identity_skip_only_where_shapes_allow() -> None:
    arch = SPACE.decode(_tokens("skip", 0, base=2))  # identity, 3 layers per block
    model = SearchedNet((1, 28, 28), 10, arch)
    residual = [layer.residual for layer in model.blocks]
    # a block's first layer skips only if it keeps the channels and the resolution (block 0
    # here: 16 -> 16 channels, stride 1); the others always can
    firsts = [
        b.stride == 1 and b.channels == c
        for b, c in zip(arch.blocks, [16, 16, 24, 32, 48], strict=True)
    ]
    assert residual == [firsts[i // 3] if i % 3 == 0 else True for i in range(3 * SPACE.blocks)]
    assert firsts == [True, False, False, False, False]
    none = SearchedNet((1, 28, 28), 10, SPACE.decode(_tokens("skip", 1, base=2)))
    assert not any(layer.residual for layer in none.blocks)


def test_spec_round_trips_through_yaml_json_and_the_model() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        tokens = [int(torch.randint(n, (1,), generator=g)) for n in SPACE.vocabulary()]
        arch = SPACE.decode(tokens)
        spec = arch.to_dict()
        assert Arch.from_dict(yaml.safe_load(yaml.safe_dump(spec))) == arch
        assert Arch.from_dict(json.loads(json.dumps(spec))) == arch
        model = build_model("searched", (1, 28, 28), 10, arch=spec)
        assert model.arch == arch and model.arch.to_dict() == spec
        assert Arch.from_dict(spec).hash() == arch.hash()


def test_hash_is_stable_and_identifies_the_network() -> None:
    arch = SPACE.decode([0] * len(SPACE.vocabulary()))
    assert arch.hash() == "f4a6908e423b"  # a fixed spec hashes the same in every process/version
    # equivalent spellings hash alike: expansion means nothing outside MBConv, MBConv e1 = dwsep
    spec = arch.to_dict()
    spec["blocks"][0]["expansion"] = 6
    assert Arch.from_dict(spec).hash() == arch.hash()
    spec["blocks"][0].update(op="mbconv", expansion=1)
    dwsep = arch.to_dict()
    dwsep["blocks"][0]["op"] = "dwsep"
    assert Arch.from_dict(spec).hash() == Arch.from_dict(dwsep).hash()
    spec["blocks"][0]["expansion"] = 3
    assert Arch.from_dict(spec).hash() != arch.hash()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"blocks": []}, "non-empty list"),
        ({"blocks": [{"op": "pool", "kernel": 3, "layers": 1, "channels": 8, "stride": 1}]},
         "op must be one of"),
        ({"blocks": [{"op": "conv", "kernel": 4, "layers": 1, "channels": 8, "stride": 1}]},
         "kernel must be odd"),
        ({"blocks": [{"op": "conv", "kernel": 3, "layers": 1, "stride": 1}]}, "missing key"),
        ({"blocks": [], "depth": 3}, "unknown key"),
        ("conv", "must be a mapping"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_one_config_error(spec: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_model("searched", (1, 28, 28), 10, arch=spec)


def test_reward_is_accuracy_scaled_by_latency_around_the_target() -> None:
    assert reward(0.8, 10.0, 10.0) == pytest.approx(0.8)  # at the target: the accuracy
    slower, faster = reward(0.8, 20.0, 10.0), reward(0.8, 5.0, 10.0)
    assert slower == pytest.approx(0.8 * 2**-0.07) and slower < 0.8  # over target: penalised
    assert faster == pytest.approx(0.8 * 0.5**-0.07) and faster > 0.8  # under: rewarded
    assert reward(0.8, 20.0, 10.0, weight=0.0) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        reward(0.8, 0.0, 10.0)
