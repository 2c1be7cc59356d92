"""The gallery of retrieve.py on disk: the scan of its folder (``scan_gallery``), the index file that keeps its
features between calls (``load_index``, ``save_index``; its format and checks), and the atomic writes of every
output file (``write_file``)."""
from __future__ import annotations

import hashlib
import os
import stat
import sys
from typing import Any, Callable, Sequence

import torch

from checkpoint import atomic_write, write_failed
from errors import UserInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INDEX_FORMAT = "composeae-retrieve-index/1"  # see save_index
INDEX_FORMAT_FAMILY = "composeae-retrieve-index/"  # every version's format starts so: such a file may be replaced


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


def file_sha256(path: str) -> str:
    """The SHA-256 of the file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index_file(path: str) -> dict | None:
    """The contents of the index file ``path`` as saved (features memory-mapped: read as the ranking touches
    them), None when there is none. A file that is not a retrieve.py index of any format version (a checkpoint, a
    text file, a torn file) raises UserInputError and is left as it is: ``--index`` never replaces it."""
    if not path or not os.path.lexists(path):
        return None
    try:
        index = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        reason = ""
    except Exception as exc:  # torch.load raises many types for a file that is not its zip format
        index, reason = None, f" ({type(exc).__name__})"
    fmt = index.get("format") if isinstance(index, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(INDEX_FORMAT_FAMILY)):
        raise UserInputError(f"--index {path} is not a gallery index of retrieve.py{reason}, so it is not replaced; "
                             f"pass the path of an index, or a new file for one")
    return index


def _index_problem(index: dict) -> str:
    """What is wrong with the contents of an index whose format and identity match ('' for nothing): the types,
    dtypes and shapes ``save_index`` writes, and finite features."""
    files = index.get("files")
    if not isinstance(files, str):
        return f"'files' is a {type(files).__name__}, not a string"
    n = len(files.split("\0")) if files else 0
    for key, dtype, dims in (("sizes", torch.int64, 1), ("mtimes", torch.int64, 1), ("features", torch.float32, 2)):
        value = index.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != dims:
            kind = f"{value.dtype} tensor of {value.dim()} dimensions" if isinstance(value, torch.Tensor) \
                else type(value).__name__
            return f"'{key}' is a {kind}, not a {dtype} tensor of {dims} dimension{'s' if dims > 1 else ''}"
        if value.shape[0] != n:
            return f"'{key}' has {value.shape[0]} rows for {n} files"
    if n and index["features"].shape[1] == 0:
        return "'features' has no columns"
    if not bool(torch.isfinite(index["features"]).all()):
        return "'features' hold NaN or infinite values"
    return ""


def load_index(path: str, identity: dict) -> dict | None:
    """The index at ``path`` if it is of ``INDEX_FORMAT``, was built with ``identity`` and its contents are sound
    (``_index_problem``), with ``files`` a list and ``sizes``/``mtimes`` lists of ints; None (after a one-line
    notice) otherwise. A file that is not an index raises UserInputError (``read_index_file``)."""
    index = read_index_file(path)
    if index is None:
        return None
    if index["format"] != INDEX_FORMAT:
        print(f"retrieve.py: {path} is a gallery index of another version of retrieve.py ({index['format']}); "
              f"rebuilding it", file=sys.stderr)
        return None
    if index.get("identity") != identity:
        old = index.get("identity") if isinstance(index.get("identity"), dict) else {}
        changed = [k for k in identity if old.get(k) != identity[k]]
        print(f"retrieve.py: {path} was built with another {', '.join(changed)}; rebuilding it", file=sys.stderr)
        return None
    problem = _index_problem(index)
    if problem:
        print(f"retrieve.py: {path} is damaged ({problem}); rebuilding it", file=sys.stderr)
        return None
    index["files"] = index["files"].split("\0") if index["files"] else []
    index["sizes"], index["mtimes"] = index["sizes"].tolist(), index["mtimes"].tolist()
    return index


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


def save_index(path: str, identity: dict, files: Sequence[tuple[str, int, int]], feats: torch.Tensor) -> None:
    """Writes the index atomically: the identity, the files (relative paths joined by NUL, which no file name
    holds), their sizes and mtimes (int64) and their L2-normalised features (G, D) fp32."""
    state = {"format": INDEX_FORMAT, "identity": identity, "files": "\0".join(f[0] for f in files),
             "sizes": torch.tensor([f[1] for f in files], dtype=torch.int64),
             "mtimes": torch.tensor([f[2] for f in files], dtype=torch.int64), "features": feats.contiguous()}
    write_file(path, lambda f: torch.save(state, f))
