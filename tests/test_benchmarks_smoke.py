"""The benchmark scripts run (--quick) and print their tables. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(name: str, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), "--quick", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.timeout(300)
def test_exchange_latency_quick() -> None:
    out = run_script("exchange_latency.py")
    for transport in ("zmq-tcp", "zmq-ipc", "torch-gloo"):
        assert f"| {transport} | 128 x 10" in out
    assert "### K = 2" in out
    assert "B header + payload) median µs" in out  # the raw multipart floor
    assert "exchange CPU mean µs" in out


@pytest.mark.timeout(300)
def test_step_ratio_quick() -> None:
    out = run_script("step_ratio.py")
    rows = (
        "| independent x 2 |",
        "| independent x 2, barrier each step |",
        "| lockstep, zmq |",
        "| lockstep, torch |",
    )
    for row in rows:
        assert out.count(row) == 2  # the step table and the overhead table
    assert "straggler estimate ms" in out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step_ratio_cli_mode_quick() -> None:
    out = run_script("step_ratio.py", "--mode", "cli", "--transports", "zmq")
    assert "| lockstep, zmq |" in out


@pytest.mark.timeout(400)
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py's code path on CPU devices and gloo: every section writes its
    Markdown and JSON, the two-process layout ends bitwise equal to the one-process engine (the
    zmq layout is left out here: tests/test_multiprocess.py covers it)."""
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
         "--transports", "torch", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "## GPU check (dry run" in proc.stdout and "### Summary" in proc.stdout
    for section in ("syncs", "overhead", "determinism", "layouts", "speedups"):
        assert (out / f"{section}.md").is_file() and (out / f"{section}.json").is_file()
    read = lambda name: json.loads((out / f"{name}.json").read_text())  # noqa: E731
    assert read("syncs")["counted"] is False  # counted on a GPU only
    assert [r["precision"] for r in read("overhead")["rows"]] == ["fp32", "bf16"] * 2
    assert all(r["ratio"] > 0 for r in read("overhead")["rows"])
    layouts = {r["layout"]: r for r in read("layouts")["rows"]}
    assert layouts["2 processes (torch)"]["max_abs_weight_diff"] == 0.0  # bitwise
    assert [r["variant"] for r in read("speedups")["rows"]][0] == "fp32 eager"
    assert (
        "| 2 processes (torch): max abs weight diff vs one process | 0 | 0 |"
        in (out / "summary.md").read_text()
    )


@pytest.mark.timeout(300)
def test_accuracy_quick(tmp_path: Path) -> None:
    """benchmarks/accuracy.py --quick on digits: the teacher, a paired row, a teacher row, a
    semi-supervised row; its tables and JSON go to tmp_path, never over the committed ones."""
    md, js = tmp_path / "ACCURACY.md", tmp_path / "results.json"
    out = run_script(
        "accuracy.py", "--rows", "ind,dml2,kd,semi-all", "--out",
        str(tmp_path / "runs"), "--markdown", str(md), "--json", str(js),
    )  # fmt: skip
    assert "| DML, K = 2 | 2 × 1 |" in out and "| KD from the teacher | 1 × 1 |" in out
    assert "| DML, mimicry on every sample | 2 × 1 |" in out and "**Teacher**" in out
    saved = json.loads(js.read_text())
    assert {r["row"] for r in saved["runs"]} == {"ind", "dml2", "kd", "semi-all", "teacher"}
    assert all({"accuracy", "nll", "ece", "entropy"} <= set(s)
               for r in saved["runs"] for s in r["students"].values())  # fmt: skip
    assert "<!-- results:begin -->" in md.read_text()


@pytest.mark.timeout(120)
def test_stop_check_quick() -> None:
    out = run_script("stop_check.py")
    assert "| loopback TCPStore, another process |" in out
