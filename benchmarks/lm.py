"""The language-model benchmark of benchmarks/LM.md (issue 26): what token-level mutual learning
and distillation buy small GPTs, with paired seeds, on a corpus nobody here wrote.

    .venv/bin/python benchmarks/lm.py --workers 2     # the protocol (~80 min on 2 idle cores)
    .venv/bin/python benchmarks/lm.py --smoke         # a tiny run of every row (a minute)
    .venv/bin/python benchmarks/lm.py --render-only   # rewrite LM.md from lm_results.json

Corpus: the Python standard library's own source (benchmarks/lm_corpus.py: this interpreter's
stdlib without site-packages, dist-packages and the test folders, split by file), recorded with
its Python version, sizes and the hash of its file list. Tokenizers: bytes (257 symbols) and a
byte-level BPE of 4,096 ids trained on the training split (`dml-cluster tokenizer train`'s
function, cached in the output folder).

Rows, per tokenizer (each a `dml-cluster train` run in its own process, one-process engine:
the same numbers as one process per peer, tests/test_lm_cohort.py), seeds 0, 1, 2:

- ind: two equal small GPTs trained independently (method independent);
- dml: the same pair with DML (peer k starts from the weights of (seed, k) in every row, and
  every row reads the same windows of (seed, epoch, step), so row R's peer k at seed s is
  compared with ind's peer k at seed s);
- kd1: small GPT 0 distilled (KD at T = 1, weight 0.5: language-model distillation's usual
  setting) from a larger GPT trained first (once per tokenizer, seed 0, on 1.5 times the small
  peers' token budget), compared with ind's peer 0; `kd` (named with --rows, not run by
  default): the same with the method's defaults T = 4 and weight 0.9 (the image recipe);
- topk / sampled: DML with the wire carrying each position's top-k log-probabilities, or
  draws from each position's distribution (`sampled`, where that encoding exists), compared
  with dense DML; the bytes one peer sends per step (from the real encoder, zmq framing) side
  by side.

Every small peer trains on the same token budget (`--tokens`, per peer); the validation
perplexity of the first `val_tokens` positions of the validation split at the end is the
measure: mean ± std over seeds and peers, and the paired difference with its 95% t-interval
over seeds. Results are saved after each run (lm_results.json); a re-run skips what is there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import commit, machine  # noqa: E402
from lm_corpus import stdlib_corpus  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t quantile 0.975 for 1..10 degrees of freedom (two-sided 95% intervals)."""


@dataclass(frozen=True)
class Size:
    """A protocol's shapes: the small and the teacher GPT, windows, batch, budgets."""

    small: dict[str, int]
    large: dict[str, int]
    block: int
    batch: int
    tokens: int  # per small peer
    val_tokens: dict[str, int]  # per tokenizer
    bpe_vocab: int
    topk: int
    samples: int
    warmup: int
    grad_clip: float | None = None  # the protocol clips nothing (LM.md's post-hoc variant does)


FULL = Size(
    small={"n_layer": 2, "n_head": 4, "n_embd": 128},
    large={"n_layer": 4, "n_head": 4, "n_embd": 192},
    block=128,
    batch=16,
    tokens=786_432,  # 384 steps of 16 x 128
    val_tokens={"bytes": 65_536, "bpe": 16_384},  # about the same stretch of text
    bpe_vocab=4096,
    topk=32,
    samples=32,
    warmup=50,
)
SMOKE = Size(
    small={"n_layer": 1, "n_head": 2, "n_embd": 32},
    large={"n_layer": 2, "n_head": 2, "n_embd": 48},
    block=32,
    batch=4,
    tokens=1_280,  # 10 steps
    val_tokens={"bytes": 1_024, "bpe": 512},
    bpe_vocab=512,
    topk=8,
    samples=8,
    warmup=3,
)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    method: str
    base: str | None = None  # the row it is paired with
    student: int | None = None  # compare this peer only (KD: the small GPT)
    encoding: str | None = None
    settings: tuple[tuple[str, float], ...] = ()  # method settings beside the defaults


ROWS = {
    "ind": Row("ind", "two GPTs, independent", "independent"),
    "dml": Row("dml", "the same pair, DML", "dml", base="ind"),
    "kd": Row("kd", "small GPT, KD from a larger GPT", "kd", base="ind", student=0),
    # added after the kd row's first results (T = 4 and weight 0.9, the image recipe, hurt):
    # the setting language-model distillation commonly uses, chosen before running it
    "kd1": Row(
        "kd1",
        "the same, KD at T = 1, weight 0.5",
        "kd",
        base="ind",
        student=0,
        settings=(("temperature", 1.0), ("kd_weight", 0.5)),
    ),  # fmt: skip
    "topk": Row("topk", "DML, wire top-k", "dml", base="dml", encoding="topk"),
    "sampled": Row("sampled", "DML, wire sampled", "dml", base="dml", encoding="sampled"),
}
TOKENIZERS = ("bytes", "bpe")
PROTOCOL = ("ind", "dml", "kd1", "topk", "sampled")
"""The rows run by default (about 160 CPU minutes: about 80 minutes on 2 idle cores with
--workers 2). `kd`, the image recipe's KD, is recorded in LM.md and runs when named
(`--rows kd`): with it the protocol is about 185 CPU minutes, over 90 minutes on 2 cores."""


def sampled_exists() -> bool:
    """Has the `sampled` bus encoding landed (the sparse-wire issue)?"""
    from dml_cluster.config import BusConfig

    return "sampled" in str(BusConfig.model_fields["encoding"].annotation)


# -- the runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    tokenizer: str
    row: str  # a ROWS key, or "teacher"
    seed: int

    @property
    def name(self) -> str:
        return f"{self.tokenizer}-{self.row}-s{self.seed}"


def base_config(size: Size, tokenizer: str, tok_file: Path | None, lists: Path) -> dict[str, Any]:
    """The config every run of `tokenizer` starts from."""
    steps = max(size.tokens // (size.batch * size.block), 1)
    optim: dict[str, Any] = {
        "name": "adam",
        "lr": 3.0e-3,
        "weight_decay": 0.0,
        "schedule": {"name": "constant", "warmup_steps": size.warmup},
    }
    if size.grad_clip:
        optim["grad_clip"] = size.grad_clip
    return {
        "run": {"name": "lm", "seed": 0, "progress_every_s": 0},
        "data": {
            "name": "text",
            "train": (lists / "train.txt").read_text().split("\n")[:-1],
            "val": (lists / "val.txt").read_text().split("\n")[:-1],
            "tokenizer": str(tok_file) if tok_file else "bytes",
            "block_size": size.block,
            "batch_size": size.batch,
            "eval_batch_size": 16,
            "val_tokens": size.val_tokens[tokenizer],
        },
        "cohort": {
            "peers": [
                {"name": "gpt-0", "model": "gpt", "args": dict(size.small)},
                {"name": "gpt-1", "model": "gpt", "args": dict(size.small)},
            ]
        },  # fmt: skip
        "method": {"name": "independent"},
        "optim": optim,
        "train": {"epochs": 1, "max_steps": steps},
        "checkpoint": {"enabled": False},
        "metrics": {"enabled": False},
    }


def job_config(job: Job, base: dict[str, Any], size: Size, out: Path) -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    cfg["run"].update(name=job.name, seed=job.seed, out_dir=str(out / "runs"))
    cfg["data"]["cache_dir"] = str(out / "cache")  # tokenized once for every run
    if job.row == "teacher":  # one larger GPT, 1.5 times the budget
        cfg["cohort"]["peers"] = [{"name": "teacher", "model": "gpt", "args": dict(size.large)}]
        cfg["train"]["max_steps"] = cfg["train"]["max_steps"] * 3 // 2
        return cfg
    row = ROWS[job.row]
    cfg["method"] = {"name": row.method, **dict(row.settings)}
    if row.method == "kd":
        teacher = out / "runs" / Job(job.tokenizer, "teacher", 0).name / "final" / "teacher.pt"
        cfg["cohort"]["peers"] = [
            cfg["cohort"]["peers"][0],
            {"name": "teacher", "model": "gpt", "role": "teacher", "checkpoint": str(teacher),
             "args": dict(size.large)},
        ]  # fmt: skip
    if row.encoding == "topk":
        cfg["bus"] = {"encoding": "topk", "k": size.topk}
    elif row.encoding == "sampled":
        cfg["bus"] = {"encoding": "sampled", "samples": size.samples}
    return cfg


def run_job(job: Job, config: dict[str, Any], out: Path) -> dict[str, Any]:
    """`dml-cluster train` of one job in its own process; its summary's figures."""
    path = out / "configs" / f"{job.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    log = out / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dml_cluster", "train", str(path)],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # its CPU time: the machine's load aside
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{job.name} failed ({code}): {log.read_text()[-2000:]}")
    run_dir = Path(config["run"]["out_dir"]) / job.name
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokenizer": job.tokenizer,
        "row": job.row,
        "seed": job.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "steps": summary["steps"],
        "peers": {
            name: {
                "index": i,
                "nll": p["final_nll"],
                "perplexity": p["final_perplexity"],
                "accuracy": p["final_accuracy"],
                "role": p["role"],
            }
            for i, (name, p) in enumerate(summary["peers"].items())
        },  # fmt: skip
        "bytes_per_step": wire_bytes(config),
    }


def wire_bytes(config: dict[str, Any]) -> int:
    """Bytes one student sends per step over zmq (to each of the others: K - 1 messages), from
    the real encoder on a step's [B·T, V] rows (values do not change the size)."""
    import torch

    from dml_cluster.bus import StepKey
    from dml_cluster.bus.wire import HEADER, encode_sent
    from dml_cluster.config import parse_config
    from dml_cluster.data.tokenizers import load_tokenizer
    from dml_cluster.launch.transports import bus_encoding

    cfg = parse_config(config)
    rows = cfg.data.batch_size * (cfg.data.block_size or 1)
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    log_p = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    _, body = encode_sent(bus_encoding(cfg).send(log_p, StepKey(0, 0, 0), 0))
    return (len(cfg.peers) - 1) * (HEADER.size + body.numel())


# -- statistics and the page -----------------------------------------------------------------


def _students(result: dict[str, Any], row: Row | None) -> dict[int, float]:
    """Peer index -> validation perplexity of the compared (student) peers of a run."""
    peers = [p for p in result["peers"].values() if p["role"] == "student"]
    if row is not None and row.student is not None:
        peers = [p for p in peers if p["index"] == row.student]
    return {p["index"]: p["perplexity"] for p in peers}


def interval(ds: Sequence[float]) -> str:
    if len(ds) < 2:
        return "–"
    t = T_975[len(ds) - 2] if len(ds) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(ds) / math.sqrt(len(ds))
    mean = statistics.mean(ds)
    return f"[{mean - half:+.2f}, {mean + half:+.2f}]"


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: list[dict[str, Any]], tokenizer: str) -> list[str]:
    def of(key: str) -> dict[int, dict[int, float]]:
        row = ROWS.get(key)
        return {
            r["seed"]: _students(r, row)
            for r in results
            if r["tokenizer"] == tokenizer and r["row"] == key
        }

    lines = [
        "| row | val. perplexity | vs | paired Δ perplexity | 95% CI of Δ | seeds | "
        "bytes sent / peer / step |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for key, row in ROWS.items():
        mine = of(key)
        if not mine:
            continue
        values = [v for per in mine.values() for v in per.values()]
        delta, ci, vs = "–", "–", row.base or ""
        if row.base is not None:
            base = of(row.base)
            ds = []
            for seed in sorted(set(mine) & set(base)):
                common = sorted(set(mine[seed]) & set(base[seed]))
                if common:
                    ds.append(statistics.mean(mine[seed][k] - base[seed][k] for k in common))
            if ds:
                delta = f"{statistics.mean(ds):+.2f}"
                ci = interval(ds)
        sent = next(r["bytes_per_step"] for r in results
                    if r["tokenizer"] == tokenizer and r["row"] == key)  # fmt: skip
        wire = f"{sent:,}" if row.method == "dml" else "–"  # what DML peers send each other
        lines.append(
            f"| {row.label} | {mean_std(values)} | {vs} | {delta} | {ci} | {len(mine)} | {wire} |"
        )
    teacher = [r for r in results if r["tokenizer"] == tokenizer and r["row"] == "teacher"]
    if teacher:
        ppl = teacher[0]["peers"]["teacher"]["perplexity"]
        lines.append(f"| (the larger GPT, KD's teacher: seed 0) | {ppl:.2f} | | | | 1 | – |")
    return lines


def render(saved: dict[str, Any]) -> str:
    meta = saved.get("meta", {})
    results = saved.get("results", [])
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results) / 60
    runs: dict[tuple[str, str], int] = {}  # (commit, command) -> runs, in order of first run
    for r in results:
        key = (r.get("commit", meta.get("commit", "?")), r.get("command", meta.get("command", "?")))
        runs[key] = runs.get(key, 0) + 1
    out = [
        f"Measured on {meta.get('machine', '?')}: {cpu:.0f} CPU minutes over {len(results)} runs "
        f"(each one process, one thread; {meta.get('minutes', 0):.0f} wall minutes in all on a "
        "machine shared with other work). The runs, by commit and command:",
        "",
        *(f"- {n} at commit `{c}`: `{cmd}`" for (c, cmd), n in runs.items()),
        "",
        f"Corpus: `{json.dumps(meta.get('corpus', {}))}`.",
        "",
        f"Protocol: {meta.get('protocol', '')}",
        "",
    ]
    for tok in TOKENIZERS:
        if any(r["tokenizer"] == tok for r in results):
            out += [f"#### Tokenizer: {tok}", "", *table(results, tok), ""]
    out.append(
        "Perplexity: exp of the mean validation loss per token (lower is better); mean ± std "
        "over seeds and compared peers. Δ: the row's minus the paired row's (*vs*), same seed "
        "and peer index, averaged over peers per seed; the 95% CI is the t-interval of the mean "
        "over seeds."
    )
    return "\n".join(out)


def write_page(path: Path, saved: dict[str, Any]) -> None:
    """Put the rendered block between the page's markers (a new page: the block alone)."""
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{render(saved)}\n{END}{tail}")


def reevaluate(saved: dict[str, Any], rows: set[str], out: Path, json_path: Path) -> None:
    """Score the final weights of `rows`' recorded runs again with this tree's evaluation
    (benchmarks/own_eval.py; since `ec3824b` it travels dense float32 whatever the wire, so it
    scores the models' own predictions). The figures recorded before are kept as
    `as_recorded`; `evaluated_at` names the commit of the new ones."""
    from own_eval import own_report

    for result in saved["results"]:
        if result["row"] not in rows or "as_recorded" in result:
            continue
        run = out / "runs" / Job(result["tokenizer"], result["row"], result["seed"]).name
        report = own_report(run)
        result["as_recorded"] = {n: dict(p) for n, p in result["peers"].items()}
        for name, peer in result["peers"].items():
            own = report["peers"][name]
            peer.update(nll=own["nll"], perplexity=own["perplexity"], accuracy=own["accuracy"])
        result["evaluated_at"] = commit()
        json_path.write_text(json.dumps(saved, indent=1))
        print(f"{run.name}: {result['as_recorded']} -> {result['peers']}", flush=True)


# -- the driver ------------------------------------------------------------------------------


def prepare(size: Size, out: Path, smoke: bool) -> tuple[Path, Path | None, dict[str, Any]]:
    """The corpus lists (smoke: a few files) and the BPE tokenizer trained on the train split."""
    from dml_cluster.data.tokenizers import train_bpe

    corpus = stdlib_corpus()
    train, val = corpus.train, corpus.val
    if smoke:
        train, val = train[:4], val[:2]
    lists = out / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (lists / "val.txt").write_text("".join(f"{p}\n" for p in val))
    tok = out / f"bpe-{size.bpe_vocab}.json"
    if not tok.exists():
        train_bpe(train, size.bpe_vocab, tok)
    facts = corpus.facts() if not smoke else {"smoke": [str(p.name) for p in train + val]}
    return lists, tok, facts


def plan(rows: Sequence[str], tokenizers: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    jobs = []
    for tok in tokenizers:
        if any(ROWS[r].method == "kd" for r in rows):
            jobs.append(Job(tok, "teacher", 0))  # first: KD runs wait for it
        jobs += [Job(tok, row, seed) for seed in seeds for row in rows]
    return jobs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few files")
    parser.add_argument("--rows", default=",".join(PROTOCOL), help="of: " + ",".join(ROWS))
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per peer")
    parser.add_argument(
        "--grad-clip", type=float, default=None, help="optim.grad_clip of every run (a variant)"
    )
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lm-bench")
    parser.add_argument("--json", type=Path, default=None, help="default: beside this script")
    parser.add_argument("--md", type=Path, default=None, help="default: benchmarks/LM.md")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--reevaluate", default="", metavar="ROWS",
        help="re-evaluate these rows' finished runs (final weights) with this tree's evaluation",
    )  # fmt: skip
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent
    out = args.out.resolve()
    json_path = args.json or (out / "lm_smoke.json" if args.smoke else here / "lm_results.json")
    md_path = args.md or (None if args.smoke else here / "LM.md")  # a smoke run: printed only
    saved = json.loads(json_path.read_text()) if json_path.exists() else {"results": []}
    if args.reevaluate:
        reevaluate(saved, set(args.reevaluate.split(",")), out, json_path)
    if args.render_only or args.reevaluate:
        if md_path is not None:
            write_page(md_path, saved)
        return
    size = SMOKE if args.smoke else FULL
    if args.tokens:
        size = Size(**{**size.__dict__, "tokens": args.tokens})
    if args.grad_clip:
        size = Size(**{**size.__dict__, "grad_clip": args.grad_clip})
    rows = [r for r in args.rows.split(",") if r]
    if "sampled" in rows and not sampled_exists():
        print("lm.py: bus.encoding sampled has not landed: the sampled row is left out")
        rows.remove("sampled")
    seeds = [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    lists, tok_file, corpus = prepare(size, out, args.smoke)
    bases = {t: base_config(size, t, tok_file if t == "bpe" else None, lists)
             for t in args.tokenizers.split(",")}  # fmt: skip
    done = {(r["tokenizer"], r["row"], r["seed"]) for r in saved["results"]}
    jobs = [j for j in plan(rows, list(bases), seeds) if (j.tokenizer, j.row, j.seed) not in done]
    started = time.perf_counter()
    before = saved.get("meta", {}).get("minutes", 0.0)  # an interrupted benchmark's time
    clipped = f", gradients clipped to norm {size.grad_clip}" if size.grad_clip else ""
    protocol = (
        f"small GPT {size.small}, teacher GPT {size.large} (1.5 times the budget), windows of "
        f"{size.block} tokens, batch {size.batch}, {size.tokens:,} training tokens per small "
        f"peer, Adam lr 3e-3 constant after {size.warmup} warm-up steps"
        f"{clipped}, validation on "
        f"{size.val_tokens} positions, BPE of {size.bpe_vocab} ids, top-{size.topk}, "
        f"{size.samples} samples per position."
    )

    command = " ".join(["python", "benchmarks/lm.py", *(argv or sys.argv[1:])])

    def record(result: dict[str, Any]) -> None:
        saved["results"].append({**result, "commit": commit(), "command": command})
        saved["meta"] = {
            "commit": commit(), "machine": machine(), "corpus": corpus, "protocol": protocol,
            "minutes": before + (time.perf_counter() - started) / 60, "command": command,
        }  # fmt: skip
        json_path.write_text(json.dumps(saved, indent=1))
        print(f"{result['tokenizer']} {result['row']} seed {result['seed']}: "
              f"{ {n: round(p['perplexity'], 2) for n, p in result['peers'].items()} } "
              f"({result['seconds']} s, {result['cpu_seconds']} s CPU)", flush=True)  # fmt: skip

    first = [j for j in jobs if j.row == "teacher"]
    rest = [j for j in jobs if j.row != "teacher"]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for phase in (first, rest):
            futures = [pool.submit(run_job, j, job_config(j, bases[j.tokenizer], size, out), out)
                       for j in phase]  # fmt: skip
            for future in concurrent.futures.as_completed(futures):
                record(future.result())
    if md_path is None:
        print(render(saved))
    else:
        write_page(md_path, saved)
    print(f"results: {json_path}; page: {md_path or '(none: a smoke run)'}")


if __name__ == "__main__":
    main()
