"""Tokenizers of text data: the built-in byte tokenizer, and Hugging Face `tokenizers` files.

`data.tokenizer: bytes` (the default) maps text to its UTF-8 bytes (ids 0-255) and adds one
end-of-text symbol (id 256): 257 symbols, nothing to train or download. Any other value is the
path of a local `tokenizer.json` written by Hugging Face's `tokenizers` package (the optional
extra `[lm]`), imported only when such a file is used. `train_bpe` trains one locally.

Every tokenizer has an `identity`: a string that changes whenever the ids it gives could change
(the byte tokenizer's version, a file's content hash); the token cache is keyed on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dml_cluster.errors import ConfigError, DataError, first_line

BYTES = "bytes"
EOT_TOKEN = "<|endoftext|>"
"""The end-of-text special token of trained BPE tokenizers (the name GPT-2 gave it)."""

# special tokens other tokenizer files use for the end of a text, tried in this order
_EOT_NAMES = (EOT_TOKEN, "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")


class Tokenizer(Protocol):
    """Text <-> token ids, with an end-of-text id that joins files."""

    vocab_size: int
    eot_id: int
    identity: str

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` (no end-of-text added), as an int64 array."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (end-of-text symbols included as the tokenizer spells them)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end-of-text 256."""

    vocab_size = 257
    eot_id = 256
    identity = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            out += EOT_TOKEN.encode() if int(i) == self.eot_id else bytes([int(i)])
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` file (`tokenizer.json`)."""

    def __init__(self, path: Path) -> None:
        tokenizers = import_tokenizers()
        try:
            data = path.read_bytes()
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except OSError as err:
            raise ConfigError(f"tokenizer {path}: cannot read ({err.strerror})") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is the same user error
            why = first_line(err)
            raise ConfigError(f"tokenizer {path}: not a tokenizers file ({why})") from None
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eot = next((self._tok.token_to_id(n) for n in _EOT_NAMES if self._tok.token_to_id(n)
                    is not None), None)  # fmt: skip
        if eot is None:
            names = ", ".join(_EOT_NAMES)
            raise ConfigError(f"tokenizer {path}: has no end-of-text token (one of {names})")
        self.eot_id = int(eot)
        self.identity = "hf-" + hashlib.sha256(data).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def import_tokenizers() -> Any:
    """The `tokenizers` package, or a one-line ConfigError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "a tokenizer file needs Hugging Face's tokenizers package: "
            "pip install 'dml-cluster[lm]' (or pip install tokenizers)"
        ) from None
    return tokenizers


def load_tokenizer(spec: str | None) -> Tokenizer:
    """`bytes` (or None) -> the byte tokenizer; anything else is a tokenizer.json path."""
    if spec is None or spec == BYTES:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer {spec}: no such file (give 'bytes' or a tokenizer.json)")
    return HFTokenizer(path)


def train_bpe(files: Sequence[str | Path], vocab_size: int, out: str | Path) -> Path:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (end-of-text included) on the
    UTF-8 text `files` and write it to `out` (a tokenizer.json). Returns the path written."""
    tokenizers = import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("tokenizer train: no files given")
    for path in paths:
        check_text_file(path)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(
            f"tokenizer train: --vocab must be at least {len(alphabet) + 1} "
            f"(the {len(alphabet)} byte symbols and end-of-text), got {vocab_size}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train([str(p) for p in paths], trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from dml_cluster.run_folder import write_atomic

    write_atomic(out, tok.to_str(pretty=True).encode())
    return out


def check_text_file(path: Path) -> bytes:
    """The bytes of `path` if it is a non-empty UTF-8 text file, else a one-line DataError
    (a decode error names the byte offset)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"text data {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"text data {path}: is a folder, not a file") from None
    except OSError as err:
        raise DataError(f"text data {path}: cannot read ({err.strerror})") from None
    if not data:
        raise DataError(f"text data {path}: the file is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"text data {path}: not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    return data
