"""The paired-seed accuracy benchmark of benchmarks/ACCURACY.md: what each method buys over
students trained alone, in the regime the papers study (students that fit their training data).

    .venv/bin/python benchmarks/accuracy.py                    # the Fashion-MNIST protocol
    .venv/bin/python benchmarks/accuracy.py --epochs 15        # ... with a shorter schedule
    .venv/bin/python benchmarks/accuracy.py --quick            # a smoke run on digits (seconds)
    .venv/bin/python benchmarks/accuracy.py --analyze          # + `dml-cluster analyze` of K=2
    .venv/bin/python benchmarks/accuracy.py --render-only      # rewrite ACCURACY.md from JSON
    .venv/bin/python benchmarks/accuracy.py --suite cifar100 --root DIR   # the CIFAR-100 recipes

Every run is one `dml-cluster train CONFIG --set run.seed=S [--set ...]` (the commands are
listed in ACCURACY.md), run with the one-process engine (the same numbers as one process per
peer, tests/test_multiprocess.py; cheaper on a CPU), `--workers` runs at a time, each in its own
process (niced). The script only turns off the Prometheus endpoint and mid-run checkpoints, and
writes the resolved config into each run folder (for `dml-cluster analyze`). Results are saved
after every run into the JSON file; a re-run skips the (row, seed) pairs already there unless
`--fresh`, so an interrupted benchmark continues where it stopped.

Paired comparisons: peer k of a cohort starts from weights that depend only on (seed, k) and
every peer sees the batches of (seed, epoch), whatever the method (tests/test_accuracy.py), so
row R's student k at seed s is compared with the independent row's student k at seed s.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import commit  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FULL_EPOCHS = 40  # the protocol's schedule, which the fmnist3k configs hold
SUBSET_BATCH = 128  # the fmnist3k configs' batch size


@dataclass(frozen=True)
class Row:
    """One line of a table: a config, its overrides, how many seeds, what it is compared with."""

    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()
    section: str = "main"
    seeds: int = 5
    baseline: str | None = "ind"
    teacher: bool = False  # the run needs the suite's teacher
    scaled: tuple[str, ...] = ()  # epoch counts of the config scaled with --epochs


@dataclass(frozen=True)
class Suite:
    name: str
    teacher: Row | None
    rows: tuple[Row, ...]
    sections: dict[str, str]  # section -> heading
    quick: tuple[str, ...] = ()  # overrides of --quick
    epoch_rows: tuple[str, ...] = ()  # sections whose train.epochs --epochs sets
    core: tuple[str, ...] = ()  # the rows run first (their first three seeds)
    subset_classes: int = 0  # classes of the epoch_rows' training subset (--per-class sets it)


_SCALED_KD = ("method.warmup_epochs",)
FMNIST = Suite(
    name="fmnist3k",
    teacher=Row(
        "teacher",
        "teacher (small_cnn width 64)",
        "configs/fmnist3k-teacher.yaml",
        section="teacher",
        seeds=1,
        baseline=None,
    ),
    rows=(
        Row(
            "ind",
            "independent, K = 2 (each alone)",
            "configs/fmnist3k-independent.yaml",
            baseline=None,
        ),
        Row("dml2", "DML, K = 2", "configs/fmnist3k-dml.yaml"),
        Row("dml3", "DML, K = 3", "configs/fmnist3k-dml.yaml", ("cohort.size=3",)),
        Row(
            "dmle-p",
            "DML_e, K = 3, ensemble of probabilities",
            "configs/fmnist3k-dml-e.yaml",
            ("method.ensemble=probs",),
        ),
        Row("dmle-l", "DML_e, K = 3, ensemble of logits", "configs/fmnist3k-dml-e.yaml"),
        Row(
            "kd",
            "KD from the teacher",
            "configs/fmnist3k-kd.yaml",
            section="teacher",
            teacher=True,
        ),
        Row(
            "dkd",
            "DKD from the teacher",
            "configs/fmnist3k-dkd.yaml",
            section="teacher",
            teacher=True,
            scaled=_SCALED_KD,
        ),
        Row(
            "fitnets",
            "FitNets hints + KD",
            "configs/fmnist3k-fitnets.yaml",
            section="teacher",
            teacher=True,
            scaled=("method.hint_epochs",),
        ),
        Row(
            "at",
            "AT (attention transfer, 3 block pairs)",
            "configs/fmnist3k-at.yaml",
            section="teacher",
            seeds=3,
            teacher=True,
        ),
        Row(
            "tdml",
            "teacher + 2 students (KD + DML)",
            "configs/fmnist3k-teacher-dml.yaml",
            section="teacher",
            teacher=True,
        ),
        Row(
            "semi-ind",
            "independent, 5% labels",
            "configs/fmnist-semi-cnn.yaml",
            ("method.name=independent",),
            "semi",
            5,
            None,
            scaled=("train.epochs",),
        ),
        Row(
            "semi-lab",
            "DML on the labelled samples only",
            "configs/fmnist-semi-cnn.yaml",
            ("method.unlabelled_mimicry=false",),
            "semi",
            5,
            "semi-ind",
            scaled=("train.epochs",),
        ),
        Row(
            "semi-all",
            "DML, mimicry on every sample",
            "configs/fmnist-semi-cnn.yaml",
            (),
            "semi",
            5,
            "semi-ind",
            scaled=("train.epochs",),
        ),
        Row(
            "mlp-alone", "MLP 784-64-10 alone", "configs/fmnist-alone.yaml", (), "control", 5, None
        ),
        Row(
            "mlp-dml",
            "MLP 784-64-10, DML K = 2",
            "configs/fmnist-dml.yaml",
            (),
            "control",
            5,
            "mlp-alone",
        ),
    ),
    sections={
        "main": "Students alone and learning from each other",
        "teacher": "Distillation from a wider teacher trained on the same subset",
        "semi": "Semi-supervised: 5% of the full training set's labels (3,000 of 60,000 images)",
        "control": "Negative control (the previous table's regime): MLP students, all 60,000 "
        "labels, 5 epochs",
    },
    quick=("data.name=digits", "data.batch_size=32", "train.eval_every=1"),
    epoch_rows=("main", "teacher"),
    core=("ind", "dml2"),
    subset_classes=10,
)

CIFAR = Suite(
    name="cifar100",
    teacher=Row(
        "teacher",
        "teacher resnet32x4 (mdistiller's recipe)",
        "configs/cifar100-resnet32x4-teacher.yaml",
        section="teacher",
        seeds=1,
        baseline=None,
    ),
    rows=(
        Row("ind", "ResNet-32 alone, K = 2", "configs/cifar100-dml-resnet32.yaml",
            ("method.name=independent",), "main", 1, None),
        Row("dml2", "DML ResNet-32, K = 2", "configs/cifar100-dml-resnet32.yaml", (), "main", 1),
        Row("r8x4", "resnet8x4 alone", "configs/cifar100-resnet8x4.yaml", (), "teacher", 1, None),
        Row("kd", "KD resnet32x4 -> resnet8x4", "configs/cifar100-kd-res32x4-res8x4.yaml", (),
            "teacher", 1, "r8x4", teacher=True),
        Row("dkd", "DKD resnet32x4 -> resnet8x4", "configs/cifar100-dkd-res32x4-res8x4.yaml",
            (), "teacher", 1, "r8x4", teacher=True),
    ),
    sections={
        "main": "DML paper: ResNet-32 pair (200 epochs)",
        "teacher": "mdistiller: resnet32x4 -> resnet8x4 (240 epochs)",
    },
)  # fmt: skip
SUITES = {s.name: s for s in (FMNIST, CIFAR)}


@dataclass(frozen=True)
class Job:
    row: Row
    seed: int
    overrides: tuple[str, ...]
    run_dir: str
    teacher_file: str | None


# -- one run (in a worker process) --------------------------------------------------------------


def _setup_worker(nice: int) -> None:
    """A worker: niced, one thread, and the dataset read once for all its runs."""
    if nice:
        os.nice(nice)
    import dml_cluster.trainer as trainer

    if hasattr(trainer, "load_dataset"):
        trainer.load_dataset = functools.lru_cache(maxsize=2)(trainer.load_dataset)


def build_config(row: Row, overrides: Sequence[str]) -> Any:
    """What `dml-cluster train row.config --set ...` runs, without the endpoint or checkpoints."""
    from dml_cluster.config import Config, apply_overrides, parse_config

    raw = apply_overrides(yaml.safe_load((ROOT / row.config).read_text()), list(overrides))
    for section in ("metrics", "checkpoint"):
        if section in Config.model_fields:
            raw.setdefault(section, {})["enabled"] = False
    return parse_config(raw)


def run_job(job: Job) -> dict[str, Any]:
    """Train one (row, seed); return what the tables need."""
    from dml_cluster.launch import run_local

    if job.teacher_file is not None:
        _wait_for(Path(job.teacher_file))
    cfg = build_config(job.row, job.overrides)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_local(cfg)
    wall = time.perf_counter() - t0
    (cfg.run.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    evals = [
        json.loads(line)
        for line in (cfg.run.dir / "cohort.jsonl").read_text().splitlines()
        if '"eval"' in line[:20]
    ]
    students = [p.name for p in cfg.peers if p.role == "student"]
    last = evals[-1]
    record: dict[str, Any] = {
        "row": job.row.key,
        "seed": job.seed,
        "wall_seconds": round(wall, 1),
        "run_dir": str(cfg.run.dir),
        "epochs": cfg.train.epochs,
        "students": {},
        "ensemble": _metrics(last["ensemble"]),
        "history": [
            {"epoch": e["epoch"], **{n: e["peers"][n]["accuracy"] for n in students}} for e in evals
        ],
    }
    for k, name in enumerate(students):
        record["students"][name] = {
            "index": k,
            **_metrics(last["peers"][name]),
            "best_accuracy": summary["peers"][name]["best_accuracy"],
        }
    teachers = [p.name for p in cfg.peers if p.role == "teacher"]
    record["teachers"] = {n: _metrics(last["peers"][n]) for n in teachers}
    return record


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    return {k: report[k] for k in ("accuracy", "entropy", "nll", "ece") if k in report}


def _wait_for(path: Path, timeout_s: float = 7200) -> None:
    """A teacher-dependent run waits for the teacher's weights (trained by another worker)."""
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no teacher at {path}")
        time.sleep(2)


# -- planning -----------------------------------------------------------------------------------


def scaled_value(row: Row, key: str, epochs: int) -> int:
    """A schedule length of `row`'s config scaled from the protocol's 40 epochs to `epochs`."""
    node: Any = yaml.safe_load((ROOT / row.config).read_text())
    for part in key.split("."):
        node = node[part]
    return max(1, round(int(node) * epochs / FULL_EPOCHS))


def job_overrides(
    suite: Suite, row: Row, seed: int, args: argparse.Namespace, teacher_file: str
) -> tuple[str, ...]:
    out = [*row.overrides]
    if row.teacher:
        out += teacher_overrides(row.config, teacher_file)
    if args.epochs and row.section in suite.epoch_rows:
        out.append(f"train.epochs={args.epochs}")
    if args.epochs:
        out += [f"{key}={scaled_value(row, key, args.epochs)}" for key in row.scaled]
    if args.per_class and row.section in suite.epoch_rows:
        out.append(f"data.train_subset.per_class={args.per_class}")
    if args.eval_every and row.section in suite.epoch_rows:
        out.append(f"train.eval_every={args.eval_every}")
    reduced = args.epochs or args.per_class
    if reduced and suite.subset_classes and row.section == "semi":  # the subset rows' steps
        per_epoch = (args.per_class or 300) * suite.subset_classes // SUBSET_BATCH
        out.append(f"train.max_steps={(args.epochs or FULL_EPOCHS) * per_epoch}")
    if args.root:
        out.append(f"data.root={args.root}")
    if args.quick:
        out += [*suite.quick, *QUICK_ROWS.get(row.section, ())]
    name = f"{suite.name}-{row.key}-s{seed}"
    out += [f"run.name={name}", f"run.seed={seed}", f"run.out_dir={args.out}"]
    return tuple(out)


QUICK_ROWS = {  # --quick: a few steps each, on digits
    "main": ("train.epochs=2", "data.train_subset.per_class=10"),
    "teacher": ("train.epochs=2", "data.train_subset.per_class=10"),
    "semi": ("train.epochs=1", "train.max_steps=3"),
    "control": ("train.epochs=1", "train.max_steps=3"),
}


def teacher_overrides(cfg_path: str, teacher_file: str) -> list[str]:
    """Point a student config at the teacher this script trained."""
    raw = yaml.safe_load((ROOT / cfg_path).read_text())
    out = [
        f"cohort.peers.{i}.checkpoint={teacher_file}"
        for i, peer in enumerate(raw["cohort"].get("peers") or [])
        if peer.get("role") == "teacher"
    ]
    if (raw.get("method") or {}).get("teacher"):
        out.append(f"method.teacher.checkpoint={teacher_file}")
    return out


def plan(suite: Suite, args: argparse.Namespace, done: set[tuple[str, int]]) -> list[Job]:
    """Every (row, seed) not done yet, in `run_order`, after the teacher."""
    teacher_file = ""
    jobs: list[Job] = []
    if suite.teacher is not None:
        t = suite.teacher
        tov = job_overrides(suite, t, 0, args, "")
        teacher_dir = Path(args.out) / f"{suite.name}-{t.key}-s0"
        teacher_file = str(teacher_dir / "final" / "teacher.pt")
        if (t.key, 0) not in done or not Path(teacher_file).exists():
            jobs.append(Job(t, 0, tov, str(teacher_dir), None))
    wanted = [r for r in suite.rows if not args.rows or r.key in args.rows]
    for row, seed in run_order(wanted, lambda row: args.seeds or row.seeds, suite.core):
        if (row.key, seed) in done:
            continue
        ov = job_overrides(suite, row, seed, args, teacher_file)
        run_dir = str(Path(args.out) / f"{suite.name}-{row.key}-s{seed}")
        jobs.append(Job(row, seed, ov, run_dir, teacher_file if row.teacher else None))
    return jobs


def run_order(rows: Sequence[Row], seeds: Any, core: Sequence[str]) -> list[tuple[Row, int]]:
    """The core comparison's first three seeds, then every other (row, seed) seed by seed: cut
    short, the benchmark still holds the core comparison and one seed of every row."""
    first = [(r, s) for s in range(3) for r in rows if r.key in core and s < seeds(r)]
    most = max((seeds(r) for r in rows), default=0)
    rest = [(r, s) for s in range(most) for r in rows if s < seeds(r) and (r, s) not in first]
    return first + rest


# -- statistics and tables ----------------------------------------------------------------------


@dataclass
class RowStats:
    row: Row
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [s[key] for r in self.runs for s in r["students"].values() if key in s]

    def by_seed(self) -> dict[int, dict[int, float]]:
        """seed -> student index -> final test accuracy."""
        return {
            r["seed"]: {s["index"]: s["accuracy"] for s in r["students"].values()}
            for r in self.runs
        }


def paired(row: RowStats, base: RowStats) -> list[tuple[int, float]]:
    """(seed, mean over the students k both rows have of acc_row[s, k] - acc_base[s, k])."""
    mine, theirs = row.by_seed(), base.by_seed()
    out = []
    for seed in sorted(set(mine) & set(theirs)):
        common = sorted(set(mine[seed]) & set(theirs[seed]))
        if common:
            out.append((seed, statistics.mean(mine[seed][k] - theirs[seed][k] for k in common)))
    return out


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t quantile 0.975 for 1..10 degrees of freedom (two-sided 95% intervals)."""


def interval(ds: Sequence[float]) -> str:
    """The 95% confidence interval of the mean paired difference (t over seeds), in points."""
    if len(ds) < 2:
        return ""
    t = T_975[len(ds) - 2] if len(ds) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(ds) / math.sqrt(len(ds))
    mean = statistics.mean(ds)
    return f"[{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    vals = [scale * v for v in values]
    if any(math.isnan(v) for v in vals):
        return "nan"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(stats: dict[str, RowStats], rows: Sequence[Row]) -> list[str]:
    lines = [
        "| row | students × seeds | test acc. % | paired Δ vs baseline, pts (seeds > 0) | "
        "95% CI of Δ | per-seed Δ | test NLL | ECE % | test entropy, nats | ensemble acc. % | "
        "s/run |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        st = stats.get(row.key)
        if st is None or not st.runs:
            continue
        n_students = len(st.runs[0]["students"])
        delta, per_seed, ci = "(baseline)", "", ""
        if row.baseline and row.baseline in stats:
            pairs = paired(st, stats[row.baseline])
            if pairs:
                ds = [d for _, d in pairs]
                pos = sum(d > 0 for d in ds)
                delta = f"{'+' if statistics.mean(ds) > 0 else ''}{fmt(ds)} ({pos}/{len(ds)})"
                per_seed = " ".join(f"{100 * d:+.2f}" for _, d in pairs)
                ci = interval(ds)
        ens = [r["ensemble"]["accuracy"] for r in st.runs] if n_students > 1 else []
        walls = [r["wall_seconds"] for r in st.runs]
        lines.append(
            f"| {row.label} | {n_students} × {len(st.runs)} | {fmt(st.values('accuracy'))} | "
            f"{delta} | {ci} | {per_seed} | {fmt(st.values('nll'), 1, 3)} | "
            f"{fmt(st.values('ece'))} | {fmt(st.values('entropy'), 1, 3)} | {fmt(ens)} | "
            f"{statistics.mean(walls):.0f} |"
        )
    return lines


def pairing_notes(stats: dict[str, RowStats], rows: Sequence[Row]) -> list[str]:
    """A line per kind of row whose paired Δ leaves out some of its or its baseline's students."""
    groups: dict[tuple[tuple[int, ...], int, str], list[str]] = {}
    for row in rows:
        st, base = stats.get(row.key), stats.get(row.baseline or "")
        if st is None or base is None or not st.runs or not base.runs:
            continue
        mine = {s["index"] for s in st.runs[0]["students"].values()}
        theirs = {s["index"] for s in base.runs[0]["students"].values()}
        common = tuple(sorted(mine & theirs))
        if common and (set(common) != mine or set(common) != theirs):
            groups.setdefault((common, len(mine), base.row.label), []).append(row.label)
    notes = []
    for (common, n_mine, base_label), labels in groups.items():
        which = " and ".join(str(k) for k in common)
        n_base = len(
            next(st for st in stats.values() if st.row.label == base_label).runs[0]["students"]
        )
        notes.append(
            f"- {', '.join(f'*{label}*' for label in labels)}: paired Δ on "
            f"student{'s' if len(common) > 1 else ''} {which} only ({n_mine} "
            f"student{'s' if n_mine > 1 else ''} per run, {n_base} in *{base_label}*); the other "
            "columns cover all the row's students."
        )
    return notes


PLUS_MINUS = (
    "**Reading ±.** Every ± is one sample standard deviation, not of the same values in every "
    "column. *test acc. %*, *test NLL*, *ECE %* and *test entropy*: over every student of every "
    "seed of the row (students × seeds values), in % of the test set, nats per test image, % "
    "(the |confidence − accuracy| gap of 15 equal-width confidence bins, weighted by their "
    "sizes), and nats. *paired Δ*: over seeds, one "
    "value per seed (that seed's differences to the baseline averaged over the students paired), "
    "in percentage points; *95% CI of Δ* is the t-interval of their mean, also in points. "
    "*ensemble acc. %*: over seeds (one ensemble per run), in %."
)


def command(suite: Suite, row: Row, meta: dict[str, Any]) -> str:
    """The `dml-cluster train` line of a row (the script adds run.name/out_dir and the teacher
    path it trained)."""
    ns = argparse.Namespace(
        epochs=meta.get("epochs"), root=meta.get("root"), quick=False, out="",
        per_class=meta.get("per_class"), eval_every=meta.get("eval_every"),
    )  # fmt: skip
    ov = [o for o in job_overrides(suite, row, 0, ns, "T") if not o.startswith("run.")]
    ov = [o for o in ov if "checkpoint=T" not in o]
    sets = " ".join(f"--set {o}" for o in ov)
    return f"dml-cluster train {row.config} {sets} --set run.seed=S".replace("  ", " ")


def render(suite: Suite, saved: dict[str, Any], note: str = "") -> str:
    """The results block of the Markdown; `note`, when given, follows the generated line."""
    meta = saved["meta"]
    rows = [suite.teacher, *suite.rows] if suite.teacher else list(suite.rows)
    stats = {r.key: RowStats(r) for r in rows}
    for run in saved["runs"]:
        if run["row"] in stats:
            stats[run["row"]].runs.append(run)
    for st in stats.values():
        st.runs.sort(key=lambda r: r["seed"])
    out = [
        BEGIN,
        f"_Generated by `{meta['command']}` at commit `{meta['commit']}` on {meta['date']}; "
        f"{meta['runs']} runs, {meta['total_minutes']:.0f} min of wall-clock with "
        f"{meta['workers']} runs at a time on {meta['machine']}._",
        "",
    ]
    if note:
        out += [note, ""]
    cuts = [
        f"{meta['epochs']} epochs instead of {FULL_EPOCHS} (warm-up and hint epochs scaled alike)"
        if meta.get("epochs") else "",
        f"a training subset of {meta['per_class']} images per class instead of 300"
        if meta.get("per_class") else "",
        f"evaluation every {meta['eval_every']} epochs" if meta.get("eval_every") else "",
    ]  # fmt: skip
    if any(cuts):
        out += ["**Reduced protocol** (see above): " + "; ".join(c for c in cuts if c) + "; "
                "the semi-supervised rows take as many steps as the subset rows.", ""]  # fmt: skip
    teacher = stats.get("teacher")
    if teacher and teacher.runs:
        t = next(iter(teacher.runs[0]["students"].values()))
        out += [
            f"**Teacher**: test accuracy {100 * t['accuracy']:.2f}%, NLL {t['nll']:.3f}, "
            f"ECE {100 * t['ece']:.2f}% ({teacher.runs[0]['wall_seconds']:.0f} s).",
            "",
        ]
    for section, heading in suite.sections.items():
        sec_rows = [r for r in suite.rows if r.section == section]
        lines = table(stats, sec_rows)
        if len(lines) > 2:
            bases = sorted({r.baseline for r in sec_rows if r.baseline})
            base = ", ".join(next(x.label for x in rows if x.key == b) for b in bases)
            out += [f"**{heading}** (paired Δ against: {base})", "", *lines, ""]
            notes = pairing_notes(stats, sec_rows)
            if notes:
                out += [*notes, ""]
    out += [PLUS_MINUS, ""]
    history = history_table(stats, [r for r in suite.rows if r.section == "main"])
    if history:
        out += [
            "**Test accuracy % at each evaluation** (mean over seeds × students):",
            "",
            *history,
            "",
        ]
    if saved.get("analysis"):
        out += analysis_block(saved["analysis"])
    out += [
        "Commands (S = each seed; the script adds run.name / run.out_dir and points the "
        "teacher's `checkpoint` at the teacher it trained):",
        "",
        "```",
    ]
    if suite.teacher:
        out.append(command(suite, suite.teacher, meta).replace(" --set run.seed=S", ""))
    out += [command(suite, r, meta) for r in suite.rows if stats[r.key].runs]
    if saved.get("analysis"):
        out.append("dml-cluster analyze RUN_DIR   # each K = 2 run folder, see above")
    out += ["```", END]
    return "\n".join(out)


def history_table(stats: dict[str, RowStats], rows: Sequence[Row]) -> list[str]:
    epochs = sorted({h["epoch"] for r in rows for run in stats[r.key].runs for h in run["history"]})
    if not epochs:
        return []
    lines = [
        "| row | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "|---|" + "---:|" * len(epochs),
    ]
    for r in rows:
        cells = []
        for e in epochs:
            accs = [
                v
                for run in stats[r.key].runs
                for h in run["history"]
                if h["epoch"] == e
                for k, v in h.items()
                if k != "epoch"
            ]
            cells.append(f"{100 * statistics.mean(accs):.2f}" if accs else "–")
        if any(c != "–" for c in cells):
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return lines


def analysis_block(analysis: dict[str, Any]) -> list[str]:
    """`dml-cluster analyze` of the K = 2 rows: training-set entropy and flatness."""
    sigmas = analysis["sigmas"]
    lines = [
        "**The DML paper's analysis (§4.8)**, `dml-cluster analyze` on the K = 2 run folders "
        f"({analysis['draws']} noise draws per σ; mean over seeds × peers): training-set "
        "accuracy, mean posterior entropy on the training set, and the increase of the "
        "training loss when Gaussian noise of std σ is added to every weight.",
        "",
        "| row | runs | train acc. % | train entropy, nats | train loss | "
        + " | ".join(f"Δloss σ={s:g}" for s in sigmas)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(sigmas),
    ]
    for label, peers in analysis["rows"].items():

        def mean(key: str, peers: list = peers) -> float:
            return statistics.mean(p[key] for p in peers)

        rises = [statistics.mean(p["flatness"][str(s)] for p in peers) for s in sigmas]
        lines.append(
            f"| {label} | {len(peers)} | {100 * mean('train_accuracy'):.2f} | "
            f"{mean('train_entropy'):.4f} | {mean('train_loss'):.4f} | "
            + " | ".join(f"{r:.4f}" for r in rises)
            + " |"
        )
    lines += ["", f"Plot: `{analysis['plot']}`.", ""] if analysis.get("plot") else [""]
    return lines


def write_markdown(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Accuracy\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# -- analysis of the K = 2 rows -----------------------------------------------------------------


def analyze_pairs(suite: Suite, saved: dict[str, Any], args: argparse.Namespace) -> None:
    """Run `dml-cluster analyze` on every kept K = 2 independent and DML run folder."""
    from dml_cluster.analyze import analyze_run, flatness_plot

    labels = {r.key: r.label for r in suite.rows}
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in saved["runs"]:
        if run["row"] not in ("ind", "dml2") or not Path(run["run_dir"]).exists():
            continue
        result = _analysis(Path(run["run_dir"]), args.sigmas, args.draws, analyze_run)
        rows.setdefault(labels[run["row"]], []).extend(result["peers"].values())
        print(f"== analyzed {run['run_dir']}", flush=True)
    plot = Path(args.markdown).parent / "accuracy_flatness.png"
    flatness_plot(rows, args.sigmas, plot)
    saved["analysis"] = {
        "sigmas": args.sigmas,
        "draws": args.draws,
        "rows": rows,
        "plot": plot.name,
    }


def _analysis(run_dir: Path, sigmas: list[float], draws: int, analyze_run: Any) -> dict:
    """RUN_DIR/analysis.json when `dml-cluster analyze` already wrote it with these settings."""
    done = run_dir / "analysis.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved.get("sigmas") == sigmas and saved.get("draws") == draws:
            return saved
    return analyze_run(run_dir, sigmas=sigmas, draws=draws)


# -- main ---------------------------------------------------------------------------------------


def load_saved(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "runs": []}


def save(path: Path, saved: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)


def run_all(jobs: list[Job], workers: int, nice: int, on_result: Any) -> None:
    if workers <= 1:
        _setup_worker(0)
        for job in jobs:
            print(f"== {job.row.label}, seed {job.seed}", flush=True)
            on_result(run_job(job))
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_setup_worker, initargs=(nice,)) as pool:
        for result in pool.imap_unordered(run_job, jobs, chunksize=1):
            on_result(result)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="fmnist3k")
    p.add_argument("--seeds", type=int, default=0, help="seeds per row (default: the row's)")
    p.add_argument("--epochs", type=int, default=0, help="shorter schedule (fmnist3k rows)")
    p.add_argument("--per-class", type=int, default=0, help="smaller subset (fmnist3k rows)")
    p.add_argument("--eval-every", type=int, default=0, help="epochs between evaluations")
    p.add_argument("--rows", type=lambda s: set(s.split(",")), default=set())
    p.add_argument("--root", default=None, help="data.root (the CIFAR-100 folder)")
    p.add_argument("--out", default="runs/accuracy", help="where the run folders go")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="digits, a few steps: a smoke test")
    p.add_argument("--fresh", action="store_true", help="forget earlier results in the JSON")
    p.add_argument("--analyze", action="store_true", help="analyze the K = 2 run folders")
    p.add_argument(
        "--sigmas",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.01, 0.02, 0.04, 0.08],
    )
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown only")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands, run none")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    default = "ACCURACY.md" if args.suite == "fmnist3k" else f"ACCURACY_{args.suite}.md"
    args.markdown = args.markdown or str(ROOT / "benchmarks" / default)
    stem = "accuracy_results" if args.suite == "fmnist3k" else f"accuracy_{args.suite}"
    args.json = args.json or str(ROOT / "benchmarks" / f"{stem}.json")
    if args.quick:
        args.seeds = args.seeds or 1
        args.workers = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    suite = SUITES[args.suite]
    json_path = Path(args.json)
    saved = {"meta": {}, "runs": []} if args.fresh else load_saved(json_path)
    if not args.render_only:
        done = {(r["row"], r["seed"]) for r in saved["runs"]}
        jobs = plan(suite, args, done)
        if args.dry_run:
            for job in jobs:
                sets = " ".join(f"--set {o}" for o in job.overrides)
                print(f"dml-cluster train {job.row.config} {sets}")
            return
        print(f"== {len(jobs)} runs to do ({len(done)} done before)", flush=True)
        start = time.perf_counter()
        elapsed_before = saved["meta"].get("total_minutes", 0.0)

        def on_result(result: dict[str, Any]) -> None:
            key = (result["row"], result["seed"])
            saved["runs"] = [r for r in saved["runs"] if (r["row"], r["seed"]) != key]
            saved["runs"].append(result)
            accs = " ".join(f"{100 * s['accuracy']:.2f}" for s in result["students"].values())
            print(
                f"== done {result['row']} seed {result['seed']}: {accs} "
                f"({result['wall_seconds']:.0f} s)",
                flush=True,
            )
            saved["meta"].update(
                meta(args, elapsed_before + (time.perf_counter() - start) / 60, len(saved["runs"]))
            )
            save(json_path, saved)

        run_all(jobs, args.workers, args.nice, on_result)
        saved["meta"].update(
            meta(args, elapsed_before + (time.perf_counter() - start) / 60, len(saved["runs"]))
        )
    if args.analyze:
        analyze_pairs(suite, saved, args)
    save(json_path, saved)
    note = ""
    if args.render_only:
        note = (
            f"_Tables re-rendered from the stored results ({Path(args.json).name}) by "
            f"`python benchmarks/accuracy.py --render-only` at commit `{commit()}`: no run was "
            "repeated; the runs are those of the line above._"
        )
    block = render(suite, saved, note)
    write_markdown(Path(args.markdown), block)
    print(block)


def meta(args: argparse.Namespace, minutes: float, runs: int) -> dict[str, Any]:
    from bench_common import machine

    flags = " ".join(f for f, on in (("--quick", args.quick),) if on)
    epochs = "".join(
        f" --{flag} {value}"
        for flag, value in (("epochs", args.epochs), ("per-class", args.per_class),
                            ("eval-every", args.eval_every))
        if value
    )  # fmt: skip
    return {
        "command": f"python benchmarks/accuracy.py --suite {args.suite}{epochs} {flags}".strip(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_minutes": minutes,
        "runs": runs,
        "workers": args.workers,
        "epochs": args.epochs or None,
        "per_class": args.per_class or None,
        "eval_every": args.eval_every or None,
        "root": args.root,
        "machine": machine().split(",")[0],
        "seeds": args.seeds or "per row",
        "args": {k: v for k, v in vars(args).items() if k in ("seeds", "rows")}
        | {"rows": sorted(args.rows)},
    }


if __name__ == "__main__":
    main()
