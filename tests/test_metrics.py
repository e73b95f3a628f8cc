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

from dml_cluster.bus.local import LocalBus
from dml_cluster.config import load_config
from dml_cluster.errors import ConfigError
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.batch import peer_batch_stats
from dml_cluster.trainer import CohortTrainer, Placement

from .conftest import REPO, cli_env
from .metrics_helpers import (
    Recorder,
    agreement_numpy,
    close,
    ema,
    kl_numpy,
    parse,
    promtool_check,
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


@pytest.fixture
def restore_torch():
    """The engine sets process-wide torch switches; put them back for the other tests."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


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
    by_name = stats.pairs_by_name(["a", "b", "c"])
    assert set(by_name) == {"a", "c"} and set(by_name["a"]) == {"kl", "js", "agreement"}


def test_one_process_engine_serves_every_peer_with_exact_values(
    tmp_path: Path, restore_torch: None
) -> None:
    """Train in this process with the exporter installed; scrape while its endpoint is up and
    compare with moving averages of KL computed here from the recorded batches."""
    cfg = _cfg(tmp_path, "train.epochs=2", "metrics.smoothing=0.8")
    from dml_cluster.cohort import set_determinism

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
    for i, (peer, other) in enumerate([PEERS, PEERS[::-1]]):
        assert value(samples, "dml_step", peer=peer) == last
        assert value(samples, "dml_train_samples_total", peer=peer) == sum(
            len(t) for _, t in recorder.steps.values()
        )
        j = 1 - i
        kls = [
            kl_numpy(lp[j], lp[i]) for lp, _ in (recorder.steps[s] for s in sorted(recorder.steps))
        ]
        scraped = value(samples, "dml_kl_divergence", peer=peer, other_peer=other, split="train")
        assert close(scraped, ema(kls, 0.8)[-1])
        final = recorder.evals[-1]
        test_kl = value(samples, "dml_kl_divergence", peer=peer, other_peer=other, split="test")
        assert close(test_kl, final["pairs"][f"{peer}|{other}"]["kl"], 1e-9)
        acc = value(samples, "dml_accuracy_ratio", peer=peer, split="test")
        assert close(acc, final["peers"][peer]["accuracy"], 1e-9)
        count = value(samples, "dml_step_duration_seconds_count", peer=peer)
        assert count == len(recorder.steps)
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
