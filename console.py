"""The console of a run and its out.log: console lines (``echo``), log records on stderr that never glue onto a
progress bar (``TqdmLogHandler``), training progress lines (``progress_to_logs``), the out.log handler of every
open run (``OutLog``, which survives a full disk with one warning), and the last line of a run that ended
(``print_last``)."""
from __future__ import annotations

import contextlib
import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("main")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
open_out_logs: list[OutLog] = []  # the out.log of every open run
_ended_out_logs: list[str] = []  # the paths of the out.log files of the runs that ended, in that order


def echo(line: str) -> None:
    """Prints a console line on stdout (on a line of its own, never glued onto a progress bar) and appends it to
    the out.log of every open run."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()  # a log file that holds stdout and stderr keeps them in order
    to_out_logs(line)


def to_out_logs(line: str) -> None:
    """Appends ``line`` to the out.log of every open run (``OutLog.write_line``)."""
    for handler in open_out_logs:
        handler.write_line(line)


def progress_to_logs(line: str, console: bool) -> None:
    """A training progress line (``progress.progress_line``): into every open out.log and, with ``console`` (no
    progress bar on stderr: it is not a terminal), on stderr."""
    if console:
        tqdm.write(line, file=sys.stderr)
    to_out_logs(line)


def print_last(line: str) -> None:
    """The last line of a run that ended (an interruption): on stderr, and appended to the out.log of the run that
    ended last, so that ``tail -f out.log`` ends with it too."""
    print(line, file=sys.stderr)
    if _ended_out_logs:
        with contextlib.suppress(OSError), open(_ended_out_logs[-1], "a", encoding="utf-8") as f:
            f.write(line + "\n")


class OutLog(logging.FileHandler):
    """A run's out.log: its log records and console lines. A write error (a full disk) is reported once, as one
    WARNING on the console naming the file, and every later line is dropped: never logging's own traceback per
    line."""

    def __init__(self, path: str):
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self._fail(sys.exc_info()[1])

    def write_line(self, line: str) -> None:
        """``line`` as it is (no time stamp), flushed."""
        if self.failed:
            return
        self.acquire()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except OSError as exc:
            self._fail(exc)
        finally:
            self.release()

    def flush(self) -> None:
        if self.failed:
            return
        try:
            super().flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = True
        reason = (getattr(exc, "strerror", None) or exc) if exc is not None else "a write error"
        logger.warning("%s can no longer be written (%s); the run goes on, its lines only on the console",
                       self.baseFilename, reason)


class TqdmLogHandler(logging.StreamHandler):
    """Logging on stderr through ``tqdm.write``: a log line never glues onto a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


class LogBuffer(logging.Handler):
    """Keeps the log records of a run's start, for its out.log (the folder is created after the inputs are checked)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def out_log_ended(handler: OutLog) -> None:
    """``handler``'s run ended: its out.log gets no more console lines, but ``print_last``'s line."""
    if handler in open_out_logs:
        open_out_logs.remove(handler)
    _ended_out_logs.append(handler.baseFilename)
