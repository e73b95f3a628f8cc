"""The controllers: they learn a small synthetic reward (random search does not), and a
controller restored from its state continues exactly as the one that saved it."""

from __future__ import annotations

import statistics

import pytest
import torch

from dml_cluster.search.controller import build_controller
from dml_cluster.search.settings import ControllerSettings

VOCAB = (3, 2, 3, 4, 3, 2, 3, 4)  # two "blocks" of four decision kinds
KINDS = (0, 1, 2, 3, 0, 1, 2, 3)
OPTIMUM = torch.tensor([2, 0, 1, 3, 0, 1, 2, 1])


def reward(tokens: tuple[int, ...]) -> float:
    return float((torch.tensor(tokens) == OPTIMUM).float().mean())


def mean_reward_late(name: str, seed: int, rounds: int = 40) -> float:
    controller = build_controller(VOCAB, KINDS, ControllerSettings(name=name), seed)
    means = []
    for _ in range(rounds):
        samples = controller.sample(8)
        rewards = [reward(s.tokens) for s in samples]
        controller.update(samples, rewards)
        means.append(statistics.fmean(rewards))
    return statistics.fmean(means[-10:])


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_a_learning_controller_beats_random_on_a_known_optimum(name: str) -> None:
    torch.set_num_threads(1)
    learnt = [mean_reward_late(name, seed) for seed in range(2)]
    random = [mean_reward_late("random", seed) for seed in range(2)]
    assert min(learnt) > max(random) + 0.2 and max(random) < 0.45, (learnt, random)


def test_random_search_is_uniform_and_never_changes() -> None:
    controller = build_controller(VOCAB, KINDS, ControllerSettings(name="random"), 0)
    samples = controller.sample(4000)
    first = torch.tensor([s.tokens[0] for s in samples])
    counts = torch.bincount(first, minlength=3).float() / len(samples)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.03)
    before = [p.clone() for p in controller.policy.parameters()]
    controller.update(samples[:8], [1.0] * 8)
    assert all(
        torch.equal(a, b) for a, b in zip(before, controller.policy.parameters(), strict=True)
    )


@pytest.mark.parametrize("name", ["ppo", "reinforce", "random"])
def test_a_restored_controller_continues_exactly(name: str) -> None:
    cfg = ControllerSettings(name=name)
    a = build_controller(VOCAB, KINDS, cfg, 3)
    for _ in range(3):
        samples = a.sample(4)
        a.update(samples, [reward(s.tokens) for s in samples])
    b = build_controller(VOCAB, KINDS, cfg, 99)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        sa, sb = a.sample(4), b.sample(4)
        assert sa == sb
        a.update(sa, [reward(s.tokens) for s in sa])
        b.update(sb, [reward(s.tokens) for s in sb])
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_controller_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cfg = ControllerSettings(name="ppo")
    a, b = build_controller(VOCAB, KINDS, cfg, 5), build_controller(VOCAB, KINDS, cfg, 5)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is where it was
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.sample(6) == b.sample(6)
