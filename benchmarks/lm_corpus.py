"""The language-model benchmark's corpus (issue 26): the Python standard library's own source.

Every machine of the project has it and nobody here wrote it: the `.py` files under the `stdlib`
path of the interpreter that runs this (`sysconfig.get_paths()["stdlib"]`), without
`site-packages`, `dist-packages` and the test folders (`test`, `tests`, `idle_test`), empty files
skipped. Split by file, not by line: a file is a validation file when the SHA-256 of its path
relative to the stdlib folder, read as a number, is 0 modulo 10 (about one file in ten), so the
split is the same on every machine with the same Python and does not move when files are added.
`facts()` records the Python version, the files' count and bytes per split and a hash of the
file list (relative paths and sizes), so a result says which corpus it was measured on.

    python benchmarks/lm_corpus.py            # the facts, as JSON
    python benchmarks/lm_corpus.py --lists D  # also D/train.txt and D/val.txt, one path a line
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
VAL_EVERY = 10


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]

    def facts(self) -> dict[str, Any]:
        """Python version, files and bytes per split, and a hash of the list of files."""
        listing = hashlib.sha256()
        for path in sorted(self.train + self.val):
            listing.update(f"{path.relative_to(self.root)}\t{path.stat().st_size}\n".encode())
        return {
            "python": platform.python_version(),
            "stdlib": str(self.root),
            "train_files": len(self.train),
            "train_bytes": sum(p.stat().st_size for p in self.train),
            "val_files": len(self.val),
            "val_bytes": sum(p.stat().st_size for p in self.val),
            "file_list_sha256": listing.hexdigest(),
        }


def is_val(relative: Path) -> bool:
    """Is this file (path relative to the stdlib folder) in the validation split?"""
    digest = hashlib.sha256(relative.as_posix().encode()).digest()
    return int.from_bytes(digest, "big") % VAL_EVERY == 0


def stdlib_corpus(root: Path | None = None) -> Corpus:
    """The corpus of the stdlib folder `root` (default: this interpreter's)."""
    root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not EXCLUDED & set(p.relative_to(root).parts[:-1]) and p.is_file() and p.stat().st_size
    )
    val = tuple(p for p in files if is_val(p.relative_to(root)))
    train = tuple(p for p in files if not is_val(p.relative_to(root)))
    return Corpus(root, train, val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=None, help="default: this interpreter's")
    parser.add_argument("--lists", type=Path, default=None, help="write train.txt and val.txt")
    args = parser.parse_args()
    corpus = stdlib_corpus(args.stdlib)
    if args.lists is not None:
        args.lists.mkdir(parents=True, exist_ok=True)
        for name, files in (("train", corpus.train), ("val", corpus.val)):
            (args.lists / f"{name}.txt").write_text("".join(f"{p}\n" for p in files))
    print(json.dumps(corpus.facts(), indent=1))


if __name__ == "__main__":
    main()
