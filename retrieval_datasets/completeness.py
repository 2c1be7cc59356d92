"""How complete a copy of a dataset is, and which copy it is.

Every loader lists the images its release's index files name (``_RetrievalDataset._set_image_paths``); at that
moment each listed file is checked with one ``os.path.isfile`` (no decode), and the ones absent are the split's
*missing* images. Images that are present but cannot be decoded are *unreadable*; they are met as the images are
loaded, also in DataLoader worker processes, whose finds travel back in the batches (``take_new_bad`` in the
worker, ``add_bad`` in the main process), and the image cache's unreadable images count from its build.

``DataRecord`` turns a run's splits into metrics.json's ``"data": {split: {"listed", "present", "unreadable"}}``
(a Fashion IQ split per category: ``"dress train"``) and warns once per split when an image is missing (at the
start) or unreadable (at the first metrics.json write that counts one). ``fingerprint`` is the SHA-256 of the
index files: the same copy gives the same digest on every machine, and a changed index file changes it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from distributed import distributed_world
from provenance import file_sha256

logger = logging.getLogger("datasets")  # the name its log lines carry

NOT_COMPARABLE = "recalls are not comparable with published numbers"
LISTING_KEY = "images/"  # fingerprint "files" key of a layout whose folder is its list (MIT-States, synthetic)


def missing_paths(paths: Iterable[str]) -> frozenset[str]:
    """The paths of ``paths`` that are not files: one ``os.path.isfile`` (a stat) each, no decode."""
    return frozenset(p for p in dict.fromkeys(paths) if not os.path.isfile(p))


def listing_digest(paths: Iterable[str], root: str) -> str:
    """The SHA-256 of the sorted lines ``'<path relative to root>\\t<size in bytes>\\n'`` of ``paths`` (a missing
    file has size -1): the fingerprint of a layout whose folder is its list."""
    lines = []
    for p in set(paths):
        try:
            size = os.stat(p).st_size
        except OSError:
            size = -1
        lines.append(f"{os.path.relpath(p, root)}\t{size}\n")
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def fingerprint(splits: Mapping[str, Any]) -> dict:
    """``{"files": {path relative to the dataset folder: sha256}, "sha256": digest}`` of the index files of the
    datasets ``splits`` (split -> dataset; None values skipped). A dataset whose folder is its list (no
    ``index_files``) contributes one entry ``"images/"``: ``listing_digest`` of its images. ``"sha256"`` is the
    SHA-256 of the sorted lines ``'<path>\\t<digest>\\n'``."""
    files: dict[str, str] = {}
    listed: dict[str, list[str]] = {}  # root -> images of the datasets without index files
    for ds in splits.values():
        if ds is None:
            continue
        if ds.index_files:
            for path in ds.index_files:
                rel = os.path.relpath(path, ds.path)
                if rel not in files:
                    files[rel] = file_sha256(path)
        else:
            listed.setdefault(ds.path, []).extend(ds.listed_paths())
    for root, paths in listed.items():
        files[LISTING_KEY] = listing_digest(paths, root)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]}\n".encode("utf-8", "surrogateescape"))
    return {"files": dict(sorted(files.items())), "sha256": h.hexdigest()}


def take_new_bad(dataset: Any) -> list[str]:
    """The unreadable image paths this process's copy of ``dataset`` met since the last call ([] for a dataset
    without that bookkeeping); a DataLoader worker sends them back in its batch."""
    take = getattr(dataset, "take_new_bad", None)
    return take() if take is not None else []


def add_bad(dataset: Any, paths: Sequence[str]) -> None:
    """Adds unreadable image paths met elsewhere (a DataLoader worker) to ``dataset``'s record in this process."""
    if paths and hasattr(dataset, "bad_images"):
        dataset.bad_images.update(paths)


def gather_bad(datasets: Sequence[Any]) -> None:
    """Every process's unreadable images of each dataset added to every process's record: a collective of the
    ``torch.distributed`` group (every rank calls it, with its copies of the same datasets in the same order);
    nothing happens in a single process."""
    _, world = distributed_world()
    if world == 1:
        return
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, [sorted(getattr(ds, "bad_images", ())) for ds in datasets])
    for lists in everyone:
        for ds, paths in zip(datasets, lists):
            add_bad(ds, paths)


def split_counts(dataset: Any) -> dict[str, dict[str, int]]:
    """``{group: {"listed", "present", "unreadable"}}`` of one dataset (group '' or a Fashion IQ category)."""
    missing = dataset.missing
    unreadable = set(dataset.bad_images) - missing
    out = {}
    for group, paths in dataset.listed_groups().items():
        n_missing = sum(p in missing for p in paths) if missing else 0
        n_bad = sum(p in unreadable for p in paths) if unreadable else 0
        out[group] = {"listed": len(paths), "present": len(paths) - n_missing, "unreadable": n_bad}
    return out


def counts(splits: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{key: {"listed", "present", "unreadable"}}`` of the splits (split -> dataset; None values skipped): the
    key is the split, or ``'<category> <split>'`` for a dataset counted per category (Fashion IQ)."""
    out = {}
    for split, ds in splits.items():
        if ds is None:
            continue
        for group, c in split_counts(ds).items():
            out[f"{group} {split}" if group else split] = c
    return out


def problem_line(name: str, n: int, listed: int, what: str) -> str:
    """``'<name>: 905 of 11,452 listed images are missing (7.9 %); recalls are not comparable ...'``."""
    pct = 100.0 * n / listed if listed else 0.0
    return f"{name}: {n:,} of {listed:,} listed images are {what} ({pct:.1f} %); {NOT_COMPARABLE}"


class DataRecord:
    """metrics.json's ``"data"`` of a run's splits, current at every call, with the warnings.

    Built at the start of a run (``splits``: split -> dataset, ``title``: the dataset's name in messages); it warns
    then, once per split, about missing images. Each call returns ``{"data": counts(splits)}`` and warns, once per
    split and run, about the splits that have unreadable images by then. With several processes every rank calls
    it at the same points (``runlog.Run.metrics`` and ``close``): the unreadable images each rank met are gathered
    first (``gather_bad``), and only rank 0 warns.
    """

    def __init__(self, splits: Mapping[str, Any], title: str) -> None:
        self.splits = {k: v for k, v in splits.items() if v is not None}
        self.title = title
        self._warned: set[str] = set()
        self._speaks = distributed_world()[0] == 0
        for key, c in counts(self.splits).items():
            missing = c["listed"] - c["present"]
            if missing and self._speaks:
                logger.warning("%s", problem_line(f"{title} {key}", missing, c["listed"], "missing"))

    def __call__(self) -> dict:
        gather_bad(list(self.splits.values()))
        data = counts(self.splits)
        for key, c in data.items():
            if c["unreadable"] and key not in self._warned and self._speaks:
                self._warned.add(key)
                logger.warning("%s", problem_line(f"{self.title} {key}", c["unreadable"], c["listed"],
                                                  "unreadable"))
        return {"data": data}
