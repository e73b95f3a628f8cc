"""`python -m dml_cluster` (what torchrun starts in each peer process): the CLI, then an exit
without the interpreter's teardown (dml_cluster/process_exit.py)."""

from dml_cluster.cli import main
from dml_cluster.process_exit import run_then_end


def run() -> None:
    """The `dml-cluster` command."""
    run_then_end(main)


if __name__ == "__main__":
    run()
