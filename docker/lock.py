"""Pin the image's Python dependencies: the closure of dml-cluster's runtime requirements, at the
versions installed in this environment (the ones the tests ran with). torch and torchvision are not
pinned here: they come with the PyTorch base image.

    .venv/bin/python docker/lock.py > docker/requirements.txt
"""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PROVIDED_BY_BASE = {"torch", "torchvision"}  # the PyTorch image carries its torchvision
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, tuple[str, str]]:
    """canonical name -> (name, installed version), for every runtime dependency."""
    found: dict[str, tuple[str, str]] = {}

    def walk(name: str) -> None:
        key = canonical(name)
        if key in found or key in PROVIDED_BY_BASE:
            return
        dist = distribution(name)
        found[key] = (dist.metadata["Name"], dist.version)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                walk(req.name)

    for text in project_dependencies():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            walk(req.name)
    return found


def project_dependencies() -> list[str]:
    """The runtime requirements as pyproject.toml states them (installed metadata can lag)."""
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def main() -> None:
    print("# The image's pinned Python dependencies (torch comes with the base image).")
    print("# Regenerate: .venv/bin/python docker/lock.py > docker/requirements.txt")
    for _, (name, version) in sorted(closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
