"""The gallery of retrieve.py on disk: the scan of its folder (``scan_gallery``) and the atomic writes of every
output file (``write_file``). The index that keeps the gallery's features between calls is ``gallery_index``."""
from __future__ import annotations

import os
import stat
from typing import Any, Callable

from checkpoint import atomic_write, write_failed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def scan_gallery(folder: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """``(images, skipped)``: ``(relative path with '/', size, mtime_ns)`` of every image file under ``folder`` (a
    regular file, or a symbolic link to one), sorted by path; and the relative paths of the other entries named
    like images (FIFOs, sockets, devices, dangling links, folders), which are never opened (reading a FIFO would
    wait for a writer for ever)."""
    found, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files + dirs:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            try:
                st = os.stat(full)  # follows a symbolic link
            except OSError:  # a dangling link, a link loop
                st = None
            if st is not None and stat.S_ISREG(st.st_mode):
                found.append((rel, st.st_size, st.st_mtime_ns))
            else:
                skipped.append(rel)
    found.sort()
    return found, sorted(skipped)


def write_file(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """``atomic_write(path, write, mode)`` after creating the missing folders above ``path`` (``mkdir -p``); a
    failure (a full disk, a write error) raises ``WriteFailed`` naming the file, which is left as it was."""
    advice = ("the earlier file of that name, if any, is unchanged: free some space or pick another place, and run "
              "it again")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        raise write_failed(path, exc, advice) from None
    atomic_write(path, write, mode=mode, advice=advice)
