"""Watching a real 2-peer cohort: torch's elastic launcher starts two peer processes talking over
zmq; each serves /metrics. The tests scrape them over HTTP while they train, lint what they
serve with promtool, point a real Prometheus server at them, and check that a run with metrics
disabled listens on nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from dml_cluster.bus.local import LocalBus
from dml_cluster.config import load_config
from dml_cluster.determinism import set_determinism
from dml_cluster.trainer import CohortTrainer, Placement

from .conftest import CLI, REPO, cli_env
from .metrics_helpers import (
    Recorder,
    agreement_numpy,
    close,
    ema_at,
    endpoints,
    kl_numpy,
    parse,
    promtool_check,
    sampled,
    scrape,
    value,
)

CONFIG = "configs/digits-dml.yaml"
PEERS = ("small_cnn-0", "small_cnn-1")
EPOCHS = 4  # 88 steps: dozens of scrapes per peer while it trains
SMOOTHING = 0.9
STATS_EVERY = 3  # the exporter reads the statistics of every third batch


def _overrides(out_dir: Path) -> list[str]:
    return [
        f"run.out_dir={out_dir}",
        "run.name=watched",
        f"train.epochs={EPOCHS}",
        "metrics.port=0",
        "metrics.address=127.0.0.1",
        f"metrics.smoothing={SMOOTHING}",
        f"metrics.stats_every={STATS_EVERY}",
    ]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@dataclass
class WatchedRun:
    """A 2-peer zmq run, its endpoints, and every scrape taken while it trained."""

    run_dir: Path
    urls: dict[str, str]
    pids: dict[str, int]
    scrapes: dict[str, list[str]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def _poll(run: WatchedRun, done: threading.Event) -> None:
    """Scrape both peers about 20 times a second until the run has finished training."""
    while True:
        finished = (run.run_dir / "summary.json").exists()
        for peer, url in run.urls.items():
            with contextlib.suppress(OSError):
                run.scrapes[peer].append(scrape(url, timeout=5))
        if finished or done.is_set():
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatchedRun]:
    out_dir = tmp_path_factory.mktemp("watched")
    overrides = [*_overrides(out_dir), "bus.transport=zmq", "metrics.linger_s=300"]
    log = (out_dir / "launcher.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "train", CONFIG, *_sets(overrides)],
        cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    run_dir = out_dir / "watched"
    try:
        found = endpoints(run_dir, PEERS, timeout=180)
        run = WatchedRun(
            run_dir,
            urls={p: r["url"] for p, r in found.items()},
            pids={p: r["pid"] for p, r in found.items()},
            scrapes={p: [] for p in PEERS},
            overrides=overrides,
        )
        done = threading.Event()
        poller = threading.Thread(target=_poll, args=(run, done), daemon=True)
        poller.start()
        poller.join(timeout=300)
        done.set()
        assert (run_dir / "summary.json").exists(), (out_dir / "launcher.log").read_text()
        yield run
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """End the launcher we started (it ends its peer processes), then anything it left."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        child.kill()


# -- scraping every peer during the run -------------------------------------------------------


def test_divergence_read_over_http_equals_kl_of_the_same_batches(
    watched: WatchedRun, tmp_path: Path
) -> None:
    """Each scrape gives (step s, KL moving average over the sampled batches up to s). Replay the
    run in the one-process engine, recompute KL(p_other || p_peer) of every sampled batch in
    numpy and compare."""
    per_peer = {p: [parse(t) for t in texts] for p, texts in watched.scrapes.items()}
    steps_seen = {
        p: [
            value(s, "dml_step", peer=p)
            for s in samples
            if value(s, "dml_step", peer=p) is not None
        ]
        for p, samples in per_peer.items()
    }
    last = max(max(v) for v in steps_seen.values())
    oracle = _replay(watched.overrides, tmp_path, int(last) + 1)
    order = sampled(sorted(oracle.steps), STATS_EVERY)
    for i, peer in enumerate(PEERS):
        j, other = 1 - i, PEERS[1 - i]
        batches = [oracle.steps[s][0] for s in order]
        kl = ema_at(order, [kl_numpy(lp[j], lp[i]) for lp in batches], SMOOTHING, int(last))
        agree = ema_at(
            order, [agreement_numpy(lp[j], lp[i]) for lp in batches], SMOOTHING, int(last)
        )
        checked = 0
        for samples in per_peer[peer]:
            step = value(samples, "dml_step", peer=peer)
            if step is None:
                continue
            labels = {"peer": peer, "other_peer": other, "split": "train"}
            scraped = value(samples, "dml_kl_divergence", **labels)
            assert close(scraped, kl[int(step)]), (peer, step, scraped, kl[int(step)])
            assert close(value(samples, "dml_agreement_ratio", **labels), agree[int(step)])
            checked += 1
        assert checked >= 2, f"only {checked} scrapes of {peer} during training"


def _replay(overrides: list[str], tmp_path: Path, steps: int) -> Recorder:
    """The same cohort in this process (LocalBus), recording every batch's predictions."""
    cfg = load_config(
        REPO / CONFIG,
        [*overrides, "bus.transport=local", "metrics.enabled=false",
         f"run.out_dir={tmp_path}", f"train.max_steps={steps}"],
    )  # fmt: skip
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(cfg)
        recorder = Recorder()
        placement = Placement((0, 1), torch.device("cpu"), reporter=True)
        CohortTrainer(cfg, LocalBus(), placement, [recorder]).run()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return recorder


def test_counters_only_grow_and_the_step_advances(watched: WatchedRun) -> None:
    for peer, texts in watched.scrapes.items():
        scrapes = [parse(t) for t in texts]
        steps = [value(s, "dml_step", peer=peer) for s in scrapes]
        steps = [s for s in steps if s is not None]
        assert len(set(steps)) >= 2, f"{peer}: the step never moved in {len(texts)} scrapes"
        assert steps == sorted(steps)
        assert steps[-1] == EPOCHS * 22 - 1  # 1437 digits training samples / 64 = 22 steps
        cumulative = ("_total", "_count", "_sum", "_bucket")
        for before, after in zip(scrapes, scrapes[1:], strict=False):
            for key, old in before.items():
                if key[0].startswith("dml_") and key[0].endswith(cumulative):
                    assert after[key] >= old, (peer, key, old, after[key])
        final = scrapes[-1]
        assert value(final, "dml_train_samples_total", peer=peer) == EPOCHS * 22 * 64
        assert value(final, "dml_bus_sent_bytes_total", peer=peer) > 0
        assert value(final, "dml_bus_received_bytes_total", peer=peer) > 0
        assert value(final, "dml_bus_rejected_messages_total", peer=peer) == 0
        assert value(final, "dml_bus_wait_seconds_total", peer=peer) > 0
        assert value(final, "dml_step_duration_seconds_count", peer=peer) == EPOCHS * 22
        assert value(final, "dml_exchange_duration_seconds_count", peer=peer) == EPOCHS * 22
        # each process serves only its own peer
        assert value(final, "dml_step", peer=next(p for p in PEERS if p != peer)) is None
        acc = value(final, "dml_accuracy_ratio", peer=peer, split="test")
        assert acc is not None and acc > 0.8
        assert value(final, "dml_ensemble_accuracy_ratio", split="test") > 0.8


def test_promtool_accepts_every_peers_exposition(watched: WatchedRun) -> None:
    if shutil.which("promtool") is None:
        _missing_prometheus("promtool")
    for peer, url in watched.urls.items():
        text = scrape(url)
        check = promtool_check(text)
        assert check.returncode == 0, f"{peer}: {check.stdout}{check.stderr}"
        assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout


# -- a real Prometheus server -----------------------------------------------------------------


def _missing_prometheus(tool: str) -> None:
    reason = (
        f"{tool} not found: install Debian's prometheus package "
        "(apt-get install --no-install-recommends prometheus; scripts/setup.sh does)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    print(f"SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.timeout(240)
def test_prometheus_scrapes_one_divergence_series_per_ordered_pair(
    watched: WatchedRun, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        _missing_prometheus("prometheus")
    targets = [urllib.parse.urlsplit(u).netloc for u in watched.urls.values()]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: dml\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        series: list[dict] = []
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                series = _query(base, 'dml_kl_divergence{split="train"}')
            except OSError:
                series = []  # not listening yet
            if len(series) >= 2:
                break
            time.sleep(0.5)
        pairs = sorted((s["metric"]["peer"], s["metric"]["other_peer"]) for s in series)
        assert pairs == sorted([PEERS, PEERS[::-1]]), series
        assert {s["metric"]["instance"] for s in series} == set(targets)
        assert all(float(s["value"][1]) >= 0.0 for s in series)
        up = _query(base, 'up{job="dml"}')
        assert sorted(float(s["value"][1]) for s in up) == [1.0, 1.0]
        info = _query(base, "dml_run_info")
        assert {s["metric"]["transport"] for s in info} == {"zmq"}
        assert {s["metric"]["cohort_size"] for s in info} == {"2"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# -- metrics off: nothing listens -------------------------------------------------------------

_PROBE = """
import json, sys
from dml_cluster.config import load_config
from dml_cluster.launch import run_local
run_local(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps({m: m in sys.modules for m in
                  ("dml_cluster.metrics.exporter", "prometheus_client")}))
"""


def _listening_while_running(*runs: list[str]) -> list[tuple[set[int], dict, str]]:
    """Run the one-process engine with each of `runs` (overrides) as real processes, side by
    side; for each, every TCP port it listened on meanwhile, its modules report, its stdout."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    probe = [sys.executable, "-c", _PROBE, str(REPO / CONFIG)]
    procs = [
        subprocess.Popen([*probe, *overrides], cwd=REPO, env=cli_env(), **pipes)
        for overrides in runs
    ]
    watched = [psutil.Process(proc.pid) for proc in procs]
    ports: list[set[int]] = [set() for _ in procs]
    while any(proc.poll() is None for proc in procs):
        for proc, process, seen in zip(procs, watched, ports, strict=True):
            if proc.poll() is not None:
                continue
            try:
                for conn in process.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        seen.add(conn.laddr.port)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    results = []
    for proc, seen in zip(procs, ports, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append((seen, json.loads(out.strip().splitlines()[-1]), out))
    return results


def test_disabled_metrics_bind_nothing_and_load_nothing(tmp_path: Path) -> None:
    common = [f"run.out_dir={tmp_path}", "train.max_steps=5", "metrics.address=127.0.0.1"]
    # the same probe, side by side, sees the endpoint when metrics are on (it is not blind)
    (ports, modules, out), (served_ports, served_modules, served_out) = _listening_while_running(
        [*common, "run.name=quiet", "metrics.enabled=false"],
        [*common, "metrics.port=0", "run.name=served", "metrics.linger_s=0.5"],
    )
    assert ports == set()
    assert modules == {"dml_cluster.metrics.exporter": False, "prometheus_client": False}
    assert "metrics:" not in out and not (tmp_path / "quiet" / "metrics").exists()
    assert (tmp_path / "quiet" / "summary.json").exists()  # it did run, in that folder
    served = json.loads((tmp_path / "served" / "metrics" / "small_cnn-0.json").read_text())
    assert served_ports == {served["port"]} and served_modules["dml_cluster.metrics.exporter"]
    assert "metrics:" in served_out
