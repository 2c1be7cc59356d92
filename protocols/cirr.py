"""CIRR's validation protocol (Liu et al., ICCV 2021, Sec. 5; the CIRR repository's evaluation): Recall@K over
every image of the split with the reference image removed from its own ranking, and Recall_subset@K over the
img_set members other than the reference."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from datasets import RetrievalTask
from protocols.base import (DEFAULT_MAX_CHUNK_ELEMS, Protocol, normalize_rows, query_chunks, recall_at_k,
                            similarities, target_ranks_from_sims)

CIRR_KS: tuple[int, ...] = (1, 5, 10, 50)  # CIRR's Recall@K (Liu et al., ICCV 2021, Sec. 5)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)  # CIRR's Recall_subset@K over the img_set members


def target_positions(task: RetrievalTask, view: str = "image") -> torch.Tensor:
    """(Q,) gallery position of each query's target label (its first occurrence), -1 where it is absent."""
    first: dict[Any, int] = {}
    for g, label in enumerate(task.gallery_labels[view]):
        first.setdefault(label, g)
    return torch.tensor([first.get(t, -1) for t in task.query_targets[view]], dtype=torch.long)


def _subset_matrix(task: RetrievalTask) -> torch.Tensor:
    """(Q, M) gallery positions of each query's ``task.query_subsets`` members, -1 padding."""
    n_queries = len(task.query_source)
    width = max((len(s) for s in task.query_subsets or []), default=0)
    subsets = torch.full((n_queries, width), -1, dtype=torch.long)  # (Q, M)
    for q, members in enumerate(task.query_subsets or []):
        subsets[q, :len(members)] = torch.tensor(members, dtype=torch.long)
    return subsets


def cirr_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                 max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> OrderedDict[str, float]:
    """CIRR's official validation protocol (Liu et al., ICCV 2021; the CIRR repository's evaluation).

    The gallery is every image of the split, the reference image is removed from its own ranking
    (``task.query_exclude``), the hit is ``target_hard`` (``task.query_targets['image']``):
    ``recall_top{1,5,10,50}_correct_composition``. ``recall_subset_top{1,2,3}_correct_composition``: the same
    similarities ranked over ``task.query_subsets`` only (the img_set members other than the reference).
    """
    n_queries = len(task.query_source)
    targets = target_positions(task)  # (Q,)
    exclude = torch.tensor(task.query_exclude if task.query_exclude is not None else [-1] * n_queries)  # (Q,)
    subsets = _subset_matrix(task)  # (Q, M)
    ranks, subset_ranks = [], []
    gallery_unit = normalize_rows(gallery_feats)  # (G, D)
    for start, stop in query_chunks(n_queries, len(task.gallery), max_chunk_elems):
        sims = similarities(query_feats[start:stop], gallery_unit)  # (C, G)
        ranks.append(target_ranks_from_sims(sims, targets[start:stop], exclude[start:stop]).cpu())
        if task.query_subsets is not None:
            subset_ranks.append(target_ranks_from_sims(sims, targets[start:stop], exclude[start:stop],
                                                       subsets[start:stop].to(sims.device)).cpu())
    out: OrderedDict[str, float] = OrderedDict()
    all_ranks = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)
    for k, r in recall_at_k(all_ranks, CIRR_KS).items():
        out[f"recall_top{k}_correct_composition"] = r
    if task.query_subsets is not None:
        all_subset = torch.cat(subset_ranks) if subset_ranks else torch.empty(0, dtype=torch.long)
        for k, r in recall_at_k(all_subset, CIRR_SUBSET_KS).items():
            out[f"recall_subset_top{k}_correct_composition"] = r
    return out


def cirr_metric_names(task: RetrievalTask) -> list[str]:
    """The names ``cirr_metrics`` gives for ``task``, in its order (the subset recalls with ``query_subsets``)."""
    names = [f"recall_top{k}_correct_composition" for k in CIRR_KS]
    if task.query_subsets is not None:
        names += [f"recall_subset_top{k}_correct_composition" for k in CIRR_SUBSET_KS]
    return names


class CirrProtocol(Protocol):
    """CIRR's protocol (``cirr_metrics``) at its fixed cut-offs; non-finite features are refused."""

    refuses_nonfinite = True

    def metric_names(self, task: RetrievalTask) -> list[str]:
        """``cirr_metric_names``."""
        return cirr_metric_names(task)

    def metrics(self, task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, *,
                max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse",
                ks: Sequence[int] | None = None) -> OrderedDict[str, float]:
        """``cirr_metrics`` (``nonfinite`` and ``ks`` do not apply: CIRR's cut-offs are fixed)."""
        return cirr_metrics(task, query_feats, gallery_feats, max_chunk_elems)
