"""The one-line error helpers: a multi-line exception message is quoted by its first line."""

from __future__ import annotations

from dml_cluster.errors import first_line, typed_first_line


def test_a_multi_line_message_is_quoted_by_its_first_line() -> None:
    err = RuntimeError("\n  Error(s) in loading state_dict  \nMissing key(s): 'fc.weight'\n")
    assert first_line(err) == "Error(s) in loading state_dict"
    assert typed_first_line(err) == "RuntimeError: Error(s) in loading state_dict"


def test_an_empty_message_is_named_by_its_type() -> None:
    for err in (KeyError(), ValueError(""), OSError("  \n ")):
        assert first_line(err) == type(err).__name__
        assert typed_first_line(err) == type(err).__name__
