"""benchmarks/lm.py's arithmetic and provenance (its runs take an hour: LM.md): the paired
difference per seed (averaged over the compared peers), its 95% t-interval over seeds, and the
page naming every commit and command its runs came from."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lm() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("lm_benchmark", REPO / "benchmarks" / "lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run(row: str, seed: int, perplexities: dict[str, float], commit: str) -> dict:
    return {
        "tokenizer": "bytes", "row": row, "seed": seed, "cpu_seconds": 60.0, "bytes_per_step": 10,
        "peers": {name: {"index": i, "perplexity": p, "role": "student"}
                  for i, (name, p) in enumerate(perplexities.items())},
        "commit": commit, "command": f"python benchmarks/lm.py # {commit}",
    }  # fmt: skip


def test_paired_differences_and_their_interval(lm: ModuleType) -> None:
    ind = {0: (8.0, 9.0), 1: (8.5, 8.5), 2: (9.0, 7.0)}
    dml = {0: (7.0, 9.0), 1: (8.0, 8.5), 2: (9.5, 7.5)}
    results = [
        *(_run("ind", s, {"gpt-0": a, "gpt-1": b}, "aaaaaaa") for s, (a, b) in ind.items()),
        *(_run("dml", s, {"gpt-0": a, "gpt-1": b}, "bbbbbbb") for s, (a, b) in dml.items()),
    ]
    page = lm.render({"meta": {"machine": "m", "minutes": 3.0}, "results": results})
    ds = [statistics.mean((dml[s][k] - ind[s][k]) for k in (0, 1)) for s in (0, 1, 2)]
    half = 4.303 * statistics.stdev(ds) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    mean = statistics.mean(ds)
    row = next(line for line in page.splitlines() if line.startswith("| the same pair, DML"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2:6] == ["ind", f"{mean:+.2f}", f"[{mean - half:+.2f}, {mean + half:+.2f}]", "3"]
    assert cells[1] == lm.mean_std([v for s in (0, 1, 2) for v in dml[s]])
    assert "- 3 at commit `aaaaaaa`: `python benchmarks/lm.py # aaaaaaa`" in page
    assert "- 3 at commit `bbbbbbb`" in page and "6 runs" in page
