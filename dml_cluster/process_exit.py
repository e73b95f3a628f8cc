"""How a dml-cluster process ends once its command is done: without the interpreter's teardown.

Tearing down an interpreter that imported torch (every optimizer brings torch._dynamo with it)
frees its modules one by one and garbage-collects hundreds of thousands of objects: one to
several seconds of CPU per process, after the last file was written. Every peer process and
launcher paid it, and a lost peer's survivor paid it before the launcher could restart the
cohort. `end_process` keeps what an orderly exit does that matters (threading's exit hooks run
and non-daemon threads joined, atexit handlers run: loggers finish, multiprocessing stops its
children; stdout and stderr flushed) and skips the rest. Files are closed where they are
written (with-blocks, line-buffered logs), never by the teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def _join_threads() -> None:
    """What an exiting interpreter does first (`threading._shutdown`): threading's own exit
    hooks, then every non-daemon thread joined. The hooks matter: a `concurrent.futures` pool's
    workers (torch.compile's inductor compiles in one) wait for work until its hook tells them
    to end, so joining them without it waits for ever."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():  # an interpreter without it: the threads alone
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()


def end_process(code: int) -> NoReturn:
    """Exit with `code` now: end threads as the interpreter does (`_join_threads`), run atexit
    handlers, flush stdout and stderr, then `os._exit` (no module teardown)."""
    _join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_status(done: SystemExit) -> int:
    """The status the interpreter exits with for `done` (a message: printed on stderr, 1)."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1


def run_then_end(entry: Callable[[], object]) -> NoReturn:
    """Run a process's entry point, then `end_process` with the status it exits with (an
    exception other than SystemExit escapes as usual: traceback, status 1)."""
    try:
        entry()
    except SystemExit as done:
        end_process(exit_status(done))
    end_process(0)
