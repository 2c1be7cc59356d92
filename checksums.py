"""The ``checksums.sha256`` of a run folder: the SHA-256 of every checkpoint ``runlog.Run.save`` writes there, in
the format ``sha256sum -c`` checks (``<64 hex>  <file name>`` per line), and the check of a checkpoint against it
(``verify_checkpoint``) that --test_only, --resume, retrieve.py and demo.py make before they read one.

A save (``checkpoint.save_checkpoint`` with a ``ChecksumFile``) lists the new digest before the checkpoint's temp
file is renamed into place, keeping the name's old line, and drops the old line after the rename. A process killed
at any moment therefore leaves a checkpoint, old or new, whose digest is listed; between the two steps a name has
two lines (which ``sha256sum -c`` reports as one failure), and a checkpoint matches when its digest is any line of
its name. After a completed save ``sha256sum -c checksums.sha256`` passes.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Callable, TypeVar

from checkpoint import atomic_write
from errors import UserInputError
from provenance import file_sha256

CHECKSUMS_NAME = "checksums.sha256"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")  # sha256sum's text (' ') and binary ('*') modes
# Tests only: called with each step of a save just done: "temp written", "checksum added", "renamed", "stale dropped"
_AFTER_STEP: Callable[[str], None] | None = None

logger = logging.getLogger("checksums")
T = TypeVar("T")
READ_TRIES = 3  # reads of a checkpoint that a running training keeps replacing, before giving up


def _step(name: str) -> None:
    if _AFTER_STEP is not None:
        _AFTER_STEP(name)


class ChecksumFile:
    """``<folder>/checksums.sha256``: its lines as ``(digest, name)`` pairs, read and rewritten whole (atomically,
    a failed write raising ``checkpoint.WriteFailed`` with ``advice``). One process writes a run folder
    (``runlog.RunLock``), so a read-modify-write needs no lock."""

    def __init__(self, folder: str, advice: str = "the file there is unchanged"):
        self.folder, self.advice = folder, advice
        self.path = os.path.join(folder, CHECKSUMS_NAME)

    def entries(self) -> list[tuple[str, str]]:
        """``(digest in lower case, name)`` of every well-formed line, in order ([] where there is no file); an
        unreadable file is a UserInputError naming it."""
        try:
            with open(self.path, encoding="utf-8-sig", errors="replace") as f:  # a leading BOM is dropped
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserInputError(f"{self.path} cannot be read ({exc.strerror or exc}); remove it, or pass "
                                 f"--ignore_checksum True") from None
        return [(m.group(1).lower(), m.group(2)) for m in map(_LINE.match, lines) if m]

    def digests(self, name: str) -> list[str]:
        """The digests listed for file ``name`` (two while its save is between ``add`` and ``drop_stale``)."""
        return [d for d, n in self.entries() if n == name]

    def _write(self, entries: list[tuple[str, str]]) -> None:
        text = "".join(f"{d}  {n}\n" for d, n in entries)
        atomic_write(self.path, lambda f: f.write(text), mode="w", advice=self.advice)

    def add(self, name: str, digest: str) -> None:
        """Lists ``digest`` for ``name`` beside its old line (called once the new file is written to its temp file,
        before the rename). A file of that name that is not listed yet (written before this folder had a checksums
        file) gets its own digest listed too, so that it stays accepted until the rename."""
        if "\n" in name or "\\" in name or name != os.path.basename(name):
            raise ValueError(f"{name!r}: a checksums file lists plain file names of its folder")
        _step("temp written")
        entries, existing = self.entries(), os.path.join(self.folder, name)
        if not any(n == name for _, n in entries) and os.path.isfile(existing):
            entries.append((file_sha256(existing), name))
        if (digest.lower(), name) not in entries:  # beside the name's old line: the file keeps its order
            at = max((i + 1 for i, (_, n) in enumerate(entries) if n == name), default=len(entries))
            entries.insert(at, (digest.lower(), name))
        self._write(entries)
        _step("checksum added")

    def drop_stale(self, name: str, digest: str) -> None:
        """Keeps only ``digest`` for ``name`` (called after the rename): ``sha256sum -c`` then passes."""
        _step("renamed")
        kept = [(d, n) for d, n in self.entries() if n != name or d == digest.lower()]
        if (digest.lower(), name) not in kept:
            kept.append((digest.lower(), name))
        self._write(kept)
        _step("stale dropped")


def verify_checkpoint(path: str, ignore: bool = False) -> str | None:
    """The SHA-256 (hex) of checkpoint ``path``, checked against the ``checksums.sha256`` beside it where that file
    lists its name; None where there is no file at ``path`` (its reader says so).

    A digest that is none of the listed ones is a UserInputError naming the file and both digests, unless
    ``ignore`` (--ignore_checksum True): then one warning. A name that is not listed (a checkpoint copied out of
    its run folder, or the original code's) is accepted.
    """
    if not os.path.isfile(path):
        return None
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise UserInputError(f"checkpoint {path} cannot be read ({exc.strerror or exc}); pass a readable "
                             f"checkpoint") from None
    try:
        real = os.path.realpath(path)  # a link elsewhere is checked against the folder of the file it names
        listed = ChecksumFile(os.path.dirname(real)).digests(os.path.basename(real))
    except UserInputError:
        if ignore:
            return digest
        raise
    if not listed or digest in listed:
        return digest
    line = (f"checkpoint {path}: SHA-256 {digest} does not match {CHECKSUMS_NAME} ({' or '.join(listed)}); it "
            f"changed after it was written")
    if not ignore:
        raise UserInputError(f"{line}: pass --ignore_checksum True to use it anyway")
    logger.warning("%s; used anyway (--ignore_checksum True)", line)
    return digest


def _identity(path: str) -> tuple | None:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time (None: absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_verified(path: str, ignore: bool, read: Callable[[], T]) -> tuple[str | None, T]:
    """``(digest, read())``: checkpoint ``path`` checked against its checksums file (``verify_checkpoint``) and read
    by ``read``, both of the same file. A training run may rename a new latest_checkpoint.pth into place between the
    hash and the read; then both are done again (up to ``READ_TRIES`` times), so the digest is always that of the
    weights read."""
    for _ in range(READ_TRIES):
        before = _identity(path)
        digest = verify_checkpoint(path, ignore)
        result = read()
        if _identity(path) == before:
            return digest, result
    raise UserInputError(f"checkpoint {path} was replaced {READ_TRIES} times while it was read (a run is writing "
                         f"it); copy it elsewhere, or wait for that run to end")
