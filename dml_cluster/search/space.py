"""The search space: MnasNet-style, factorised and hierarchical, sized for 8x8 to 32x32 inputs.

A fixed stem and head around B blocks; each block chooses, independently of the others, its
operation (regular conv, depthwise-separable conv, inverted-residual MBConv), kernel, MBConv
expansion, squeeze-and-excitation ratio, skip (identity residual or none), number of layers and
a width multiplier of the base channel plan. The block's stride comes from the plan.

A sampled architecture is an `Arch`: a small, human-readable spec (plain dicts/lists, YAML or
JSON) that builds the same model wherever `model: searched` with `args: {arch: ...}` is
accepted, with a stable hash. Torch-free: configs and the controller's decoding import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from dml_cluster.errors import ConfigError

OPS = ("conv", "dwsep", "mbconv")
SKIPS = ("identity", "none")
DECISIONS = ("op", "kernel", "expansion", "se", "skip", "layers", "width")
"""The decisions of one block, in the order the controller emits them (one token each)."""


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round `value` to a multiple of `divisor` (at least `divisor`), never 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class BlockSpec:
    """One block of a built architecture: `layers` layers of `op`; the first has `stride`."""

    op: str
    kernel: int
    expansion: int
    se: float
    skip: str
    layers: int
    channels: int
    stride: int

    def canonical(self) -> BlockSpec:
        """The same block written one way only: expansion means something for MBConv alone,
        and an MBConv of expansion 1 is the depthwise-separable conv (dw -> SE -> 1x1)."""
        op, expansion = self.op, self.expansion
        if op == "mbconv" and expansion == 1:
            op = "dwsep"
        if op != "mbconv":
            expansion = 1
        return BlockSpec(op, self.kernel, expansion, float(self.se), self.skip, self.layers,
                         self.channels, self.stride)  # fmt: skip


@dataclass(frozen=True)
class Arch:
    """A whole architecture: stem channels, blocks, head channels (input and classes come from
    the data, so one spec builds for any input shape)."""

    stem: int
    head: int
    blocks: tuple[BlockSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"stem": self.stem, "head": self.head, "blocks": [asdict(b) for b in self.blocks]}

    def hash(self) -> str:
        """12 hex digits of the canonical JSON: equal for specs that build the same model."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One short line, e.g. `mb3k5e6x2/se dw3x1 ...`."""
        short = {"conv": "c", "dwsep": "dw", "mbconv": "mb"}
        parts = []
        for b in self.blocks:
            text = f"{short[b.op]}{b.kernel}" + (f"e{b.expansion}" if b.op == "mbconv" else "")
            text += f"x{b.layers}c{b.channels}" + ("/se" if b.se else "")
            text += "+" if b.skip == "identity" else ""
            parts.append(text)
        return " ".join(parts)

    @classmethod
    def from_dict(cls, spec: Any) -> Arch:
        """Parse and check a spec; a problem is one ConfigError line naming the key."""
        if not isinstance(spec, dict):
            raise ConfigError(f"model 'searched': arch must be a mapping, got {spec!r}")
        unknown = sorted(set(spec) - {"stem", "head", "blocks"})
        if unknown:
            raise ConfigError(f"model 'searched': arch has unknown key(s) {unknown}")
        stem = _positive_int(spec.get("stem", 16), "arch.stem")
        head = _positive_int(spec.get("head", 128), "arch.head")
        blocks = spec.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError("model 'searched': arch.blocks must be a non-empty list of blocks")
        return cls(stem, head, tuple(_block(b, i) for i, b in enumerate(blocks)))


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model 'searched': {key} must be a positive int, got {value!r}")
    return value


def _block(raw: Any, index: int) -> BlockSpec:
    where = f"arch.blocks.{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"model 'searched': {where} must be a mapping, got {raw!r}")
    names = [f.name for f in BlockSpec.__dataclass_fields__.values()]
    unknown = sorted(set(raw) - set(names))
    missing = [n for n in names if n not in raw and n not in ("expansion", "se", "skip")]
    if unknown or missing:
        what = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
        raise ConfigError(f"model 'searched': {where} has {what} (keys: {', '.join(names)})")
    op, skip = raw["op"], raw.get("skip", "none")
    if op not in OPS:
        raise ConfigError(f"model 'searched': {where}.op must be one of {OPS}, got {op!r}")
    if skip not in SKIPS:
        raise ConfigError(f"model 'searched': {where}.skip must be one of {SKIPS}, got {skip!r}")
    kernel = _positive_int(raw["kernel"], f"{where}.kernel")
    if kernel % 2 == 0:
        raise ConfigError(f"model 'searched': {where}.kernel must be odd, got {kernel}")
    se = raw.get("se", 0.0)
    if isinstance(se, bool) or not isinstance(se, int | float) or not 0.0 <= se < 1.0:
        raise ConfigError(f"model 'searched': {where}.se must be a ratio in [0, 1), got {se!r}")
    return BlockSpec(
        op=op,
        kernel=kernel,
        expansion=_positive_int(raw.get("expansion", 1), f"{where}.expansion"),
        se=float(se),
        skip=skip,
        layers=_positive_int(raw["layers"], f"{where}.layers"),
        channels=_positive_int(raw["channels"], f"{where}.channels"),
        stride=_positive_int(raw["stride"], f"{where}.stride"),
    ).canonical()


@dataclass(frozen=True)
class SearchSpace:
    """The choices of every decision and the base plan (channels and stride per block).

    Choice lists are the config's `search.space`; defaults follow the issue: 5 blocks, kernels
    3/5, expansions 1/3/6, SE 0/0.25, layers 1-3, widths 0.5/0.75/1.0/1.25.
    """

    channels: tuple[int, ...] = (16, 24, 32, 48, 64)
    strides: tuple[int, ...] = (1, 2, 2, 1, 2)
    stem: int = 16
    head: int = 128
    op: tuple[str, ...] = OPS
    kernel: tuple[int, ...] = (3, 5)
    expansion: tuple[int, ...] = (1, 3, 6)
    se: tuple[float, ...] = (0.0, 0.25)
    skip: tuple[str, ...] = SKIPS
    layers: tuple[int, ...] = (1, 2, 3)
    width: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides):
            raise ConfigError(
                f"config error: search.space: {len(self.channels)} channels but "
                f"{len(self.strides)} strides (one of each per block)"
            )

    @property
    def blocks(self) -> int:
        return len(self.channels)

    def choices(self, decision: str) -> tuple[Any, ...]:
        return getattr(self, decision)

    def vocabulary(self) -> tuple[int, ...]:
        """How many choices each token of a sequence has (len = blocks x decisions)."""
        return tuple(len(self.choices(d)) for _ in range(self.blocks) for d in DECISIONS)

    def token_kinds(self) -> tuple[int, ...]:
        """Which decision each token is (an index into DECISIONS)."""
        return tuple(k for _ in range(self.blocks) for k in range(len(DECISIONS)))

    def decode(self, tokens: list[int] | tuple[int, ...]) -> Arch:
        """The architecture a token sequence (one choice index per decision) describes."""
        if len(tokens) != self.blocks * len(DECISIONS):
            raise ValueError(f"expected {self.blocks * len(DECISIONS)} tokens, got {len(tokens)}")
        blocks = []
        for b in range(self.blocks):
            pick = {
                d: self.choices(d)[tokens[b * len(DECISIONS) + k]] for k, d in enumerate(DECISIONS)
            }
            blocks.append(
                BlockSpec(
                    op=pick["op"],
                    kernel=pick["kernel"],
                    expansion=pick["expansion"],
                    se=float(pick["se"]),
                    skip=pick["skip"],
                    layers=pick["layers"],
                    channels=make_divisible(self.channels[b] * pick["width"]),
                    stride=self.strides[b],
                ).canonical()
            )
        return Arch(self.stem, self.head, tuple(blocks))

    def size(self) -> int:
        """How many token sequences the space holds."""
        total = 1
        for n in self.vocabulary():
            total *= n
        return total
