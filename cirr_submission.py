"""The two prediction files that the CIRR test-split server scores (github Cuberick-Orion/CIRR, Test-split_server.md).

``{"version": "rc2", "metric": "recall", "<pairid>": [50 image names]}`` and
``{"version": "rc2", "metric": "recall_subset", "<pairid>": [3 image names]}``: for every test1 pair, its best 50
gallery images with the reference removed (the gallery is every test1 image), and its best 3 img_set members other
than the reference, best first.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import torch

import test_retrieval
from checkpoint import atomic_write
from datasets import RetrievalTask
from distributed import distributed_world
from errors import UserInputError
from protocols.base import DEFAULT_MAX_CHUNK_ELEMS, normalize_rows, query_chunks, similarities

logger = logging.getLogger("main")

CIRR_VERSION = "rc2"
RECALL_TOP = 50  # names per pair for "recall" (the server's Recall@{1,5,10,50})
SUBSET_TOP = 3  # names per pair for "recall_subset" (Recall_subset@{1,2,3})
RECALL_FILE = "test1_pred_ranks_recall.json"  # the names of the CIRR repository's example files
SUBSET_FILE = "test1_pred_ranks_recall_subset.json"


def ranked_names(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int,
                 subset_k: int, max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> tuple[list[list], list[list]]:
    """Per query, the ``k`` best gallery labels with the reference removed (``test_retrieval.top_k`` with its
    exclusion), and the ``subset_k`` best of ``task.query_subsets`` (the CIRR test-server submission's two lists)."""
    labels = task.gallery_labels["image"]
    exclude = torch.tensor(task.query_exclude, dtype=torch.long) if task.query_exclude is not None else None
    _, idx = test_retrieval.top_k(query_feats, gallery_feats, k, exclude, max_chunk_elems)  # (Q, k)
    top = [[labels[i] for i in row] for row in idx.tolist()]
    subset_top = []
    gallery_unit = normalize_rows(gallery_feats)  # (G, D)
    for start, stop in query_chunks(len(task.query_source), len(task.gallery), max_chunk_elems):
        sims = similarities(query_feats[start:stop], gallery_unit).cpu()  # (C, G)
        for c, q in enumerate(range(start, stop)):
            members = sorted(m for m in task.query_subsets[q] if exclude is None or m != int(exclude[q]))
            member_sims = sims[c, torch.tensor(members, dtype=torch.long)] if members else torch.empty(0)
            order = torch.sort(member_sims, descending=True, stable=True).indices[:subset_k].tolist()
            subset_top.append([labels[members[i]] for i in order])
    return top, subset_top


def submission_dicts(task: RetrievalTask, query_feats: torch.Tensor,
                     gallery_feats: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``recall`` and ``recall_subset`` dicts of a CIRR task's query (Q, D) and gallery (G, D) features."""
    top, subset = ranked_names(task, query_feats, gallery_feats, RECALL_TOP, SUBSET_TOP)
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    recall_subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for pairid, names, subset_names in zip(task.query_ids, top, subset):
        recall[str(pairid)] = names
        recall_subset[str(pairid)] = subset_names
    return recall, recall_subset


def check_submission_dir(folder: str) -> None:
    """Makes sure ``--submission_dir`` can receive the two files before anything runs: refuses (one line) a regular
    file, a path below one, a folder that cannot be created or written, or one where either file's name is taken by
    something other than a file; creates the folder when it is missing."""
    flag = f"--submission_dir {folder}"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserInputError(f"{flag} is a file, not a folder; pass a folder for the CIRR test1 prediction files")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{flag}: cannot create the folder ({exc.strerror or exc}); pass a folder that can be "
                             f"created and written") from None
    for name in (RECALL_FILE, SUBSET_FILE):
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserInputError(f"{flag}: {path} exists and is not a file; remove it or pass another folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserInputError(f"{flag}: cannot write in the folder ({exc.strerror or exc}); pass a writable "
                             f"folder") from None


def write_submission(folder: str, recall: dict, recall_subset: dict) -> list[str]:
    """Writes the two files (atomically) into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, data in ((RECALL_FILE, recall), (SUBSET_FILE, recall_subset)):
        path = os.path.join(folder, name)
        atomic_write(path, lambda f, d=data: json.dump(d, f), mode="w")
        paths.append(path)
    return paths


def write_test1_submission(args, model: torch.nn.Module, dataset: Any, device: torch.device) -> list[str]:
    """Encodes CIRR's test1 split (``dataset``) with ``model`` and writes both files into ``--submission_dir``."""
    task = dataset.test_task()
    query_feats, gallery_feats = test_retrieval.encode_task(
        model, dataset, task, batch_size=args.eval_batch_size, device=device, num_workers=args.loader_num_workers,
        amp=args.amp, desc="test1 submission")
    if distributed_world()[0] != 0:  # every rank encodes its share; rank 0 writes
        return []
    paths = write_submission(args.submission_dir, *submission_dicts(task, query_feats, gallery_feats))
    logger.info("CIRR test1 predictions of %d pairs written to %s", len(task.query_source), " and ".join(paths))
    return paths
