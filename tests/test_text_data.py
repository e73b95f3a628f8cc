"""Text data: the token cache, training/validation windows, tokenizers, one-line errors."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dml_cluster.config import parse_config
from dml_cluster.data.text import (
    TokenFile,
    WindowSampler,
    _exclusive,
    cache_key,
    epoch_offset,
    load_text,
    num_windows,
    token_dtype,
    tokenize_split,
    val_starts,
    window_starts,
)
from dml_cluster.data.tokenizers import EOT_TOKEN, ByteTokenizer, load_tokenizer, train_bpe
from dml_cluster.errors import ConfigError, DataError

CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
) * 8


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text(CORPUS)
    (data / "b.py").write_text(CORPUS.upper() + "é ü ß\n")
    (data / "val.py").write_text(CORPUS[::-1])
    return data


def test_byte_tokenizer_joins_files_with_end_of_text(corpus: Path, tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tf = tokenize_split(str(corpus / "[ab].py"), "train", tok, tmp_path / "cache")
    ids = np.asarray(tf.open())
    a, b = (corpus / "a.py").read_bytes(), (corpus / "b.py").read_bytes()
    expected = list(a) + [256] + list(b) + [256]
    assert tf.dtype == np.dtype("<u2") and tf.num_tokens == len(expected)
    assert ids.tolist() == expected
    assert tok.decode(tok.encode("héllo").tolist()) == "héllo"


def test_cache_written_once_reused_and_renewed_when_a_file_changes(
    corpus: Path, tmp_path: Path
) -> None:
    cache, tok = tmp_path / "cache", ByteTokenizer()
    first = tokenize_split([str(corpus / "a.py")], "train", tok, cache)
    stamp = first.path.stat().st_mtime_ns
    again = tokenize_split([str(corpus / "a.py")], "train", tok, cache)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # not rewritten
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".tokens"]
    (corpus / "a.py").write_text(CORPUS.replace("add", "sub"))  # same size, new content
    changed = tokenize_split([str(corpus / "a.py")], "train", tok, cache)
    assert changed.path != first.path
    assert bytes(np.asarray(changed.open())[:7].astype(np.uint8)) == b"def sub"
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


def test_a_half_written_cache_is_not_used(corpus: Path, tmp_path: Path) -> None:
    cache, tok = tmp_path / "cache", ByteTokenizer()
    tf = tokenize_split(str(corpus / "a.py"), "train", tok, cache)
    with open(tf.path, "r+b") as f:
        f.truncate(10)  # a token file whose description says more
    again = tokenize_split(str(corpus / "a.py"), "train", tok, cache)
    assert again.num_tokens == tf.num_tokens and tf.path.stat().st_size == 2 * tf.num_tokens


def test_dtype_fits_the_vocabulary() -> None:
    assert token_dtype(257) == np.dtype("<u2")
    assert token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")


def _as_is(batch: object) -> object:
    return batch


def test_windows_are_a_function_of_seed_epoch_step(corpus: Path, tmp_path: Path) -> None:
    text = load_text(
        str(corpus / "[ab].py"), str(corpus / "val.py"), block_size=16,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert (text.input_shape, text.num_classes) == ((16,), 257)  # what build_model takes
    n_tok, steps = text.train.tokens.num_tokens, text.steps_per_epoch(4)
    assert steps == num_windows(n_tok, 16) // 4 > 2
    ids = torch.from_numpy(np.asarray(text.train.tokens.open()).astype(np.int64))
    epoch = [text.train_batch(4, seed=3, epoch=1, step=s) for s in range(steps)]
    resumed = [text.train_batch(4, seed=3, epoch=1, step=s) for s in range(2, steps)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(epoch[2:], resumed, strict=True))  # fmt: skip
    starts = torch.cat([window_starts(n_tok, 16, 4, 3, 1, s) for s in range(steps)])
    assert len(set(starts.tolist())) == starts.numel()  # no window twice in an epoch
    assert ((starts - epoch_offset(3, 1, 16)) % 16 == 0).all()
    x, y = epoch[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    s0 = int(starts[0])
    assert torch.equal(x[0], ids[s0 : s0 + 16]) and torch.equal(y[0], ids[s0 + 1 : s0 + 17])
    other_epoch = window_starts(n_tok, 16, 4, 3, 2, 0)
    other_seed = window_starts(n_tok, 16, 4, 4, 1, 0)
    assert not torch.equal(other_epoch, starts[:4]) and not torch.equal(other_seed, starts[:4])
    sampler = WindowSampler(n_tok, 16, 4, seed=3, epoch=1, first=2, stop=steps)
    assert len(sampler) == steps - 2
    assert torch.equal(torch.tensor(list(sampler)).flatten(), starts[8:])
    # a DataLoader (its workers' pickled copies) reads the same batches
    loader = DataLoader(text.train, batch_sampler=sampler, collate_fn=_as_is, num_workers=1)
    got = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, epoch[2:], strict=True))
    # a DataLoader worker's pickled copy carries the path, not the tokens
    text.train.read([0])  # the map is open here
    copy = pickle.loads(pickle.dumps(text.train))
    assert copy._map is None and len(pickle.dumps(text.train)) < 2_000
    assert torch.equal(copy.read([5])[0], text.train.read([5])[0])


def test_replicas_read_the_windows_in_shares_and_number_rows_by_position() -> None:
    """cohort.replicas D: replica r reads the r-th of D equal slices of each step's windows (all
    of them together the one-process batch), and the sampled wire numbers its rows as the whole
    batch's positions (block_size rows a window)."""
    from dml_cluster.launch.transports import bus_encoding

    whole = list(WindowSampler(4000, 16, 8, seed=3, epoch=1, first=0, stop=5))
    shares = [list(WindowSampler(4000, 16, 8, 3, 1, 0, 5, (r, 4))) for r in range(4)]
    assert [sum((s[step] for s in shares), []) for step in range(5)] == whole
    text = {"name": "text", "train": "a", "val": "b", "block_size": 16, "batch_size": 8}
    cfg = parse_config({"data": text, "cohort": {"size": 2, "model": "gpt", "replicas": 4},
                        "bus": {"encoding": "sampled", "samples": 4}})  # fmt: skip
    assert [bus_encoding(cfg, r).first_row for r in range(4)] == [0, 32, 64, 96]


def test_validation_reads_consecutive_windows_up_to_val_tokens(
    corpus: Path, tmp_path: Path
) -> None:
    text = load_text(
        str(corpus / "a.py"), str(corpus / "val.py"), block_size=8, val_tokens=100,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert val_starts(1_000, 8, 100).tolist() == [8 * i for i in range(12)]
    assert val_starts(50, 8, 100).tolist() == [8 * i for i in range(6)]  # (50 - 1) // 8
    batches = list(text.val_batches(5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    ids = np.asarray(text.val.tokens.open()).astype(np.int64)
    assert torch.cat([b[0] for b in batches]).flatten().tolist() == ids[:96].tolist()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_bad_inputs_are_one_line(corpus: Path, tmp_path: Path) -> None:
    cache, good = tmp_path / "cache", str(corpus / "a.py")
    cases = {
        str(tmp_path / "missing.txt"): "no such file",
        str(tmp_path / "nothing*.txt"): "matches no file",
        _write(tmp_path / "empty.txt", b""): "the file is empty",
        _write(tmp_path / "latin1.txt", b"abc\ncaf\xe9\n"): "not UTF-8 text (byte 7",
    }
    for path, words in cases.items():
        with pytest.raises(DataError, match=None) as err:
            load_text(path, good, block_size=8, cache_dir=cache)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    (tmp_path / "globbed").mkdir()
    _write(tmp_path / "globbed" / "__init__.py", b"")
    with pytest.raises(DataError, match="globbed/\\*.py: matches only empty files"):
        load_text(str(tmp_path / "globbed" / "*.py"), good, block_size=8, cache_dir=cache)
    _write(tmp_path / "globbed" / "mod.py", b"x = 1\n" * 3)
    skipped = load_text(str(tmp_path / "globbed" / "*.py"), good, block_size=4, cache_dir=cache)
    assert skipped.train.tokens.num_tokens == 3 * len(b"x = 1\n") + 1  # the empty file: skipped
    with pytest.raises(DataError, match="cannot fill one window"):
        load_text(good, _write(tmp_path / "short.txt", b"abc"), block_size=8, cache_dir=cache)
    with pytest.raises(ConfigError, match="data.val_tokens: 4 positions hold no validation"):
        load_text(good, good, block_size=8, val_tokens=4, cache_dir=cache)
    with pytest.raises(ConfigError, match="tokenizer nope.json: no such file"):
        load_tokenizer("nope.json")
    assert not any(p.suffix == ".tokens" and "latin" in p.name for p in cache.iterdir())


def test_config_takes_text_settings_only_for_text() -> None:
    base = {"cohort": {"size": 2, "model": "mlp"}}
    lm = {"cohort": {"size": 2, "model": "gpt"}}
    text = {"name": "text", "train": "a/*.txt", "val": "b.txt", "block_size": 64}
    cfg = parse_config({**lm, "data": text})
    assert cfg.data.block_size == 64
    image_hash = parse_config(dict(base)).hash()
    assert parse_config({**base, "data": {"name": "digits"}}).hash() == image_hash
    with pytest.raises(ConfigError, match="data.block_size: text data needs it"):
        parse_config({**lm, "data": {"name": "text", "train": "a", "val": "b"}})
    with pytest.raises(ConfigError, match="data.label_fraction: text data has no labels"):
        parse_config({**lm, "data": {**text, "label_fraction": 0.5}})
    with pytest.raises(ConfigError, match="data.image_size: text data does not take it"):
        parse_config({**lm, "data": {**text, "image_size": 32}})
    with pytest.raises(ConfigError, match="data.block_size: only text data"):
        parse_config({**base, "data": {"name": "digits", "block_size": 8}})
    moved = parse_config({**lm, "data": {**text, "cache_dir": "/elsewhere"}})
    assert moved.hash() == cfg.hash()  # where the cache lies does not change the numbers


def test_bpe_tokenizer_trained_round_trips(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    out = train_bpe([corpus / "a.py", corpus / "b.py"], 300, tmp_path / "tok" / "tokenizer.json")
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.decode([tok.eot_id]) == EOT_TOKEN
    sample = "class Point:\n    def add(self):  # ünïcode\n"
    assert tok.decode(tok.encode(sample).tolist()) == sample
    assert len(tok.encode(sample)) < len(sample.encode())  # merges learnt
    for text, words in (("{not json", "not a tokenizers file ("), (out.read_text().replace(
            EOT_TOKEN, "<|other|>"), "has no end-of-text token")):  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_tokenizer(str(bad))
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    tf = tokenize_split(str(corpus / "a.py"), "train", tok, tmp_path / "cache")
    other = tokenize_split(str(corpus / "a.py"), "train", ByteTokenizer(), tmp_path / "cache")
    assert tf.path != other.path  # the tokenizer is part of the key
    assert np.asarray(tf.open())[-1] == tok.eot_id


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`dml-cluster ARGS` in this process (no second torch import); its exit status."""
    from dml_cluster.cli import main

    monkeypatch.setattr(sys, "argv", ["dml-cluster", *args])
    try:
        main()
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def test_cli_trains_a_tokenizer_and_refuses_bad_files_in_one_line(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("tokenizers")
    out = tmp_path / "t.json"
    assert _cli(["tokenizer", "train", str(corpus / "a.py"), "--vocab", "280", "--out", str(out)],
                monkeypatch) == 0  # fmt: skip
    assert load_tokenizer(str(out)).vocab_size == 280 and str(out) in capsys.readouterr().out
    bad = _write(tmp_path / "bad.txt", b"\xff\xfe")
    refused = ["tokenizer", "train", bad, "--vocab", "280", "--out", str(tmp_path / "u.json")]
    assert _cli(refused, monkeypatch) == 2 and not (tmp_path / "u.json").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text (byte 0" in err, err


def test_one_writer_the_others_wait_and_read_its_file(corpus: Path, tmp_path: Path) -> None:
    cache, tok = tmp_path / "cache", ByteTokenizer()
    cache.mkdir()
    key, _ = cache_key([corpus / "a.py"], tok)
    found: list[TokenFile] = []
    with _exclusive(cache / f"{key}.lock"):  # another process is writing this split
        reader = threading.Thread(
            target=lambda: found.append(tokenize_split(str(corpus / "a.py"), "train", tok, cache))
        )
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not found  # waits on the lock; writes nothing meanwhile
        assert not (cache / f"{key}.tokens").exists()
    reader.join(10)
    assert found and found[0].num_tokens == len(CORPUS) + 1


def test_the_benchmark_corpus_is_the_stdlib_split_by_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_corpus.py"
    spec = importlib.util.spec_from_file_location("lm_corpus", path)
    assert spec is not None and spec.loader is not None
    lm_corpus = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lm_corpus", lm_corpus)  # (its dataclass looks itself up)
    spec.loader.exec_module(lm_corpus)
    root = tmp_path / "lib"
    names = [f"pkg{i}/mod{j}.py" for i in range(5) for j in range(8)]
    skipped = ["test/test_x.py", "site-packages/y.py", "idlelib/idle_test/z.py", "pkg0/n.txt"]
    for name in names + skipped + ["pkg0/__init__.py"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("" if name.endswith("__init__.py") else f"# {name}\n")
    corpus = lm_corpus.stdlib_corpus(root)
    found = sorted(str(p.relative_to(root)) for p in corpus.train + corpus.val)
    assert found == sorted(names) and corpus.val and corpus.train  # by file, tests/empty out
    facts = corpus.facts()
    assert facts["train_files"] + facts["val_files"] == len(names)
    (root / "pkg9").mkdir()
    (root / "pkg9" / "new.py").write_text("x = 1\n")  # a new file moves no other file
    again = lm_corpus.stdlib_corpus(root)
    assert set(corpus.val) <= set(again.val) and set(corpus.train) <= set(again.train)
    assert again.facts()["file_list_sha256"] != facts["file_list_sha256"]
