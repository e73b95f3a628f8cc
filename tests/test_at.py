"""Attention Transfer against its formula, its size rule, and an in-process teacher that follows
the run's precision, layout and compile settings (issue 22 item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dml_cluster.cohort import build_peer
from dml_cluster.config import parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.at import ATConfig
from dml_cluster.method_config.kd import KDConfig
from dml_cluster.method_inputs import MethodInputs
from dml_cluster.methods import (
    Predictions,
    Progress,
    Shapes,
    StepView,
    TeacherOutputs,
    build_method,
)
from dml_cluster.models import build_model
from dml_cluster.schema import PeerConfig

DIGITS = (1, 8, 8)
TEACHER = PeerConfig(name="t", model="small_cnn", role="teacher", checkpoint="unused.pt")


def _expected_q(a: torch.Tensor, factor: int = 1) -> torch.Tensor:
    """The formula, written out in float64: pool by `factor` (mean of each factor x factor
    block), square, mean over channels, flatten, divide by the L2 norm."""
    a = a.double()
    b, c, h, w = a.shape
    a = a.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))
    v = (a * a).sum(dim=1).reshape(b, -1) / c
    return v / v.pow(2).sum(dim=1, keepdim=True).sqrt()


def test_at_loss_is_the_formula() -> None:
    torch.manual_seed(0)
    pairs = [("s1", "t1"), ("s2", "t2"), ("s3", "t3")]
    student = {  # same size; the student's twice the teacher's; the teacher's twice the student's
        "s1": torch.randn(3, 8, 4, 4, requires_grad=True),
        "s2": torch.randn(3, 16, 8, 4, requires_grad=True),
        "s3": torch.randn(3, 4, 2, 2, requires_grad=True),
    }
    teacher = {"t1": torch.randn(3, 32, 4, 4), "t2": torch.randn(3, 5, 4, 2),
               "t3": torch.randn(3, 6, 4, 4)}  # fmt: skip
    logits, target = torch.randn(3, 10, requires_grad=True), torch.tensor([1, 2, 3])
    method = build_method(ATConfig(teacher=TEACHER, layers=pairs))
    view = StepView(
        0, [], [], Progress(0, 0, 1), student, TeacherOutputs(torch.randn(3, 10), teacher)
    )
    parts = method(logits, target, view)

    qs = [_expected_q(student["s1"]), _expected_q(student["s2"], 2), _expected_q(student["s3"])]
    qt = [_expected_q(teacher["t1"]), _expected_q(teacher["t2"]), _expected_q(teacher["t3"], 2)]
    at = 1000.0 / 2 * sum(((s - t) ** 2).mean() for s, t in zip(qs, qt, strict=True))
    ce = F.cross_entropy(logits.double(), target)
    # tolerance: the loss in float32 against the formula in float64 (rounding, not layout)
    # float32 loss vs a float64 formula
    torch.testing.assert_close(parts.distill.double(), at, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.total.double(), ce + at, rtol=1e-5, atol=1e-7)
    assert parts.total.dtype == torch.float32
    parts.total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student.values())


def test_at_refuses_maps_that_do_not_pool_into_each_other() -> None:
    method = build_method(ATConfig(teacher=TEACHER, layers=[("a", "b")]))
    fits = Shapes(DIGITS, 10, {"a": torch.Size([2, 4, 8, 6])}, {"b": torch.Size([2, 9, 4, 3])})
    assert method.extra_modules(0, fits) == {}
    for student, teacher, problem in [
        ([2, 4, 6, 6], [2, 4, 4, 4], "the larger must be an integer multiple"),
        ([2, 4, 8, 2], [2, 4, 4, 4], "the larger must be an integer multiple"),
        ([2, 16], [2, 4, 4, 4], "attention maps need feature maps"),
    ]:
        shapes = Shapes(DIGITS, 10, {"a": torch.Size(student)}, {"b": torch.Size(teacher)})
        with pytest.raises(ConfigError) as err:
            method.extra_modules(0, shapes)
        assert str(err.value).startswith("config error: method.layers: (a, b)")
        assert problem in str(err.value) and "\n" not in str(err.value)


def test_the_in_process_teacher_runs_in_the_run_precision_layout_and_compile_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 + channels_last + compile: the teacher is prepared like every peer (prepare_model):
    its logits and features come out in bf16, its weights are channels_last, it is compiled."""
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(
        "dml_cluster.precision.compile_model", lambda model, *_: compiled.append(model) or True
    )
    torch.save(build_model("small_cnn", DIGITS, 10, width=8).state_dict(), tmp_path / "t.pt")
    teacher = {"name": "t", "model": "small_cnn", "args": {"width": 8}, "role": "teacher",
               "checkpoint": str(tmp_path / "t.pt")}  # fmt: skip
    cfg = parse_config({
        "run": {"precision": "bf16", "channels_last": True, "compile": True},
        "cohort": {"peers": [{"name": "s", "model": "small_cnn", "args": {"width": 4}}]},
        "method": {"name": "at", "teacher": teacher, "layers": [["blocks.0", "blocks.1"]]},
    })  # fmt: skip
    inputs = MethodInputs(build_method(cfg.method), cfg.run, DIGITS, 10)
    cpu = torch.device("cpu")
    peer = build_peer(cfg, 0, DIGITS, 10, cpu, inputs)
    t = inputs.teacher_on(cpu)
    assert compiled == [t.model, peer.model]  # the teacher at the student's attach, then it
    assert t.model.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, *DIGITS).contiguous(memory_format=torch.channels_last)
    with inputs.recording(0) as features:
        peer.model(x)
    given = inputs.gather([0], lambda _: cpu, lambda _: x, {0: features}, None)[0]
    assert given.teacher is not None
    assert given.teacher.logits.dtype == torch.bfloat16
    assert given.teacher.features["blocks.1"].dtype == torch.bfloat16
    assert given.features["blocks.0"].dtype == torch.bfloat16
    assert given.features["blocks.0"].requires_grad
    assert not given.teacher.features["blocks.1"].requires_grad


@pytest.mark.filterwarnings("ignore:.*a meta parameter in the current model")
def test_each_device_hosting_a_student_runs_its_own_teacher(tmp_path: Path) -> None:
    """Two students on two devices (the CPU and torch's shape-only "meta" device, standing in
    for two GPUs): each device gets its own teacher, probed and run on that device's copy of
    the batch, and each student's inputs stay on its device."""
    torch.save(build_model("small_cnn", DIGITS, 10, width=8).state_dict(), tmp_path / "t.pt")
    teacher = {"name": "t", "model": "small_cnn", "args": {"width": 8}, "role": "teacher",
               "checkpoint": str(tmp_path / "t.pt")}  # fmt: skip
    cfg = parse_config({
        "cohort": {"peers": [{"name": n, "model": "small_cnn", "args": {"width": 4}}
                             for n in "ab"]},
        "method": {"name": "at", "teacher": teacher, "layers": [["blocks.1", "blocks.1"]]},
    })  # fmt: skip
    devices = {0: torch.device("cpu"), 1: torch.device("meta")}
    inputs = MethodInputs(build_method(cfg.method), cfg.run, DIGITS, 10)
    peers = {i: build_peer(cfg, i, DIGITS, 10, d, inputs) for i, d in devices.items()}
    x = torch.randn(4, *DIGITS)
    features, asked = {}, []
    for i, peer in peers.items():
        with inputs.recording(i) as features[i]:
            peer.model(x.to(devices[i]))

    def input_of(i: int) -> torch.Tensor:
        asked.append(i)
        return x.to(devices[i])

    given = inputs.gather([0, 1], devices.__getitem__, input_of, features, torch.arange(4))
    assert asked == [0, 1]  # the batch moved once to each device, explicitly
    for i, device in devices.items():
        assert inputs.teacher_on(device).model.fc.weight.device == device
        assert given[i].teacher is not None and given[i].teacher.logits.device == device
        assert given[i].features["blocks.1"].device == device
        assert given[i].sample_ids is None  # AT does not declare them


def test_predictions_refuse_masked_rows_to_a_method_reading_every_row() -> None:
    dense = Predictions(torch.zeros(3, 4))
    assert dense.log_probs() is dense.values and dense.encoding == "dense"
    masked = Predictions(torch.zeros(3, 4), mask=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="only the rows of their mask"):
        build_method(KDConfig())(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                                 StepView(0, [], [masked], Progress(0, 0, 1)))  # fmt: skip
