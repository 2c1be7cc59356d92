"""The standard Fashion IQ protocol of CLIP4Cir (Baldrati et al., CVPRW 2022 / TOMM 2023, ``validate.py``) and its
successors: each category's queries ranked against that category's val images, R@10 and R@50 and their mean."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from datasets import RetrievalTask
from protocols.base import (DEFAULT_MAX_CHUNK_ELEMS, Protocol, normalize_rows, query_chunks, recall_at_k,
                            similarities, target_ranks_from_sims)

FASHIONIQ_STANDARD_KS: tuple[int, ...] = (10, 50)  # R@10 and R@50 of CLIP4Cir and its successors


def _group_recalls(task: RetrievalTask, group: str, members: list[bool], query_feats: torch.Tensor,
                   gallery_feats: torch.Tensor, max_chunk_elems: int) -> dict[int, float]:
    """Recall@{10, 50} of the queries of ``group`` against the gallery items of ``group``, the hit the target."""
    labels = task.gallery_labels["image"]
    g_mask = torch.tensor(task.gallery_groups[group], dtype=torch.bool)  # (G,)
    q_idx = torch.nonzero(torch.tensor(members, dtype=torch.bool)).flatten()  # (Qc,)
    g_idx = torch.nonzero(g_mask).flatten()  # (Gc,)
    where = {}
    for local, g in enumerate(g_idx.tolist()):
        where.setdefault(labels[g], local)
    targets = torch.tensor([where.get(task.query_targets["image"][q], -1) for q in q_idx.tolist()],
                           dtype=torch.long)  # (Qc,) position in this group's gallery
    ranks = []
    group_gallery = normalize_rows(gallery_feats[g_idx.to(gallery_feats.device)])  # (Gc, D)
    for start, stop in query_chunks(len(q_idx), len(g_idx), max_chunk_elems):
        sims = similarities(query_feats[q_idx[start:stop].to(query_feats.device)], group_gallery)  # (C, Gc)
        ranks.append(target_ranks_from_sims(sims, targets[start:stop]).cpu())
    return recall_at_k(torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long), FASHIONIQ_STANDARD_KS)


def fashioniq_standard_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                               max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> OrderedDict[str, float]:
    """The Fashion IQ protocol of CLIP4Cir (Baldrati et al., CVPRW 2022 / TOMM 2023, ``validate.py``) and its
    successors: the queries of each category are ranked against that category's val images only
    (``task.gallery_groups``), the hit is the target image, and the reference image is NOT removed (CLIP4Cir does
    not remove it; papers that remove it report different numbers). ``recall_top{10,50}_correct_<category>`` and
    their mean over the categories, ``recall_top{10,50}_correct_mean``.
    """
    if task.query_groups is None or task.gallery_groups is None:
        raise ValueError("the standard Fashion IQ protocol needs query_groups and gallery_groups")
    out: OrderedDict[str, float] = OrderedDict()
    per_group = {group: _group_recalls(task, group, members, query_feats, gallery_feats, max_chunk_elems)
                 for group, members in task.query_groups.items()}
    for k in FASHIONIQ_STANDARD_KS:
        for group in task.query_groups:
            out[f"recall_top{k}_correct_{group}"] = per_group[group][k]
        out[f"recall_top{k}_correct_mean"] = sum(per_group[g][k] for g in per_group) / max(1, len(per_group))
    return out


def fashioniq_standard_metric_names(task: RetrievalTask) -> list[str]:
    """The names ``fashioniq_standard_metrics`` gives for ``task``, in its order."""
    return [name for k in FASHIONIQ_STANDARD_KS
            for name in [*(f"recall_top{k}_correct_{g}" for g in task.query_groups), f"recall_top{k}_correct_mean"]]


class FashionIQStandardProtocol(Protocol):
    """The standard Fashion IQ protocol (``fashioniq_standard_metrics``) at its fixed cut-offs; non-finite features
    are refused."""

    refuses_nonfinite = True

    def metric_names(self, task: RetrievalTask) -> list[str]:
        """``fashioniq_standard_metric_names``."""
        return fashioniq_standard_metric_names(task)

    def metrics(self, task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, *,
                max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse",
                ks: Sequence[int] | None = None) -> OrderedDict[str, float]:
        """``fashioniq_standard_metrics`` (``nonfinite`` and ``ks`` do not apply: the cut-offs are fixed)."""
        return fashioniq_standard_metrics(task, query_feats, gallery_feats, max_chunk_elems)
