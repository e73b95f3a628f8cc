"""A real multi-host run on one machine: two network namespaces joined by a veth pair, each with
its own host name and hosts file, one torchrun agent in each, c10d rendezvous across the link.

The 2-peer cohort exchanges over the zmq bus between the two addresses and must finish with the
one-process engine's weights; every peer must have bound its inbox on its host's veth address
(a loopback inbox could not be reached from the other host). Run as root (CI is); where network
namespaces cannot be made the tests skip and say why (DML_REQUIRE_NETNS=1 makes that a failure).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, assert_same_states, run_cli
from .k8s_helpers import (
    CONFIG,
    RUN,
    SETS,
    Pod,
    find,
    indexed_job_pods,
    load_dir,
    one_process_reference,  # noqa: F401 - the `reference` fixture
    start,
    wait_all,
)

ADDRESSES = ("10.231.0.1", "10.231.0.2")
ENDPOINT = re.compile(r"bus inbox tcp://([0-9.]+):\d+")


@dataclass
class Hosts:
    """Two network hosts: namespace i has ADDRESSES[i] on its end of the veth pair."""

    namespaces: tuple[str, str]
    ip: str
    unshare: str

    def write_hosts_file(self, lines: list[str]) -> None:
        """What each host resolves names with (`ip netns exec` mounts it over /etc/hosts)."""
        for ns in self.namespaces:
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(["127.0.0.1 localhost", *lines]) + "\n")

    def wrap(self, index: int, hostname: str) -> list[str]:
        """Run a command on host `index`: its network namespace, its own host name."""
        set_name = 'hostname "$0" && exec "$@"'
        return [
            self.ip, "netns", "exec", self.namespaces[index],
            self.unshare, "--uts", "sh", "-c", set_name, hostname,
        ]  # fmt: skip


def _cannot(reason: str) -> None:
    if os.environ.get("DML_REQUIRE_NETNS") == "1":
        pytest.fail(f"network namespaces are required here: {reason}")
    pytest.skip(f"cannot make network namespaces: {reason}")


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    ip, unshare = shutil.which("ip"), shutil.which("unshare")
    if ip is None or unshare is None:
        _cannot("`ip` (iproute2) or `unshare` (util-linux) is not installed")
    if os.geteuid() != 0:
        _cannot("not running as root")
    tag = f"{os.getpid() % 100000}"
    namespaces = (f"dmlt{tag}a", f"dmlt{tag}b")
    veth = (f"dmv{tag}a", f"dmv{tag}b")
    setup = [
        *[[ip, "netns", "add", ns] for ns in namespaces],
        [ip, "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]],
    ]
    for ns, dev, address in zip(namespaces, veth, ADDRESSES, strict=True):
        setup += [
            [ip, "link", "set", dev, "netns", ns],
            [ip, "-n", ns, "addr", "add", f"{address}/24", "dev", dev],
            [ip, "-n", ns, "link", "set", dev, "up"],
            [ip, "-n", ns, "link", "set", "lo", "up"],
        ]
    try:
        for command in setup:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                _cannot(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
        yield Hosts(namespaces, ip, unshare)
    finally:
        for ns in namespaces:
            subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run([ip, "link", "del", veth[0]], capture_output=True, timeout=30)


def run_on_hosts(hosts: Hosts, pods: list[Pod], hostnames: list[str], logs: Path) -> str:
    """Pod i on host i; returns every log, after checking that each pod exited 0."""
    procs = [
        start(pod, wrap=hosts.wrap(i, hostnames[i]), log_dir=logs) for i, pod in enumerate(pods)
    ]
    codes = wait_all(procs, timeout=240)
    text = "\n".join(f"== {p.name}\n{(logs / f'{p.name}.log').read_text()}" for p in pods)
    assert codes == [0] * len(pods), text[-6000:]
    return text


def check_bound_addresses(logs: str) -> None:
    """Each peer's inbox is on its own host's veth address: one on each, none on loopback."""
    assert sorted(ENDPOINT.findall(logs)) == sorted(ADDRESSES), logs[-4000:]


def test_launch_script_across_two_hosts(hosts: Hosts, reference: Path, tmp_path: Path) -> None:
    """launch/multinode.sh on each host, rendezvous at host 0's address."""
    hosts.write_hosts_file([f"{ADDRESSES[0]} host0", f"{ADDRESSES[1]} host1"])
    out = tmp_path / "runs"
    pods = []
    for rank in range(2):
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHON": sys.executable,
            "NNODES": "2",
            "NODE_RANK": str(rank),
            "RDZV_ENDPOINT": f"{ADDRESSES[0]}:29400",
            "RDZV_ID": "netns-test",
        }
        argv = [str(REPO / "launch" / "multinode.sh"), str(CONFIG), *SETS]
        pods.append(Pod(f"host{rank}", [*argv, "--set", f"run.out_dir={out}"], env, REPO))
    logs = run_on_hosts(hosts, pods, ["host0", "host1"], tmp_path)
    check_bound_addresses(logs)
    assert_same_states(out / RUN, reference)


def test_indexed_job_pods_across_two_hosts(hosts: Hosts, reference: Path, tmp_path: Path) -> None:
    """The rendered Indexed Job's pods, named and resolved as Kubernetes names them: pod i is
    host i, and the rendezvous is pod 0's DNS name from the manifest."""
    keys = run_cli("keys", "generate", str(tmp_path / "manifests"), "--k8s-secret", f"{RUN}-curve")
    assert keys.returncode == 0, keys.stderr  # the Secret of CURVE keys the pods mount
    result = run_cli(
        "k8s", "render", str(CONFIG), *SETS, "--image", "dml-cluster:test",
        "--engine", "indexed-job", "--gpus-per-peer", "0", "--out", str(tmp_path / "manifests"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifests = load_dir(tmp_path / "manifests")
    job = find(manifests, "Job")
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    subdomain = job["spec"]["template"]["spec"]["subdomain"]
    hostnames = [f"{name}-{i}" for i in range(2)]
    # kubelet's hosts line for a pod with a subdomain: the FQDN first, then the host name
    hosts.write_hosts_file(
        [
            f"{address} {host}.{subdomain}.{namespace}.svc.cluster.local {host}"
            for address, host in zip(ADDRESSES, hostnames, strict=True)
        ]
    )
    pods = indexed_job_pods(manifests, tmp_path / "pods", hosts={})
    logs = run_on_hosts(hosts, pods, hostnames, tmp_path)
    check_bound_addresses(logs)
    assert_same_states(tmp_path / "pods" / "workspace" / "runs" / RUN, reference)
