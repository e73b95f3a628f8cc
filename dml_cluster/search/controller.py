"""The controllers that propose architectures: an LSTM policy trained with PPO or REINFORCE, and
random search, the baseline every claim is measured against.

The policy emits one token per decision of the factorised space (MnasNet, ENAS): at step t an
LSTM cell reads the embedding of the previous choice and a linear head of the decision's kind
gives the logits of its choices. Rewards become advantages against a moving-average baseline,
scaled by a moving average of the rewards' spread (so one learning rate suits rewards of any
scale). Seeded by its own generator; `state_dict` holds everything a resumed search needs.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dml_cluster.search.settings import ControllerSettings


@dataclass(frozen=True)
class Sample:
    """One proposed token sequence and its log-probability under the policy that proposed it."""

    tokens: tuple[int, ...]
    log_prob: float


class Policy(nn.Module):
    """An LSTM over the decision sequence; one embedding table and one head per decision kind."""

    def __init__(
        self, vocab: tuple[int, ...], kinds: tuple[int, ...], hidden: int, bound: float
    ) -> None:
        super().__init__()
        self.vocab, self.kinds, self.bound = vocab, kinds, bound
        sizes = {k: n for k, n in zip(kinds, vocab, strict=True)}
        order = sorted(sizes)
        self.start = nn.Parameter(torch.zeros(1, hidden))
        # which token is being decided (block b's op vs block b+1's): heads are per decision kind
        self.position = nn.Parameter(0.1 * torch.randn(len(kinds), hidden))
        self.embeds = nn.ModuleList(nn.Embedding(sizes[k], hidden) for k in order)
        self.heads = nn.ModuleList(nn.Linear(hidden, sizes[k]) for k in order)
        self.cell = nn.LSTMCell(hidden, hidden)
        for head in self.heads:  # start near uniform: every choice is tried early on
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def run(
        self, count: int, tokens: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample `count` sequences (or score the given [count, T] `tokens`): returns tokens,
        their summed log-probabilities [count] and summed entropies [count]."""
        x = self.start.expand(count, -1)
        state: tuple[Tensor, Tensor] | None = None
        picked, log_prob, entropy = [], torch.zeros(count), torch.zeros(count)
        for t, kind in enumerate(self.kinds):
            state = self.cell(x + self.position[t], state)
            logits = self.heads[kind](state[0])
            if self.bound > 0:  # ENAS's tanh constant: no choice's odds fall below e^(-2 bound)
                logits = self.bound * torch.tanh(logits / self.bound)
            log_p = torch.log_softmax(logits, dim=1)
            if tokens is None:
                choice = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(1)
            else:
                choice = tokens[:, t]
            picked.append(choice)
            log_prob = log_prob + log_p.gather(1, choice[:, None]).squeeze(1)
            entropy = entropy - (log_p.exp() * log_p).sum(1)
            x = self.embeds[kind](choice)
        return torch.stack(picked, 1), log_prob, entropy


class Controller:
    """Proposes `sample(n)` sequences and hears their rewards through `update(samples, rewards)`;
    this base never learns (its policy's heads stay zero: every choice uniform)."""

    def __init__(
        self, vocab: tuple[int, ...], kinds: tuple[int, ...], cfg: ControllerSettings, seed: int
    ) -> None:
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
            torch.manual_seed(seed)
            self.policy = Policy(vocab, kinds, cfg.hidden, cfg.logit_bound)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None
        self.spread: float | None = None
        self.updates = 0

    def sample(self, count: int) -> list[Sample]:
        with torch.no_grad():
            tokens, log_prob, _ = self.policy.run(count, generator=self.generator)
        return [
            Sample(tuple(int(v) for v in row), float(lp))
            for row, lp in zip(tokens, log_prob, strict=True)
        ]

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        """A round's samples and rewards: counted, nothing learnt."""
        self.updates += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        """A copy of everything that decides what comes next (torch's state dicts share their
        tensors with the live ones: a controller loaded from them would train the same Adam
        moments in place)."""
        return copy.deepcopy(
            {
                "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "baseline": self.baseline,
                "spread": self.spread,
                "updates": self.updates,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline, self.spread = state["baseline"], state["spread"]
        self.updates = state["updates"]


class PolicyGradient(Controller, ABC):
    """Learns from each round: `epochs` gradient steps on `objective` over its samples."""

    def advantages(self, rewards: list[float]) -> Tensor:
        """(reward - moving-average baseline) / moving-average spread, then both move on."""
        r = torch.tensor(rewards, dtype=torch.float64)
        decay = self.cfg.baseline_decay
        if self.baseline is None:
            self.baseline = float(r.mean())
            self.spread = float(r.std(correction=0)) if len(rewards) > 1 else 0.0
        adv = (r - self.baseline) / max(self.spread or 0.0, 1e-3)
        self.baseline = decay * self.baseline + (1 - decay) * float(r.mean())
        deviation = float((r - self.baseline).abs().mean())
        self.spread = decay * (self.spread or 0.0) + (1 - decay) * deviation
        return adv.float()

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        """One learning step on a round's samples and rewards; the loss's last value."""
        adv = self.advantages(rewards)
        tokens = torch.tensor([s.tokens for s in samples], dtype=torch.int64)
        old = torch.tensor([s.log_prob for s in samples])
        loss = torch.zeros(())
        for _ in range(self.epochs):
            _, log_prob, entropy = self.policy.run(len(samples), tokens)
            loss = self.objective(log_prob, old, adv) - self.cfg.entropy * entropy.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.updates += 1
        return {"loss": float(loss.detach()), "baseline": float(self.baseline or 0.0)}

    @property
    def epochs(self) -> int:
        return 1

    @abstractmethod
    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor) -> Tensor:
        """The loss whose gradient moves the policy towards the round's better samples."""


class PPO(PolicyGradient):
    """Clipped surrogate objective (Schulman et al. 2017), several epochs per round."""

    @property
    def epochs(self) -> int:
        return self.cfg.ppo_epochs

    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor) -> Tensor:
        ratio = torch.exp(log_prob - old)
        clipped = torch.clamp(ratio, 1 - self.cfg.clip, 1 + self.cfg.clip)
        return -torch.minimum(ratio * adv, clipped * adv).mean()


class Reinforce(PolicyGradient):
    """The score-function gradient (Williams 1992): one step per round."""

    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor) -> Tensor:
        return -(adv * log_prob).mean()


class RandomSearch(Controller):
    """Every choice uniform and independent; never learns: the baseline of every claim."""


CONTROLLERS: dict[str, type[Controller]] = {
    "ppo": PPO,
    "reinforce": Reinforce,
    "random": RandomSearch,
}


def build_controller(
    vocab: tuple[int, ...], kinds: tuple[int, ...], cfg: ControllerSettings, seed: int
) -> Controller:
    return CONTROLLERS[cfg.name](vocab, kinds, cfg, seed)
