"""Hugging Face transformers causal LMs (`model: hf:PATH`) as peers of a language-model cohort.

A tiny GPT-2 of transformers (one layer, 32 wide, its own dropout of 0.1 left on), built from a
config.json saved into a temporary folder (nothing is downloaded), next to a built-in GPT: the
cohort trained by two torchrun peer processes over the torch transport (gloo) ends bitwise equal
to the one-process engine. The same launch serves the
`save_pretrained` copy (RUN/hf/<peer>/, loaded by `AutoModelForCausalLM.from_pretrained` as it
is, predicting exactly what the trained peer predicts), `generate` from the hf peer, and an
`hf:` model read back from that copy (`from_pretrained`). Bad input is one line, exit 2,
nothing written. transformers is imported in this process only by the tests that need it.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .cohort_runs import _cli, sets, train_many
from .conftest import assert_same_states, cli_in_process, final_weights, torch_switches_kept

WORDS = ("the", "cohort", "of", "small", "models", "learns", "each", "token", "from", "every")
TINY = {  # transformers' GPT-2 config, as save_pretrained writes it (only what differs)
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "vocab_size": 257,  # the byte tokenizer's 256 bytes + end-of-text (id 256)
    "n_positions": 64,
    "bos_token_id": 256,
    "eos_token_id": 256,
}
CONFIG = """
run: {name: lm-hf, seed: 5}
data:
  name: text
  train: TRAIN
  val: VAL
  block_size: 32
  batch_size: 4
  eval_batch_size: 16
  val_tokens: 512
cohort:
  peers:
    - {name: gpt, model: gpt, args: {n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.1}}
    - {name: tiny, model: "hf:MODEL"}
method: {name: dml}
optim: {name: adam, lr: 0.003, weight_decay: 0.0, schedule: {name: cosine, warmup_steps: 2}}
train: {epochs: 1, max_steps: 6}
checkpoint: {every_steps: 3}
metrics: {enabled: false}
"""


def _text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                     for _ in range(lines)) + "\n"  # fmt: skip


def _model_folder(folder: Path, **changes: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **changes}))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-hf")
    (root / "train.txt").write_text(_text(0, 50))
    (root / "val.txt").write_text(_text(2, 12))
    _model_folder(root / "tiny")
    config = CONFIG.replace("TRAIN", str(root / "train.txt")).replace("VAL", str(root / "val.txt"))
    (root / "lm-hf.yaml").write_text(config.replace("MODEL", str(root / "tiny")))
    return root


@dataclass(frozen=True)
class Launched:
    run: Path  # the torchrun group's run folder
    reference: Path  # the one-process engine's
    model: Path  # the hf peer's folder (config only)


@pytest.fixture(scope="module")
def launched(corpus: Path) -> Launched:
    """Two torchrun peer processes over the torch transport; meanwhile, the one-process engine
    on the same config in this process (no process start, no second import of transformers:
    a session reference in a process of its own costs about 4 s more CPU, and no other module
    trains this config)."""
    runs = corpus / "runs"
    config = str(corpus / "lm-hf.yaml")
    torch_items = sets(f"run.out_dir={runs}", "run.name=torch", "bus.transport=torch")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        launch = pool.submit(train_many, [[config, *torch_items]], corpus / "torch.json", 2)
        with torch_switches_kept():
            code = _cli(["train", config, *sets(f"run.out_dir={runs}", "run.name=reference")])
        proc = launch.result()
    assert code == 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return Launched(runs / "torch", runs / "reference", corpus / "tiny")


def test_gpt_and_hf_peers_over_torch_equal_one_process(launched: Launched) -> None:
    """Every tensor of both peers' final weights and checkpointed states (model, Adam, schedule,
    random stream) bitwise equal: transformers' initialisation and dropout draw from the peer's
    own stream wherever the peer runs."""
    assert_same_states(launched.run, launched.reference)
    first = final_weights(launched.run)["tiny"]
    assert "transformer.h.0.attn.c_attn.weight" in first  # transformers' own parameter names


def test_the_save_pretrained_copy_loads_as_it_is(launched: Launched) -> None:
    """RUN/hf/<peer>/ (written by the peer's process) is what from_pretrained loads, predicting
    what the trained peer predicts, bit for bit; `hf:` of that folder starts from it; the
    built-in GPT gets no such copy."""
    from transformers import AutoModelForCausalLM

    from dml_cluster.models import build_model

    copy = launched.run / "hf" / "tiny"
    assert sorted(p.name for p in (launched.run / "hf").iterdir()) == ["tiny"]
    loaded = AutoModelForCausalLM.from_pretrained(copy, local_files_only=True).eval()
    trained = build_model(f"hf:{launched.model}", (32,), 257)
    trained.load_state_dict(final_weights(launched.run)["tiny"])
    ids = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained.eval()(ids))
    again = build_model(f"hf:{copy}", (32,), 257)  # a folder with weights: from_pretrained
    for name, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_generate_from_the_hf_peer(launched: Launched) -> None:
    from dml_cluster.generate import generate_from_run

    text = generate_from_run(launched.run, "tiny", "the cohort", tokens=6)
    assert text.startswith("the cohort") and len(text.encode()) > len("the cohort")
    assert text == generate_from_run(launched.run, "tiny", "the cohort", tokens=6)  # greedy


def test_bad_hf_input_is_one_line_and_writes_nothing(
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    restore_torch: None,
) -> None:
    """Another vocabulary than the tokenizer's, a context shorter than the windows, a folder
    without config.json, an unknown setting, an hf model on images, and transformers missing."""
    bpe = _model_folder(tmp_path / "bpe", vocab_size=300)
    short = _model_folder(tmp_path / "short", n_positions=16)
    (tmp_path / "empty").mkdir()
    hf = "cohort.peers.1.model=hf:"
    tiny = f"hf:{corpus / 'tiny'}"
    cases = {
        "vocabulary": ((hf + str(bpe),), "its vocab_size 300 is not the tokenizer's 257 ids"),
        "context": ((hf + str(short),), "data.block_size 32 is larger than the model's context"),
        "no-config": ((hf + str(tmp_path / "empty"),), "the folder has no config.json"),
        "setting": (("cohort.peers.1.args={n_lyr: 2}",), "args.n_lyr: GPT2Config has no such"),
        "images": (("data.name=digits", f"cohort.peers.0.model={tiny}"), "is a language model"),
        "missing": (
            (),
            "needs transformers, which is not installed: pip install 'dml-cluster[hf]'",
        ),
    }
    for name, (items, phrase) in cases.items():
        if name == "missing":
            monkeypatch.setitem(sys.modules, "transformers", None)  # what import meets without it
        out_dir = tmp_path / "runs" / name
        code, _, err = cli_in_process(monkeypatch, capsys, "train", str(corpus / "lm-hf.yaml"),
                                      *sets(f"run.out_dir={out_dir}", *items))  # fmt: skip
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and phrase in lines[0], (name, err)
        assert not (out_dir / "lm-hf" / "config.yaml").exists(), name
        assert not list((out_dir / "lm-hf").glob("*.jsonl")), name
