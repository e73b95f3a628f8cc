"""Top-k rows (dml_cluster/sparse_rows.py) and the losses on their support
(dml_cluster/losses_sparse.py): encoding round trip, index dtypes, the residual, top-k with
k = C against the dense loss, the sparse DML / DML_e / KD losses against the dense ones on the
densified targets, and bad settings refused. The wire format's
top-k messages: tests/test_wire.py; one process vs processes: tests/test_multiprocess.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dml_cluster import losses, losses_sparse
from dml_cluster.bus.local import LocalBus
from dml_cluster.config import load_config
from dml_cluster.errors import ConfigError
from dml_cluster.launch.transports import bus_encoding
from dml_cluster.losses_sparse import topk_kl, topk_kl_rows
from dml_cluster.sparse_rows import TopK, densify, encode_topk, index_dtype
from dml_cluster.trainer import CohortTrainer, Placement

from .cohort_runs import REPO


def _log_p(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(rows, classes, generator=g) * 3, dim=1)


@pytest.mark.parametrize(
    ("classes", "dtype"),
    [(10, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16),
     (32769, torch.int32), (151_936, torch.int32)],
)  # fmt: skip
def test_indices_take_the_smallest_integer_type_that_holds_c(classes, dtype) -> None:
    assert index_dtype(classes) == dtype
    info = torch.iinfo(dtype)
    assert info.max >= classes - 1 and info.min <= 0


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_topk_round_trip(value_dtype: torch.dtype) -> None:
    log_p = _log_p(32, 1000)
    rows = encode_topk(log_p, 16, value_dtype)
    assert rows.indices.dtype == torch.int16 and rows.values.dtype == value_dtype
    back = rows.widened()
    values, indices = log_p.topk(16, dim=1)
    assert torch.equal(back.indices, indices)
    assert torch.equal(back.values, values.to(value_dtype).float())  # exact widening
    assert back.values.dtype == torch.float32 and back.indices.dtype == torch.int64
    # the residual is the mass not kept, spread evenly over the other classes
    dense = densify(rows).exp()
    # tolerance: bf16 values on the wire, densified (not a layout comparison)
    assert torch.allclose(dense.sum(dim=1), torch.ones(32), atol=1e-5)  # float32 summation order
    kept = values.to(value_dtype).float().exp().sum(dim=1)
    assert torch.allclose(back.residual(), 1 - kept)  # float32 summation order


@pytest.mark.parametrize("k", [0, -1, 11])
def test_a_k_outside_one_to_c_is_refused_in_one_line(k: int) -> None:
    with pytest.raises(ValueError, match=r"^bus.k must be in 1\.\.10 \(the number of classes\)"):
        encode_topk(_log_p(4, 10), k)


def test_topk_with_k_equal_to_c_is_the_dense_loss() -> None:
    target, log_q = _log_p(64, 10, 1), _log_p(64, 10, 2)
    rows = encode_topk(target, 10, torch.float32)
    assert float(rows.residual().abs().max()) == 0.0
    dense = losses.kl(target, log_q)
    # tolerance: the sparse formula and the dense KL add the same terms in another order
    # float32 summation order
    assert torch.allclose(topk_kl(rows, log_q), dense, rtol=1e-6, atol=1e-7)
    mask = torch.arange(64) % 3 == 0
    # float32 summation order
    assert torch.allclose(topk_kl(rows, log_q, mask), losses.kl(target, log_q, mask))


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_loss_on_the_support_is_the_kl_to_the_spread_target(k: int) -> None:
    """The residual term equals KL against the densified target (residual spread evenly), and
    the gradient w.r.t. the receiver's logits matches too. (float32 values: bfloat16 may round
    a row's kept mass to >= 1, whose densified rest is exp(-inf), which the dense loss cannot
    read; the sparse one takes r = 0 as 0, below.)"""
    target = _log_p(16, 100, 3)
    rows = encode_topk(target, k, torch.float32)
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(4), requires_grad=True)
    sparse = topk_kl(rows, F.log_softmax(logits, dim=1))
    (g_sparse,) = torch.autograd.grad(sparse, logits)
    dense = losses.kl(densify(rows), F.log_softmax(logits, dim=1))
    (g_dense,) = torch.autograd.grad(dense, logits)
    # tolerance: sparse vs dense losses and gradients sum in another order (float32)
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)  # float32 summation order
    assert torch.allclose(g_sparse, g_dense, rtol=1e-4, atol=1e-7)  # float32 summation order


def test_a_row_whose_kept_mass_is_everything_has_no_residual_term() -> None:
    values = torch.tensor([[0.0, -30.0]])  # all the mass on one class (exp(-30) ~ 1e-13)
    rows = TopK(torch.tensor([[2, 0]], dtype=torch.uint8), values, 5)
    log_q = _log_p(1, 5, 5)
    per_row = topk_kl_rows(rows, log_q)
    assert torch.isfinite(per_row).all()
    # tolerance: bf16-rounded kept values
    assert torch.allclose(per_row, -log_q[:, 2], atol=1e-5)  # float32 summation order


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sparse_mimicry_dml_dml_e_and_kd_equal_the_dense_losses_on_the_spread_targets(
    temperature: float,
) -> None:
    """Each sparse loss equals its dense counterpart applied to the densified targets (the rest
    spread evenly), tempering and the probability ensemble included."""
    g = torch.Generator().manual_seed(6)
    peers = [encode_topk(_log_p(16, 50, s), 8, torch.float32) for s in (7, 8, 9)]
    dense_peers = [densify(p) for p in peers]
    logits = torch.randn(16, 50, generator=g)
    mask = torch.arange(16) % 2 == 0
    pairs = [
        (losses_sparse.mutual_kl(logits, peers, temperature, mask),
         losses.mutual_kl(logits, dense_peers, temperature, mask)),
        (losses_sparse.ensemble_kl(logits, peers, temperature),
         losses.ensemble_kl(logits, dense_peers, temperature)),
        (losses_sparse.kd_loss(logits, peers[0], temperature),
         losses.kd_loss(logits, dense_peers[0], temperature)),
    ]  # fmt: skip
    for sparse, dense in pairs:
        # tolerance: sparse vs dense losses sum in another order (float32)
        # float32 summation order
        assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6), (sparse, dense)


BAD_SETTINGS = {
    "bus.encoding=topk": "bus: encoding topk needs k",
    "bus.encoding=topk,bus.k=0": "bus: k must be at least 1, got 0",
    "bus.k=3": "bus: k is a setting of encoding topk, not of float32",
    "bus.encoding=topk,bus.k=3,method.name=dkd": "topk cannot be used with method 'dkd'",
    "bus.encoding=topk,bus.k=3,method.name=dml_js": "topk cannot be used with method 'dml_js'",
    "bus.encoding=topk,bus.k=3,method.name=dml_e,method.ensemble=logits": (
        "topk cannot be used with method 'dml_e': dml_e's logit ensemble"
    ),
}


@pytest.mark.parametrize(("items", "words"), BAD_SETTINGS.items())
def test_bad_sparse_settings_are_one_config_error_line(items: str, words: str) -> None:
    """k missing, k <= 0, k without topk, a method that needs every class (the CLI prints a
    ConfigError as one line and exits 2: tests/test_config.py)."""
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/digits-dml.yaml", items.split(","))
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: ") and words in message


def test_a_k_above_the_classes_is_refused_once_the_data_tells_c(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs/digits-dml.yaml",
        ["bus.encoding=topk", "bus.k=11", f"run.out_dir={tmp_path / 'runs'}"],
    )
    with pytest.raises(ConfigError) as err:
        CohortTrainer(
            cfg, LocalBus(bus_encoding(cfg)), Placement((0, 1), torch.device("cpu"), True)
        )
    assert str(err.value) == (
        "config error: bus.k: 11 classes kept per row, but the data has 10 classes"
    )
    assert not (tmp_path / "runs").exists()
