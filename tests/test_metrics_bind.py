"""`metrics.address`, the endpoint's bind address (issue 21, item 8), on real sockets: the
default binds every interface (a pod's IP, which Prometheus scrapes; here any address of the
loopback network stands for it), 127.0.0.1 only that one; `k8s render` refuses an address a
pod's Prometheus cannot reach."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dml_cluster.config import load_config
from dml_cluster.errors import ConfigError
from dml_cluster.k8s.pod import metrics_port
from dml_cluster.metrics import metrics_observers

from .conftest import REPO
from .metrics_helpers import scrape

CONFIG = REPO / "configs" / "digits-dml.yaml"
ELSEWHERE = "127.0.0.2"  # another address of this machine (all of 127.0.0.0/8 is loopback)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize(("address", "elsewhere"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_the_endpoint_binds_the_configured_address(
    tmp_path: Path, address: str, elsewhere: bool
) -> None:
    cfg = load_config(
        CONFIG, [f"run.out_dir={tmp_path}", "metrics.port=0", f"metrics.address={address}"]
    )
    with metrics_observers(cfg, (0, 1), "x") as (exporter,):
        assert exporter._server.server_address[0] == address  # the socket's own address
        assert "dml_run_info" in scrape(f"http://127.0.0.1:{exporter.port}/metrics")
        assert _reachable(ELSEWHERE, exporter.port) is elsewhere


def test_k8s_render_takes_only_an_address_that_binds_every_interface(tmp_path: Path) -> None:
    for address in ("0.0.0.0", "'::'"):  # quoted: bare, YAML reads :: as no string
        cfg = load_config(CONFIG, [f"metrics.address={address}"])
        assert metrics_port(cfg) == 9400
    cfg = load_config(CONFIG, ["metrics.address=127.0.0.1"])
    with pytest.raises(ConfigError) as refused:
        metrics_port(cfg)
    assert str(refused.value) == (
        "config error: metrics.address: 127.0.0.1 cannot be scraped in Kubernetes: Prometheus "
        "scrapes the pod's IP, given when the pod starts; bind every interface (the default "
        "0.0.0.0, or ::)"
    )
