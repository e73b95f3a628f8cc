"""A search's outputs from its search.jsonl: the Pareto plot of accuracy vs cost (several
searches overlaid), the top-N table in report.md and best.yaml (a model spec to paste into a
train config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from dml_cluster.errors import ConfigError


def read_records(folder: Path) -> list[dict[str, Any]]:
    """A search folder's candidate records (one a line of search.jsonl)."""
    path = Path(folder) / "search.jsonl"
    if not path.exists():
        raise ConfigError(f"{folder}: no search.jsonl (not a search's run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def unique(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per architecture (the first time it was evaluated)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        seen.setdefault(r["hash"], r)
    return list(seen.values())


def best(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate of the highest reward (the earliest of equals)."""
    return max(unique(records), key=lambda r: r["reward"])


def pareto_front(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The candidates no other beats on both accuracy and `key` (lower is better), by `key`."""
    front: list[dict[str, Any]] = []
    for r in sorted(unique(records), key=lambda r: (r[key], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front


def pareto_figure(searches: dict[str, list[dict[str, Any]]], key: str = "latency_ms") -> Figure:
    """Validation accuracy vs `key` of every candidate, one colour per search, its front joined."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, records) in enumerate(searches.items()):
        colour = colormaps["tab10"](i % 10)
        rows = unique(records)
        ax.scatter([r[key] for r in rows], [100 * r["accuracy"] for r in rows], s=14,
                   alpha=0.45, color=colour)  # fmt: skip
        front = pareto_front(records, key)
        ax.plot([r[key] for r in front], [100 * r["accuracy"] for r in front], marker="o",
                color=colour, label=f"{label} ({len(rows)} archs)")  # fmt: skip
        top = best(records)
        ax.scatter([top[key]], [100 * top["accuracy"]], marker="*", s=160, color=colour,
                   edgecolor="black", zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel({"latency_ms": "latency (ms per batch, median)", "mflops": "MFLOPs"}[key])
    ax.set_ylabel("validation accuracy after proxy training (%)")
    ax.set_title("candidates and Pareto fronts (star: highest reward)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def top_table(records: list[dict[str, Any]], n: int) -> str:
    """A Markdown table of the `n` best architectures by reward."""
    rows = sorted(unique(records), key=lambda r: -r["reward"])[:n]
    lines = [
        "| rank | reward | val acc | latency ms | MFLOPs | params | round | hash | arch |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['reward']:.4f} | {100 * r['accuracy']:.2f} | {r['latency_ms']:.3g} | "
            f"{r['mflops']:.3g} | {r['params']:,} | {r['round'] + 1} | `{r['hash']}` | "
            f"`{r['describe']}` |"
        )
    return "\n".join(lines)


def best_yaml(record: dict[str, Any]) -> str:
    """best.yaml: a peer entry to paste under cohort.peers (or model + args of a cohort)."""
    head = (
        f"# best architecture: reward {record['reward']:.4f}, validation accuracy "
        f"{100 * record['accuracy']:.2f}% after proxy training, {record['latency_ms']:.3g} ms, "
        f"{record['mflops']:.3g} MFLOPs, {record['params']:,} parameters (hash "
        f"{record['hash']})\n# paste under cohort.peers, or use model/args in a cohort section\n"
    )
    spec = {"name": "student", "model": "searched", "args": {"arch": record["arch"]}}
    return head + yaml.safe_dump(spec, sort_keys=False)


def write_report(
    folder: Path,
    top: int,
    compare: list[Path] = (),  # type: ignore[assignment]
    retrained: dict[str, Any] | None = None,
) -> list[Path]:
    """report.md, pareto.png (this search, then the `compare` ones overlaid), best.yaml."""
    folder = Path(folder)
    records = read_records(folder)
    searches = {_label(folder, records): records}
    for other in compare:
        other_records = read_records(other)
        searches[_label(Path(other), other_records)] = other_records
    paths = []
    for key, name in (("latency_ms", "pareto.png"), ("mflops", "pareto_flops.png")):
        pareto_figure(searches, key).savefig(folder / name, dpi=120)
        paths.append(folder / name)
    winner = best(records)
    (folder / "best.yaml").write_text(best_yaml(winner))
    text = [
        f"# Search {folder.name}",
        "",
        f"{len(records)} candidates in {1 + max(r['round'] for r in records)} rounds, "
        f"{len(unique(records))} distinct architectures; controller "
        f"{records[0]['controller']}, reward mode {records[0]['reward_mode']}.",
        "Accuracy: on the validation split (training images the candidates did not train "
        "on), after the proxy training; never the test set.",
        "",
        f"## Top {top} by reward",
        "",
        top_table(records, top),
        "",
        "![Pareto: accuracy vs latency](pareto.png)",
        "![Pareto: accuracy vs FLOPs](pareto_flops.png)",
        "",
        "best.yaml holds the winner, ready to paste into a train config.",
    ]
    if retrained:
        text += ["", "## Retrained with KD (test accuracy)", "", _retrain_text(retrained)]
    (folder / "report.md").write_text("\n".join(text) + "\n")
    return [folder / "report.md", *paths, folder / "best.yaml"]


def _label(folder: Path, records: list[dict[str, Any]]) -> str:
    first = records[0]
    return f"{folder.name}: {first['controller']}, {first['reward_mode']}"


def _retrain_text(r: dict[str, Any]) -> str:
    accs = ", ".join(f"{100 * a:.2f}" for a in r["test_accuracy"])
    return (
        f"`{r['hash']}` trained {r['epochs']} epochs with KD from the teacher, seeds "
        f"{r['seeds']}: test accuracy {100 * r['mean']:.2f} +- {100 * r['std']:.2f} % "
        f"({accs}); latency {r['latency_ms']:.3g} ms, {r['mflops']:.3g} MFLOPs."
    )
