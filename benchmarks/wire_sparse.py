"""Bytes per exchange of each bus.encoding, from the real encoder (no timing).

For each class count C and rows (B = 256 samples; B x T = 4,096 token positions for the 32k
vocabulary), a peer's [rows, C] log-probabilities are encoded as a transport encodes them
(`Encoding.send`, then the zmq wire's `encode_sent`) and the message's bytes are counted,
headers included: zmq (the 56-byte wire header + payload) and torch (its 48-byte header +
payload). A peer sends one such message to each of the K - 1 others per exchange and receives
K - 1, so bytes sent (= received) per peer per exchange are (K - 1) x the message. The ratio is
to dense float32 on the same transport. Top-k values in bfloat16 (bus.sparse_dtype's default),
indices in the smallest integer type holding C. `sampled` (bus.samples) is not built yet.

Run from the repo root: .venv/bin/python benchmarks/wire_sparse.py [--quick]
(--quick: C = 10 and 1,000 only.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml_cluster.bus.encoding import Encoding  # noqa: E402
from dml_cluster.bus.torch_bus import _HEADER_BYTES as TORCH_HEADER  # noqa: E402
from dml_cluster.bus.wire import HEADER, encode_sent  # noqa: E402

SHAPES = [(10, 256), (1000, 256), (32000, 4096)]
ENCODINGS = [
    ("dense float32", Encoding("float32")),
    ("dense bfloat16", Encoding("bfloat16")),
    *[(f"top-{k} (bf16, int ids)", Encoding("topk", k)) for k in (5, 16, 64)],
]


def message_bytes(encoding: Encoding, log_p: torch.Tensor) -> int:
    """The payload bytes of one message carrying `log_p` under `encoding`."""
    _, body = encode_sent(encoding.send(log_p))
    return body.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 10 and 1,000 only")
    args = parser.parse_args()
    shapes = SHAPES[:2] if args.quick else SHAPES
    g = torch.Generator().manual_seed(0)
    for classes, rows in shapes:
        log_p = torch.randn(rows, classes, generator=g).log_softmax(dim=1)
        print(f"\n### C = {classes:,}, rows = {rows:,}\n")
        print("| encoding | payload B | zmq message B | vs fp32 | torch message B | vs fp32 |"
              " K=2 sent/peer B | K=4 sent/peer B |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for name, encoding in ENCODINGS:
            if encoding.sparse and encoding.k > classes:
                continue
            payload = message_bytes(encoding, log_p)
            zmq_b, torch_b = HEADER.size + payload, TORCH_HEADER + payload
            base = base or (zmq_b, torch_b)
            print(
                f"| {name} | {payload:,} | {zmq_b:,} | {base[0] / zmq_b:,.1f}x | {torch_b:,} | "
                f"{base[1] / torch_b:,.1f}x | {zmq_b:,} | {3 * zmq_b:,} |"
            )


if __name__ == "__main__":
    main()
