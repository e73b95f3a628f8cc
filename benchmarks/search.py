"""Search to Distill on Fashion-MNIST: AKD (kd reward) vs NAS (ce reward) vs random search under
the same candidates and cost target, each winner retrained with KD; and two different teachers.

    nice -n 10 .venv/bin/python benchmarks/search.py --out /tmp/akd      # the SEARCH.md run
    .venv/bin/python benchmarks/search.py --quick --out /tmp/akd-quick    # digits, ~2-4 min

Steps (everything through the project's own engine, one process, resumable: a rerun with the
same --out skips what is finished):
1. teachers, trained with CE on the training subset: A = small_cnn (a CNN), B = an MLP;
2. four searches with the same space, controller budget (rounds x candidates), proxy training
   and cost target: kd+PPO with teacher A (AKD), ce+PPO (NAS, then KD), kd+random with
   teacher A, kd+PPO with teacher B;
3. retraining with KD, one cohort per teacher: the teacher and `--seeds` copies of every
   winner (copies differ in their initialisation, seeded by peer index; one shared batch order),
   test accuracy on the full test set -- the only time the test set is read.
Results: <out>/results.json, <out>/pareto.png (all searches overlaid) and a Markdown block on
stdout for benchmarks/SEARCH.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import provenance  # noqa: E402

from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.launch import run_local  # noqa: E402
from dml_cluster.search.engine import Search  # noqa: E402
from dml_cluster.search.report import best, pareto_figure, read_records, write_report  # noqa: E402
from dml_cluster.search.settings import parse_search_config  # noqa: E402

FULL = {
    "data": {"name": "fashion-mnist", "batch_size": 64, "eval_batch_size": 1000,
             "train_subset": {"per_class": 150, "seed": 0}},
    "validation_per_class": 50,
    "teachers": {"A": {"model": "small_cnn", "args": {"width": 16}},
                 "B": {"model": "mlp", "args": {"hidden": [512, 256]}}},
    "teacher_epochs": 12,
    "space": {"channels": [12, 24, 48], "strides": [2, 2, 1], "stem": 8, "head": 64},
    "rounds": 4, "candidates": 4, "proxy_epochs": 3,
    "cost": {"metric": "flops", "target": 3.0, "batch": 64, "repeats": 10, "warmup": 2},
    "retrain_epochs": 5, "seeds": 3,
}  # fmt: skip
QUICK = {
    **FULL,
    "data": {"name": "digits", "batch_size": 32, "train_subset": {"fraction": 0.7, "seed": 0}},
    "validation_per_class": 20,
    "teachers": {"A": {"model": "small_cnn", "args": {"width": 8}},
                 "B": {"model": "mlp", "args": {"hidden": [64]}}},
    "teacher_epochs": 4,
    "space": {"channels": [8, 16], "strides": [1, 2], "stem": 8, "head": 32},
    "rounds": 2, "candidates": 3, "proxy_epochs": 1,
    "cost": {"metric": "flops", "target": 0.3, "batch": 32, "repeats": 3, "warmup": 1},
    "retrain_epochs": 2, "seeds": 2,
}  # fmt: skip
SEARCHES = {  # name: (reward, controller, teacher, controller seed)
    "akd-A": ("kd", "ppo", "A", 0),
    "nas-ce": ("ce", "ppo", "A", 0),
    "random-A": ("kd", "random", "A", 0),
    "akd-B": ("kd", "ppo", "B", 0),
}
REPLICATES = {  # --replicate: AKD and NAS again with another controller seed
    "akd-A-s1": ("kd", "ppo", "A", 1),
    "nas-ce-s1": ("ce", "ppo", "A", 1),
}
COMMON = {
    "method": {"name": "kd", "temperature": 4.0, "kd_weight": 0.9},
    "optim": {"lr": 0.05, "schedule": {"name": "cosine"}},
    "metrics": {"enabled": False},
    "checkpoint": {"every_steps": None},
    "run": {"progress_every_s": 0},
}


def quietly(fn: Any, log: Path) -> Any:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f, contextlib.redirect_stdout(f):
        return fn()


def train_teacher(out: Path, plan: dict[str, Any], key: str) -> Path:
    weights = out / "teachers" / f"teacher-{key}" / "final" / "teacher.pt"
    if weights.exists():
        return weights
    spec = plan["teachers"][key]
    run = {**COMMON["run"], "name": f"teacher-{key}", "out_dir": str(out / "teachers")}
    cfg = parse_config({
        **COMMON, "run": run, "data": plan["data"], "method": {"name": "independent"},
        "cohort": {"peers": [{"name": "teacher", **spec}]},
        "train": {"epochs": plan["teacher_epochs"], "eval_every": plan["teacher_epochs"]},
    })  # fmt: skip
    quietly(lambda: run_local(cfg), out / "logs" / f"teacher-{key}.log")
    return weights


def run_search(out: Path, plan: dict[str, Any], name: str, teachers: dict[str, Path]) -> Path:
    reward, controller, key, seed = {**SEARCHES, **REPLICATES}[name]
    raw = {
        **COMMON, "run": {**COMMON["run"], "name": name, "out_dir": str(out / "searches")},
        "data": plan["data"], "train": {"epochs": plan["retrain_epochs"]},
        "search": {
            "teacher": {**plan["teachers"][key], "checkpoint": str(teachers[key])},
            "reward": reward, "controller": {"name": controller, "seed": seed},
            "rounds": plan["rounds"], "candidates": plan["candidates"],
            "proxy_epochs": plan["proxy_epochs"], "space": plan["space"], "cost": plan["cost"],
            "validation_per_class": plan["validation_per_class"],
        },
    }  # fmt: skip
    scfg = parse_search_config(raw)
    search = Search(scfg)
    t0 = time.perf_counter()
    quietly(
        lambda: search.run(say=lambda line: print(line, file=sys.stderr)),
        out / "logs" / f"{name}.log",
    )
    print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    write_report(search.dir, 10)
    return search.dir


def retrain_cohort(
    out: Path,
    plan: dict[str, Any],
    key: str,
    teacher: Path,
    winners: dict[str, dict[str, Any]],
    suffix: str = "",
) -> dict[str, list[float]]:
    """Teacher `key` and `seeds` copies of each winner in one KD cohort: test accuracies."""
    folder = out / "retrain" / f"teacher-{key}{suffix}"
    peers = [{"name": "teacher", **plan["teachers"][key], "role": "teacher",
              "checkpoint": str(teacher)}]  # fmt: skip
    for label, record in winners.items():
        for s in range(plan["seeds"]):
            peers.append({"name": f"{label}-{s}", "model": "searched",
                          "args": {"arch": record["arch"]}})  # fmt: skip
    if not (folder / "summary.json").exists():
        cfg = parse_config({
            **COMMON, "run": {**COMMON["run"], "name": folder.name, "out_dir": str(folder.parent)},
            "data": plan["data"], "cohort": {"peers": peers},
            "train": {"epochs": plan["retrain_epochs"], "eval_every": plan["retrain_epochs"]},
        })  # fmt: skip
        t0 = time.perf_counter()
        quietly(lambda: run_local(cfg), out / "logs" / f"retrain-{key}.log")
        print(f"retrain with teacher {key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = json.loads((folder / "summary.json").read_text())
    peer = summary["peers"]
    accs = {
        label: [peer[f"{label}-{s}"]["final_accuracy"] for s in range(plan["seeds"])]
        for label in winners
    }
    accs["teacher"] = [summary["peers"]["teacher"]["final_accuracy"]]
    return accs


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +- {100 * sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="digits, tiny sizes (smoke run)")
    parser.add_argument(
        "--replicate", action="store_true", help="also AKD and NAS with controller seed 1"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out
    t0 = time.perf_counter()
    teachers = {key: train_teacher(out, plan, key) for key in plan["teachers"]}
    print(f"teachers: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    folders = {name: run_search(out, plan, name, teachers) for name in SEARCHES}
    records = {name: read_records(folder) for name, folder in folders.items()}
    winners = {name: best(rows) for name, rows in records.items()}
    pareto_figure(records, "mflops").savefig(out / "pareto_flops.png", dpi=120)
    pareto_figure(records, "latency_ms").savefig(out / "pareto.png", dpi=120)
    by_teacher = {
        "A": retrain_cohort(out, plan, "A", teachers["A"], winners),
        "B": retrain_cohort(
            out, plan, "B", teachers["B"], {k: winners[k] for k in ("akd-A", "akd-B")}
        ),
    }
    if args.replicate:
        for name in REPLICATES:
            folders[name] = run_search(out, plan, name, teachers)
            records[name] = read_records(folders[name])
            winners[name] = best(records[name])
        replicate = {k: winners[k] for k in REPLICATES}
        by_teacher["A-replicate"] = retrain_cohort(
            out, plan, "A", teachers["A"], replicate, suffix="-replicate"
        )
    results = {
        "plan": plan, "searches": {n: {"winner": w, "candidates": len(records[n]),
                                       "distinct": len({r["hash"] for r in records[n]})}
                                   for n, w in winners.items()},
        "retrain": by_teacher, "seconds": round(time.perf_counter() - t0), **provenance(),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_markdown(results)


def print_markdown(results: dict[str, Any]) -> None:
    print(f"command: {results.get('command', '?')}\ncommit: {results.get('commit', '?')}")
    plan = results["plan"]
    print("| search | reward | controller (seed) | teacher | winner | val acc | MFLOPs "
          "| latency ms | params | test acc, KD from A (mean +- std) |")  # fmt: skip
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for name, (reward, controller, key, seed) in {**SEARCHES, **REPLICATES}.items():
        if name not in results["searches"]:
            continue
        w = results["searches"][name]["winner"]
        cohort = "A" if name in SEARCHES else "A-replicate"
        test = mean_std(results["retrain"][cohort][name])
        winner = f"`{w['describe']}` (`{w['hash']}`)"
        print(f"| {name} | {reward} | {controller} ({seed}) | {key} | {winner} | "
              f"{100 * w['accuracy']:.2f} | {w['mflops']:.3g} | {w['latency_ms']:.3g} | "
              f"{w['params']:,} | {test} |")  # fmt: skip
    print()
    print("| student \\ teacher | A (small_cnn) | B (MLP) |")
    print("|---|---:|---:|")
    for name in ("akd-A", "akd-B"):
        a, b = results["retrain"]["A"][name], results["retrain"]["B"][name]
        print(f"| {name} pick | {mean_std(a)} | {mean_std(b)} |")
    teachers = [100 * results["retrain"][k]["teacher"][0] for k in ("A", "B")]
    print(f"| teacher itself | {teachers[0]:.2f} | {teachers[1]:.2f} |")
    print(f"\n{results['seconds']} s in all; {plan['seeds']} initialisations per winner")


if __name__ == "__main__":
    main()
