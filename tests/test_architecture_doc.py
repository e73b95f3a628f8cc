"""docs/ARCHITECTURE.md names only what exists: every repository path it writes (`dml_cluster/...`,
`tests/...`, `benchmarks/...`) is there, and every citation `path.py::Name` or
`path.py::Class.member` is defined in that file (read with ast, nothing imported), so the design
reference cannot silently go stale when code moves or is renamed. README.md links to it."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"

PATH = re.compile(r"\b(?:dml_cluster|tests|benchmarks)/[\w./-]*[\w/]")
"""A repository path as the doc writes it: a file or a folder (`dml_cluster/bus/`)."""

CITATION = re.compile(r"\b((?:dml_cluster|tests|benchmarks)(?:/\w+)*\.py)::([A-Za-z_][\w.]*\w)")
"""`dml_cluster/trainer.py::CohortTrainer.train_step`: a name defined in that file."""

MIN_CITATIONS = 60
"""The doc is a call-path reference; far fewer citations would mean the syntax drifted."""


def _names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body defines: functions, classes, assigned names."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


@cache
def _module(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(), filename=path)


def _defined(path: str, dotted: str) -> bool:
    scope: list[ast.stmt] = _module(path).body
    parts = dotted.split(".")
    for n, part in enumerate(parts):
        node = _names(scope).get(part)
        if node is None:
            return False
        if n < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return False
            scope = node.body
    return True


def test_every_path_in_the_doc_exists() -> None:
    text = DOC.read_text()
    paths = sorted(set(PATH.findall(text)))
    assert paths, "the doc names no repository path"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_cited_name_is_defined_where_the_doc_says() -> None:
    citations = sorted(set(CITATION.findall(DOC.read_text())))
    assert len(citations) >= MIN_CITATIONS, f"only {len(citations)} `path.py::name` citations"
    missing_files = sorted({p for p, _ in citations if not (ROOT / p).is_file()})
    assert missing_files == [], f"cited files that do not exist: {missing_files}"
    undefined = [f"{p}::{name}" for p, name in citations if not _defined(p, name)]
    assert undefined == [], f"cited names not defined in their file: {undefined}"


def test_the_readme_links_the_doc() -> None:
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()
