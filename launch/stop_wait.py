"""Print how long torchrun should wait for its peers after passing a SIGTERM on (their checkpoint
save, checkpoint.on_signal.grace_s, plus a margin): `stop_wait.py CONFIG [--set KEY=VALUE ...]`,
for TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's default, 30 s, would cut a longer grace).
A bad config is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from cohort_size import overrides

from dml_cluster.config import load_config
from dml_cluster.errors import DmlError
from dml_cluster.preemption import launcher_wait_s


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: stop_wait.py CONFIG [--set KEY=VALUE ...]")
    try:
        print(launcher_wait_s(load_config(sys.argv[1], overrides(sys.argv[2:]))))
    except DmlError as err:
        print(f"dml-cluster: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
