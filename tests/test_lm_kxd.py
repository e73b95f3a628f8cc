"""K peers x D replicas of a language-model cohort with a Hugging Face peer: a built-in GPT and
test_lm_hf's tiny GPT-2 (`hf:`; GPT-2 ties its output layer to its token embedding) at D = 2,
one torchrun launch of 4 processes on the CPU (gloo), against D = 1 in this process.

The launch: the cohort replicated (DDP) over torch; the same sharded (cohort.shard: fsdp,
FSDP2) for one epoch over torch, then carried on from its checkpoint at the epoch's end over
zmq. Marked slow: a launch of its own (4 processes, two of which import transformers) and the
D = 1 reference cost about 35 s on the 2-core machine, more than the seconds language-model
cohorts may add to the default suite; its cheap parts run there (the windows' shares and row
numbers: test_text_data; the FSDP units of a tied GPT-2: test_lm_hf).

The tolerance against D = 1 is test_kxd's (its docstring: the replicas' gradient average adds
the same terms in another order; 1e-6 is 10x the measured rounding and far below an SGD step).
It holds for language models trained with SGD and without dropout: each replica draws dropout
masks from its own stream, so with dropout D = 2 is another run (measured 0.028 apart), and Adam
divides a gradient that is zero but for rounding (attention's key bias) by its own tiny root mean
square, turning the summation order's noise into steps of up to lr x 1e-2 (6.6e-6 measured).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .cohort_runs import sets, train_many
from .conftest import (
    PER_PROCESS,
    _assert_same_tree,
    cli_here,
    final_weights,
    max_weight_diff,
    saved_states,
)
from .test_lm_hf import CONFIG, _model_folder, _text

pytestmark = pytest.mark.slow

PLAIN = (
    "data.batch_size=8",
    "cohort.peers.0.args.dropout=0.0",
    "cohort.peers.1.args={resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
    "optim={name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0, schedule: {name: constant}}",
    "train.epochs=2",
    "train.max_steps=10",
    "checkpoint.every_steps=4",
)
"""8 steps per epoch (70 windows of 32 tokens, 8 a step): the 10 steps cross the epoch's end;
SGD and no dropout (module docstring)."""
D2 = ("cohort.replicas=2",)
FSDP = (*D2, "cohort.shard=fsdp")
TOLERANCE = 1e-6  # float32 summation order of the gradient average (module docstring)


class Runs:
    def __init__(self, root: Path) -> None:
        root.mkdir(exist_ok=True)
        (root / "train.txt").write_text(_text(0, 50))
        (root / "val.txt").write_text(_text(2, 12))
        _model_folder(root / "tiny")
        config = CONFIG.replace("TRAIN", str(root / "train.txt")).replace(
            "VAL", str(root / "val.txt")
        )
        (root / "lm-hf.yaml").write_text(config.replace("MODEL", str(root / "tiny")))
        self.root = root

        def run(name: str, *items: str) -> list[str]:
            out = (f"run.out_dir={root / 'runs'}", f"run.name={name}")
            return [str(root / "lm-hf.yaml"), *sets(*PLAIN, *items, *out)]

        launch = [
            run("ddp", *D2, "bus.transport=torch"),
            # sharded: one epoch, then carried on to 10 steps from its checkpoint of step 8
            run("fsdp", *FSDP, "bus.transport=torch", "train.max_steps=8"),
            run("fsdp", *FSDP, "bus.transport=zmq"),
        ]
        self.launch = train_many(launch, root / "a.json", nproc=4)
        self.output = f"exit {self.launch.returncode}\n{self.launch.stderr[-3000:]}"
        (self.reference,) = cli_here([["train", *run("d1")]])

    def dir(self, name: str) -> Path:
        run_dir = self.root / "runs" / name
        assert (run_dir / "summary.json").exists(), self.output + self.reference.stderr[-2000:]
        return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("lm-kxd"))


def test_an_hf_peer_at_two_replicas_ends_within_rounding_of_one(runs: Runs) -> None:
    """Each replica reads half of each step's windows; DDP averages their gradients: the
    weights are D = 1's up to the order of the additions."""
    diff = max_weight_diff(final_weights(runs.dir("ddp")), final_weights(runs.dir("d1")))
    print(f"max |dw| ddp (D=2) vs d1 (D=1): {diff:.3g}")
    assert 0 < diff < TOLERANCE, diff


def test_a_sharded_hf_peer_trains_and_resumes_as_a_replicated_one(runs: Runs) -> None:
    """FSDP2 (GPT-2's tied output layer and token embedding in one group), resumed from its
    checkpoint at the epoch's end over zmq: every peer's saved state and final weights bit for
    bit the DDP run's (two replicas: halving is exact). Checkpoints keep transformers' names and
    the tie, and the save_pretrained copy is the whole model, loaded as it is."""
    from transformers import AutoModelForCausalLM

    sharded, replicated = runs.dir("fsdp"), runs.dir("ddp")
    assert "resuming at step 8 (epoch 2, step 0 of it)" in runs.launch.stdout
    a, b = saved_states(sharded), saved_states(replicated)
    assert a.keys() == b.keys() and {s["step"] for s in a.values()} == {"step-000000010"}
    differ = {*PER_PROCESS, "config_hash"}  # the configs differ in cohort.shard only
    for peer in a:
        mine = {k: v for k, v in a[peer].items() if k not in differ}
        _assert_same_tree(mine, {k: v for k, v in b[peer].items() if k not in differ}, peer)
    final = final_weights(sharded)
    _assert_same_tree(final, final_weights(replicated), "final")
    model = a["tiny"]["model"]
    assert "transformer.h.0.attn.c_attn.weight" in model
    assert not any(k.startswith(("module.", "_orig_mod.", "_fsdp")) for k in model)
    assert torch.equal(model["lm_head.weight"], model["transformer.wte.weight"])
    copy = AutoModelForCausalLM.from_pretrained(sharded / "hf" / "tiny", local_files_only=True)
    assert copy.state_dict().keys() == final["tiny"].keys()
    for name, value in copy.state_dict().items():
        assert torch.equal(value, final["tiny"][name]), name
