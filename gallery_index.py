"""The gallery index of retrieve.py on disk: a manifest, a raw feature file, and a FAISS index file beside them.

``--index PATH`` names the manifest, a JSON object::

    {"format": "composeae-retrieve-index/2", "identity": {"checkpoint_sha256", "image_size", "model"},
     "dtype": "float32" | "float16", "dim": D, "rows": G, "feature_file": "<PATH's name>.<token>.f32",
     "faiss": null | {"file", "feature_file", "spec", "nprobe", "recall_at_10", "recall_queries", "build_s"},
     "files": [[relative path, size, mtime_ns], ...]}

The feature file (``feature_store``) holds the L2-normalised features of ``files`` in that order (sorted paths),
one row each. A new feature file gets a new token, and the manifest is replaced atomically after it is complete,
so a reader always finds a complete index; superseded feature and FAISS files are removed then.

Building is resumable: the rows of the images to encode are appended to ``<PATH>.build-<token>.f32`` in chunks of
``BUILD_CHUNK``, and after each chunk (rows on disk first) the progress record ``<PATH>.build.json`` is replaced
atomically: the plan (``<PATH>.build-<token>.plan``, written once), the rows it covers, the unreadable ones. A
build that was stopped continues after the last recorded row; only recorded rows are trusted. The features are then
assembled in gallery order (old rows that still apply, new rows) into a new feature file. One process at a time
updates an index (``fcntl.flock`` on ``<PATH>.lock``): a second waits, then finds the index up to date.

A file at PATH that is not a manifest of any format version (``INDEX_FORMAT_FAMILY``) is never replaced."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

import ann
from checkpoint import WriteFailed, atomic_write
from errors import UserInputError
from feature_store import DTYPES, SUFFIX, FeatureFile, FeatureWriter, memory_map

INDEX_FORMAT = "composeae-retrieve-index/2"
INDEX_FORMAT_FAMILY = "composeae-retrieve-index/"  # every version's format starts so: such a file may be replaced
BUILD_CHUNK = 2048  # images encoded, written and recorded at a time by a build
FileEntry = tuple[str, int, int]  # (relative path with '/', size, mtime_ns)
Encoder = Callable[[list[str]], tuple[torch.Tensor, set[int]]]  # paths -> (normalised rows (n, D), unreadable)


def notice(message: str) -> None:
    """One ``retrieve.py:`` line on stderr."""
    print(f"retrieve.py: {message}", file=sys.stderr)


def _sibling(path: str, name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def _owned(path: str) -> re.Pattern:
    """The names of the files beside the manifest ``path`` that the index makes (and may remove)."""
    base = re.escape(os.path.basename(path))
    return re.compile(rf"{base}\.(?:[0-9a-f]{{16}}\.(?:f32|f16|faiss)|build-[0-9a-f]{{16}}\.(?:plan|f32|f16)"
                      rf"|build\.json)")


def _write(path: str, text: str, durable: bool) -> None:
    """``text`` into ``path``: atomically and flushed to disk when ``durable`` (``WriteFailed`` on a failure)."""
    try:
        if durable:
            atomic_write(path, lambda f: f.write(text), mode="w")
        else:
            with open(path, "w") as f:
                f.write(text)
    except OSError as exc:
        raise WriteFailed(f"cannot write {path} ({exc.strerror or exc}); the earlier file of that name, if any, is "
                          f"unchanged: free some space or pick another place, and run it again") from None


def _manifest_text(meta: dict, files: Sequence[FileEntry]) -> str:
    """The manifest's JSON: ``meta`` indented, then one file entry a line."""
    head = json.dumps({k: v for k, v in meta.items() if k != "files"}, indent=1)
    body = ",\n".join(json.dumps([p, int(s), int(m)]) for p, s, m in files)
    return f"{head[:-2]},\n \"files\": [\n{body}\n ]\n}}\n"


# ----------------------------------------------------------------------------------------------------------------
# Reading a manifest
# ----------------------------------------------------------------------------------------------------------------

def _parse(path: str) -> tuple[Any, str]:
    """The manifest (JSON) or an index of an earlier format (a torch file) at ``path``; ``(None, reason)`` for
    neither."""
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"{":
                f.seek(0)
                return json.loads(f.read().decode("utf-8")), ""
    except (OSError, ValueError) as exc:
        return None, f" ({type(exc).__name__})"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), ""
    except Exception as exc:  # torch.load raises many types for a file that is not its zip format
        return None, f" ({type(exc).__name__})"


def read_index_file(path: str) -> dict | None:
    """The manifest at ``path`` as a dict, None when there is none. A file that is not a retrieve.py index of any
    format version (a checkpoint, a text file, a torn file) raises UserInputError and is left as it is:
    ``--index`` never replaces it."""
    if not path or not os.path.lexists(path):
        return None
    index, reason = _parse(path)
    fmt = index.get("format") if isinstance(index, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(INDEX_FORMAT_FAMILY)):
        raise UserInputError(f"--index {path} is not a gallery index of retrieve.py{reason}, so it is not replaced; "
                             f"pass the path of an index, or a new file for one")
    return index


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_problem(index: dict, path: str) -> str:
    """What is wrong with a manifest whose format and identity match ('' for nothing): the fields' types, the
    feature file's name and size."""
    files = index.get("files")
    if not isinstance(files, list):
        return f"'files' is a {type(files).__name__}, not a list"
    for i, f in enumerate(files):
        if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and _is_int(f[1]) and _is_int(f[2])):
            return f"'files' entry {i} is not [path, size, mtime_ns] (a string and two integers)"
    if index.get("dtype") not in DTYPES:
        return f"'dtype' is {index.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    if not (_is_int(index.get("dim")) and index["dim"] >= 1):
        return f"'dim' is {index.get('dim')!r}, not a positive integer"
    if index.get("rows") != len(files):
        return f"'rows' is {index.get('rows')!r} for {len(files)} files"
    name = index.get("feature_file")
    if not (isinstance(name, str) and _owned(path).fullmatch(name) and name.endswith(SUFFIX[index["dtype"]])):
        return f"'feature_file' is {name!r}, not a feature file of this index"
    feature_path = _sibling(path, name)
    if not os.path.isfile(feature_path):
        return f"its feature file {name} is missing"
    rows = os.path.getsize(feature_path) // (index["dim"] * DTYPES[index["dtype"]].itemsize)
    if os.path.getsize(feature_path) != len(files) * index["dim"] * DTYPES[index["dtype"]].itemsize:
        return f"the feature file {name} holds {rows} rows for {len(files)} files"
    if index.get("faiss") is not None and not isinstance(index.get("faiss"), dict):
        return f"'faiss' is a {type(index['faiss']).__name__}, not an object"
    return ""


def load_index(path: str, identity: dict, dtype: str | None = None) -> dict | None:
    """The index at ``path`` if it is of ``INDEX_FORMAT``, was built with ``identity`` (and ``dtype``, when given)
    and its manifest is sound (``_manifest_problem``); None (after a one-line notice) otherwise. A file that is not
    an index raises UserInputError (``read_index_file``). The manifest's fields, with ``entries`` (the
    ``FileEntry`` tuples), ``files``, ``sizes`` and ``mtimes`` lists, ``feature_path``, and ``features``: the whole
    (G, D) matrix memory-mapped (``feature_store.memory_map``), for callers that rank it in memory."""
    index = read_index_file(path)
    if index is None:
        return None
    if index["format"] != INDEX_FORMAT:
        notice(f"{path} is a gallery index of another version of retrieve.py ({index['format']}); rebuilding it")
        return None
    if index.get("identity") != identity:
        old = index.get("identity") if isinstance(index.get("identity"), dict) else {}
        changed = [k for k in identity if old.get(k) != identity[k]]
        notice(f"{path} was built with another {', '.join(changed)}; rebuilding it")
        return None
    problem = _manifest_problem(index, path)
    if problem:
        notice(f"{path} is damaged ({problem}); rebuilding it")
        return None
    if dtype is not None and index["dtype"] != dtype:
        notice(f"{path} holds {index['dtype']} features, and --index_dtype is {dtype}; rebuilding it")
        return None
    entries = [(p, s, m) for p, s, m in index["files"]]
    feature_path = _sibling(path, index["feature_file"])
    return {**index, "entries": entries, "files": [e[0] for e in entries], "sizes": [e[1] for e in entries],
            "mtimes": [e[2] for e in entries], "feature_path": feature_path,
            "features": memory_map(feature_path, len(entries), index["dim"], index["dtype"])}


def open_features(index: dict, **kw) -> FeatureFile:
    """A ``FeatureFile`` reading the feature file of the loaded ``index`` (``load_index``)."""
    return FeatureFile(index["feature_path"], index["rows"], index["dim"], index["dtype"], **kw)


# ----------------------------------------------------------------------------------------------------------------
# Writing an index
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: str, enabled: bool = True) -> Iterator[None]:
    """Holds the exclusive lock ``<path>.lock`` (``fcntl.flock``; the kernel drops it when the process dies),
    after making the missing folders above ``path``."""
    if not enabled:
        yield
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteFailed(f"cannot write {path}.lock ({exc.strerror or exc}); pick another place for --index, and "
                          f"run it again") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _cleanup(path: str, keep: Sequence[str]) -> None:
    """Removes the files of the index ``path`` (``_owned``) that are not in ``keep``: superseded feature and FAISS
    files, a finished build's files. A reader that opened one still reads it (Linux keeps an open file)."""
    folder, owned = os.path.dirname(os.path.abspath(path)), _owned(path)
    for name in os.listdir(folder):
        if owned.fullmatch(name) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def _copy_rows(runs: Sequence[tuple[FeatureFile, int, int]], writer: FeatureWriter) -> None:
    """Appends the rows ``[row, row + n)`` of each ``(reader, row, n)`` to ``writer``, a reader's chunk at a time."""
    for reader, row, n in runs:
        for off in range(0, n, reader.rows_per_chunk):
            writer.append(reader.read_raw(row + off, min(reader.rows_per_chunk, n - off)))


def _runs(places: Sequence[tuple[FeatureFile, int]]) -> list[tuple[FeatureFile, int, int]]:
    """``(reader, first row, count)`` runs of consecutive rows of one reader, in the order of ``places``."""
    runs: list[list] = []
    for reader, row in places:
        if runs and runs[-1][0] is reader and runs[-1][1] + runs[-1][2] == row:
            runs[-1][2] += 1
        else:
            runs.append([reader, row, 1])
    return [tuple(r) for r in runs]


def commit(path: str, identity: dict, dtype: str, dim: int, kept: Sequence[FileEntry],
           places: Sequence[tuple[FeatureFile, int]], durable: bool = True,
           movable: FeatureFile | None = None) -> dict:
    """Writes the feature file of ``kept`` (row i from ``places[i]`` = (reader, row)) under a new token, then the
    manifest over ``path``, and removes the superseded files; returns ``load_index``'s dict of it. ``movable``: a
    build file that is renamed instead of copied when it holds exactly the rows, in order."""
    name = f"{os.path.basename(path)}.{secrets.token_hex(8)}.{SUFFIX[dtype]}"
    target = _sibling(path, name)
    runs = _runs(places)
    try:
        if (movable is not None and len(runs) == 1 and runs[0][0] is movable and runs[0][1] == 0
                and os.path.getsize(movable.path) == len(kept) * movable.row_bytes):
            os.rename(movable.path, target)
        else:
            with FeatureWriter(target, dim, dtype, durable=durable) as writer:
                _copy_rows(runs, writer)
                writer.sync()
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(target)
        raise WriteFailed(f"cannot write {target} ({exc.strerror or exc}); the index {path} is unchanged: free "
                          f"some space or pick another place, and run it again") from None
    meta = {"format": INDEX_FORMAT, "identity": identity, "dtype": dtype, "dim": int(dim), "rows": len(kept),
            "feature_file": name, "faiss": None}
    _write(path, _manifest_text(meta, kept), durable)
    _cleanup(path, [name])
    return load_index(path, identity, dtype)


def save_index(path: str, identity: dict, files: Sequence[FileEntry], feats: torch.Tensor,
               dtype: str = "float32") -> dict:
    """Writes the index of ``files`` with their L2-normalised features (G, D) in one go (under the lock); returns
    ``load_index``'s dict of it."""
    tmp = f"{path}.build-{secrets.token_hex(8)}.{SUFFIX[dtype]}"
    with locked(path):
        try:
            with FeatureWriter(tmp, feats.shape[1], dtype) as writer:
                writer.append(feats.float())
            with FeatureFile(tmp, len(files), feats.shape[1], dtype) as reader:
                return commit(path, identity, dtype, feats.shape[1], files, [(reader, i) for i in range(len(files))],
                              movable=reader)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Resumable builds
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Build:
    """A build in progress: the plan (the files to encode, in order), the rows written and recorded, and which of
    them are unreadable images (``bad``) or features that are not finite (``nonfinite``), stored as zeros."""

    path: str  # the manifest's path
    identity: dict
    dtype: str
    dim: int
    plan: list[FileEntry]
    plan_sha256: str
    token: str
    rows: int = 0
    bad: set[int] = dataclasses.field(default_factory=set)
    nonfinite: set[int] = dataclasses.field(default_factory=set)

    @property
    def feature_path(self) -> str:
        return f"{self.path}.build-{self.token}.{SUFFIX[self.dtype]}"

    @property
    def plan_path(self) -> str:
        return f"{self.path}.build-{self.token}.plan"

    def record(self, durable: bool) -> None:
        """Replaces the progress record ``<path>.build.json`` (after the rows it covers are on disk)."""
        state = {"format": INDEX_FORMAT, "identity": self.identity, "dtype": self.dtype, "dim": self.dim,
                 "token": self.token, "plan_sha256": self.plan_sha256, "rows": self.rows, "bad": sorted(self.bad),
                 "nonfinite": sorted(self.nonfinite)}
        _write(f"{self.path}.build.json", json.dumps(state), durable)

    def usable(self) -> list[int]:
        """The recorded rows that hold features."""
        return [i for i in range(self.rows) if i not in self.bad and i not in self.nonfinite]


def _plan_digest(plan: Sequence[FileEntry]) -> tuple[str, str]:
    text = json.dumps([list(f) for f in plan])
    return text, hashlib.sha256(text.encode()).hexdigest()


def start_build(path: str, identity: dict, dtype: str, dim: int, plan: list[FileEntry], durable: bool) -> Build:
    """A new build of ``plan``: its plan file written, an empty progress record."""
    text, digest = _plan_digest(plan)
    build = Build(path, identity, dtype, dim, plan, digest, secrets.token_hex(8))
    _write(build.plan_path, text, durable)
    build.record(durable)
    return build


def read_build(path: str, identity: dict, dtype: str, dim: int) -> Build | None:
    """The build of the index ``path`` that a stopped process left, if its record is sound and was made for
    ``identity``, ``dtype`` and ``dim``; None otherwise (its files are removed by the next commit)."""
    try:
        with open(f"{path}.build.json") as f:
            state = json.load(f)
        if (state.get("format"), state.get("identity"), state.get("dtype"), state.get("dim")) != \
                (INDEX_FORMAT, identity, dtype, dim) or not re.fullmatch(r"[0-9a-f]{16}", str(state.get("token"))):
            return None
        build = Build(path, identity, dtype, dim, [], state["plan_sha256"], state["token"], int(state["rows"]),
                      set(state["bad"]), set(state["nonfinite"]))
        with open(build.plan_path) as f:
            text = f.read()
        if hashlib.sha256(text.encode()).hexdigest() != build.plan_sha256:
            return None
        build.plan = [(p, int(s), int(m)) for p, s, m in json.loads(text)]
        size = os.path.getsize(build.feature_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= build.rows <= len(build.plan) or size < build.rows * dim * DTYPES[dtype].itemsize:
        return None
    return build


def encode_rest(build: Build, encode: Encoder, durable: bool, progress: bool) -> None:
    """Encodes the plan's files from ``build.rows`` on, ``BUILD_CHUNK`` at a time: rows appended and synced, then
    the record replaced. A progress bar (images per second, time left) when ``progress``."""
    try:
        writer = FeatureWriter(build.feature_path, build.dim, build.dtype, rows=build.rows, durable=durable)
    except OSError as exc:
        raise WriteFailed(f"cannot write {build.feature_path} ({exc.strerror or exc}); free some space or pick "
                          f"another place for --index, and run it again") from None
    with writer, tqdm(total=len(build.plan), initial=build.rows, unit="img", desc="index",
                      disable=not progress) as bar:
        for start in range(build.rows, len(build.plan), BUILD_CHUNK):
            chunk = build.plan[start:start + BUILD_CHUNK]
            feats, bad = encode([f[0] for f in chunk])  # (n, D), unreadable positions
            ok = torch.isfinite(feats).all(dim=1)  # (n,)
            try:
                writer.append(torch.where(ok.unsqueeze(1), feats, 0.0))
                writer.sync()
            except OSError as exc:
                raise WriteFailed(f"cannot write {build.feature_path} ({exc.strerror or exc}); the build resumes "
                                  f"from its last record: free some space, and run it again") from None
            build.rows += len(chunk)
            build.bad |= {start + i for i in bad}
            build.nonfinite |= {start + i for i in torch.nonzero(~ok).flatten().tolist() if i not in bad}
            build.record(durable)
            bar.update(len(chunk))


@dataclasses.dataclass
class Update:
    """What ``update_index`` did: the index (``load_index``'s dict; None when no file could be encoded), its open
    ``FeatureFile``, the unreadable files and those whose features are not finite (relative paths), and how many
    images it encoded."""

    index: dict | None
    features: FeatureFile | None
    bad: list[str]
    nonfinite: list[str]
    encoded: int


def _salvage(build: Build, wanted: set, places: dict) -> FeatureFile:
    """Adds the usable rows of a stopped build whose plan is not today's to ``places``; returns its reader."""
    reader = FeatureFile(build.feature_path, build.rows, build.dim, build.dtype, exact_size=False)
    for i in build.usable():
        if build.plan[i] in wanted:
            places.setdefault(build.plan[i], (reader, i))
    return reader


def update_index(path: str, identity: dict, dtype: str, files: Sequence[FileEntry], dim: int, encode: Encoder, *,
                 durable: bool = True, progress: bool = False, rebuild: bool = False) -> Update:
    """Brings the index ``path`` up to date with ``files`` (sorted ``scan_gallery`` entries) under its lock: rows of
    unchanged files are kept, the others encoded (``encode``, resuming a stopped build), and a new feature file and
    manifest are committed when anything changed. ``rebuild``: the existing index and build are not used (their
    contents are damaged). ``durable``: files are synced and the lock taken (False for a throw-away index)."""
    with locked(path, durable):
        index = None if rebuild else load_index(path, identity, dtype)
        if index is not None and index["dim"] != dim:  # the model's width is known from its query features
            notice(f"{path} is damaged ('features' are {index['dim']} wide, the model's {dim}); rebuilding it")
            index = None
        readers: list[FeatureFile] = []  # the sources of rows, closed before the lock is released
        try:
            places: dict = {}
            if index is not None:
                readers.append(open_features(index))
                places = {f: (readers[0], i) for i, f in enumerate(index["entries"])}
            plan = [f for f in files if f not in places]
            build = None if rebuild else read_build(path, identity, dtype, dim)
            if build is not None and build.plan != plan:
                readers.append(_salvage(build, set(files), places))
                build, plan = None, [f for f in files if f not in places]
            if build is not None and build.rows:
                notice(f"resuming the build of {path}: {build.rows} of {len(build.plan)} images were encoded")
            if build is None and plan:
                build = start_build(path, identity, dtype, dim, plan, durable)
            encoded = 0
            if build is not None:
                encoded = len(build.plan) - build.rows
                encode_rest(build, encode, durable, progress)
                readers.append(FeatureFile(build.feature_path, build.rows, dim, dtype, exact_size=False))
                for i in build.usable():
                    places[build.plan[i]] = (readers[-1], i)
            kept = [f for f in files if f in places]
            if kept and (index is None or kept != index["entries"]):
                index = commit(path, identity, dtype, dim, kept, [places[f] for f in kept], durable,
                               movable=readers[-1] if build is not None else None)
            elif build is not None or len(readers) > (index is not None):
                _cleanup(path, [index["feature_file"]] if index is not None else [])
        finally:
            for reader in readers:
                reader.close()
        features = open_features(index) if index is not None and kept else None
    bad = sorted(build.plan[i][0] for i in build.bad) if build is not None else []
    nonfinite = sorted(build.plan[i][0] for i in build.nonfinite) if build is not None else []
    return Update(index if kept else None, features, bad, nonfinite, encoded)


# ----------------------------------------------------------------------------------------------------------------
# The FAISS index beside the features
# ----------------------------------------------------------------------------------------------------------------

def faiss_index(path: str, index: dict, features: FeatureFile, durable: bool = True, seed: int = 0) -> tuple[Any, int]:
    """``(FAISS index, nprobe)`` of the committed ``index``: read from its file when the manifest records one
    built from its feature file, otherwise built (``ann.build_faiss``, which prints its recall@10), saved as
    ``<feature file's name>.faiss`` and recorded in the manifest."""
    info = index.get("faiss")
    if isinstance(info, dict) and info.get("feature_file") == index["feature_file"]:
        try:
            return ann.read_faiss(_sibling(path, str(info.get("file")))), int(info["nprobe"])
        except (RuntimeError, OSError, KeyError, TypeError, ValueError):
            notice(f"{path}: its FAISS index {info.get('file')} cannot be read; rebuilding it")
    name = index["feature_file"].rsplit(".", 1)[0] + ".faiss"
    info = ann.build_faiss(features, _sibling(path, name), seed=seed, log=notice)
    info.update(file=name, feature_file=index["feature_file"])
    with locked(path, durable):
        current = read_index_file(path)
        if isinstance(current, dict) and current.get("feature_file") == index["feature_file"]:
            _write(path, _manifest_text({**current, "faiss": info}, index["entries"]), durable)
            _cleanup(path, [index["feature_file"], name])
    return ann.read_faiss(_sibling(path, name)), info["nprobe"]
