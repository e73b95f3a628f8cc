"""Language-model cohorts through the whole trainer: two tiny GPTs (1 and 2 layers) on a few
thousand tokens of generated text.

The guarantees: the cohort trained by two torchrun peer processes over zmq, one of them killed
while saving a checkpoint mid-epoch (SIGKILL, tests/fault_injection.py) and the group restarted,
ends bitwise equal to the one-process engine trained uninterrupted in this process (one launch
serves parity and resume). In this process: KD (over the sampled wire) and DKD from a larger
teacher LM peer, sequential DML_e over the top-k wire, bf16 autocast, progress in tokens/s, the
warm-up, generate and analyze on the trained run, and bad input refused in one line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import random
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .cohort_runs import _cli, sets, train_many
from .conftest import assert_same_states

WORDS = ("the", "cohort", "of", "small", "models", "learns", "each", "token", "from", "every")
CONFIG = """
run: {name: lm, seed: 3, progress_every_s: 0.001}
data:
  name: text
  train: TRAIN
  val: VAL
  block_size: 32
  batch_size: 4
  eval_batch_size: 8
cohort:
  peers:
    - {name: gpt-a, model: gpt, args: {n_layer: 1, n_head: 2, n_embd: 32}}
    - {name: gpt-b, model: gpt, args: {n_layer: 2, n_head: 2, n_embd: 32, dropout: 0.1}}
method: {name: dml}
optim:  # nanoGPT's recipe: AdamW, no decay of 1-D parameters, clipping, per-step cosine
  name: adamw
  lr: 0.003
  betas: [0.9, 0.95]
  weight_decay: 0.1
  decay_1d_params: false
  grad_clip: 0.5  # below the GPTs' gradient norms here (1.4 to 2.5): every step clips
  schedule: {name: cosine, unit: step, warmup_steps: 5, min_lr_ratio: 0.1}
train: {epochs: 2, max_steps: 16}
checkpoint: {every_steps: 4, keep: 10}
metrics: {enabled: false}
"""
"""~120 windows of 32 tokens: 30 steps per epoch; 16 steps, checkpoints every 4."""


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(words)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    (root / "train-a.txt").write_text(_text(0, 40))
    (root / "train-b.txt").write_text(_text(1, 40))
    (root / "val.txt").write_text(_text(2, 20))
    config = CONFIG.replace("TRAIN", str(root / "train-*.txt")).replace(
        "VAL", str(root / "val.txt")
    )
    (root / "lm.yaml").write_text(config)
    return root


@pytest.fixture(scope="module")
def deterministic_torch() -> Iterator[None]:
    """An in-process run sets torch's global switches (determinism, threads): restored after."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.set_num_threads(saved[2])


def _train(corpus: Path, *items: str) -> int:
    """`dml-cluster train lm.yaml --set ...` in this process; its exit status."""
    return _cli(["train", str(corpus / "lm.yaml"), *sets(*items)])


@dataclass(frozen=True)
class Trained:
    runs: Path
    launch: subprocess.CompletedProcess  # the killed and restarted torchrun group
    progress: str  # what the one-process engine wrote on stderr


@pytest.fixture(scope="module")
def trained(corpus: Path, deterministic_torch: None) -> Trained:
    """The cohort under torchrun over zmq, gpt-b's process killed while saving step 12 and the
    group restarted; meanwhile, the same cohort uninterrupted in this process (`reference`)."""
    runs = corpus / "runs"
    killed = [str(corpus / "lm.yaml"), *sets(f"run.out_dir={runs}", "run.name=killed",
                                              "bus.transport=zmq")]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the launch, while we train here
        launch = pool.submit(
            train_many, [killed], corpus / "killed.json", 2, max_restarts=1,
            fault="die-saving:gpt-b:12",
        )  # fmt: skip
        with tempfile.TemporaryFile("w+") as err, contextlib.redirect_stderr(err):
            assert _train(corpus, f"run.out_dir={runs}", "run.name=reference") == 0
            err.seek(0)
            progress = err.read()
        return Trained(runs, launch.result(), progress)


def test_two_processes_killed_and_resumed_equal_one_process(trained: Trained) -> None:
    proc = trained.launch
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the killed peer, or the survivor that lost it (bus: exit 200), whichever torchrun sees first
    lost = ("failed (exitcode: -9) local_rank: 1", "failed (exitcode: 200) local_rank: 0")
    assert any(line in proc.stderr for line in lost), proc.stderr[-3000:]
    assert "resuming at step 8 (epoch 1, step 8 of it)" in proc.stdout  # mid-epoch
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-6000:]
    assert_same_states(trained.runs / "killed", trained.runs / "reference")


def test_the_run_reports_per_token(trained: Trained) -> None:
    reference = trained.runs / "reference"
    assert "tokens/s" in trained.progress  # progress off a terminal: a line per step
    summary = json.loads((reference / "summary.json").read_text())
    for peer in ("gpt-a", "gpt-b"):
        ppl = summary["peers"][peer]["final_perplexity"]
        nll = summary["peers"][peer]["final_nll"]
        # perplexity is exp(nll) computed once in float64 and stored: isclose for float rounding
        assert math.isclose(ppl, math.exp(nll))
        assert ppl < 257  # learnt something (257: the byte vocabulary's uniform guess)
    evals = [json.loads(line) for line in (reference / "cohort.jsonl").open()]
    last = [e for e in evals if e["event"] == "eval"][-1]
    assert last["pairs"]["gpt-a|gpt-b"]["kl"] > 0 and last["ensemble"]["tokens"] > 500
    data = json.loads((reference / "data.json").read_text())
    assert data["dataset"] == "text" and data["splits"]["train"]["tokens"] > 3000
    from dml_cluster.generate import generate_from_run
    from dml_cluster.report import load_run, summary_markdown

    assert generate_from_run(reference, "gpt-a", "the cohort", tokens=8).startswith("the cohort")
    page = summary_markdown(load_run(reference), {})  # the report's page, without its plots
    assert "## Validation per token" in page and "Per-class" not in page
    from dml_cluster.analyze import analyze_run

    analysis = analyze_run(reference, sigmas=(0.01,), draws=1)  # on training windows, per token
    assert set(analysis["peers"]) == {"gpt-a", "gpt-b"}
    assert all(math.isfinite(p["train_loss"]) for p in analysis["peers"].values())


def test_teachers_wire_and_precision_in_one_process(
    corpus: Path, trained: Trained, capfd: pytest.CaptureFixture[str]
) -> None:
    """KD (bf16 autocast, the sampled wire) and DKD from a 2-layer teacher LM (the reference's
    gpt-b) to a 1-layer student, sequential DML_e over the top-k wire: each trains and
    evaluates per token."""
    runs = corpus / "runs-methods"
    short = (f"run.out_dir={runs}", "train.max_steps=3", "checkpoint.every_steps=null")
    teacher = trained.runs / "reference" / "final" / "gpt-b.pt"
    peers = (
        "cohort.peers=[{name: student, model: gpt, args: {n_layer: 1, n_head: 2, n_embd: 32}}, "
        f"{{name: teacher, model: gpt, role: teacher, checkpoint: '{teacher}', "
        "args: {n_layer: 2, n_head: 2, n_embd: 32}}]"
    )
    topk = ("bus.encoding=topk", "bus.k=8")
    sampled = ("bus.encoding=sampled", "bus.samples=8")
    cases = {
        "kd": ("method={name: kd}", peers, "run.precision=bf16", *sampled),
        "dkd": ("method={name: dkd}", peers),
        "topk": ("method={name: dml_e}", "cohort.update=sequential", *topk),
    }
    for name, items in cases.items():
        assert _train(corpus, *short, f"run.name={name}", *items) == 0, capfd.readouterr().err
        summary = json.loads((runs / name / "summary.json").read_text())
        assert all(math.isfinite(p["final_perplexity"]) for p in summary["peers"].values())
    kd = json.loads((runs / "kd" / "summary.json").read_text())
    assert kd["ensemble"]["final_accuracy"] == kd["peers"]["student"]["final_accuracy"]


def test_bad_input_is_one_line_and_writes_nothing(
    corpus: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    other_vocab = tmp_path / "bpe.pt"  # a GPT of another vocabulary (a BPE's 300 ids)
    from dml_cluster.models import build_model

    torch.save(build_model("gpt", (32,), 300, n_layer=1, n_head=2, n_embd=32).state_dict(),
               other_vocab)  # fmt: skip
    cases = {
        "missing": ("data.val=" + str(tmp_path / "nope.txt"), "nope.txt: no such file"),
        "empty": ("data.val=" + str(tmp_path / "empty.txt"), "the file is empty"),
        "binary": ("data.val=" + str(tmp_path / "latin1.txt"), "not UTF-8 text (byte 3"),
        "context": (
            "cohort.peers.1.args.block_size=16",
            "the model's context (16 positions) is shorter than data.block_size 32",
        ),
        "vocabulary": (
            f"cohort.peers.1.weights={other_vocab}",
            "does not fit model 'gpt'",
        ),
    }
    for name, (item, phrase) in cases.items():
        out_dir = tmp_path / name
        assert _train(corpus, f"run.out_dir={out_dir}", item) == 2, name
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dml-cluster: ") and phrase in err[0], err
        assert not (out_dir / "lm" / "config.yaml").exists()
        assert (
            not list((out_dir / "lm").glob("*.jsonl")) and not (out_dir / "lm" / "peers").exists()
        )


def test_warm_up_rises_linearly_and_leaves_the_schedule_alone() -> None:
    from dml_cluster.cohort import build_peer
    from dml_cluster.config import parse_config
    from dml_cluster.optimizer import set_learning_rate, step_schedule

    cfg = parse_config({
        "cohort": {"size": 1, "model": "gpt", "args": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
        "data": {"name": "text", "train": "a", "val": "b", "block_size": 4},
        "optim": {"name": "sgd", "lr": 0.4, "schedule": {"name": "step", "step_epochs": 1,
                                                         "gamma": 0.5, "warmup_steps": 4}},
    })  # fmt: skip
    peer = build_peer(cfg, 0, (4,), 11, torch.device("cpu"))
    peer.optimizer.step()  # no gradients: changes nothing (the schedule steps after it)
    seen = []
    for step in range(6):
        set_learning_rate(peer.optimizer, peer.scheduler, cfg.optim.schedule, step, 100)
        seen.append(peer.optimizer.param_groups[0]["lr"])
        if step == 1:  # an epoch ends during the warm-up: the schedule steps from its own rate
            step_schedule(peer.optimizer, peer.scheduler)
    assert seen == [0.1, 0.2, 0.2 * 3 / 4, 0.2, 0.2, 0.2]
    plain = parse_config({"cohort": {"size": 1, "model": "mlp"}})
    warmed = parse_config({"cohort": {"size": 1, "model": "mlp"},
                           "optim": {"schedule": {"warmup_steps": 0}}})  # fmt: skip
    assert plain.hash() == warmed.hash()  # no warm-up: configs hash as before it existed


def test_text_path_reads_the_steps_windows_and_fingerprints_the_text(tmp_path: Path) -> None:
    """Batches are the text data's windows of (seed, epoch, step), from any first step; their
    fingerprint names the text's content (not its path), so peers on other text are refused."""
    from dml_cluster.data.text import load_text
    from dml_cluster.data.text_path import TextPath

    def path(folder: str, text: str) -> TextPath:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.txt").write_text(text)
        data = load_text(str(tmp_path / folder / "t.txt"), str(tmp_path / folder / "t.txt"),
                         block_size=8, cache_dir=tmp_path / "cache")  # fmt: skip
        return TextPath(data, torch.device("cpu"), batch_size=3, eval_batch_size=4, seed=5,
                        workers=0, prefetch=2)  # fmt: skip

    a, moved, other = path("a", _text(0, 30)), path("b", _text(0, 30)), path("c", _text(1, 30))
    steps = list(a.epoch(1, 0, 4))
    for s, _, x, y in steps:
        want_x, want_y = a.text.train_batch(3, seed=5, epoch=1, step=s)
        assert torch.equal(x, want_x) and torch.equal(y, want_y.reshape(-1))
    resumed = list(a.epoch(1, 2, 4))
    assert all(torch.equal(r[2], s[2]) for r, s in zip(resumed, steps[2:], strict=True))
    starts = steps[0][1]
    assert a.fingerprint(starts) == moved.fingerprint(starts) != other.fingerprint(starts)
    assert a.test_fingerprint() == moved.test_fingerprint() != other.test_fingerprint()
    assert sum(y.numel() for _, y in a.test_batches()) == a.num_test * 8
