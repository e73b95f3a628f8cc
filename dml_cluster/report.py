"""`dml-cluster report RUN_DIR`: a finished (or running) run's logs turned into plots and a page.

Reads the run folder the trainer writes (cohort.jsonl evaluations, peers/<name>.jsonl training
records, summary.json when the run finished) and writes, into RUN_DIR/report/ by default,
PNG plots (see `plots`) and report.md: the run at a glance, final accuracies, divergence between
peers, where a step's time goes, and the per-class accuracy table (a language-model cohort's:
validation loss, perplexity, next-token accuracy and ECE per peer instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dml_cluster import plots
from dml_cluster.errors import DmlError, InputError
from dml_cluster.evaluation import per_class_table
from dml_cluster.run_folder import RunLogs, read_jsonl, time_split, train_record
from dml_cluster.token_evaluation import token_table


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except DmlError as err:
        raise InputError(f"report: {err}") from None


def load_run(run_dir: str | Path) -> RunLogs:
    """Read a run folder; a folder that is not a run is one clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"report: {run_dir}: no such run folder")
    cohort = run_dir / "cohort.jsonl"
    peer_files = sorted((run_dir / "peers").glob("*.jsonl"))
    if not cohort.exists() and not peer_files:
        raise InputError(
            f"report: {run_dir}: not a run folder (no cohort.jsonl, no peers/*.jsonl logs)"
        )
    evals = [r for r in _records(cohort) if r.get("event") == "eval"] if cohort.exists() else []
    records = {p.stem: _records(p) for p in peer_files}
    train = {
        name: [train_record(r) for r in rs if r.get("event") == "train"]
        for name, rs in records.items()
    }
    warnings = [r for rs in records.values() for r in rs if r.get("event") == "warning"]
    summary = None
    if (run_dir / "summary.json").exists():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            raise InputError(f"report: {run_dir / 'summary.json'}: not valid JSON") from None
    peers = list(evals[-1]["peers"]) if evals else sorted(train)
    return RunLogs(run_dir, evals, train, summary, peers, warnings)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _table(head: list[str], rows: list[list[str]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---|" + f"{align}|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _init_from(record: Any) -> str | None:
    """Where a run's students started (`train.init_from`), as the report's fact line says it."""
    if not isinstance(record, dict):
        return None
    return f"the final weights of {record.get('folder')} (step {record.get('steps')})"


def summary_markdown(logs: RunLogs, images: dict[str, str]) -> str:
    """The report page: Markdown with the plots embedded by relative path."""
    s = logs.summary or {}
    last = logs.evals[-1] if logs.evals else None
    out = [f"# Run report: {logs.name}", ""]
    facts = [
        ("method", s.get("method")),
        ("update", s.get("update")),
        ("transport", s.get("transport")),
        ("cohort size", s.get("cohort_size", len(logs.peers))),
        ("steps", s.get("steps", last["step"] if last else None)),
        ("epochs", s.get("epochs", last["epoch"] if last else None)),
        ("wall time", f"{s['wall_seconds']:.1f} s" if "wall_seconds" in s else None),
        ("config hash", f"`{s['config_hash']}`" if "config_hash" in s else None),
        ("initialised from", _init_from(s.get("init_from"))),
    ]
    out += [f"- **{k}**: {v}" for k, v in facts if v is not None]
    if logs.summary is None:
        out.append("- **status**: no summary.json: the run is unfinished or was stopped")
    out.append("")
    if logs.warnings:
        out += ["## Warnings", ""]
        out += [f"- step {w.get('step', '?')}: {w['message']}" for w in logs.warnings]
        out.append("")

    if last is not None:
        out += ["## Test accuracy", ""]
        rows = []
        for name in logs.peers:
            model = s.get("peers", {}).get(name, {}).get("model", "")
            accs = [e["peers"][name]["accuracy"] for e in logs.evals]
            rows.append(
                [name, model, *_final_best(logs, accs), f"{last['peers'][name]['entropy']:.4f}"]
            )
        if len(logs.peers) > 1:
            accs = [e["ensemble"]["accuracy"] for e in logs.evals]
            entropy = f"{last['ensemble']['entropy']:.4f}"
            rows.append(["**ensemble**", "", *_final_best(logs, accs), entropy])
        head = ["peer", "model", "final", "best", "entropy (nats)"]
        out += _table(head, rows) + [""]
    out += _image(images, "accuracy", "Test accuracy per peer and of the ensemble")
    if last is not None and "perplexity" in last["ensemble"]:  # a language-model cohort
        out += [f"## Validation per token (epoch {last['epoch']})", ""]
        out += [token_table(last), ""]

    if last is not None and last.get("pairs"):
        out += ["## Divergence between peers (final evaluation, test set)", ""]
        rows = []
        for key, pair in last["pairs"].items():
            peer, other = key.split("|", 1)
            kl, js, agree = f"{pair['kl']:.4f}", f"{pair['js']:.4f}", _pct(pair["agreement"])
            rows.append([peer, other, kl, js, agree])
        head = ["peer", "other peer", "KL(p_other ‖ p_peer)", "JS", "top-1 agreement"]
        out += _table(head, rows) + [""]
    out += _image(images, "divergence", "Divergence between peers over training")
    out += _image(images, "entropy", "Mean posterior entropy")
    out += _image(images, "loss", "Training losses")

    splits = {name: time_split(logs.train.get(name, [])) for name in logs.peers}
    splits = {n: t for n, t in splits.items() if t is not None}
    if splits:
        out += ["## Time per step", ""]
        rows = []
        for name, t in splits.items():
            parts = (t.compute, t.transfer, t.wait)
            share = [f"{1000 * v:.2f} ({100 * v / t.step:.0f}%)" if t.step else "–" for v in parts]
            rate = f"{1 / t.step:.1f}" if t.step else "–"
            rows.append([name, f"{1000 * t.step:.2f}", *share, rate])
        head = ["peer", "step ms", "compute ms", "exchange ms", "wait ms", "steps/s"]
        out += _table(head, rows)
        out += [
            "",
            f"Means over the {next(iter(splits.values())).steps_logged} logged steps per peer. "
            "*exchange* is the time on the bus minus *wait*, the time spent waiting for the "
            "slowest peer (measured by the zmq transport; collectives do not tell the two apart).",
            "",
        ]
    out += _image(images, "timing", "Where a step's time goes")

    if last is not None and "per_class" in last["ensemble"]:
        out += [f"## Per-class test accuracy (epoch {last['epoch']}, %)", ""]
        out += [per_class_table(last, logs.class_names), ""]
    return "\n".join(out).rstrip() + "\n"


def _final_best(logs: RunLogs, accs: list[float]) -> list[str]:
    best = max(range(len(accs)), key=accs.__getitem__)
    return [_pct(accs[-1]), f"{_pct(accs[best])} (epoch {logs.evals[best]['epoch']})"]


def _image(images: dict[str, str], key: str, title: str) -> list[str]:
    return [f"![{title}]({images[key]})", ""] if key in images else []


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, logs: RunLogs | None = None
) -> list[Path]:
    """Write the plots and report.md; returns the files written, report.md first. `logs`: the
    run's, if already read (`load_run`)."""
    logs = logs if logs is not None else load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else logs.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for key, figure in plots.all_figures(logs).items():
        path = out / f"{key}.png"
        plots.save(figure, path)
        images[key] = path.name
    page = out / "report.md"
    page.write_text(summary_markdown(logs, images))
    return [page, *(out / name for name in images.values())]
