"""Errors a user can act on: printed as one line by the CLI, never as a traceback."""

from __future__ import annotations


class DmlError(Exception):
    """Base class: the message is the whole story; `exit_code` is what the process returns."""

    exit_code: int = 1


class ConfigError(DmlError):
    """The experiment config is invalid (unknown key, wrong type, impossible value)."""

    exit_code = 2


class DataError(DmlError):
    """A dataset is missing, truncated or malformed."""

    exit_code = 2


class InputError(DmlError):
    """A command's input cannot be used: a folder that is not a run, a log that is not JSON, a
    run folder that takes no files. Permanent (1-127): a person has to choose another."""

    exit_code = 2


class PeerError(DmlError):
    """Another peer of the cohort stopped answering, or sent something unusable.

    Exit codes 128-255 are retried by Kubeflow's `restartPolicy: ExitCode` and a lost peer is
    worth retrying, so this one is in that range.
    """

    exit_code = 200


class CheckpointError(DmlError):
    """A checkpoint cannot be written or used: corrupt, from another config, disk full.

    Permanent (1-127): retrying cannot fix it, a person has to look.
    """

    exit_code = 2


class ReportedElsewhere(DmlError):
    """An error every peer process met alike, reported by one of them (`signals.local_reporter`):
    the others exit with its status and print nothing."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("")
        self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message, for a one-line error that quotes it (torch's and
    users' exceptions often span many lines); the name of its type when it has no message."""
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


def typed_first_line(err: BaseException) -> str:
    """`Type: first line` of `err` (just `Type` when it has no message): for an exception from
    a user's code, whose type says as much as its message."""
    name = type(err).__name__
    lines = str(err).strip().splitlines()
    return f"{name}: {lines[0].strip()}" if lines else name
