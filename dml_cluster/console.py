"""How a dml-cluster process writes to its terminal or log: every line in one write.

Python's `print` writes the text and its newline separately when the stream writes through
(stderr always, stdout under PYTHONUNBUFFERED): peer processes sharing a terminal or a pod's log
then interleave mid-line. Assembled whole, a line shorter than the pipe's atomic size (4 KiB)
reaches a shared pipe or terminal in one piece.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO


def write_whole_lines() -> None:
    """Make stdout and stderr hand the OS each line whole (line buffering instead of writing
    through), for the rest of the process."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(line_buffering=True, write_through=False)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (a live display), not a file, pipe or log."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def say(line: str, stream: TextIO | None = None) -> None:
    """Write one line (newline added) to `stream` (default stderr) as a single write."""
    stream = stream if stream is not None else sys.stderr
    stream.write(line + "\n")
    stream.flush()
