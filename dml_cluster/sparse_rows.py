"""Sparse rows of log-probabilities: what a sparse `bus.encoding` carries for each row (a sample,
or a token position: any [rows, C] tensor, whatever its rows stand for). Tensors only: the bus
encodes and moves these (bus/encoding.py), the losses read them (losses_sparse.py); neither
knows the other, both know this module.

- `TopK`: each row's k most likely classes as (index, log-probability) pairs; the rest of its
  mass is spread evenly over the other C - k classes (the receiver recovers it from the kept
  values: 1 - sum(exp(values))).
- `Sampled`: n class ids drawn with replacement from the row's distribution at a temperature T
  (softmax(log p / T)), kept as the distinct ids with their counts and the drawn distribution's
  log-probability at each (Sparse Logit Sampling, Anshumann et al. 2025). counts / n is an
  unbiased estimate of the drawn distribution (losses_sparse.py says what that buys). The draw
  is counter-based: the uniform variate of draw j of row r is a hash of (key, r, j), the key
  derived from (run.seed, step, round, peer), so the same rows draw the same ids in any layout,
  on any device, without touching a global random state.

Indices take the smallest integer dtype that holds every class index, counts the smallest that
holds n, values the configured float dtype (bfloat16 by default). `widened()` reads them as a
receiver does (int64 indices and counts, float32 values), exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster.data.seeding import derive_seed

DRAW_DOMAIN = "sampled-ids"
"""The seed domain of `Sampled` draws (dml_cluster.data.seeding.derive_seed)."""
_CHUNK_ELEMENTS = 1 << 23
"""Rows are drawn in chunks of at most this many [rows, C] elements (64 MB of int64 each)."""
_WEIGHT_SCALE = 2.0**60
"""A probability's integer weight in the draw's cumulative sum (its sum stays below 2^62)."""


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every index of `num_classes` classes."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes <= 1 << 8:
        return torch.uint8
    if num_classes <= 1 << 15:
        return torch.int16
    return torch.int32


def count_dtype(samples: int) -> torch.dtype:
    """The smallest integer dtype that holds a count of up to `samples` draws."""
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    if samples < 1 << 8:
        return torch.uint8
    if samples < 1 << 15:
        return torch.int16
    return torch.int32


def check_k(k: int, num_classes: int) -> None:
    """`k` is a usable top-k size for `num_classes` classes (one line if not)."""
    if not 0 < k <= num_classes:
        raise ValueError(f"bus.k must be in 1..{num_classes} (the number of classes), got {k}")


def check_samples(samples: int) -> None:
    """`samples` is a usable number of draws per row (one line if not)."""
    if samples <= 0:
        raise ValueError(f"bus.samples must be at least 1, got {samples}")


@dataclass(frozen=True)
class TopK:
    """Top-k rows: `indices` and `values` [rows, k] (log-probabilities), of `num_classes`."""

    indices: Tensor
    values: Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> TopK:
        """The rows on `device` (devices.on_one_device moves them as it moves tensors)."""
        return TopK(self.indices.to(device), self.values.to(device), self.num_classes)

    def widened(self) -> TopK:
        """int64 indices and float32 values, as a receiver reads them (exact)."""
        return TopK(self.indices.long(), self.values.float(), self.num_classes)

    def kept_mass(self) -> Tensor:
        """[rows] the probability mass the kept classes hold (float32)."""
        return self.values.float().exp().sum(dim=1)

    def residual(self) -> Tensor:
        """[rows] the mass not kept (>= 0), spread evenly over the other C - k classes; 0 when
        k = C."""
        if self.k == self.num_classes:
            return self.values.new_zeros(self.values.shape[0], dtype=torch.float32)
        return (1.0 - self.kept_mass()).clamp(min=0.0)


@dataclass(frozen=True)
class Sampled:
    """Sampled rows, [rows, n] each (n = the draws per row): `indices` the distinct ids drawn,
    ascending, then padding slots (id 0); `counts` how often each was drawn (0 in padding; each
    row's counts sum to n); `values` the drawn distribution's log-probability at each id (0 in
    padding). Of `num_classes` classes."""

    indices: Tensor
    counts: Tensor
    values: Tensor
    num_classes: int

    @property
    def samples(self) -> int:
        """n, the draws per row."""
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> Sampled:
        return Sampled(
            self.indices.to(device), self.counts.to(device), self.values.to(device),
            self.num_classes,
        )  # fmt: skip

    def widened(self) -> Sampled:
        """int64 indices and counts, float32 values, as a receiver reads them (exact)."""
        return Sampled(
            self.indices.long(), self.counts.long(), self.values.float(), self.num_classes
        )

    def drawn(self) -> Tensor:
        """[rows, n] bool: the slots that hold a drawn id (not padding)."""
        return self.counts > 0

    def distinct(self) -> Tensor:
        """[rows] how many distinct ids each row drew (<= n)."""
        return self.drawn().sum(dim=1)

    def weights(self) -> Tensor:
        """[rows, n] counts / n (float32): the estimate of the drawn distribution at each id."""
        return self.counts.float() / self.samples

    def kept_mass(self) -> Tensor:
        """[rows] the drawn distribution's mass on the distinct ids drawn (float32)."""
        return torch.where(self.drawn(), self.values.float().exp(), 0.0).sum(dim=1)

    def check(self) -> None:
        """Raise ValueError unless every index is a class, every count >= 0 and each row's
        counts sum to n (what a receiver checks before using rows it did not make)."""
        if self.indices.numel() == 0:
            return
        if int(self.indices.min()) < 0 or int(self.indices.max()) >= self.num_classes:
            raise ValueError(f"sampled id outside 0..{self.num_classes - 1}")
        counts = self.counts.long()
        if int(counts.min()) < 0:
            raise ValueError("a negative count of sampled ids")
        if not bool((counts.sum(dim=1) == self.samples).all()):
            raise ValueError(f"sampled counts that do not add up to {self.samples} draws a row")


Rows = TopK | Sampled
"""Sparse rows of either kind."""


def encode_topk(log_p: Tensor, k: int, dtype: torch.dtype = torch.bfloat16) -> TopK:
    """The top-k rows of [rows, C] log-probabilities `log_p` (detached), values in `dtype`."""
    num_classes = log_p.shape[1]
    check_k(k, num_classes)
    values, indices = log_p.detach().topk(k, dim=1, sorted=True)
    return TopK(indices.to(index_dtype(num_classes)), values.to(dtype), num_classes)


def draw_key(seed: int, step: int, round: int, peer: int) -> int:
    """The 63-bit key of the draws of `peer`'s rows at (step, round) in a run seeded `seed`."""
    return derive_seed(DRAW_DOMAIN, seed, step, round, peer)


def _mul32(h: Tensor, factor: int) -> Tensor:
    """(h * factor) mod 2^32 for int64 `h` in [0, 2^32), never overflowing int64."""
    lo, hi = factor & 0xFFFF, factor >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2^32) with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(key: int, first_row: int, rows: int, n: int, device: torch.device) -> Tensor:
    """[rows, n] float64 uniform variates in [0, 1), 48 random bits each, for draws j of rows
    first_row.., a function of (key, row, j) only: counter-based, the same on every device and
    in every chunking."""
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    counter = torch.arange(first_row * n, (first_row + rows) * n, device=device)
    h = _mix32((counter & 0xFFFFFFFF) ^ k0)
    h = _mix32(h ^ (counter >> 32) ^ k1)
    high = _mix32(h ^ k0 ^ 0x9E3779B9)
    low = _mix32(high ^ k1 ^ 0x7F4A7C15)
    bits = ((high >> 8) << 24) | (low >> 8)  # 48 bits: exact in float64
    return (bits.double() * 2.0**-48).view(rows, n)


def _group(ids: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[rows, n] drawn ids -> distinct ids ascending with their counts and log q, padded."""
    rows, n = ids.shape
    ids, _ = ids.sort(dim=1)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = torch.arange(n, device=ids.device).expand(rows, n)
    starts, _ = torch.where(new, slot, n).sort(dim=1)  # each group's first slot, then n
    ends = torch.cat([starts[:, 1:], starts.new_full((rows, 1), n)], dim=1)
    drawn = starts < n
    counts = torch.where(drawn, ends - starts, 0)
    distinct = torch.where(drawn, ids.gather(1, starts.clamp(max=n - 1)), 0)
    values = torch.where(drawn, log_q.gather(1, distinct), 0.0)
    return distinct, counts, values


def _inverse_cdf(q: Tensor, u: Tensor, integer: bool) -> Tensor:
    """[rows, n] class ids: for each uniform u, the first class whose cumulative probability
    (of the rows of `q`, [rows, C]) exceeds u times the row's total. `integer`: the cumulative
    sum in int64 (each probability times 2^60, truncated: exact, and deterministic on CUDA,
    where a float cumsum raises under strict determinism); else in float32 (on the CPU, where
    it is deterministic too and several times faster)."""
    if integer:
        # deterministic: an int64 cumsum (torch raises for floating point only)
        cdf = (q * _WEIGHT_SCALE).long().cumsum(dim=1)
        total = cdf[:, -1:]
        point = torch.minimum((u * total.double()).long(), total - 1)  # in [0, total)
    else:
        cdf = q.cumsum(dim=1)  # deterministic: on the CPU only (the caller's rule)
        total = cdf[:, -1:]
        below = torch.nextafter(total, torch.zeros_like(total))  # the largest float < total
        point = torch.minimum((u * total.double()).float(), below)
    return torch.searchsorted(cdf, point, right=True)  # a class of probability 0 never


def encode_sampled(
    log_p: Tensor, samples: int, temperature: float, key: int,
    dtype: torch.dtype = torch.bfloat16, integer: bool | None = None, first_row: int = 0,
) -> Sampled:  # fmt: skip
    """`samples` ids drawn with replacement from each row of softmax(`log_p` / `temperature`)
    ([rows, C] log-probabilities, detached) by inverse transform of the counter-based uniforms
    of `key` (`draw_key`); values in `dtype`. `integer`: how the cumulative distribution is
    summed (`_inverse_cdf`; default: in int64 off the CPU, in float32 on it). `first_row`: the
    row of the whole batch that `log_p`'s first row is (a data-parallel replica's share draws
    each row's ids as the whole batch does)."""
    check_samples(samples)
    log_p = log_p.detach()
    rows, num_classes = log_p.shape
    if integer is None:
        integer = log_p.device.type != "cpu"
    step = max(1, _CHUNK_ELEMENTS // max(num_classes, 1))
    parts = []
    for first in range(0, rows, step):
        chunk = log_p[first : first + step].float()
        log_q = torch.log_softmax(chunk / temperature, dim=1) if temperature != 1.0 else chunk
        u = uniforms(key, first_row + first, chunk.shape[0], samples, log_p.device)
        ids = _inverse_cdf(log_q.exp(), u, integer)
        parts.append(_group(ids, log_q))
    if not parts:
        empty = log_p.new_zeros((0, samples))
        parts = [(empty.long(), empty.long(), empty)]
    distinct, counts, values = (torch.cat(p) for p in zip(*parts, strict=True))
    return Sampled(
        distinct.to(index_dtype(num_classes)), counts.to(count_dtype(samples)), values.to(dtype),
        num_classes,
    )  # fmt: skip


def densify(rows: Rows) -> Tensor:
    """The [rows, C] log-probabilities `rows` stand for: the kept (top-k) or drawn (sampled)
    classes' own log-probabilities, the rest of the mass spread evenly over the other classes (a
    row that kept all its mass gives them the smallest normal float). What evaluation and batch
    statistics score; the losses read the sparse support directly."""
    rows = rows.widened()
    n, c = rows.values.shape[0], rows.num_classes
    if isinstance(rows, TopK):
        listed = torch.full((n,), rows.k, device=rows.device)
        indices = rows.indices
    else:  # padding slots write 0 into a spare column C, dropped below
        listed = rows.distinct()
        indices = torch.where(rows.drawn(), rows.indices, c)
    rest = (c - listed).float()
    tiny = torch.finfo(torch.float32).tiny  # a row that kept all its mass: ~0, not log 0
    spread = ((1.0 - rows.kept_mass()).clamp(min=0.0) / rest.clamp(min=1)).clamp(min=tiny)
    dense = spread.log()[:, None].expand(n, c + 1).clone()
    return dense.scatter_(1, indices, rows.values)[:, :c].contiguous()


def log_prob_at(rows: Rows, classes: Tensor) -> Tensor:
    """[rows] float32: each row's log-probability at its class `classes[r]` ([rows] ints in
    0..C-1), exactly the value `densify(rows)` holds there, read from the sparse support
    without making the [rows, C] tensor (what the running cross-entropy of the progress line
    reads every step)."""
    rows = rows.widened()
    cls = classes.to(rows.device, torch.int64)[:, None]
    if isinstance(rows, TopK):
        listed = torch.full((rows.values.shape[0],), rows.k, device=rows.device)
        match = rows.indices == cls
    else:
        listed = rows.distinct()
        match = (rows.indices == cls) & rows.drawn()
    # the same float32 arithmetic as densify's, row by row
    rest = (rows.num_classes - listed).float()
    tiny = torch.finfo(torch.float32).tiny
    spread = ((1.0 - rows.kept_mass()).clamp(min=0.0) / rest.clamp(min=1)).clamp(min=tiny)
    kept = torch.where(match, rows.values, 0.0).sum(dim=1)  # at most one slot matches
    return torch.where(match.any(dim=1), kept, spread.log())


def describe(rows: Rows) -> dict[str, Tensor]:
    """What an encoding kept of its rows, as device scalars (means over rows): `kept_mass`, the
    probability mass of the kept (top-k) or distinct drawn (sampled) classes; for sampled rows
    also `distinct_ids`, the distinct ids per row (beside n draws)."""
    out = {"kept_mass": rows.kept_mass().mean()}
    if isinstance(rows, Sampled):
        out["distinct_ids"] = rows.distinct().float().mean()
    return out
