"""The one-line user-error convention shared by every entry point.

Bad input (a flag, a path, a file) raises ``UserInputError`` with one line that says what went wrong, where, and what
to do; the entry point prints it as ``<program>: error: <message>`` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback


class UserInputError(Exception):
    """Bad user input (a flag, a path, a file): one clear line, turned into exit code 2 by the entry point."""


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr, ``<prog>: error: <message> (see --help)``, and exit code 2 (argparse's
    default adds the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_internal_error(program: str, exc: BaseException, log_path: str | None = None) -> int:
    """The last resort of an entry point: an unexpected exception becomes one line on stderr,
    ``<program>: internal error: <type>: <message>; the traceback is in <file>``, and exit code 1.

    The traceback is appended to ``log_path`` (the run's out.log) when it is given and writable, else written to a
    new file in the system's temporary folder; it never goes to the console."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = None
    if log_path:
        try:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(text)
            where = log_path
        except OSError:
            where = None
    if where is None:
        try:
            fd, where = tempfile.mkstemp(prefix=f"{os.path.splitext(program)[0]}-traceback-", suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            where = "(nowhere: the temporary folder is not writable)"
    message = " ".join(str(exc).split()) or "(no message)"
    print(f"{program}: internal error: {type(exc).__name__}: {message}; the traceback is in {where}", file=sys.stderr)
    return 1
