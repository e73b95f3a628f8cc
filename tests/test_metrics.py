"""Cohort statistics and the Prometheus exporter, in this process: the one-process engine serves
one real HTTP endpoint labelled per peer, scraped over a real socket."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dml_cluster.bus import BusStats
from dml_cluster.bus.local import LocalBus
from dml_cluster.config import load_config
from dml_cluster.determinism import set_determinism
from dml_cluster.errors import ConfigError
from dml_cluster.metrics import events, metrics_observers
from dml_cluster.metrics.batch import cohort_batch_stats, peer_batch_stats
from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.run_folder import read_jsonl
from dml_cluster.trainer import CohortTrainer, Placement

from .conftest import REPO, cli_env, final_weights
from .metrics_helpers import (
    Recorder,
    agreement_numpy,
    close,
    ema,
    kl_numpy,
    parse,
    promtool_check,
    sampled,
    scrape,
    value,
)

CONFIG = REPO / "configs" / "digits-dml.yaml"
PEERS = ("small_cnn-0", "small_cnn-1")


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        CONFIG,
        [
            f"run.out_dir={tmp_path / 'runs'}",
            "metrics.port=0",
            "metrics.address=127.0.0.1",
            *overrides,
        ],
    )


def test_batch_stats_match_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    log_ps = {i: F.log_softmax(torch.randn(32, 7, generator=g) * 2, dim=1) for i in range(3)}
    target = torch.randint(0, 7, (32,), generator=g)
    target[:5] = -1  # unlabelled samples do not count for accuracy
    stats = peer_batch_stats(log_ps, target, 1)
    assert set(stats.pairs) == {0, 2}
    for j in (0, 2):
        assert close(stats.pairs[j].kl, kl_numpy(log_ps[j].double(), log_ps[1].double()), 1e-5)
        assert close(stats.pairs[j].agreement, agreement_numpy(log_ps[j], log_ps[1]), 1e-7)
        m = (log_ps[j].exp() + log_ps[1].exp()) / 2
        js = 0.5 * (
            kl_numpy(log_ps[j].double(), m.log().double())
            + kl_numpy(log_ps[1].double(), m.log().double())
        )
        assert close(stats.pairs[j].js, js, 1e-5)
    labelled = target != -1
    expected = (log_ps[1].argmax(1)[labelled] == target[labelled]).float().mean().item()
    assert close(stats.accuracy, expected, 1e-7)
    p = log_ps[1].exp()
    assert close(stats.entropy, -(p * log_ps[1]).sum(1).mean().item(), 1e-6)
    assert peer_batch_stats(log_ps, torch.full((32,), -1), 0).accuracy is None
    alone = peer_batch_stats({1: log_ps[1]}, target, 1)  # a one-peer cohort, a teacher's process
    assert alone.pairs == {} and alone.entropy == stats.entropy
    by_name = stats.pairs_by_name(["a", "b", "c"])
    assert set(by_name) == {"a", "c"} and set(by_name["a"]) == {"kl", "js", "agreement"}


def test_one_process_engine_serves_every_peer_with_exact_values(
    tmp_path: Path, restore_torch: None
) -> None:
    """Train in this process with the exporter installed; scrape while its endpoint is up and
    compare with moving averages of KL computed here from the recorded batches."""
    cfg = _cfg(tmp_path, "train.epochs=2", "metrics.smoothing=0.8", "metrics.stats_every=4")
    set_determinism(cfg)
    recorder = Recorder()
    with metrics_observers(cfg, (0, 1), "0123456789abcdef") as observers:
        assert len(observers) == 1
        exporter = observers[0]
        record = json.loads((cfg.run.dir / "metrics" / f"{PEERS[0]}.json").read_text())
        assert record["url"] == exporter.url and record["port"] == exporter.port > 0
        before = parse(scrape(exporter.url))
        assert value(before, "dml_run_info", **_run_labels(cfg)) == 1.0
        assert value(before, "dml_step", peer=PEERS[0]) is None  # nothing trained yet
        placement = Placement((0, 1), torch.device("cpu"), reporter=True)
        CohortTrainer(cfg, LocalBus(), placement, [*observers, recorder]).run()
        text = scrape(exporter.url)
    with pytest.raises(OSError):  # the port is released when the block ends
        scrape(exporter.url, timeout=2)

    samples = parse(text)
    last = max(recorder.steps)
    sampled_steps = sampled(sorted(recorder.steps), 4)  # the batches the moving average saw
    for i, (peer, other) in enumerate([PEERS, PEERS[::-1]]):
        assert value(samples, "dml_step", peer=peer) == last
        assert value(samples, "dml_train_samples_total", peer=peer) == sum(
            len(t) for _, t in recorder.steps.values()
        )
        j = 1 - i
        kls = [kl_numpy(recorder.steps[s][0][j], recorder.steps[s][0][i]) for s in sampled_steps]
        scraped = value(samples, "dml_kl_divergence", peer=peer, other_peer=other, split="train")
        assert close(scraped, ema(kls, 0.8)[-1])
        final = recorder.evals[-1]
        test_kl = value(samples, "dml_kl_divergence", peer=peer, other_peer=other, split="test")
        assert close(test_kl, final["pairs"][f"{peer}|{other}"]["kl"], 1e-9)
        acc = value(samples, "dml_accuracy_ratio", peer=peer, split="test")
        assert close(acc, final["peers"][peer]["accuracy"], 1e-9)
        count = value(samples, "dml_step_duration_seconds_count", peer=peer)
        assert count == len(recorder.steps)  # every step's time, read on the sampled steps
        ces = [F.nll_loss(log_ps[i], y).item() for log_ps, y in recorder.steps.values()]
        scraped = value(samples, "dml_cross_entropy_loss", peer=peer)
        assert close(scraped, ema(ces, 0.8)[-1])  # every step's loss, in order
    ensemble = value(samples, "dml_ensemble_accuracy_ratio", split="test")
    assert close(ensemble, recorder.evals[-1]["ensemble"]["accuracy"], 1e-9)
    assert value(samples, "dml_bus_sent_bytes_total", peer=PEERS[0]) == 0.0  # nothing moves
    if shutil.which("promtool"):
        check = promtool_check(text)
        assert check.returncode == 0, check.stdout + check.stderr


def _run_labels(cfg) -> dict[str, str]:
    return {
        "run_id": "0123456789abcdef",
        "run_name": cfg.run.name,
        "config_hash": cfg.hash(),
        "transport": "local",
        "cohort_size": "2",
        "method": "dml",
        "update": "simultaneous",
    }


def test_busy_default_port_falls_back_to_a_free_one(tmp_path: Path, capfd) -> None:
    cfg = load_config(CONFIG, [f"run.out_dir={tmp_path / 'runs'}", "metrics.address=127.0.0.1"])
    default = cfg.metrics.port
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # if something else holds it, just as good
            taken.bind(("127.0.0.1", default))
            taken.listen()
        with metrics_observers(cfg, (0, 1), "x") as (exporter,):
            assert exporter.port != default
            assert "dml_run_info" in scrape(exporter.url)
    assert f"metrics port {default} is in use" in capfd.readouterr().err


def test_busy_port_set_in_the_config_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = _cfg(tmp_path, f"metrics.port={busy}")
        expected = f"metrics: cannot serve on 127.0.0.1:{busy}"
        with pytest.raises(ConfigError, match=expected), metrics_observers(cfg, (0, 1), "x"):
            pass


def test_metrics_settings_do_not_change_the_config_hash(tmp_path: Path) -> None:
    a = _cfg(tmp_path)
    b = _cfg(tmp_path, "metrics.enabled=false", "metrics.port=9500", "metrics.linger_s=3")
    assert a.hash() == b.hash()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("metrics.port=70000", "metrics.port"),
        ("metrics.smoothing=1.0", "metrics.smoothing"),
        ("metrics.linger_s=-1", "metrics.linger_s"),
        ("metrics.prot=1", "metrics.prot"),
    ],
)
def test_bad_metrics_settings_are_one_line_errors(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"config error: {key}"):
        _cfg(tmp_path, override)


def test_unbindable_address_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dml_cluster", "train", str(CONFIG),
         "--set", f"run.out_dir={tmp_path}", "--set", "metrics.address=203.0.113.7",
         "--set", "train.max_steps=1"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dml-cluster: config error: metrics: cannot serve on 203.0.113.7:9400: "
        "Cannot assign requested address"
    ]


def test_disabled_metrics_install_no_observer(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "metrics.enabled=false")
    with metrics_observers(cfg, (0, 1), "x") as observers:
        assert observers == []
    assert not (cfg.run.dir / "metrics").exists()


class Keeper:
    """An observer that gets no trainer: it keeps every event, asking for the statistics of
    every `every`-th step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[StepEvent] = []
        self.evals: list[EvalEvent] = []
        self.summary: dict | None = None

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(self, event: StepEvent) -> None:
        self.steps.append(event)

    def on_eval(self, event: EvalEvent) -> None:
        self.evals.append(event)

    def on_end(self, summary: dict) -> None:
        self.summary = summary


def test_statistics_are_computed_once_per_step_whatever_the_observers(
    tmp_path: Path, restore_torch: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter, the run log and two more observers: one statistics call per step on which
    any of them asks, for every hosted peer at once, and none on the other steps."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def counted(log_ps, target, peers):
        calls.append((len(target), tuple(peers)))
        return cohort_batch_stats(log_ps, target, peers)

    monkeypatch.setattr(events, "cohort_batch_stats", counted)
    cfg = _cfg(tmp_path, "train.max_steps=13", "run.log_every=4", "metrics.stats_every=3")
    set_determinism(cfg)
    first, second = Keeper(every=6), Keeper(every=6)
    with metrics_observers(cfg, (0, 1), "x") as observers:
        placement = Placement((0, 1), torch.device("cpu"), reporter=True)
        CohortTrainer(cfg, LocalBus(), placement, [*observers, first, second]).run()
    asked = [s for s in range(13) if s % 4 == 0 or s % 3 == 0]  # the run log's, the exporter's
    assert calls == [(64, (0, 1))] * len(asked)
    for keeper in (first, second):
        assert [e.step for e in keeper.steps if e.has_batch_stats] == asked
        for event in keeper.steps:
            assert all((p.batch is None) == (event.step not in asked) for p in event.peers.values())
    assert all(a is b for a, b in zip(first.steps, second.steps, strict=True))  # one event


def test_observers_read_everything_from_the_event(tmp_path: Path, restore_torch: None) -> None:
    """An observer without a trainer reference sees losses, learning rates, timings, bus counters
    and batch statistics; the JSONL run log is written from the same event."""
    cfg = _cfg(tmp_path, "train.max_steps=6", "run.log_every=2", "metrics.enabled=false")
    set_determinism(cfg)
    keeper = Keeper(every=3)
    placement = Placement((0, 1), torch.device("cpu"), reporter=True)
    summary = CohortTrainer(cfg, LocalBus(), placement, [keeper]).run()
    assert [e.step for e in keeper.steps] == list(range(6))
    for event in keeper.steps:
        assert event.epoch == 0 and event.batch_size == 64 == len(event.target)
        assert event.step_seconds > event.exchange_seconds >= event.wait_seconds >= 0
        # nothing moves in one process; every step is one exchange
        assert (event.bus.bytes_sent, event.bus.bytes_received) == (0, 0)
        assert event.bus.exchanges == event.step + 1
        assert set(event.peers) == {0, 1}
        expected = cohort_batch_stats(event.log_ps, event.target, [0, 1])
        asked = event.step % 2 == 0 or event.step % 3 == 0  # the run log's, the keeper's
        for i, peer in event.peers.items():
            assert peer.lr == cfg.optim.lr
            assert peer.losses is not None and peer.losses.total > 0
            assert peer.batch == (expected[i] if asked else None)
    for i, name in enumerate(PEERS):
        records = read_jsonl(cfg.run.dir / "peers" / f"{name}.jsonl")
        assert [r["step"] for r in records] == [0, 2, 4]
        for record in records:
            event = keeper.steps[record["step"]]
            peer = event.peers[i]
            assert peer.losses is not None and peer.batch is not None
            assert record["loss"] == peer.losses.total and record["ce"] == peer.losses.ce
            assert record["distill"] == peer.losses.distill and record["lr"] == peer.lr
            assert record["train_accuracy"] == peer.batch.accuracy
            assert record["entropy"] == peer.batch.entropy
            assert record["pairs"] == peer.batch.pairs_by_name(list(PEERS))
            assert record["step_seconds"] == event.step_seconds
    assert [(e.epoch, e.step) for e in keeper.evals] == [(1, 6)]
    (evaluated,) = keeper.evals
    assert evaluated.report["peers"].keys() == set(PEERS)
    assert evaluated.bus == BusStats(exchanges=6 + 1)  # 6 steps, the test set in one chunk
    (record,) = read_jsonl(cfg.run.dir / "cohort.jsonl")  # the run log's, from the same event
    assert record["elapsed_seconds"] == evaluated.elapsed_seconds > 0
    assert record["ensemble"] == evaluated.report["ensemble"]
    assert keeper.summary == summary


def test_statistics_never_touch_training(tmp_path: Path, restore_torch: None) -> None:
    """Statistics on every step for every observer, or on none but the run log's first: the
    trained weights are bitwise the same."""
    weights = []
    for name, sets in (
        ("all", ["run.log_every=1", "metrics.stats_every=1"]),
        ("none", ["run.log_every=1000", "metrics.enabled=false"]),
    ):
        cfg = _cfg(tmp_path, f"run.name={name}", "train.max_steps=25", *sets)
        set_determinism(cfg)
        keepers = [Keeper(every=1)] if name == "all" else []
        with metrics_observers(cfg, (0, 1), "x") as observers:
            placement = Placement((0, 1), torch.device("cpu"), reporter=True)
            CohortTrainer(cfg, LocalBus(), placement, [*observers, *keepers]).run()
        weights.append(final_weights(cfg.run.dir))
    assert weights[0].keys() == weights[1].keys() == set(PEERS)
    for peer, state in weights[0].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, weights[1][peer][key]), (peer, key)
