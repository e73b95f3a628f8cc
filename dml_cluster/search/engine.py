"""The search loop: propose -> measure -> train the round's cohort -> score -> learn, resumable.

Run folder (<run.out_dir>/<run.name>):
  search.jsonl      one record per candidate (round, arch, hash, ACC, LAT, FLOPs, params, reward)
  state.pt          after each round: rounds done, the controller (policy, optimizer, baseline,
                    RNG) and the search config's fingerprint
  rounds/round-N/   the round's cohort run folder (checkpoints, logs, final weights) and
                    plan.json: the round's proposals and their measured costs, written before
                    training, so a killed round resumes with the same candidates and latencies
A killed search resumes at its first unfinished round: the plan is read back, the cohort resumes
from its checkpoint, and the records and controller updates that follow are those of an
uninterrupted search (with a deterministic cost: bitwise; with measured latency: as measured).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model
from dml_cluster.run_folder import write_json_atomic
from dml_cluster.search.controller import Controller, Sample, build_controller
from dml_cluster.search.evaluate import (
    DataShape,
    data_shape,
    round_config,
    score,
    search_folder,
    train_cohort,
)
from dml_cluster.search.measure import Cost, measure
from dml_cluster.search.reward import reward
from dml_cluster.search.settings import SearchConfig
from dml_cluster.search.space import Arch, SearchSpace


@dataclass(frozen=True)
class Proposal:
    """A sampled candidate and what it costs (measured before its round trains)."""

    tokens: tuple[int, ...]
    log_prob: float
    arch: Arch
    cost: Cost


def fingerprint(scfg: SearchConfig) -> str:
    """What must not change when a search resumes: all but rounds, top, retrain, metrics and
    train.epochs (the retraining's)."""
    d = scfg.model_dump(mode="json")
    for key in ("rounds", "top", "retrain"):
        d["search"].pop(key)
    d["base"].pop("metrics", None)
    (d["base"].get("train") or {}).pop("epochs", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Search:
    """One search: its folder, space, controller, history; `run()` does the rounds left."""

    def __init__(self, scfg: SearchConfig, nproc: bool = False) -> None:
        self.scfg, self.nproc = scfg, nproc
        self.search = scfg.search
        self.dir = search_folder(scfg)
        self.space: SearchSpace = self.search.space.build()
        run = scfg.base.get("run") or {}
        self.seed = self.search.controller.seed
        self.seed = int(run.get("seed", 0)) if self.seed is None else self.seed
        self.threads = int(run.get("threads", 1))
        self.controller: Controller = build_controller(
            self.space.vocabulary(), self.space.token_kinds(), self.search.controller, self.seed
        )
        self.history: list[dict[str, Any]] = []
        self.rounds_done = 0
        self._shape: DataShape | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "state.pt"

    @property
    def log_path(self) -> Path:
        return self.dir / "search.jsonl"

    def resume(self) -> None:
        """Load the state of an earlier run of this search, if there is one."""
        if not self.state_path.exists():
            if self.log_path.exists():
                self.log_path.unlink()  # records of a round that never finished
            return
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint(self.scfg):
            raise ConfigError(
                f"config error: {self.dir} holds a search of another config; choose another "
                "run.name (or remove the folder)"
            )
        self.controller.load_state_dict(state["controller"])
        self.rounds_done = int(state["rounds_done"])
        records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        self.history = [r for r in records if r["round"] < self.rounds_done]
        self._rewrite_log()

    def _save_state(self) -> None:
        state = {
            "fingerprint": fingerprint(self.scfg),
            "rounds_done": self.rounds_done,
            "controller": self.controller.state_dict(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def _rewrite_log(self) -> None:
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))
        tmp.replace(self.log_path)

    # -- one round --------------------------------------------------------------------------

    @property
    def shape(self) -> DataShape:
        if self._shape is None:
            self._shape = data_shape(self.scfg)
        return self._shape

    def _measured(self) -> dict[str, Cost]:
        return {r["hash"]: Cost(r["latency_ms"], r["mflops"], r["params"]) for r in self.history}

    def plan(self, round_index: int) -> list[Proposal]:
        """The round's proposals: read back if the round was started before, else sampled and
        measured (a candidate measured in an earlier round keeps its numbers)."""
        path = self.dir / "rounds" / f"round-{round_index:03d}" / "plan.json"
        samples = self.controller.sample(self.search.candidates)  # moves its RNG on either way
        if path.exists():
            return [_proposal(p) for p in json.loads(path.read_text())]
        known = self._measured()
        proposals = []
        for sample in samples:
            arch = self.space.decode(sample.tokens)
            if arch.hash() not in known:
                known[arch.hash()] = self._measure(arch)
            proposals.append(Proposal(sample.tokens, sample.log_prob, arch, known[arch.hash()]))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, [_plain(p) for p in proposals])
        return proposals

    def _measure(self, arch: Arch) -> Cost:
        torch.set_num_threads(self.threads)
        v = self.shape
        model = build_model("searched", v.input_shape, v.num_classes, arch=arch.to_dict())
        c = self.search.cost
        return measure(model.to(_device()), v.input_shape, c.batch, c.repeats, c.warmup)

    def evaluate(self, round_index: int, proposals: list[Proposal]) -> dict[str, float]:
        """Validation accuracy by arch hash: earlier rounds' results, the rest trained now."""
        accuracy = {r["hash"]: r["accuracy"] for r in self.history}
        new: dict[str, Arch] = {}
        for p in proposals:
            if p.arch.hash() not in accuracy:
                new.setdefault(p.arch.hash(), p.arch)
        if new:
            archs = list(new.values())
            name = f"round-{round_index:03d}"
            cfg = round_config(self.scfg, archs, self.dir / "rounds", name, shape=self.shape)
            train_cohort(cfg, self.nproc)
            accuracy.update(score(cfg, archs))
        return accuracy

    def records(
        self, round_index: int, proposals: list[Proposal], accuracy: dict[str, float]
    ) -> list[dict[str, Any]]:
        c = self.search.cost
        seen = {r["hash"] for r in self.history}
        out = []
        for i, p in enumerate(proposals):
            h = p.arch.hash()
            lat = p.cost.latency_ms if c.metric == "latency" else p.cost.mflops
            out.append({
                "round": round_index, "index": i, "hash": h, "arch": p.arch.to_dict(),
                "describe": p.arch.describe(), "accuracy": accuracy[h],
                "latency_ms": p.cost.latency_ms, "mflops": p.cost.mflops,
                "params": p.cost.params, "cost": lat,
                "reward": reward(accuracy[h], lat, c.target, c.weight),
                "cached": h in seen, "controller": self.search.controller.name,
                "reward_mode": self.search.reward,
            })  # fmt: skip
            seen.add(h)
        return out

    # -- the loop ---------------------------------------------------------------------------

    def run(self, say: Any = print) -> list[dict[str, Any]]:
        """Do the rounds left; `say` gets one progress line per round."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        if self.rounds_done:
            say(f"search: resuming after round {self.rounds_done} of {self.search.rounds}")
        for r in range(self.rounds_done, self.search.rounds):
            t0 = time.perf_counter()
            proposals = self.plan(r)
            accuracy = self.evaluate(r, proposals)
            records = self.records(r, proposals, accuracy)
            samples = [Sample(p.tokens, p.log_prob) for p in proposals]
            self.controller.update(samples, [rec["reward"] for rec in records])
            self.history += records
            with self.log_path.open("a") as f:
                f.writelines(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
            self.rounds_done = r + 1
            self._save_state()
            say(self._progress(r, records, time.perf_counter() - t0))
        return self.history

    def _progress(self, r: int, records: list[dict[str, Any]], seconds: float) -> str:
        best_now = max(records, key=lambda rec: rec["reward"])
        best = max(self.history, key=lambda rec: rec["reward"])
        cached = sum(rec["cached"] for rec in records)
        unit = "ms" if self.search.cost.metric == "latency" else "MFLOPs"
        return (
            f"round {r + 1}/{self.search.rounds}: {len(records)} candidates ({cached} seen "
            f"before) in {seconds:.1f} s; round best reward {best_now['reward']:.4f} (acc "
            f"{best_now['accuracy']:.4f}, {best_now['cost']:.3g} {unit}); best so far "
            f"{best['reward']:.4f} [{best['describe']}]"
        )


def _plain(p: Proposal) -> dict[str, Any]:
    return {
        "tokens": list(p.tokens),
        "log_prob": p.log_prob,
        "arch": p.arch.to_dict(),
        "cost": asdict(p.cost),
    }


def _proposal(d: dict[str, Any]) -> Proposal:
    return Proposal(tuple(d["tokens"]), d["log_prob"], Arch.from_dict(d["arch"]), Cost(**d["cost"]))
