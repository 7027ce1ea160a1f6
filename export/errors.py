"""The one exception the exporter raises for anything a user can fix: its message is one line."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot go on; `str(e)` says why in one line (the CLI prints only that)."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
