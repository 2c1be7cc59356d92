"""Retrieval evaluation of composed image + text queries (TIRG / ComposeAE protocol).

Protocol (TIRG, Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 4; ComposeAE, Anwaar et al., WACV 2021,
arXiv 2006.11149, Sec. 4.2), as the reference code evaluates it:

* every gallery image is encoded once (``model.image_features``), every query is composed from its source image and
  its modification text (``model.compose_img_text_features``) to the ``'repres'`` feature (``encoding.encode_task``,
  re-exported here);
* query and gallery features are L2-normalised row-wise and compared by dot product (cosine similarity);
* on MIT-States / Fashion200k the query's own source image is pushed to the end of its ranking (the reference sets
  its similarity to ``-10e10``; it stays in the list, so with a gallery smaller than k it can still be counted);
* recall@k = fraction of queries with at least one gallery image of the target's label among the k nearest. On
  MIT-States the label is also checked per view: the whole ``'adj noun'`` composition, the adjective, the noun.
  On Fashion IQ the label is the target image id and the recall is reported per clothing category.

The ranking is computed without sorting the gallery: the rank of the first relevant gallery item of a query equals
the number of gallery items ranked before it, which is a count over one similarity row (see ``first_hit_ranks``).

The protocols of later work (CIRR, the standard Fashion IQ protocol) live in ``protocols``; ``PROTOCOLS`` maps a
task's ``protocol`` name to the ``protocols.base.Protocol`` that names and computes its metrics.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from datasets import RetrievalTask
from encoding import encode_task
from protocols.base import (DEFAULT_MAX_CHUNK_ELEMS, Protocol, normalize_rows, recall_at_k,
                            target_ranks_from_sims)
from protocols.cirr import CIRR_KS, CIRR_SUBSET_KS, CirrProtocol, cirr_metrics
from protocols.fashioniq import FASHIONIQ_STANDARD_KS, FashionIQStandardProtocol, fashioniq_standard_metrics
from torch_functions import full_fp32_matmul

# The public names, those of ``protocols`` that callers reach through this module among them.
__all__ = ["CIRR_KS", "CIRR_SUBSET_KS", "DEFAULT_KS", "DEFAULT_MAX_CHUNK_ELEMS", "FASHIONIQ_STANDARD_KS",
           "NONFINITE_POLICIES", "PROTOCOLS", "NonFiniteFeaturesError", "TirgProtocol", "cirr_metrics", "encode_task",
           "evaluate", "fashioniq_standard_metrics", "first_hit_ranks", "metric_names", "normalize_rows",
           "protocol_of", "recall_at_k", "retrieval_metrics", "target_ranks_from_sims", "task_ks",
           "task_metrics", "top_k"]

logger = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)  # the reference's recall cut-offs
NONFINITE_POLICIES: tuple[str, ...] = ("refuse", "rank_last")


class NonFiniteFeaturesError(ValueError):
    """Query or gallery features hold NaN or infinity (a diverged model): no recall can be computed from them."""

    def __init__(self, bad_queries: int, n_queries: int, bad_gallery: int, n_gallery: int) -> None:
        self.bad_queries, self.n_queries, self.bad_gallery, self.n_gallery = bad_queries, n_queries, bad_gallery, n_gallery
        super().__init__(f"the features of {bad_queries} of {n_queries} queries and {bad_gallery} of {n_gallery} "
                         f"gallery items are not finite (NaN or infinite): the model's weights or activations "
                         f"diverged, so no recall is reported")


def _finite_rows(queries: torch.Tensor, gallery: torch.Tensor, nonfinite: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q,) and (G,) masks of the L2-normalised feature rows that are finite everywhere.

    ``nonfinite='refuse'`` raises ``NonFiniteFeaturesError`` when any row is not finite (one host sync);
    ``'rank_last'`` logs a warning and returns the masks: the caller ranks those rows last and never counts them
    as hits. A NaN similarity must never count as a hit: every comparison with NaN is False, so without this check
    a NaN row would rank every item first.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    q_ok = torch.isfinite(queries).all(dim=1)  # (Q,)
    g_ok = torch.isfinite(gallery).all(dim=1)  # (G,)
    bad_q, bad_g = int((~q_ok).sum()), int((~g_ok).sum())
    if bad_q or bad_g:
        error = NonFiniteFeaturesError(bad_q, q_ok.numel(), bad_g, g_ok.numel())
        if nonfinite == "refuse":
            raise error
        logger.warning("%s; they are ranked last and never count as hits", str(error).split(": the model")[0])
    return q_ok, g_ok


# ----------------------------------------------------------------------------------------------------------------
# Metrics on features (pure functions)
# ----------------------------------------------------------------------------------------------------------------

def first_hit_ranks(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_targets: torch.Tensor,
                    gallery_labels: torch.Tensor, query_exclude: torch.Tensor | None = None,
                    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse") -> torch.Tensor:
    """0-based rank of the first relevant gallery item of every query, for every label view.

    query_feats: (Q, D), gallery_feats: (G, D); both are L2-normalised here (a zero row stays zero: similarity 0,
    where the reference would divide by zero). Similarity = dot product, in fp32 on ``query_feats.device``.
    query_targets: (Q, V) int labels, gallery_labels: (G, V) int labels; item g is relevant to query q in view v
    when ``gallery_labels[g, v] == query_targets[q, v]``.
    query_exclude: (Q,) gallery position whose similarity is set to -inf (the query's source image), -1 for none.
    It is ranked last but stays in the ranking, like the reference's ``sims[i, source] = -10e10``.

    The ranking is by descending similarity, ties broken by the lower gallery index (a stable sort of ``-sims``).
    For a query, let s* be the best similarity over its relevant items and j* the smallest relevant index reaching
    s*; the first hit's rank is ``#{g: sim_g > s*} + #{g < j*: sim_g == s*}``. A query with no relevant item gets
    rank G (never a hit).

    Queries are processed in chunks of ``max(1, max_chunk_elems // G)`` rows, so each (chunk, G) buffer holds at
    most ``max_chunk_elems`` entries. Returns a LongTensor (Q, V) on ``query_feats.device``.

    Rows that are not finite after normalisation: ``nonfinite='refuse'`` (default) raises
    ``NonFiniteFeaturesError`` naming how many; ``'rank_last'`` gives such a query rank G (no hit) and such a
    gallery item similarity -inf and no relevance (ranked after every finite item, never a hit).
    """
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(query_feats.shape)} and "
                         f"{tuple(gallery_feats.shape)}")
    n_queries, n_gallery = query_feats.shape[0], gallery_feats.shape[0]
    if query_targets.dim() != 2 or query_targets.shape[0] != n_queries:
        raise ValueError(f"query_targets must be (Q={n_queries}, V), got {tuple(query_targets.shape)}")
    n_views = query_targets.shape[1]
    if tuple(gallery_labels.shape) != (n_gallery, n_views):
        raise ValueError(f"gallery_labels must be (G={n_gallery}, V={n_views}), got {tuple(gallery_labels.shape)}")
    if query_exclude is not None:
        if tuple(query_exclude.shape) != (n_queries,):
            raise ValueError(f"query_exclude must be (Q={n_queries},), got {tuple(query_exclude.shape)}")
        if n_queries and (int(query_exclude.min()) < -1 or int(query_exclude.max()) >= n_gallery):
            raise ValueError(f"query_exclude must hold gallery positions in [0, {n_gallery}) or -1")

    device = query_feats.device
    ranks = torch.full((n_queries, n_views), n_gallery, dtype=torch.long, device=device)  # (Q, V)
    if n_queries == 0 or n_gallery == 0:
        return ranks

    neg_inf = float("-inf")
    rows_per_chunk = max(1, int(max_chunk_elems) // n_gallery)
    with torch.autocast(device_type=device.type, enabled=False), full_fp32_matmul():
        queries = F.normalize(query_feats.float(), dim=1)  # (Q, D)
        gallery = F.normalize(gallery_feats.to(device=device, dtype=torch.float32), dim=1)  # (G, D)
        gallery_t = gallery.t()  # (D, G) a view, no copy
        labels = gallery_labels.to(device=device, dtype=torch.long)  # (G, V)
        targets = query_targets.to(device=device, dtype=torch.long)  # (Q, V)
        exclude = None if query_exclude is None else query_exclude.to(device=device, dtype=torch.long)  # (Q,)
        index = torch.arange(n_gallery, device=device)  # (G,)
        q_ok, g_ok = _finite_rows(queries, gallery, nonfinite)  # (Q,), (G,)

        for start in range(0, n_queries, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_queries)
            sims = queries[start:stop] @ gallery_t  # (C, G)
            sims = torch.where(g_ok.unsqueeze(0), sims, neg_inf)  # non-finite gallery items: last
            if exclude is not None:
                excl = exclude[start:stop]  # (C,)
                rows = torch.arange(stop - start, device=device)  # (C,)
                cols = excl.clamp_min(0)  # (C,) -1 (none) rewrites column 0 with its own value
                sims[rows, cols] = torch.where(excl >= 0, neg_inf, sims[rows, cols])
            for v in range(n_views):
                relevant = (labels[:, v].unsqueeze(0) == targets[start:stop, v].unsqueeze(1)) & g_ok  # (C, G)
                best = torch.where(relevant, sims, neg_inf).amax(dim=1, keepdim=True)  # (C, 1) s*
                at_best = sims == best  # (C, G)
                first = torch.where(relevant & at_best, index, n_gallery).amin(dim=1, keepdim=True)  # (C, 1) j*
                rank = (sims > best).sum(dim=1) + (at_best & (index < first)).sum(dim=1)  # (C,)
                hit_possible = relevant.any(dim=1) & q_ok[start:stop]  # (C,)
                ranks[start:stop, v] = torch.where(hit_possible, rank, n_gallery)
    return ranks


def top_k(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int, query_exclude: torch.Tensor | None = None,
          max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, gallery_normalized: bool = False,
          nonfinite: str = "refuse") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best gallery items of every query, as the evaluation ranks them: cosine similarity of the
    L2-normalised features in fp32, descending, ties to the lower gallery index (a stable sort).

    ``gallery_normalized``: ``gallery_feats`` is already ``normalize_rows(raw)`` (e.g. a stored index), so it is
    used as it is: the same numbers as passing ``raw``, without normalising a large gallery for every call.

    query_feats: (Q, D), gallery_feats: (G, D). query_exclude: (Q,) gallery position left out of that query's
    ranking (its own source image), -1 for none. Returns ``(scores, indices)``, each (Q, min(k, G')) where G' is
    the number of gallery items a query can get (G, less one when any query excludes one); on ``query_feats.device``.

    Non-finite rows: ``nonfinite='refuse'`` (default) raises ``NonFiniteFeaturesError``; ``'rank_last'`` ranks a
    non-finite gallery item after every finite one (score -inf) and gives a non-finite query indices -1, scores NaN.
    """
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(query_feats.shape)} and "
                         f"{tuple(gallery_feats.shape)}")
    n_queries, n_gallery = query_feats.shape[0], gallery_feats.shape[0]
    device = query_feats.device
    drop = query_exclude is not None and bool((query_exclude >= 0).any())
    k = max(0, min(int(k), n_gallery - int(drop)))
    scores = torch.empty(n_queries, k, dtype=torch.float32, device=device)  # (Q, k)
    indices = torch.empty(n_queries, k, dtype=torch.long, device=device)  # (Q, k)
    if n_queries == 0 or k == 0:
        return scores, indices
    rows_per_chunk = max(1, int(max_chunk_elems) // n_gallery)
    with torch.autocast(device_type=device.type, enabled=False), full_fp32_matmul():
        queries = F.normalize(query_feats.float(), dim=1)  # (Q, D)
        gallery = gallery_feats.to(device=device, dtype=torch.float32)  # (G, D)
        gallery_t = (gallery if gallery_normalized else normalize_rows(gallery)).t()  # (D, G)
        exclude = None if query_exclude is None else query_exclude.to(device=device, dtype=torch.long)  # (Q,)
        q_ok, g_ok = _finite_rows(queries, gallery_t.t(), nonfinite)  # (Q,), (G,)
        for start in range(0, n_queries, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_queries)
            sims = queries[start:stop] @ gallery_t  # (C, G)
            # a non-finite gallery item sorts below every cosine (>= -1) but above the excluded item (-inf)
            sims = torch.where(g_ok.unsqueeze(0), sims, -2.0)
            if drop:  # the excluded item gets -inf: last in a stable sort, and k <= G - 1 leaves it out
                excl = exclude[start:stop]  # (C,)
                rows = torch.arange(stop - start, device=device)  # (C,)
                cols = excl.clamp_min(0)  # (C,) -1 (none) rewrites column 0 with its own value
                sims[rows, cols] = torch.where(excl >= 0, float("-inf"), sims[rows, cols])
            idx = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]  # (C, k)
            indices[start:stop] = idx
            scores[start:stop] = sims.gather(1, idx)
        if not bool(g_ok.all()):
            scores[~g_ok[indices]] = float("-inf")
        if not bool(q_ok.all()):
            scores[~q_ok], indices[~q_ok] = math.nan, -1
    return scores, indices


def _encode_labels(task: RetrievalTask) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Labels to ints, per view, with one vocabulary shared by gallery labels and query targets.

    Returns (views in the insertion order of ``task.gallery_labels``, gallery (G, V), targets (Q, V)).
    """
    views = list(task.gallery_labels)
    if set(views) != set(task.query_targets):
        raise ValueError(f"gallery_labels views {views} differ from query_targets views {list(task.query_targets)}")
    n_gallery, n_queries = len(task.gallery), len(task.query_source)
    gallery_ids = torch.empty(n_gallery, len(views), dtype=torch.long)  # (G, V)
    target_ids = torch.empty(n_queries, len(views), dtype=torch.long)  # (Q, V)
    for v, view in enumerate(views):
        gal, tgt = task.gallery_labels[view], task.query_targets[view]
        if len(gal) != n_gallery or len(tgt) != n_queries:
            raise ValueError(f"view {view!r}: {len(gal)} gallery labels for {n_gallery} gallery items, "
                             f"{len(tgt)} targets for {n_queries} queries")
        vocab: dict[Any, int] = {}
        gallery_ids[:, v] = torch.tensor([vocab.setdefault(x, len(vocab)) for x in gal], dtype=torch.long)
        target_ids[:, v] = torch.tensor([vocab.setdefault(x, len(vocab)) for x in tgt], dtype=torch.long)
    return views, gallery_ids, target_ids


def retrieval_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS, max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
                      nonfinite: str = "refuse") -> OrderedDict[str, float]:
    """Recall@k of the task's queries (Q, D) against its gallery (G, D), under the reference's metric names.

    Without ``task.query_groups`` (MIT-States, Fashion200k): for k in ks, for view in ``task.gallery_labels`` order,
    ``recall_top{k}_correct_{view}`` (top1 composition, top1 adj, top1 noun, top5 composition, ...).

    With ``task.query_groups`` (Fashion IQ; exactly one view, the target id): for k in ks, for group,
    ``recall_top{k}_correct_{group}`` over the queries of that group (NaN for a group without queries).

    Differences from the reference Fashion IQ evaluation (``fiq_test``):
    * the reference never resets its per-category hit counter between values of k, so each k's count was added
      onto the previous k's already divided recall; here every (k, group) recall is computed on its own;
    * the reference keeps only the 50 first distinct ids of each ranking, so its recall@100 equals its recall@50;
      here recall@100 is the true one, over the distinct gallery images (the dataset de-duplicates the gallery).
    """
    n_queries, n_gallery = len(task.query_source), len(task.gallery)
    if query_feats.shape[0] != n_queries or gallery_feats.shape[0] != n_gallery:
        raise ValueError(f"got {query_feats.shape[0]} query / {gallery_feats.shape[0]} gallery features for "
                         f"{n_queries} queries / {n_gallery} gallery items")
    views, gallery_ids, target_ids = _encode_labels(task)
    exclude = None
    if task.query_exclude is not None:
        if len(task.query_exclude) != n_queries:
            raise ValueError(f"query_exclude has {len(task.query_exclude)} entries for {n_queries} queries")
        exclude = torch.tensor(task.query_exclude, dtype=torch.long)  # (Q,)
    ranks = first_hit_ranks(query_feats, gallery_feats, target_ids, gallery_ids, exclude,
                            max_chunk_elems=max_chunk_elems, nonfinite=nonfinite).cpu()  # (Q, V)

    out: OrderedDict[str, float] = OrderedDict()
    if task.query_groups is None:
        per_view = [recall_at_k(ranks[:, v], ks) for v in range(len(views))]
        for k in ks:
            for v, view in enumerate(views):
                out[f"recall_top{k}_correct_{view}"] = per_view[v][k]
        return out

    if len(views) != 1:
        raise ValueError(f"grouped (Fashion IQ) metrics need exactly one label view, got {views}")
    per_group = {}
    for group, members in task.query_groups.items():
        if len(members) != n_queries:
            raise ValueError(f"query group {group!r} has {len(members)} entries for {n_queries} queries")
        mask = torch.tensor(members, dtype=torch.bool)  # (Q,)
        per_group[group] = recall_at_k(ranks[mask, 0], ks)
    for k in ks:
        for group in task.query_groups:
            out[f"recall_top{k}_correct_{group}"] = per_group[group][k]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Protocols: the task's ``protocol`` name -> how its metrics are named and computed
# ----------------------------------------------------------------------------------------------------------------

def task_ks(task: RetrievalTask) -> tuple[int, ...]:
    """The task's recall cut-offs: ``task.ks``, or the reference's ``DEFAULT_KS``."""
    return tuple(task.ks) if task.ks else DEFAULT_KS


class TirgProtocol(Protocol):
    """The original's protocol (TIRG, Vo et al., CVPR 2019, Sec. 4; ComposeAE, Anwaar et al., WACV 2021, Sec. 4.2):
    ``retrieval_metrics`` at the caller's ``ks``, else the task's (``task_ks``); non-finite features follow the
    caller's ``nonfinite`` policy (see ``first_hit_ranks``)."""

    refuses_nonfinite = False

    def metric_names(self, task: RetrievalTask) -> list[str]:
        """``recall_top{k}_correct_{view or group}`` for k in ``task_ks(task)``, in ``retrieval_metrics``'s order."""
        groups = task.query_groups if task.query_groups is not None else task.gallery_labels
        return [f"recall_top{k}_correct_{g}" for k in task_ks(task) for g in groups]

    def metrics(self, task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, *,
                max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse",
                ks: Sequence[int] | None = None) -> OrderedDict[str, float]:
        """``retrieval_metrics`` at ``ks`` (None: ``task_ks(task)``)."""
        return retrieval_metrics(task, query_feats, gallery_feats, ks=task_ks(task) if ks is None else ks,
                                 max_chunk_elems=max_chunk_elems, nonfinite=nonfinite)


# Every protocol a RetrievalTask can name: 'tirg' (the original's), 'cirr' (reference removed, recall and
# recall_subset), 'fashioniq_standard' (per-category galleries, R@10 / R@50).
PROTOCOLS: dict[str, Protocol] = {"tirg": TirgProtocol(), "cirr": CirrProtocol(),
                                  "fashioniq_standard": FashionIQStandardProtocol()}


def protocol_of(task: RetrievalTask) -> Protocol:
    """The ``PROTOCOLS`` entry of ``task.protocol``; a ValueError naming an unknown protocol."""
    protocol = PROTOCOLS.get(task.protocol)
    if protocol is None:
        raise ValueError(f"unknown retrieval protocol {task.protocol!r}")
    return protocol


def metric_names(task: RetrievalTask) -> list[str]:
    """The names ``task_metrics`` gives for ``task`` (its protocol), in its order, without computing anything."""
    return protocol_of(task).metric_names(task)


def task_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                 max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse",
                 ks: Sequence[int] | None = None) -> OrderedDict[str, float]:
    """The metrics of ``task.protocol`` (its ``PROTOCOLS`` entry): ``'tirg'`` (``retrieval_metrics``, at ``ks``,
    else at ``task.ks`` when given), ``'cirr'`` (``cirr_metrics``) or ``'fashioniq_standard'``
    (``fashioniq_standard_metrics``).

    Non-finite features: the TIRG protocol follows ``nonfinite`` (see ``first_hit_ranks``); the later-work
    protocols always refuse them (``NonFiniteFeaturesError``)."""
    protocol = protocol_of(task)
    if protocol.refuses_nonfinite:
        _finite_rows(query_feats, gallery_feats, "refuse")
    return protocol.metrics(task, query_feats, gallery_feats, max_chunk_elems=max_chunk_elems, nonfinite=nonfinite,
                            ks=ks)


# ----------------------------------------------------------------------------------------------------------------
# Model evaluation: the features of ``encoding.encode_task``, ranked
# ----------------------------------------------------------------------------------------------------------------

def evaluate(model: torch.nn.Module, dataset: Any, task: RetrievalTask, *, batch_size: int = 32,
             device: torch.device | str | None = None, num_workers: int = 0, amp: bool = False,
             max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, ks: Sequence[int] | None = None, desc: str = "test",
             progress: bool = True, nonfinite: str = "refuse") -> OrderedDict[str, float]:
    """Recall@k of ``model`` on ``task``: the metrics of ``task.protocol`` (``task_metrics``) of the features of
    ``encode_task``; ``ks`` (the TIRG protocol's cut-offs) default: ``task_ks(task)``; non-finite features: see
    ``first_hit_ranks``."""
    query_feats, gallery_feats = encode_task(model, dataset, task, batch_size=batch_size, device=device,
                                             num_workers=num_workers, amp=amp, desc=desc, progress=progress)
    return task_metrics(task, query_feats, gallery_feats, max_chunk_elems=max_chunk_elems, nonfinite=nonfinite,
                        ks=ks)
