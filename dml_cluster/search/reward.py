"""The search's reward (MnasNet's soft constraint, used by Search to Distill):
ACC * (LAT / TARGET) ** w, with w = -0.07 by default (MnasNet's alpha = beta).

With w < 0 a candidate slower than the target is penalised (factor < 1) and a faster one
rewarded (factor > 1), smoothly: halving the latency is worth about 5% of accuracy.
"""

from __future__ import annotations


def reward(accuracy: float, cost: float, target: float, weight: float = -0.07) -> float:
    """ACC * (LAT / TARGET) ** w for a candidate of accuracy `accuracy` and cost `cost`."""
    if cost <= 0 or target <= 0:
        raise ValueError(f"cost and target must be positive, got {cost} and {target}")
    return accuracy * (cost / target) ** weight
