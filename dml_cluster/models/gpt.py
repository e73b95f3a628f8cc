"""A small GPT: a decoder-only transformer language model (Radford et al. 2018, 2019).

Token ids [B, T] -> next-token logits [B, T, V]. Learnt token and position embeddings; a stack
of pre-norm blocks (x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))) with causal
multi-head self-attention (torch's `scaled_dot_product_attention`, `is_causal`) and a GELU MLP
four times as wide; a final LayerNorm; the output layer is the token embedding itself (tied
weights: logits = h @ E^T). Initialisation as GPT-2 describes it: normal(0, 0.02) weights, zero
biases, and the projections that end a residual branch scaled by 1/sqrt(2 * n_layer).

Registered as `gpt` (a token model): `build_model("gpt", (block_size,), vocab_size, n_layer=..,
n_head=.., n_embd=.., block_size=.., dropout=..)`; the model's `block_size` (its context, the
positions it has embeddings for) defaults to the data's, and windows longer than it are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster.errors import ConfigError
from dml_cluster.models._common import positive_int
from dml_cluster.models.registry import TokenShape, register

_INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.out = nn.Linear(n_embd, n_embd)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out_drop(self.out(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The layers that end the block's two residual branches."""
        return self.attn.out, self.mlp[2]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """Decoder-only transformer; forward(ids [B, T]) -> logits [B, T, vocab_size]."""

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
        dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.position = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self._init(n_layer)

    def _init(self, n_layer: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=_INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=_INIT_STD / math.sqrt(2 * n_layer))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.block_size:
            raise ValueError(f"a window of {t} tokens is longer than the context {self.block_size}")
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.embed(ids) + self.position(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)  # tied: the output layer is E^T


@register("gpt", tokens=True)
def build_gpt(
    input_shape: TokenShape,
    num_classes: int,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """GPT for windows of input_shape[0] tokens over a vocabulary of `num_classes` ids;
    `block_size` (the context) defaults to the window length."""
    (window,) = input_shape
    n_layer = positive_int("gpt", "n_layer", n_layer)
    n_head = positive_int("gpt", "n_head", n_head)
    n_embd = positive_int("gpt", "n_embd", n_embd)
    context = window if block_size is None else positive_int("gpt", "block_size", block_size)
    if n_embd % n_head:
        raise ConfigError(f"model 'gpt': n_embd {n_embd} is not a multiple of n_head {n_head}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"model 'gpt': dropout must be in [0, 1), got {dropout!r}")
    if window > context:
        raise ConfigError(
            f"model 'gpt': data.block_size {window} is larger than the model's context "
            f"(block_size {context})"
        )
    return GPT(num_classes, context, n_layer, n_head, n_embd, float(dropout))
