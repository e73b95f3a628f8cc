"""Hugging Face transformers causal LMs (`model: hf:PATH`) as peers of a language-model cohort.

A tiny GPT-2 of transformers (one layer, 32 wide, its own dropout of 0.1 left on), built from a
config.json saved into a temporary folder (nothing is downloaded), next to a built-in GPT: the
cohort trained by two torchrun peer processes over the torch transport (gloo) ends bitwise equal
to the one-process engine, in float32 and under bf16 autocast (one launch, both runs). The same
launch serves the `save_pretrained` copy (RUN/hf/<peer>/, loaded by
`AutoModelForCausalLM.from_pretrained` as it is, predicting exactly what the trained peer
predicts), `generate` from the hf peer, an `hf:` model read back from that copy
(`from_pretrained`), and the hf peer as a frozen teacher (KD from its checkpoint, DKD from its
folder with weights). Bad input is one line, exit 2, nothing written. transformers is imported
in this process only by the tests that need it. K x D with an hf peer: tests/test_kxd.py;
run.compile: test_compiled_hf_peer (slow).
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
from .conftest import (
    assert_same_states,
    cli_in_process,
    final_weights,
    run_cli,
    torch_switches_kept,
)

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
    bf16: Path  # the torchrun group's run under run.precision: bf16
    bf16_reference: Path  # the one-process engine's


@pytest.fixture(scope="module")
def launched(corpus: Path) -> Launched:
    """Two torchrun peer processes over the torch transport, in float32 then under bf16
    autocast; meanwhile, the one-process engine on the same configs in this process (no process
    start, no second import of transformers: a session reference in a process of its own costs
    about 4 s more CPU, and no other module trains these configs)."""
    runs = corpus / "runs"
    config = str(corpus / "lm-hf.yaml")
    out = f"run.out_dir={runs}"
    bf16 = ("run.precision=bf16", "train.max_steps=3")  # one checkpoint (every 3 steps)
    launched = [
        [config, *sets(out, "run.name=torch", "bus.transport=torch")],
        [config, *sets(out, "run.name=torch-bf16", "bus.transport=torch", *bf16)],
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        launch = pool.submit(train_many, launched, corpus / "torch.json", 2)
        with torch_switches_kept():
            codes = [
                _cli(["train", config, *sets(out, "run.name=reference")]),
                _cli(["train", config, *sets(out, "run.name=reference-bf16", *bf16)]),
            ]
        proc = launch.result()
    assert codes == [0, 0]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return Launched(
        runs / "torch", runs / "reference", corpus / "tiny",
        runs / "torch-bf16", runs / "reference-bf16",
    )  # fmt: skip


def test_gpt_and_hf_peers_over_torch_equal_one_process(launched: Launched) -> None:
    """Every tensor of both peers' final weights and checkpointed states (model, Adam, schedule,
    random stream) bitwise equal: transformers' initialisation and dropout draw from the peer's
    own stream wherever the peer runs."""
    assert_same_states(launched.run, launched.reference)
    first = final_weights(launched.run)["tiny"]
    assert "transformer.h.0.attn.c_attn.weight" in first  # transformers' own parameter names


def test_bf16_autocast_keeps_the_parity_and_float32_weights(launched: Launched) -> None:
    """Under run.precision: bf16 (3 steps) the torchrun group and the one-process engine still
    end bit for bit equal; the weights (final, checkpointed, the save_pretrained copy) stay float32,
    and the copy loads; the run is not the float32 one (autocast did compute in bf16)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert_same_states(launched.bf16, launched.bf16_reference)
    final = final_weights(launched.bf16)
    step = max((launched.bf16 / "checkpoints").glob("step-*"))
    saved = torch.load(step / "tiny.pt", weights_only=True)["model"]
    copy = launched.bf16 / "hf" / "tiny"
    written = load_file(copy / "model.safetensors")
    for tensors in (*final.values(), saved, written):
        assert {v.dtype for v in tensors.values()} == {torch.float32}
    recorded = json.loads((copy / "config.json").read_text())
    assert recorded.get("dtype", recorded.get("torch_dtype")) == "float32"  # 4.x: torch_dtype
    loaded = AutoModelForCausalLM.from_pretrained(copy, local_files_only=True)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, final["tiny"][name]), name
    fp32 = launched.run / "checkpoints" / "step-000000003" / "tiny.pt"  # the same 3 steps
    fp32_weight = torch.load(fp32, weights_only=True)["model"]["lm_head.weight"]
    assert not torch.equal(final["tiny"]["lm_head.weight"], fp32_weight)


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


def test_an_hf_teacher_from_its_checkpoint_or_its_folder(
    launched: Launched,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    restore_torch: None,
) -> None:
    """The trained hf peer as a frozen teacher of a built-in GPT (one process, 2 steps): KD from
    its final weights (`checkpoint:`, on the config-only folder) and DKD from its save_pretrained
    copy (a folder with weights: no checkpoint). The teacher's weights stay what they were, the
    student (started from the launch's GPT) moves."""
    trained = final_weights(launched.run)
    student = launched.run / "final" / "gpt.pt"
    teachers = {
        "kd": f"model: 'hf:{launched.model}', checkpoint: '{launched.run / 'final' / 'tiny.pt'}'",
        "dkd": f"model: 'hf:{launched.run / 'hf' / 'tiny'}'",
    }
    for method, teacher in teachers.items():
        peers = (
            "cohort.peers=[{name: student, model: gpt, args: {n_layer: 1, n_head: 2, n_embd: 32},"
            f" weights: '{student}'}}, {{name: teacher, role: teacher, {teacher}}}]"
        )
        items = (f"run.out_dir={tmp_path}", f"run.name={method}", f"method={{name: {method}}}",
                 peers, "train.max_steps=1", "checkpoint.every_steps=null")  # fmt: skip
        code, _, err = cli_in_process(
            monkeypatch, capsys, "train", str(corpus / "lm-hf.yaml"), *sets(*items)
        )
        assert code == 0, err
        final = final_weights(tmp_path / method)
        assert final["teacher"].keys() == trained["tiny"].keys()
        for name, value in final["teacher"].items():
            assert torch.equal(value, trained["tiny"][name]), (method, name)
        moved = [not torch.equal(v, trained["gpt"][k]) for k, v in final["student"].items()]
        assert any(moved), method


def test_fsdp_shards_the_blocks_and_keeps_tied_weights_in_the_root_group(corpus: Path) -> None:
    """cohort.shard: fsdp's units (what fully_shard groups on its own): a transformer's blocks
    (the members of a ModuleList, which fully_shard refuses as a unit) and its final norm; the
    token embedding tied to the output layer (GPT-2's `lm_head` is its `wte`; the built-in GPT
    reads its embedding's weight in its own forward) and the position table stay in the root's
    group. The runs: tests/test_lm_kxd.py (slow)."""
    from dml_cluster.models import build_model
    from dml_cluster.sharding import units

    hf = build_model(f"hf:{corpus / 'tiny'}", (32,), 257)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert units(hf) == [*hf.transformer.h, hf.transformer.ln_f]
    gpt = build_model("gpt", (32,), 257, n_layer=2, n_head=2, n_embd=32)
    assert [type(u).__name__ for u in units(gpt)] == ["Block", "Block", "LayerNorm"]


@pytest.mark.slow
def test_a_compiled_hf_peer_trains_and_keeps_its_names(corpus: Path, tmp_path: Path) -> None:
    """run.compile with an hf peer (torch.compile, CPU inductor: a C++ compiler): it trains,
    its checkpoints, final weights and save_pretrained copy keep transformers' parameter names
    (no `_orig_mod.`), the copy loads, and `generate` samples from the trained peer. Slow:
    compiling both peers' forward and backward took 50 to 110 s on the 2-core machine (in a
    process of its own: compilation leaves caches and settings in the process)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dml_cluster.generate import generate_from_run
    from dml_cluster.models import build_model
    from dml_cluster.precision import cannot_compile

    if (reason := cannot_compile(torch.device("cpu"))) is not None:
        pytest.skip(reason)
    items = (f"run.out_dir={tmp_path}", "run.name=compiled", "run.compile=true",
             "train.max_steps=2", "checkpoint.every_steps=1")  # fmt: skip
    done = run_cli("train", str(corpus / "lm-hf.yaml"), *sets(*items), timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "running eagerly" not in done.stderr
    run = tmp_path / "compiled"
    final = final_weights(run)["tiny"]
    first, saved = (
        torch.load(run / "checkpoints" / f"step-00000000{s}" / "tiny.pt", weights_only=True)
        for s in (1, 2)
    )
    written = load_file(run / "hf" / "tiny" / "model.safetensors")
    built = build_model(f"hf:{corpus / 'tiny'}", (32,), 257).state_dict()
    assert final.keys() == saved["model"].keys() == built.keys() >= written.keys()
    assert "transformer.h.0.attn.c_attn.weight" in written
    assert not any("_orig_mod" in k for k in (*final, *written))
    assert any(not torch.equal(v, first["model"][k]) for k, v in saved["model"].items())
    loaded = AutoModelForCausalLM.from_pretrained(run / "hf" / "tiny", local_files_only=True)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, final[name]), name
    text = generate_from_run(run, "tiny", "the cohort", tokens=6)
    assert text.startswith("the cohort") and len(text.encode()) > len("the cohort")


def test_bad_hf_input_is_one_line_and_writes_nothing(
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    restore_torch: None,
) -> None:
    """Another vocabulary than the tokenizer's (a student's, a teacher's), a context shorter
    than the windows, a folder without config.json, an unknown setting, a teacher of a folder
    without weights and without a checkpoint, an hf model on images, and transformers
    missing."""
    bpe = _model_folder(tmp_path / "bpe", vocab_size=300)
    short = _model_folder(tmp_path / "short", n_positions=16)
    (tmp_path / "empty").mkdir()
    hf = "cohort.peers.1.model=hf:"
    tiny = f"hf:{corpus / 'tiny'}"
    weights = tmp_path / "weights.pt"  # a checkpoint of the 300-id model
    torch.save({"model": {}}, weights)  # never read: the model is refused when it is built
    teacher = "method={name: kd}", "cohort.peers.1.role=teacher"
    cases = {
        "vocabulary": ((hf + str(bpe),), "its vocab_size 300 is not the tokenizer's 257 ids"),
        "context": ((hf + str(short),), "data.block_size 32 is larger than the model's context"),
        "no-config": ((hf + str(tmp_path / "empty"),), "the folder has no config.json"),
        "setting": (("cohort.peers.1.args={n_lyr: 2}",), "args.n_lyr: GPT2Config has no such"),
        "teacher-vocabulary": (
            (*teacher, hf + str(bpe), f"cohort.peers.1.checkpoint={weights}"),
            "its vocab_size 300 is not the tokenizer's 257 ids",
        ),
        "teacher-no-weights": (
            teacher,
            f"a teacher needs a checkpoint (the trained weights to load); '{tiny}' does not come "
            "with weights",
        ),
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
