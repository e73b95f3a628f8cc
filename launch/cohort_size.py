"""Print the processes a cohort takes: `cohort_size.py CONFIG [--set KEY=VALUE ...]`.

The launch scripts start one process per peer, K x D with `cohort.replicas: D` (each peer
data-parallel over D processes, ranks peer-major); the config, read exactly as `dml-cluster
train` reads it, says how many. A bad config is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from dml_cluster.config import load_config
from dml_cluster.errors import DmlError


def overrides(args: list[str]) -> list[str]:
    found, rest = [], list(args)
    while rest:
        flag = rest.pop(0)
        if flag == "--set" and rest:
            found.append(rest.pop(0))
        elif flag.startswith("--set="):
            found.append(flag.removeprefix("--set="))
    return found


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: cohort_size.py CONFIG [--set KEY=VALUE ...]")
    try:
        cfg = load_config(sys.argv[1], overrides(sys.argv[2:]))
        print(len(cfg.peers) * cfg.cohort.replicas)
    except DmlError as err:
        print(f"dml-cluster: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
