"""The optimizer settings language models train with (dml_cluster/optimizer.py): AdamW with its
betas, no weight decay on 1-D parameters, gradient clipping (also of a model sharded over two
processes), and per-step cosine and linear schedules after the warm-up. End to end (a torchrun
zmq run killed and resumed, bitwise equal to the one-process engine) they are the settings of
tests/test_lm_cohort.py's cohort."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dml_cluster.config import OptimConfig, ScheduleConfig, parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model
from dml_cluster.optimizer import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    set_learning_rate,
    step_factor,
)

REPO = Path(__file__).resolve().parent.parent


def _schedule(**settings: object) -> ScheduleConfig:
    return ScheduleConfig.model_validate(settings)


def test_per_step_schedules_decay_after_the_warm_up() -> None:
    """Warm-up 4 of 24 steps, then cosine or linear from 1 to min_lr_ratio 0.1 over the other
    20; multistep's milestones count steps; under unit: epoch only the warm-up is per step."""
    cosine = _schedule(name="cosine", unit="step", warmup_steps=4, min_lr_ratio=0.1)
    linear = _schedule(name="linear", unit="step", warmup_steps=4, min_lr_ratio=0.1)
    factors = [step_factor(cosine, s, 24) for s in range(24)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # approx: cos and the fractions of float64 round in another order than the literals
    assert factors[14] == pytest.approx(0.55)  # halfway through the decay
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert step_factor(linear, 14, 24) == pytest.approx(0.55)  # float64 rounding, as above
    assert step_factor(linear, 23, 24) == pytest.approx(0.1 + 0.9 / 20)  # float64 rounding
    multistep = _schedule(name="multistep", unit="step", milestones=[5, 10], gamma=0.5)
    assert [step_factor(multistep, s, 24) for s in (4, 5, 9, 10, 23)] == [1, 0.5, 0.5, 0.25, 0.25]
    by_epoch = _schedule(name="cosine", warmup_steps=4)
    assert [step_factor(by_epoch, s, 24) for s in (0, 3, 4, 23)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="with unit: step use multistep"):
        _schedule(name="step", unit="step")


def test_set_learning_rate_scales_every_group_and_epoch_schedules_end_at_the_floor() -> None:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    cfg = OptimConfig(name="adamw", lr=0.5, decay_1d_params=False,
                      schedule=_schedule(name="linear", unit="step", min_lr_ratio=0.2))  # fmt: skip
    optimizer = build_optimizer(params, cfg, 0.5)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs=3)
    set_learning_rate(optimizer, scheduler, cfg.schedule, 5, 10)
    # approx: 0.5 x 0.6 is 0.30000000000000004 in float64, the factor 0.2 + 0.8 x 0.5 not
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * 0.6] * 2)
    for name in ("cosine", "linear"):  # unit: epoch, stepped at each epoch's end
        schedule = _schedule(name=name, min_lr_ratio=0.2)
        optimizer = build_optimizer(params, OptimConfig(lr=0.5), 0.5)
        scheduler = build_scheduler(optimizer, schedule, epochs=3)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        # approx: torch's recursive cosine and linear formulas round each epoch's rate
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1), name


def test_adamw_exempts_1d_parameters_from_weight_decay() -> None:
    """nanoGPT's and Hugging Face's grouping: matrices and embeddings decay, biases and norm
    scales do not; without the setting one group, as before it existed."""
    model = build_model("gpt", (8,), 11, n_layer=1, n_head=2, n_embd=8)
    params = list(model.parameters())
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                      decay_1d_params=False)  # fmt: skip
    optimizer = build_optimizer(params, cfg, 1e-3)
    assert type(optimizer) is torch.optim.AdamW
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95)
    assert {p.ndim for p in decayed["params"]} == {2} and {p.ndim for p in exempt["params"]} == {1}
    assert len(decayed["params"]) + len(exempt["params"]) == len(params)
    plain = build_optimizer(params, OptimConfig(name="adam", weight_decay=0.1), 1e-3)
    assert type(plain) is torch.optim.Adam and len(plain.param_groups) == 1


def test_new_optim_settings_at_their_defaults_hash_as_before() -> None:
    base = {"cohort": {"size": 2, "model": "mlp"}}
    spelled = {**base, "optim": {"betas": [0.9, 0.999], "decay_1d_params": True,
                                 "grad_clip": None,
                                 "schedule": {"unit": "epoch", "min_lr_ratio": 0.0}}}  # fmt: skip
    assert parse_config(base).hash() == parse_config(spelled).hash()
    for changed in ({"grad_clip": 1.0}, {"name": "adamw"}, {"schedule": {"unit": "step"}}):
        assert parse_config({**base, "optim": changed}).hash() != parse_config(base).hash()
    with pytest.raises(ConfigError, match="betas must be in"):
        parse_config({**base, "optim": {"betas": [0.9, 1.0]}})


def test_clip_gradients_bounds_the_norm_as_torch_does() -> None:
    """Above the bound, the gradients are those of torch's clip_grad_norm_ (bitwise) and the
    norm before clipping is returned; below it, untouched."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    expected = [p.grad.clone() for p in params]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for twin, grad in zip(twins, expected, strict=True):
        twin.grad = grad.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    norm = clip_gradients(torch.optim.SGD(params, lr=0.1), 1.0)
    assert torch.equal(norm, torch_norm) and norm > 1.0
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(params, twins, strict=True))
    before = [p.grad.clone() for p in params]
    assert clip_gradients(torch.optim.SGD(params, lr=0.1), 100.0) < 100.0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_clip_gradients_of_a_model_sharded_over_two_processes(tmp_path: Path) -> None:
    """FSDP2 shards (DTensor gradients) and a plain module's gradients count together, the
    shards' norm reduced over the processes: the same clipped gradients and norm as the model
    unsharded."""
    out = tmp_path / "clip.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_clip", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sharded"] and result["norm"] > 0.05  # it clipped
    # the shards' squares are summed in another order than the whole tensors': float rounding
    assert result["norm"] == pytest.approx(result["reference_norm"], rel=1e-6)
    assert result["max_grad_diff"] < 1e-7  # the two norms' last-bit difference, scaled in
    # float32: a gradient norm scaled to 0.05 and recomputed lands within float32 rounding
    assert result["clipped_norm"] == pytest.approx(0.05, rel=1e-5)
