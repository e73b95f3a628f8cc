"""The built-in GPT: shapes, causality, tied weights, parameter count, one-line bad options;
sampling from a run (generate) and chunked validation over tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dml_cluster.config import parse_config
from dml_cluster.data.tokenizers import ByteTokenizer
from dml_cluster.errors import ConfigError
from dml_cluster.evaluation import evaluate_cohort
from dml_cluster.generate import generate_from_run
from dml_cluster.models import build_model, is_token_model, model_options
from dml_cluster.run_folder import record_config
from dml_cluster.token_evaluation import TokenEvaluation

V, T = 257, 16


def tiny(**args: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", (T,), V, n_layer=2, n_head=2, n_embd=32, **args)


def test_logits_per_position_and_registry_facts() -> None:
    model = tiny()
    ids = torch.randint(0, V, (3, T))
    assert model(ids).shape == (3, T, V)
    assert model(ids[:, :5]).shape == (3, 5, V)  # shorter windows are fine
    assert is_token_model("gpt") and not is_token_model("mlp")
    assert set(model_options("gpt")) == {"n_layer", "n_head", "n_embd", "block_size", "dropout"}


def test_a_future_token_never_changes_earlier_logits() -> None:
    model = tiny().eval()
    ids = torch.randint(0, V, (2, T))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.equal(a[:, 9:], b[:, 9:])


def test_output_layer_is_the_token_embedding_and_parameters_add_up() -> None:
    model = tiny()
    c, layers = 32, 2
    expected = V * c + T * c + layers * (12 * c * c + 13 * c) + 2 * c  # no separate output layer
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not any(p.shape == (V, c) for n, p in model.named_parameters() if n != "embed.weight")
    ids = torch.randint(0, V, (2, T))
    loss = F.cross_entropy(model(ids).flatten(0, 1), torch.randint(0, V, (2 * T,)))
    loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_training_is_deterministic_and_learns() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the engines' strict mode: SDPA must run under it
    try:
        _train_twice()
    finally:
        torch.use_deterministic_algorithms(before)


def _train_twice() -> None:
    def run() -> tuple[torch.Tensor, list[float]]:
        model = tiny(dropout=0.1)
        seq = torch.arange(T + 1).repeat(4, 1) * 7 % V  # a pattern to learn
        losses = []
        torch.manual_seed(2)
        for _ in range(10):  # plain SGD by hand: a torch.optim's first import costs seconds
            x, y = seq[:, :-1], seq[:, 1:]
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
            losses.append(loss.item())
        return model.embed.weight.detach().clone(), losses

    (w1, l1), (w2, l2) = run(), run()
    assert torch.equal(w1, w2) and l1 == l2
    assert l1[-1] < 0.7 * l1[0], l1


def test_bad_options_and_shapes_are_one_line() -> None:
    cases = {
        "n_head": ({"n_head": 3}, "not a multiple of n_head"),
        "dropout": ({"dropout": 1.5}, "dropout must be in [0, 1)"),
        "context": ({"block_size": 8}, "data.block_size 16 is larger than the model's context"),
        "layers": ({"n_layer": 0}, "n_layer must be a positive int"),
    }
    for args, words in cases.values():
        with pytest.raises(ConfigError) as err:
            build_model("gpt", (T,), V, n_embd=32, **args)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"input_shape must be \(block_size,\)"):
        build_model("gpt", (1, 8, 8), V)
    assert build_model("gpt", (8,), V, n_embd=32, block_size=64).block_size == 64


def test_config_pairs_token_models_with_text_data() -> None:
    text = {"name": "text", "train": "a.txt", "val": "b.txt", "block_size": 32}
    parse_config({"cohort": {"size": 2, "model": "gpt"}, "data": text})
    with pytest.raises(ConfigError, match="cohort.model: 'gpt' is a language model"):
        parse_config({"cohort": {"size": 2, "model": "gpt"}})
    with pytest.raises(ConfigError, match="cohort.model: 'mlp' is not a language model"):
        parse_config({"cohort": {"size": 2, "model": "mlp"}, "data": text})
    short = {"peers": [{"model": "gpt"}, {"model": "gpt", "args": {"block_size": 16}}]}
    with pytest.raises(ConfigError, match=r"cohort.peers.1.args.block_size: the model's context"):
        parse_config({"cohort": short, "data": text})


def _run_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A finished run's folder as generate reads it: config.yaml and final/<peer>.pt."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    args = {"n_layer": 1, "n_head": 2, "n_embd": 16}
    raw = {
        "cohort": {"size": 2, "model": "gpt", "args": args},
        "data": {"name": "text", "train": "a.txt", "val": "b.txt", "block_size": 8},
    }
    record_config(run, parse_config(raw).to_dict())
    torch.manual_seed(5)
    model = build_model("gpt", (8,), 257, **args)
    torch.save(model.state_dict(), run / "final" / "gpt-1.pt")
    return run, model


def test_generate_greedy_and_seeded_sampling(tmp_path: Path) -> None:
    run, model = _run_folder(tmp_path)
    prompt = "héllo wörld"  # 13 bytes: longer than the context of 8
    ids = list(prompt.encode())
    for _ in range(12):  # greedy by hand, the latest 8 tokens as context
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids[-8:]]))[0, -1].argmax()))
        if ids[-1] == 256:
            break
    greedy = generate_from_run(run, "gpt-1", prompt, tokens=12)
    assert greedy == prompt + ByteTokenizer().decode(ids[13:])
    hot = [
        generate_from_run(run, "gpt-1", "ab", tokens=12, temperature=1.5, seed=s) for s in (1, 1, 2)
    ]
    assert hot[0] == hot[1] != hot[2]
    assert generate_from_run(run, "gpt-1", "", tokens=3) == generate_from_run(
        run, "gpt-1", "", tokens=3
    )  # an empty prompt starts from end-of-text


def test_generate_refuses_in_one_line(tmp_path: Path) -> None:
    run, _ = _run_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"has no peer 'gpt-7' \(peers: gpt-0, gpt-1\)"):
        generate_from_run(run, "gpt-7", "x")
    with pytest.raises(ConfigError, match=r"final/gpt-0.pt: no such file"):
        generate_from_run(run, "gpt-0", "x")
    with pytest.raises(ConfigError, match="has no config.yaml"):
        generate_from_run(tmp_path, "gpt-0", "x")


def test_chunked_token_evaluation_matches_the_whole_at_once() -> None:
    torch.manual_seed(3)
    names = ["a", "b", "t"]
    log_ps = {n: F.log_softmax(torch.randn(96, V) * 2, dim=1) for n in names}
    y = torch.randint(0, V, (96,))
    y[:30] = log_ps["a"][:30].argmax(1)  # some right answers
    stream = TokenEvaluation(names, ensemble_of=["a", "b"])
    for i in range(0, 96, 40):  # uneven chunks: 40, 40, 16
        stream.add({n: p[i : i + 40] for n, p in log_ps.items()}, y[i : i + 40])
    got, whole = stream.result(), evaluate_cohort(log_ps, y, V, ensemble_of=["a", "b"])
    for name in names:
        for key in ("accuracy", "entropy", "nll", "ece"):
            # tolerance: chunked sums vs one pass over all rows add in another order (float32)
            assert got["peers"][name][key] == pytest.approx(whole["peers"][name][key], rel=1e-5)
        assert got["peers"][name]["perplexity"] == pytest.approx(
            math.exp(whole["peers"][name]["nll"]), rel=1e-5
        )
    for key in ("accuracy", "nll", "ece", "entropy"):
        assert got["ensemble"][key] == pytest.approx(whole["ensemble"][key], rel=1e-5)
    for pair, values in whole["pairs"].items():
        for key, value in values.items():
            assert got["pairs"][pair][key] == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert got["peers"]["a"]["tokens"] == 96 and got["ensemble"]["members"] == ["a", "b"]
