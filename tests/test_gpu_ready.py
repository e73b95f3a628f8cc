"""GPU-ready peers, the parts a CPU can check: determinism modes, the deterministic replacements
of AdaptiveAvgPool2d and weighted bincount (same numbers as before), placement, precision."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dml_cluster.bus.staging import to_device, to_host
from dml_cluster.checkpoint import CohortCheckpoints, Position
from dml_cluster.cohort import build_peer
from dml_cluster.config import parse_config
from dml_cluster.control import LocalControl
from dml_cluster.determinism import (
    apply_mode,
    current_mode,
    is_builtin_model,
    resolve_mode,
    set_determinism,
)
from dml_cluster.devices import cohort_device_type, hosted_devices, process_group_backend
from dml_cluster.errors import ConfigError
from dml_cluster.evaluation import class_counts, per_class_accuracy, predict
from dml_cluster.models import build_model, model_names
from dml_cluster.models._common import GlobalAvgPool
from dml_cluster.precision import check_precision, compile_model, make_scaler, prepare_model

from .conftest import REPO

COHORT = {"size": 2, "model": "small_cnn"}
CPU = torch.device("cpu")


# -- determinism modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "enabled", "warn_only", "benchmark"),
    [("strict", True, False, False), ("warn", True, True, False), ("off", False, False, True)],
)
def test_each_mode_sets_torch_flags(restore_torch, mode, enabled, warn_only, benchmark) -> None:
    apply_mode(mode)
    assert torch.are_deterministic_algorithms_enabled() is enabled
    assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
    assert torch.backends.cudnn.deterministic is enabled
    assert torch.backends.cudnn.benchmark is benchmark
    assert current_mode() == mode


def test_older_spellings_and_bad_values() -> None:
    def mode(value):
        return parse_config({"cohort": COHORT, "run": {"deterministic": value}}).run.deterministic

    assert (mode(True), mode(False), mode("warn")) == ("strict", "off", "warn")
    assert parse_config({"cohort": COHORT}).run.deterministic == "auto"
    with pytest.raises(Exception, match="run.deterministic"):
        mode("sometimes")


def test_auto_is_strict_on_cpu_and_for_builtin_models_warn_for_others_on_cuda() -> None:
    outside = "torchvision.resnet18"  # a model the project does not own (not built-in)
    assert all(is_builtin_model(m) for m in model_names())
    assert not is_builtin_model(outside) and not is_builtin_model("my_pkg.nets:build")
    assert resolve_mode("auto", "cpu", ["resnet20", outside]) == "strict"
    assert resolve_mode("auto", "cuda", ["resnet20", "small_cnn"]) == "strict"
    assert resolve_mode("auto", "cuda", ["resnet20", outside]) == "warn"
    assert resolve_mode("off", "cuda", ["resnet20"]) == "off"
    assert resolve_mode("strict", "cuda", [outside]) == "strict"


def test_engine_start_sets_the_cublas_workspace_and_the_mode(restore_torch, monkeypatch) -> None:
    """set_determinism (what both engines call first): the environment before CUDA (not started
    in this CPU process), then the flags; a workspace the user exported is kept."""
    threads = torch.get_num_threads()
    got = {}
    for mode in ("off", "warn", "strict", "auto", True):
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        cfg = parse_config({"cohort": COHORT, "run": {"deterministic": mode}})
        got[str(mode)] = [
            set_determinism(cfg),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_determinism(cfg)
    torch.set_num_threads(threads)
    assert not torch.cuda.is_initialized()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # kept
    assert got["off"] == ["off", None, False, False]
    assert got["warn"] == ["warn", ":4096:8", True, True]
    assert got["strict"] == ["strict", ":4096:8", True, False]
    assert got["auto"] == ["strict", ":4096:8", True, False]  # CPU: auto is strict
    assert got["True"] == ["strict", ":4096:8", True, False]


# -- the deterministic replacements give the old numbers ---------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_global_pool_equals_adaptive_avg_pool(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 5, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 16, 1, 1, generator=g)
    outs, grads = [], []
    for pool in (GlobalAvgPool(), nn.AdaptiveAvgPool2d(1)):
        xi = x.clone().requires_grad_(True)
        y = pool(xi)
        y.backward(grad)
        outs.append(y)
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "wrn16_2", "mobilenetv2", "resnet18"])
def test_builtin_models_pool_with_a_mean_and_give_the_old_numbers(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (3, 16, 16), 10, **({"width": 0.25} if name == "resnet18" else {}))
    pools = [m for m in model.modules() if isinstance(m, GlobalAvgPool)]
    assert pools, f"{name} has no GlobalAvgPool"
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    new = model(x)
    for parent in model.modules():  # put the old pooling back, same weights
        for child_name, child in parent.named_children():
            if isinstance(child, GlobalAvgPool):
                setattr(parent, child_name, nn.AdaptiveAvgPool2d(1))
    assert torch.equal(new, model(x))


def test_class_counts_equal_bincount() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (1000,), generator=g)
    weights = (torch.rand(1000, generator=g) < 0.7).float()
    assert torch.equal(class_counts(y, 12), torch.bincount(y, minlength=12).float())
    assert torch.equal(
        class_counts(y, 12, weights), torch.bincount(y, weights=weights, minlength=12).float()
    )


def test_per_class_accuracy_equals_the_bincount_formula() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (500,), generator=g)
    log_p = F.log_softmax(torch.randn(500, 9, generator=g), dim=1)
    correct = (log_p.argmax(1) == y).float()
    total = torch.bincount(y, minlength=9).float()
    hits = torch.bincount(y, weights=correct, minlength=9)
    assert per_class_accuracy(log_p, y, 9) == (hits / total.clamp(min=1)).tolist()


# -- placement --------------------------------------------------------------------------------


def _cfg(size: int, devices: list[str] | None = None):
    cohort = {"size": size, "model": "mlp", **({"devices": devices} if devices else {})}
    return parse_config({"cohort": cohort})


@pytest.mark.parametrize(
    ("gpus", "peers", "expected"),
    [
        (1, 4, ["cuda:0", "cuda:0", "cuda:0", "cuda:0"]),
        (2, 2, ["cuda:0", "cuda:1"]),
        (4, 2, ["cuda:0", "cuda:1"]),
        (2, 4, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
        (0, 3, ["cpu", "cpu", "cpu"]),
    ],
)
def test_placement_one_process_engine_and_one_peer_per_process(gpus, peers, expected) -> None:
    """The same peer -> device map whether the one-process engine hosts every peer or torchrun
    starts one process per peer (LOCAL_RANK = the peer's rank on a one-node cohort)."""
    cfg = _cfg(peers)
    engine = hosted_devices(cfg, tuple(range(peers)), gpus=gpus)
    assert [str(engine[i]) for i in range(peers)] == expected
    for rank in range(peers):
        (device,) = hosted_devices(cfg, (rank,), local_rank=rank, gpus=gpus).values()
        assert str(device) == expected[rank]


def test_placement_across_nodes_uses_the_local_rank() -> None:
    """Peer 3 of a 2 x 2 cohort is local rank 1 on the second node: its GPU 1."""
    (device,) = hosted_devices(_cfg(4), (3,), local_rank=1, gpus=2).values()
    assert str(device) == "cuda:1"


def test_explicit_devices_and_their_errors() -> None:
    cfg = _cfg(3, ["cuda:1", "cpu", "cuda"])
    got = hosted_devices(cfg, (0, 1, 2), gpus=2)
    assert [str(got[i]) for i in range(3)] == ["cuda:1", "cpu", "cuda:0"]  # 'cuda': slot 2 % 2
    with pytest.raises(ConfigError, match="this node has 1 GPU"):
        hosted_devices(cfg, (0, 1, 2), gpus=1)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        hosted_devices(cfg, (0, 1, 2), gpus=0)
    with pytest.raises(ConfigError, match="cohort.devices"):
        _cfg(2, ["cuda:0", "tpu"])
    assert _cfg(2, ["cuda:1", "cpu"]).hash() == _cfg(2).hash()  # where, not what, is trained


@pytest.mark.parametrize(
    ("gpus", "local_world", "devices", "backend"),
    [
        (2, 2, None, "nccl"),  # one GPU per process
        (4, 2, None, "nccl"),
        (1, 4, None, "gloo"),  # 4 processes share a GPU: NCCL cannot
        (2, 4, None, "gloo"),
        (0, 2, None, "gloo"),  # CPU
        (2, 2, ["cuda:1", "cuda:0"], "nccl"),
        (2, 2, ["cuda:0", "cuda:0"], "gloo"),
        (2, 2, ["cuda:0", "cpu"], "gloo"),
    ],
)
def test_process_group_backend(gpus, local_world, devices, backend) -> None:
    cfg = _cfg(local_world, devices)
    assert process_group_backend(cfg, local_world, gpus=gpus) == backend
    assert cohort_device_type(cfg, gpus=gpus) == ("cuda" if gpus else "cpu")


# -- precision ------------------------------------------------------------------------------


def test_bf16_autocasts_the_forward_and_publishes_float32() -> None:
    cfg = parse_config({"cohort": COHORT, "run": {"precision": "bf16", "channels_last": True}})
    torch.manual_seed(0)
    model = prepare_model(build_model("small_cnn", (1, 8, 8), 10, width=4), cfg.run, CPU)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.dtype == torch.float32
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 8, 8)
    assert model(x).dtype == torch.bfloat16
    log_p = predict(model, x, 2)
    assert log_p.dtype == torch.float32 and torch.allclose(log_p.exp().sum(1), torch.ones(4))
    assert list(model.state_dict()) == list(
        build_model("small_cnn", (1, 8, 8), 10, width=4).state_dict()
    )


def test_fp16_needs_cuda() -> None:
    cfg = parse_config({"cohort": COHORT, "run": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"^config error: run.precision: fp16 needs CUDA"):
        check_precision(cfg, "cpu")
    check_precision(cfg, "cuda")
    mixed = parse_config(
        {"cohort": {**COHORT, "devices": ["cuda:0", "cpu"]}, "run": {"precision": "fp16"}}
    )
    with pytest.raises(ConfigError, match="a peer of this cohort runs on the CPU"):
        check_precision(mixed, "cuda")
    assert make_scaler("bf16", CPU) is None


def test_a_checkpoint_keeps_the_fp16_loss_scaler(tmp_path: Path) -> None:
    """The save/restore path of fp16's GradScaler, on the CPU (a CPU scaler stands in for the
    CUDA one: the same state_dict)."""
    cfg = parse_config({"cohort": COHORT, "run": {"out_dir": str(tmp_path), "name": "r"}})
    state = {"scale": 2048.0, "growth_factor": 2.0, "backoff_factor": 0.5,
             "growth_interval": 2000, "_growth_tracker": 37}  # fmt: skip

    def peers(scale_state):
        built = {i: build_peer(cfg, i, (1, 8, 8), 10, CPU) for i in range(2)}
        for peer in built.values():
            peer.scaler = torch.amp.GradScaler("cpu")
            if scale_state:
                peer.scaler.load_state_dict(scale_state)
        return built

    checkpoints = CohortCheckpoints(cfg, cfg.run.dir)
    checkpoints.save(Position(1, 0, 5), peers(state), [], LocalControl())
    fresh = peers(None)
    restored = CohortCheckpoints(cfg, cfg.run.dir).restore(fresh, LocalControl())
    assert restored is not None and restored.position.step == 5
    for peer in fresh.values():
        assert peer.scaler.state_dict() == state


# -- transports: what the CPU can check of the device copies ---------------------------------


def test_staging_on_the_cpu_converts_once_and_keeps_values() -> None:
    """zmq's device -> host copy: the wire dtype, contiguous, the same values; received tensors
    come back to the peer's device (the CUDA branches, pinned memory with an event and a
    non_blocking copy back, need a GPU: benchmarks/gpu_check.py runs them)."""
    x = torch.randn(6, 4).t()  # not contiguous
    for dtype in (torch.float32, torch.bfloat16):
        host = to_host(x, dtype)
        assert host.dtype == dtype and host.is_contiguous() and host.device == CPU
        assert torch.equal(host, x.to(dtype))
    assert to_device(x, CPU) is x


def test_the_installed_torch_is_in_the_declared_range() -> None:
    """pyproject declares torch >=2.11,<2.15; the suite runs on what is installed (2.13 here)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (REPO / "pyproject.toml").read_text()
    spec = next(
        Requirement(line.strip().strip('",'))
        for line in text.splitlines()
        if line.strip().startswith('"torch>=')
    )
    assert str(spec.specifier) == "<2.15,>=2.11"
    assert Version(torch.__version__.split("+")[0]) in spec.specifier


def test_compile_settings_and_a_platform_that_cannot_compile(capsys) -> None:
    def setting(value):
        return parse_config({"cohort": COHORT, "run": {"compile": value}}).run.compile

    assert (setting(False), setting(True), setting("max-autotune")) == (False, True, "max-autotune")
    with pytest.raises(ConfigError, match="run.compile"):
        setting("fastest")
    model = nn.Linear(3, 2)
    missing = importlib.util.find_spec("triton") is None
    if missing:  # this machine: no triton, so CUDA models cannot be compiled -> eager, one line
        assert compile_model(model, True, torch.device("cuda")) is False
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["dml-cluster: run.compile: torch.compile needs triton for CUDA, which is "
                       "not installed; running eagerly"]  # fmt: skip
        assert model(torch.ones(1, 3)).shape == (1, 2)


def test_auto_on_cuda_with_an_outside_model_warns_once(restore_torch, monkeypatch, capsys) -> None:
    """A fake CUDA cohort (the device type is all that changes): auto -> warn, said in one line."""
    threads = torch.get_num_threads()
    monkeypatch.setattr("dml_cluster.determinism.cohort_device_type", lambda cfg: "cuda")
    peers = [{"model": "small_cnn"}, {"model": "torchvision.resnet18"}]
    cfg = parse_config({"cohort": {"peers": peers}, "data": {"name": "synthetic"}})
    assert set_determinism(cfg) == "warn" and current_mode() == "warn"
    torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.deterministic auto -> warn on CUDA" in err[0]
