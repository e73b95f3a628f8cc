"""The model zoo: registry behaviour, output shapes, gradients, sizes and seeded init."""

from __future__ import annotations

import pytest
import torch

from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model, model_names, model_options, register

torch.set_num_threads(1)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 10
# Models too big to be worth building for all three shapes: only the smallest input is checked.
BIG = {"wrn28_10", "resnet110"}

EXPECTED = {
    "mlp",
    "small_cnn",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn",
    "wrn16_2",
    "wrn40_2",
    "wrn28_10",
    "mobilenetv2",
    "resnet18",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family_sorted() -> None:
    names = model_names()
    assert names == sorted(names)
    assert set(names) >= EXPECTED


@pytest.mark.parametrize(
    ("name", "shape"),
    [(n, s) for n in sorted(EXPECTED) for s in SHAPES if n not in BIG or s == SHAPES[0]],
)
def test_logits_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, NUM_CLASSES)
    x = torch.randn(2, *shape)
    model.train()
    assert model(x).shape == (2, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small_cnn", "mlp", "resnet8"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1)])
def test_odd_and_tiny_inputs(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet20", "small_cnn", "mobilenetv2", "wrn16_2", "mlp"])
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), NUM_CLASSES)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 7]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize(
    ("name", "published"),
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("wrn16_2", 0.69e6)],
)
def test_parameter_counts_match_papers(name: str, published: float) -> None:
    count = n_params(build_model(name, (3, 32, 32), 10))
    assert abs(count - published) / published < 0.05, count


def test_kwargs_change_the_model() -> None:
    assert n_params(build_model("small_cnn", (1, 8, 8), 10, width=8)) < n_params(
        build_model("small_cnn", (1, 8, 8), 10)
    )
    mlp = build_model("mlp", (1, 8, 8), 10, hidden=[32])
    assert n_params(mlp) == 64 * 32 + 32 + 32 * 10 + 10
    assert n_params(build_model("wrn", (3, 32, 32), 10, depth=16, widen=2)) == n_params(
        build_model("wrn16_2", (3, 32, 32), 10)
    )
    half = build_model("resnet18", (3, 32, 32), 10, width=0.5)
    assert n_params(half) < n_params(build_model("resnet18", (3, 32, 32), 10)) / 3
    slim = build_model("mobilenetv2", (3, 32, 32), 10, width_mult=0.5)
    assert n_params(slim) < n_params(build_model("mobilenetv2", (3, 32, 32), 10))


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2", "mobilenetv2", "small_cnn", "mlp"])
def test_same_seed_same_weights(name: str) -> None:
    torch.manual_seed(1234)
    a = build_model(name, (3, 32, 32), NUM_CLASSES)
    torch.manual_seed(1234)
    b = build_model(name, (3, 32, 32), NUM_CLASSES)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randn(2, 3, 32, 32)
    a.train()
    b.train()
    assert torch.equal(a(x), b(x))  # no dropout or other randomness in forward
    torch.manual_seed(99)
    c = build_model(name, (3, 32, 32), NUM_CLASSES)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items())


def test_batchnorm_init() -> None:
    model = build_model("resnet8", (3, 32, 32), NUM_CLASSES)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet9000", (3, 32, 32), 10)
    msg = str(err.value)
    assert msg.startswith("unknown model 'resnet9000' (known: ")
    assert ", ".join(model_names()) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("name", "kwargs", "bad"),
    [
        ("resnet20", {"width": 2}, "width"),
        ("mlp", {"hiden": [10]}, "hiden"),
        ("wrn", {"widen": 2, "dropout": 0.3}, "dropout"),
    ],
)
def test_unknown_kwarg_names_model_and_argument(name: str, kwargs: dict, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(name, (3, 32, 32), 10, **kwargs)
    msg = str(err.value)
    assert f"'{name}'" in msg and f"'{bad}'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("name", "kwargs", "word"),
    [
        ("wrn", {"depth": 15}, "depth"),
        ("wrn", {"widen": 0}, "widen"),
        ("small_cnn", {"width": -1}, "width"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult"),
        ("mlp", {"hidden": [64, 0]}, "hidden"),
    ],
)
def test_bad_option_values(name: str, kwargs: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        build_model(name, (3, 32, 32), 10, **kwargs)


@pytest.mark.parametrize(("shape", "classes"), [((3, 32), 10), ((3, 0, 32), 10), ((3, 8, 8), 0)])
def test_bad_shape_or_classes(shape: tuple, classes: int) -> None:
    with pytest.raises(ConfigError):
        build_model("small_cnn", shape, classes)


def test_options_and_duplicate_registration() -> None:
    assert model_options("wrn") == ("depth", "widen")
    assert model_options("resnet20") == ()
    with pytest.raises(ValueError, match="twice"):
        register("mlp")(lambda input_shape, num_classes: torch.nn.Identity())
