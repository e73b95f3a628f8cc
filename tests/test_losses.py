"""Losses against hand-computed values: KL direction, JS symmetry, DML_e target, masking."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dml_cluster import losses
from dml_cluster.method_config.dml import DMLConfig
from dml_cluster.methods import StepView, build_method

F64 = torch.float64


def _log(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_kl_matches_hand_computation_and_direction() -> None:
    q, p = [0.5, 0.5], [0.9, 0.1]
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(q || p)
    # float rounding, another op order
    assert math.isclose(losses.kl(_log([q]), _log([p])).item(), expected, rel_tol=1e-12)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    # float rounding, another op order
    assert math.isclose(losses.kl(_log([p]), _log([q])).item(), reverse, rel_tol=1e-12)
    # torch's F.kl_div takes the same two in the opposite order: (log p, log q) for KL(q || p)
    torch_order = F.kl_div(_log([p]), _log([q]), reduction="batchmean", log_target=True)
    # float rounding, another op order
    assert math.isclose(torch_order.item(), expected, rel_tol=1e-12)


def test_mutual_kl_trains_peer_k_towards_peer_l() -> None:
    # KL(p_l || p_k): the gradient w.r.t. peer k's logits is (p_k - p_l) / B, and p_l gets none.
    z_k = torch.tensor(
        [[1.0, -0.5, 0.3], [0.2, 0.1, -1.0]], dtype=torch.float64, requires_grad=True
    )
    z_l = torch.tensor(
        [[0.1, 0.7, -0.2], [2.0, -1.0, 0.0]], dtype=torch.float64, requires_grad=True
    )
    log_l = F.log_softmax(z_l, dim=1)
    loss = losses.mutual_kl(z_k, [log_l])
    loss.backward()
    expected = (F.softmax(z_k, 1) - F.softmax(z_l, 1)).detach() / 2
    assert torch.allclose(z_k.grad, expected, atol=1e-12)
    assert z_l.grad is None
    hand = (
        sum(
            (F.softmax(z_l, 1)[b] * (F.log_softmax(z_l, 1)[b] - F.log_softmax(z_k, 1)[b])).sum()
            for b in range(2)
        )
        / 2
    )
    assert torch.isclose(loss, hand.detach(), atol=1e-12)


def test_mutual_kl_averages_links_over_k_minus_1() -> None:
    torch.manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64)
    others = [F.log_softmax(torch.randn(4, 5, dtype=torch.float64), 1) for _ in range(3)]
    links = [losses.kl(o, F.log_softmax(z, 1)) for o in others]
    assert torch.isclose(losses.mutual_kl(z, others), sum(links) / 3)


def test_temperature_reapplied_from_log_probs_and_scaled_by_t_squared() -> None:
    torch.manual_seed(1)
    z_k, z_l, T = (
        torch.randn(3, 4, dtype=torch.float64),
        torch.randn(3, 4, dtype=torch.float64),
        4.0,
    )
    from_logits = losses.kl(F.log_softmax(z_l / T, 1), F.log_softmax(z_k / T, 1)) * T**2
    # the bus carries log_softmax(z) at T = 1; the loss re-applies T
    got = losses.mutual_kl(z_k, [F.log_softmax(z_l, 1)], temperature=T)
    assert torch.isclose(got, from_logits, atol=1e-12)


def test_js_is_symmetric_bounded_and_hand_computed() -> None:
    a, b = [[0.7, 0.2, 0.1]], [[0.1, 0.3, 0.6]]
    m = [(x + y) / 2 for x, y in zip(a[0], b[0], strict=True)]
    hand = 0.5 * sum(x * math.log(x / mm) for x, mm in zip(a[0], m, strict=True)) + 0.5 * sum(
        y * math.log(y / mm) for y, mm in zip(b[0], m, strict=True)
    )
    ab, ba = losses.js_div(_log(a), _log(b)).item(), losses.js_div(_log(b), _log(a)).item()
    assert math.isclose(ab, hand, rel_tol=1e-12)
    assert math.isclose(ab, ba, rel_tol=1e-12)
    assert 0 < ab <= math.log(2)


def test_dml_e_target_is_mean_of_other_probabilities() -> None:
    p1, p2 = [[0.6, 0.3, 0.1]], [[0.2, 0.2, 0.6]]
    p_bar = [0.4, 0.25, 0.35]
    z_k = torch.tensor([[0.5, 0.0, -0.5]], dtype=torch.float64)
    p_k = F.softmax(z_k, 1)[0].tolist()
    hand = sum(t * math.log(t / s) for t, s in zip(p_bar, p_k, strict=True))
    got = losses.ensemble_kl(z_k, [_log(p1), _log(p2)])
    assert math.isclose(got.item(), hand, rel_tol=1e-12)
    assert torch.allclose(
        losses.ensemble_log_probs([_log(p1), _log(p2)]).exp(),
        torch.tensor([p_bar], dtype=torch.float64),
    )


def test_cross_entropy_ignores_unlabelled_samples() -> None:
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    y = torch.tensor([0, -1, -1])
    assert torch.isclose(losses.cross_entropy(z, y), F.cross_entropy(z[:1], y[:1]))
    none = losses.cross_entropy(z, torch.full((3,), -1))
    assert none.item() == 0.0


def test_semi_supervised_masking_ce_on_labelled_mimicry_on_all() -> None:
    torch.manual_seed(2)
    z = torch.randn(6, 4, dtype=torch.float64)
    other = F.log_softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    y = torch.tensor([0, 1, -1, -1, 2, -1])
    view = StepView.of([other])
    on_all = build_method(DMLConfig(unlabelled_mimicry=True))(z, y, view)
    labelled = build_method(DMLConfig(unlabelled_mimicry=False))(z, y, view)
    rows = y != -1
    assert torch.isclose(on_all.ce, F.cross_entropy(z[rows], y[rows]))
    # float rounding, another op order
    assert torch.isclose(on_all.distill, losses.kl(other, F.log_softmax(z, 1)))
    # float rounding, another op order
    assert torch.isclose(labelled.distill, losses.kl(other[rows], F.log_softmax(z[rows], 1)))
    # float rounding, another op order
    assert torch.isclose(on_all.total, on_all.ce + on_all.distill)


def test_independent_has_no_mimicry_and_weight_scales_it() -> None:
    torch.manual_seed(3)
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    other = F.log_softmax(torch.randn(4, 3), 1)
    ind = build_method(DMLConfig(name="independent"))(z, y, StepView.of([other]))
    # float rounding, another op order
    assert ind.distill.item() == 0.0 and torch.isclose(ind.total, ind.ce)
    half = build_method(DMLConfig(weight=0.5))(z, y, StepView.of([other]))
    # float rounding, another op order
    assert torch.isclose(half.total, half.ce + 0.5 * half.distill)


def test_entropy_of_uniform_is_log_c() -> None:
    assert math.isclose(
        losses.entropy(torch.full((2, 8), 1 / 8).log()).item(), math.log(8), rel_tol=1e-6
    )
