"""The one-line user-error convention shared by every entry point.

Bad input (a flag, a path, a file) raises ``UserInputError`` with one line that says what went wrong, where, and what
to do; the entry point prints it as ``<program>: error: <message>`` on stderr and exits with code 2.
"""
from __future__ import annotations


class UserInputError(Exception):
    """Bad user input (a flag, a path, a file): one clear line, turned into exit code 2 by the entry point."""
