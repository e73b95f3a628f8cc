"""Pin the image's Python dependencies: the closure of dml-cluster's runtime requirements, at the
versions installed in this environment (the ones the tests ran with). torch is not pinned here:
it comes with the PyTorch base image.

    .venv/bin/python docker/lock.py > docker/requirements.txt
"""

from __future__ import annotations

import re
from importlib.metadata import distribution

from packaging.requirements import Requirement

PROVIDED_BY_BASE = {"torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "dml-cluster") -> dict[str, tuple[str, str]]:
    """canonical name -> (name, installed version), for every runtime dependency of `root`."""
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

    for text in distribution(root).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            walk(req.name)
    return found


def main() -> None:
    print("# The image's pinned Python dependencies (torch comes with the base image).")
    print("# Regenerate: .venv/bin/python docker/lock.py > docker/requirements.txt")
    for _, (name, version) in sorted(closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
