"""Distillation losses and methods: the DKD identity, the KD gradient, hints, method checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dml_cluster import losses
from dml_cluster.cohort import build_peer
from dml_cluster.config import parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.dkd import DKDConfig
from dml_cluster.method_config.kd import KDConfig
from dml_cluster.method_inputs import MethodInputs
from dml_cluster.methods import Progress, StepView, build_method
from dml_cluster.methods.dkd import warmup_factor
from dml_cluster.methods.fitnets import build_regressor
from dml_cluster.models import build_model


@pytest.mark.parametrize(
    ("temperature", "dtype"),
    [(1.0, torch.float32), (4.0, torch.float32), (1.0, torch.float64), (2.0, torch.float64),
     (4.0, torch.float64), (10.0, torch.float64)],
)  # fmt: skip
@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(
    temperature: float, dtype: torch.dtype, scale: float
) -> None:
    # float32 at T = 10 drifts by ~3e-5 (the T^2 = 100 factor scales its rounding): the identity
    # itself is checked in float64 there
    torch.manual_seed(int(temperature * 10 + scale))
    z_s, z_t = torch.randn(32, 10, dtype=dtype) * scale, torch.randn(32, 10, dtype=dtype) * scale
    y = torch.randint(0, 10, (32,))
    kd = losses.kd_loss(z_s, z_t, temperature, reduction="none")
    tckd, nckd = losses.dkd_parts(z_s, z_t, y, temperature, reduction="none")
    pt_teacher = F.softmax(z_t / temperature, dim=1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(kd, tckd + (1 - pt_teacher) * nckd, atol=1e-5, rtol=1e-5)


def test_dkd_parts_are_finite_with_gradients_and_zero_for_equal_logits() -> None:
    torch.manual_seed(1)
    z = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    tckd, nckd = losses.dkd_parts(z, torch.randn(8, 5), y, 4.0)
    (tckd + nckd).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    same_t, same_n = losses.dkd_parts(z.detach(), z.detach(), y, 4.0)
    assert same_t.abs() < 1e-6 and same_n.abs() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 3.0, 20.0])
def test_kd_gradient_is_t_times_ps_minus_pt_per_sample(temperature: float) -> None:
    torch.manual_seed(2)
    z_s = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(16, 10, dtype=torch.float64)
    # per sample (before the batch mean): the sum of per-sample losses has per-row gradients
    losses.kd_loss(z_s, z_t, temperature, reduction="none").sum().backward()
    expected = temperature * (
        F.softmax(z_s.detach() / temperature, 1) - F.softmax(z_t / temperature, 1)
    )
    torch.testing.assert_close(z_s.grad, expected, atol=1e-10, rtol=1e-8)
    # the batch mean divides it by B
    z_s.grad = None
    losses.kd_loss(z_s, z_t, temperature).backward()
    torch.testing.assert_close(z_s.grad, expected / 16, atol=1e-10, rtol=1e-8)


def test_kd_accepts_teacher_log_probs_or_logits_alike() -> None:
    torch.manual_seed(3)
    z_s, z_t = torch.randn(4, 6), torch.randn(4, 6)
    a = losses.kd_loss(z_s, z_t, 4.0)
    b = losses.kd_loss(z_s, F.log_softmax(z_t, 1), 4.0)
    torch.testing.assert_close(a, b)


def test_kd_method_mixes_ce_and_kd_and_adds_peers_on_request() -> None:
    torch.manual_seed(4)
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -1, 0])
    teacher, peer = F.log_softmax(torch.randn(6, 4), 1), F.log_softmax(torch.randn(6, 4), 1)
    kd = build_method(KDConfig(kd_weight=0.7))
    parts = kd(z, y, StepView.of(teachers=[teacher], peers=[peer]))
    assert kd.temperature == 4.0
    torch.testing.assert_close(parts.distill, losses.kd_loss(z, teacher, 4.0))  # float32 op order
    # float32 op order
    torch.testing.assert_close(parts.total, 0.3 * parts.ce + 0.7 * parts.distill)
    with_dml = build_method(KDConfig(kd_weight=0.7, peer_weight=0.5))
    both = with_dml(z, y, StepView.of(teachers=[teacher], peers=[peer]))
    torch.testing.assert_close(both.total, parts.total + 0.5 * losses.mutual_kl(z, [peer], 1.0))


def test_dkd_warmup_and_labelled_rows_only() -> None:
    assert warmup_factor(Progress(0, 0, 10), 20) == pytest.approx(1 / 20)
    assert warmup_factor(Progress(19, 190, 10), 20) == 1.0
    assert warmup_factor(Progress(0, 0, 10), 0) == 1.0
    torch.manual_seed(5)
    z, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, -1, 2, 3, -1])
    dkd = build_method(DKDConfig(alpha=1.0, beta=8.0, warmup_epochs=4))
    parts = dkd(z, y, StepView.of(teachers=[t], epoch=1))
    rows = y != -1
    tckd, nckd = losses.dkd_parts(z[rows], t[rows], y[rows], 4.0)
    torch.testing.assert_close(parts.total, parts.ce + 0.5 * (tckd + 8.0 * nckd))


def test_hint_regressor_shapes() -> None:
    same = build_regressor(torch.Size([2, 8, 7, 7]), torch.Size([2, 32, 7, 7]))
    assert same(torch.zeros(2, 8, 7, 7)).shape == (2, 32, 7, 7)
    bigger = build_regressor(torch.Size([2, 8, 14, 14]), torch.Size([2, 32, 7, 7]))
    assert bigger(torch.zeros(2, 8, 14, 14)).shape == (2, 32, 7, 7)
    flat = build_regressor(torch.Size([2, 64]), torch.Size([2, 512]))
    assert flat(torch.zeros(2, 64)).shape == (2, 512)
    with pytest.raises(ConfigError, match="smaller than the hint"):
        build_regressor(torch.Size([2, 8, 3, 3]), torch.Size([2, 32, 7, 7]))


def _cohort(method: dict, peers: list[dict]) -> dict:
    return {"data": {"name": "digits"}, "cohort": {"peers": peers}, "method": method}


def test_methods_check_the_cohort_they_get(tmp_path) -> None:
    ckpt = str(tmp_path / "t.pt")
    teacher = {"name": "t", "model": "mlp", "role": "teacher", "checkpoint": ckpt}
    student = {"name": "s", "model": "mlp"}
    with pytest.raises(ConfigError, match="needs a teacher"):
        parse_config(_cohort({"name": "kd"}, [student]))
    with pytest.raises(ConfigError, match="does not learn from teacher peers"):
        parse_config(_cohort({"name": "dml"}, [teacher, student]))
    with pytest.raises(ConfigError, match="every peer is a teacher"):
        parse_config(_cohort({"name": "kd"}, [teacher]))
    with pytest.raises(ConfigError, match="a teacher needs a checkpoint"):
        parse_config(_cohort({"name": "kd"}, [{**teacher, "checkpoint": None}, student]))
    with pytest.raises(ConfigError, match="method.guided_layer: required key is missing"):
        parse_config(_cohort({"name": "fitnets", "teacher": teacher}, [student]))
    assert parse_config(_cohort({"name": "dkd"}, [teacher, student])).method.name == "dkd"


def test_fitnets_names_a_missing_layer(tmp_path) -> None:
    torch.save(build_model("mlp", (1, 8, 8), 10).state_dict(), tmp_path / "t.pt")
    teacher = {"name": "t", "model": "mlp", "role": "teacher", "checkpoint": str(tmp_path / "t.pt")}
    method = {"name": "fitnets", "teacher": teacher, "guided_layer": "nope", "hint_layer": "net.1"}
    cfg = parse_config(_cohort(method, [{"name": "s", "model": "mlp"}]))
    with pytest.raises(
        ConfigError, match="method.guided_layer: peer 0's model has no module 'nope'"
    ):
        inputs = MethodInputs(build_method(cfg.method), cfg.run, (1, 8, 8), 10)
        build_peer(cfg, 0, (1, 8, 8), 10, torch.device("cpu"), inputs)
