"""`dml-cluster generate RUN --peer NAME --prompt TEXT`: text sampled from a trained language
model peer, so a user can see what it learnt.

The peer is rebuilt from the run's resolved config (RUN/config.yaml) and its final weights
(RUN/final/<peer>.pt); the prompt is encoded with the run's tokenizer (an empty prompt starts
from end-of-text, the start of a document). Each new token is drawn from the model's
next-token distribution at `temperature` (0: the most probable token, greedy), from a seeded
generator, so the same command prints the same text; at most the model's context of the latest
tokens is fed back. Sampling stops after `tokens` new tokens or at an end-of-text token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dml_cluster.config import load_config
from dml_cluster.errors import ConfigError
from dml_cluster.run_folder import CONFIG_FILE


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt: list[int],
    tokens: int,
    *,
    temperature: float,
    context: int,
    stop: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The ids `model` appends to `prompt`: up to `tokens` of them, fewer if `stop` is drawn
    (it is included). `temperature` 0 is greedy; else ids are drawn from softmax(logits / T)."""
    if temperature < 0:
        raise ConfigError(f"generate: --temperature must be >= 0, got {temperature}")
    if not prompt:
        raise ConfigError("generate: the prompt has no tokens")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    out: list[int] = []
    try:
        for _ in range(tokens):
            window = torch.tensor([ids[-context:]], dtype=torch.int64)
            logits: Tensor = model(window)[0, -1].float()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=0)
                nxt = int(torch.multinomial(probs, 1, generator=g))
            ids.append(nxt)
            out.append(nxt)
            if nxt == stop:
                break
    finally:
        model.train(was_training)
    return out


def generate_from_run(
    run_dir: str | Path,
    peer: str,
    prompt: str,
    tokens: int = 100,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The prompt and what peer `peer` of the run in `run_dir` writes after it."""
    from dml_cluster.cohort import read_weights
    from dml_cluster.data.tokenizers import load_tokenizer
    from dml_cluster.models import build_model

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"generate: {run_dir} has no {CONFIG_FILE} (not a run folder?)")
    cfg = load_config(run_dir / CONFIG_FILE)
    if cfg.data.name != "text" or cfg.data.block_size is None:
        raise ConfigError(f"generate: {run_dir} did not train language models (data.name: text)")
    names = [p.name for p in cfg.peers]
    if peer not in names:
        raise ConfigError(f"generate: {run_dir} has no peer {peer!r} (peers: {', '.join(names)})")
    spec = next(p for p in cfg.peers if p.name == peer)
    weights = run_dir / "final" / f"{peer}.pt"
    if not weights.exists():
        raise ConfigError(f"generate: {weights}: no such file (has the run finished?)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(spec.model, (cfg.data.block_size,), tokenizer.vocab_size, **spec.args)
    model.load_state_dict(read_weights(weights, key="generate: weights"))
    context = int(getattr(model, "block_size", cfg.data.block_size))
    ids = tokenizer.encode(prompt).tolist() if prompt else [tokenizer.eot_id]
    new = sample(
        model, ids, tokens, temperature=temperature, context=context, stop=tokenizer.eot_id,
        seed=seed,
    )  # fmt: skip
    return prompt + tokenizer.decode(new)
