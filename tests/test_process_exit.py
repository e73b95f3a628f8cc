"""How a dml-cluster process ends (dml_cluster/process_exit.py): without the interpreter's
teardown, but with what an orderly exit does that matters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import REPO


def test_a_process_with_a_thread_pool_ends_at_once() -> None:
    """A `concurrent.futures` pool's idle workers (torch.compile's inductor leaves one behind
    after compiling) end when threading's exit hook tells them to: `end_process` runs it before
    joining the threads, as the interpreter does, instead of waiting on them for ever (a CPU
    run with run.compile hung at its end so). Its atexit handlers run, its status is kept."""
    script = textwrap.dedent(
        """
        import atexit, concurrent.futures
        from dml_cluster.process_exit import run_then_end

        def entry():
            pool = concurrent.futures.ThreadPoolExecutor(2)
            assert pool.submit(sum, [1, 2]).result() == 3  # a worker started, now idle
            atexit.register(print, "atexit ran")
            raise SystemExit(3)

        run_then_end(entry)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "atexit ran\n"
