"""Re-run the accuracy table of benchmarks/ACCURACY.md: what each way of distilling buys.

    .venv/bin/python benchmarks/accuracy.py               # the full table (~30-40 min, 2 CPU cores)
    .venv/bin/python benchmarks/accuracy.py --quick       # a smoke run on digits (~1 min)
    .venv/bin/python benchmarks/accuracy.py --rows e2     # re-run some rows, keep the others

Trains the teacher (configs/fmnist-teacher.yaml), then every row for every seed with the
one-process engine (`run_local`: bitwise the same numbers as one process per peer, far cheaper
on 2 cores), each run exactly what `dml-cluster train CONFIG --set ...` would run. Writes the
raw results to benchmarks/accuracy_results.json and the tables into ACCURACY.md between the
`results` markers (the text around them is kept). With `--rows`, the other rows' results are
taken from the existing JSON and the teacher already trained is reused. One process for all
runs: torch is imported and the dataset read once.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dml_cluster.trainer  # noqa: E402
from dml_cluster.config import Config, apply_overrides, parse_config  # noqa: E402
from dml_cluster.data import load_dataset  # noqa: E402
from dml_cluster.launch import run_local  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()
    section: str = "main"
    notes: str = ""


ROWS = [
    Row("a", "(a) alone (CE)", "configs/fmnist-alone.yaml"),
    Row("b", "(b) DML, 2 students", "configs/fmnist-dml.yaml"),
    Row("c1", "(c) DML, 3 students", "configs/fmnist-dml-k3.yaml"),
    Row("c2", "(c) DML_e, 3 students", "configs/fmnist-dml-k3.yaml", ("method.name=dml_e",)),
    Row("d", "(d) KD from the teacher", "configs/fmnist-kd.yaml"),
    Row("e", "(e) DKD from the teacher", "configs/fmnist-dkd.yaml"),
    Row(
        "e2",
        "(e) DKD, mdistiller's 20-epoch warm-up",
        "configs/fmnist-dkd.yaml",
        ("method.warmup_epochs=20",),
    ),
    Row("f", "(f) FitNets hints + KD", "configs/fmnist-fitnets.yaml"),
    Row(
        "s1",
        "independent, 5% labels",
        "configs/fmnist-semi.yaml",
        ("method.name=independent",),
        "semi",
    ),
    Row(
        "s2",
        "DML on labelled samples only",
        "configs/fmnist-semi.yaml",
        ("method.unlabelled_mimicry=false",),
        "semi",
    ),
    Row("s3", "DML, mimicry on all samples", "configs/fmnist-semi.yaml", (), "semi"),
    # the full-label learning rate, 0.05: unstable with ~6 labelled samples per batch
    *(
        Row(
            f"{r}x",
            f"{label}, lr 0.05",
            "configs/fmnist-semi.yaml",
            (*o, "optim.lr=0.05"),
            "semi05",
        )
        for r, label, o in (
            ("s1", "independent, 5% labels", ("method.name=independent",)),
            ("s2", "DML on labelled samples only", ("method.unlabelled_mimicry=false",)),
            ("s3", "DML, mimicry on all samples", ()),
        )
    ),
]


@dataclass
class Result:
    row: Row
    seed: int
    summary: dict[str, Any]
    wall: float
    students: dict[str, dict[str, Any]] = field(default_factory=dict)


def quiet_runs(raw: dict[str, Any]) -> dict[str, Any]:
    """No Prometheus endpoint, no mid-run checkpoints in table runs (where configs have them)."""
    if "metrics" in Config.model_fields:
        raw.setdefault("metrics", {})["enabled"] = False
    if "checkpoint" in Config.model_fields:
        raw.setdefault("checkpoint", {})["enabled"] = False
    return raw


def build(path: str, overrides: list[str]) -> Config:
    raw = yaml.safe_load((ROOT / path).read_text())
    return parse_config(quiet_runs(apply_overrides(raw, overrides)))


def common_overrides(args: argparse.Namespace, name: str, seed: int, teacher: str) -> list[str]:
    out = [f"run.name={name}", f"run.seed={seed}", f"run.out_dir={args.out}"]
    if args.quick:
        out += ["data.name=digits", "data.batch_size=64", "train.epochs=2"]
    return out


def teacher_overrides(cfg_path: str, teacher: str, quick: bool) -> list[str]:
    """Point a student config at the teacher trained by this script."""
    raw = yaml.safe_load((ROOT / cfg_path).read_text())
    out = []
    for i, peer in enumerate(raw["cohort"].get("peers") or []):
        if peer.get("role") == "teacher":
            out.append(f"cohort.peers.{i}.checkpoint={teacher}")
    if (raw.get("method") or {}).get("teacher"):
        out.append(f"method.teacher.checkpoint={teacher}")
    return out


def from_json(run: dict[str, Any]) -> Result:
    row = next(r for r in ROWS if r.key == run["row"])
    summary = {"ensemble": run["ensemble"]}
    return Result(row, run["seed"], summary, run["wall_seconds"], run["students"])


def run_one(cfg: Config) -> tuple[dict[str, Any], float]:
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_local(cfg)
    return summary, time.perf_counter() - t0


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def command(row: Row, seed: int, teacher_cmd: bool) -> str:
    sets = " ".join(f"--set {o}" for o in (*row.overrides, f"run.seed={seed}"))
    return f"dml-cluster train {row.config} {sets}".strip()


def table(results: list[Result], section: str, alone: float | None) -> list[str]:
    lines = [
        "| method | students × seeds | final acc. % (mean ± std) | best acc. % | "
        "Δ final | ensemble final % | wall-clock per run, s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [r for r in ROWS if r.section == section]:
        rs = [r for r in results if r.row.key == row.key]
        if not rs:
            continue
        final = [s["final_accuracy"] for r in rs for s in r.students.values()]
        best = [s["best_accuracy"] for r in rs for s in r.students.values()]
        ens = [r.summary["ensemble"]["final_accuracy"] for r in rs]
        walls = [r.wall for r in rs]
        delta = ""
        if alone is not None:
            delta = f"{100 * (statistics.mean(final) - alone):+.2f}"
        ens_s = mean_std(ens) if len(rs[0].students) > 1 else "–"
        lines.append(
            f"| {row.label} | {len(rs[0].students)} × {len(rs)} | {mean_std(final)} | "
            f"{mean_std(best)} | {delta} | {ens_s} | {statistics.mean(walls):.0f} |"
        )
    return lines


def per_class(results: list[Result], teacher: dict[str, Any], class_names: list[str]) -> list[str]:
    """Per-class accuracy of the teacher and of the (a), (d), (e), (f) students, seed means."""
    cols = {"teacher": [teacher["per_class"]]}
    for key in ("a", "b", "d", "e", "e2", "f"):
        rs = [r for r in results if r.row.key == key]
        if rs:
            cols[next(r.label for r in ROWS if r.key == key)] = [
                s["per_class"] for r in rs for s in r.students.values()
            ]
    head = "| class | " + " | ".join(cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for c, name in enumerate(class_names):
        cells = [statistics.mean(100 * pc[c] for pc in runs) for runs in cols.values()]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return lines


def render(results: list[Result], teacher: dict[str, Any], meta: dict[str, Any]) -> str:
    alone_rs = [
        s["final_accuracy"] for r in results if r.row.key == "a" for s in r.students.values()
    ]
    alone = statistics.mean(alone_rs) if alone_rs else None

    def base(key: str) -> float | None:
        accs = [
            s["final_accuracy"] for r in results if r.row.key == key for s in r.students.values()
        ]
        return statistics.mean(accs) if accs else None

    out = [
        BEGIN,
        f"_Generated by `{meta['command']}` on {meta['date']}; {meta['seeds']} seeds; "
        f"total wall-clock {meta['total_minutes']:.1f} min._",
        "",
        f"**Teacher** ({meta['teacher_model']}, {meta['teacher_epochs']} epochs, seed 0): "
        f"final {100 * teacher['final_accuracy']:.2f}%, best {100 * teacher['best_accuracy']:.2f}% "
        f"(epoch {teacher['best_epoch']}); trained in {meta['teacher_wall']:.0f} s.",
        "",
        f"**Students** ({meta['student_model']}, {meta['student_epochs']} epochs), full labels; "
        "Δ is against row (a):",
        "",
        *table(results, "main", alone),
        "",
        "**Semi-supervised**, 5% of the labels (CE on those only), same students and epochs; "
        "Δ is against the independent row:",
        "",
        *table(results, "semi", base("s1")),
        "",
        "The same three with the full-label learning rate, 0.05 (Δ against its independent row):",
        "",
        *table(results, "semi05", base("s1x")),
        "",
        "**Per-class test accuracy %** at the last epoch (mean over the runs of each row):",
        "",
        *per_class(results, teacher, meta["class_names"]),
        "",
        "Commands, one run each (add `--set run.seed=S` for S in the seeds):",
        "",
        "```",
        "dml-cluster train configs/fmnist-teacher.yaml",
        *sorted({command(r.row, 0, True).removesuffix(" --set run.seed=0") for r in results}),
        "```",
        END,
    ]
    return "\n".join(out)


def write_markdown(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Accuracy\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    parser.add_argument("--out", default="runs/accuracy", help="where the runs go")
    parser.add_argument("--quick", action="store_true", help="digits, 2 epochs: a smoke test")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite ACCURACY.md from the JSON, run nothing"
    )
    parser.add_argument("--markdown", default=str(ROOT / "benchmarks" / "ACCURACY.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "accuracy_results.json"))
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads(Path(args.json).read_text())
        runs = [from_json(r) for r in saved["runs"]]
        write_markdown(Path(args.markdown), render(runs, saved["teacher"], saved["meta"]))
        return
    # every run reads the same dataset: read it once for the whole table
    dml_cluster.trainer.load_dataset = functools.lru_cache(maxsize=2)(load_dataset)
    start = time.perf_counter()
    name = "fmnist-teacher"
    tcfg = build("configs/fmnist-teacher.yaml", common_overrides(args, name, 0, ""))
    if args.quick:
        tcfg = parse_config(quiet_runs(apply_overrides(tcfg.to_dict(), ["train.epochs=3"])))
    teacher_path = str(tcfg.run.dir / "final" / "teacher.pt")
    wanted = set(filter(None, args.rows.split(",")))
    results, previous = [], {}
    if wanted and Path(args.json).exists() and Path(teacher_path).exists():
        previous = json.loads(Path(args.json).read_text())
        results = [from_json(r) for r in previous["runs"] if r["row"] not in wanted]
        tsum = {"peers": {"teacher": previous["teacher"]}, "class_names": None}
        twall = previous["meta"]["teacher_wall"]
        print(f"== teacher: reusing {teacher_path}", flush=True)
    else:
        print(f"== teacher ({name})", flush=True)
        tsum, twall = run_one(tcfg)
    for row in ROWS:
        if wanted and row.key not in wanted:
            continue
        for seed in range(args.seeds):
            run = f"{Path(row.config).stem}-{row.key}-s{seed}"
            overrides = [
                *teacher_overrides(row.config, teacher_path, args.quick),
                *row.overrides,
                *common_overrides(args, run, seed, teacher_path),
            ]
            cfg = build(row.config, overrides)
            print(f"== {row.label} seed {seed} ({run})", flush=True)
            summary, wall = run_one(cfg)
            students = {n: p for n, p in summary["peers"].items() if p.get("role") != "teacher"}
            results.append(Result(row, seed, summary, wall, students))
    total = (time.perf_counter() - start) / 60
    if previous:
        total += previous["meta"]["total_minutes"]
        tsum["class_names"] = previous["meta"]["class_names"]
    scfg = build("configs/fmnist-alone.yaml", common_overrides(args, "x", 0, ""))
    meta = {
        "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "total_minutes": total,
        "teacher_model": f"{tcfg.peers[0].model} {tcfg.peers[0].args}",
        "teacher_epochs": tcfg.train.epochs,
        "teacher_wall": twall,
        "student_model": f"{scfg.peers[0].model} {scfg.peers[0].args}",
        "student_epochs": scfg.train.epochs,
        "class_names": tsum["class_names"],
    }
    teacher = tsum["peers"]["teacher"]
    block = render(results, teacher, meta)
    raw = {
        "meta": meta,
        "teacher": teacher,
        "runs": [
            {
                "row": r.row.key, "label": r.row.label, "seed": r.seed, "wall_seconds": r.wall,
                "students": r.students, "ensemble": r.summary["ensemble"],
            }
            for r in results
        ],
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(raw, indent=1))
    write_markdown(Path(args.markdown), block)
    print(block)


if __name__ == "__main__":
    main()
