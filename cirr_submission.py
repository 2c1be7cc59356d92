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
from typing import Any

import torch

import test_retrieval
from checkpoint import atomic_write
from datasets import RetrievalTask
from distributed import distributed_world

logger = logging.getLogger("main")

CIRR_VERSION = "rc2"
RECALL_TOP = 50  # names per pair for "recall" (the server's Recall@{1,5,10,50})
SUBSET_TOP = 3  # names per pair for "recall_subset" (Recall_subset@{1,2,3})
RECALL_FILE = "test1_pred_ranks_recall.json"  # the names of the CIRR repository's example files
SUBSET_FILE = "test1_pred_ranks_recall_subset.json"


def submission_dicts(task: RetrievalTask, query_feats: torch.Tensor,
                     gallery_feats: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``recall`` and ``recall_subset`` dicts of a CIRR task's query (Q, D) and gallery (G, D) features."""
    top, subset = test_retrieval.ranked_names(task, query_feats, gallery_feats, RECALL_TOP, SUBSET_TOP)
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    recall_subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for pairid, names, subset_names in zip(task.query_ids, top, subset):
        recall[str(pairid)] = names
        recall_subset[str(pairid)] = subset_names
    return recall, recall_subset


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
