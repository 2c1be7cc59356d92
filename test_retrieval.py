"""Retrieval evaluation of composed image + text queries (TIRG / ComposeAE protocol).

Protocol (TIRG, Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 4; ComposeAE, Anwaar et al., WACV 2021,
arXiv 2006.11149, Sec. 4.2), as the reference code evaluates it:

* every gallery image is encoded once (``model.image_features``), every query is composed from its source image and
  its modification text (``model.compose_img_text_features``) to the ``'repres'`` feature;
* query and gallery features are L2-normalised row-wise and compared by dot product (cosine similarity);
* on MIT-States / Fashion200k the query's own source image is pushed to the end of its ranking (the reference sets
  its similarity to ``-10e10``; it stays in the list, so with a gallery smaller than k it can still be counted);
* recall@k = fraction of queries with at least one gallery image of the target's label among the k nearest. On
  MIT-States the label is also checked per view: the whole ``'adj noun'`` composition, the adjective, the noun.
  On Fashion IQ the label is the target image id and the recall is reported per clothing category.

The ranking is computed without sorting the gallery: the rank of the first relevant gallery item of a query equals
the number of gallery items ranked before it, which is a count over one similarity row (see ``first_hit_ranks``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import RetrievalTask
from distributed import all_gather_rows, distributed_world

logger = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)  # the reference's recall cut-offs
DEFAULT_MAX_CHUNK_ELEMS: int = 2 ** 25  # similarity entries held at once (128 MiB of fp32 per buffer)
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

@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """Full fp32 matmuls (no TF32), whatever the caller enabled for training; restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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
    with torch.autocast(device_type=device.type, enabled=False), _full_fp32_matmul():
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


def normalize_rows(feats: torch.Tensor) -> torch.Tensor:
    """(N, D) rows L2-normalised in fp32 as the ranking normalises them (a zero row stays zero)."""
    return F.normalize(feats.float(), dim=1)


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
    with torch.autocast(device_type=device.type, enabled=False), _full_fp32_matmul():
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


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """recall@k = mean(rank < k) over the (Q,) first-hit ranks; NaN for an empty set of queries."""
    if ranks.numel() == 0:
        return {k: math.nan for k in ks}
    return {k: (ranks < k).double().mean().item() for k in ks}


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


def metric_names(task: RetrievalTask) -> list[str]:
    """The names ``task_metrics`` gives for ``task`` (its protocol), in its order, without computing anything."""
    if task.protocol == "cirr":
        names = [f"recall_top{k}_correct_composition" for k in CIRR_KS]
        if task.query_subsets is not None:
            names += [f"recall_subset_top{k}_correct_composition" for k in CIRR_SUBSET_KS]
        return names
    if task.protocol == "fashioniq_standard":
        return [name for k in FASHIONIQ_STANDARD_KS
                for name in [*(f"recall_top{k}_correct_{g}" for g in task.query_groups), f"recall_top{k}_correct_mean"]]
    groups = task.query_groups if task.query_groups is not None else task.gallery_labels
    return [f"recall_top{k}_correct_{g}" for k in task_ks(task) for g in groups]


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
# Model evaluation
# ----------------------------------------------------------------------------------------------------------------

class _KeyedImages(Dataset):
    """``dataset.load_image(key)`` for a list of keys, so a DataLoader can prefetch them (uint8 (3, S, S))."""

    def __init__(self, dataset: Any, keys: list) -> None:
        self.dataset = dataset
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load_image(self.keys[i])


def _assemble_rows(rows: torch.Tensor | None, index: torch.Tensor, total: int, world_size: int,
                   device: torch.device) -> torch.Tensor:
    """Scatter this process's feature rows (n, D) to their positions ``index`` (n,) of a (total, D) fp32 tensor.

    With world_size > 1 the rows of all ranks are exchanged first (all-gathers, padded to the longest share), so
    every rank returns the same complete tensor. A rank with no rows passes ``rows=None``.
    """
    if world_size == 1:
        dim = 0 if rows is None else rows.shape[1]
        out = torch.zeros(total, dim, dtype=torch.float32, device=device)  # (total, D)
        if rows is not None:
            out[index.to(device)] = rows.float()
        return out

    import torch.distributed as dist

    comm_device = torch.device("cpu") if dist.get_backend() == "gloo" else device
    n_local = 0 if rows is None else rows.shape[0]
    dim_local = -1 if rows is None else rows.shape[1]
    sizes = torch.tensor([[n_local, dim_local]], dtype=torch.long, device=comm_device)  # (1, 2)
    sizes_t = all_gather_rows(sizes).cpu()  # (W, 2)
    n_max, dim = int(sizes_t[:, 0].max()), int(sizes_t[:, 1].max())
    dim = max(dim, 0)
    out = torch.zeros(total, dim, dtype=torch.float32, device=device)
    if n_max == 0:
        return out
    padded = torch.zeros(n_max, dim, dtype=torch.float32, device=comm_device)  # (n_max, D)
    padded_index = torch.full((n_max,), -1, dtype=torch.long, device=comm_device)  # (n_max,)
    if rows is not None and n_local:
        padded[:n_local] = rows.float().to(comm_device)
        padded_index[:n_local] = index.to(comm_device)
    gathered_rows = all_gather_rows(padded).to(device)  # (W * n_max, D)
    gathered_index = all_gather_rows(padded_index).to(device)  # (W * n_max,)
    valid = gathered_index >= 0
    out[gathered_index[valid]] = gathered_rows[valid]
    return out


def _scatter_rows(buf: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``buf[rows[i]] = values[i]`` for the i with ``rows[i] >= 0``; ``rows`` (B,) on the CPU, so the selection
    needs no host-device synchronisation."""
    keep = torch.nonzero(rows >= 0).flatten()  # (K,) CPU
    if keep.numel() == 0:
        return
    dst = rows[keep].to(buf.device, non_blocking=True)
    src = values if keep.numel() == rows.numel() else values.index_select(0, keep.to(values.device, non_blocking=True))
    buf.index_copy_(0, dst, src.to(buf.dtype))


def encode_task(model: torch.nn.Module, dataset: Any, task: RetrievalTask, *, batch_size: int = 32,
                device: torch.device | str | None = None, num_workers: int = 0, amp: bool = False,
                desc: str = "test", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's query features (Q, D) and gallery features (G, D), fp32 on ``device`` (not normalised), as the
    evaluation computes them (see the module docstring for the protocol).

    Runs under ``torch.inference_mode()`` with the model in eval mode; every module's training flag is restored
    afterwards. Each image of ``task.image_keys`` that the gallery or a query uses is loaded once
    (``dataset.load_image``, through a DataLoader with ``num_workers``) and encoded once with
    ``model.image_features``: its embedding is kept if it is in the gallery, its composition state if it is a query
    source (the reference re-encoded the source image of every query). Queries are then composed in batches of
    ``batch_size`` from the kept states and ``model.extract_text_feature(texts)``.

    ``amp``: the model calls run under ``torch.autocast(dtype=torch.bfloat16)``; features are cast back to fp32
    before the similarity. ``device``: default, the device of the model's first parameter.

    Distributed: when a ``torch.distributed`` process group with world_size > 1 is initialised, rank r encodes the
    images ``used[r::world_size]`` and composes the queries whose source image it encoded (the composition states,
    which can be large feature maps, never leave their rank). Gallery and query features are then exchanged with
    ``all_gather`` (padded to equal length), so every rank computes the same, complete metrics. Every rank must
    call ``evaluate``. A single process makes no ``torch.distributed`` call beyond checking for a process group.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if device is None:
        first_param = next(model.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
    device = torch.device(device)
    rank, world_size = distributed_world()
    show = progress and rank == 0

    n_queries = len(task.query_source)
    if len(task.query_text) != n_queries:
        raise ValueError(f"task has {len(task.query_text)} query texts for {n_queries} query sources")
    gallery_set, source_set = set(task.gallery), set(task.query_source)
    used = sorted(gallery_set | source_set)  # positions in task.image_keys that are needed
    slot = {p: i for i, p in enumerate(used)}  # position -> index in `used`
    mine = used[rank::world_size]  # this rank's images (strided share)

    # rows of this rank's gallery embedding / source state buffers, per image of `mine` (-1: not kept)
    gallery_rows, source_rows, source_row_of = [], [], {}
    n_gal_local = n_src_local = 0
    for p in mine:
        gallery_rows.append(n_gal_local if p in gallery_set else -1)
        n_gal_local += p in gallery_set
        if p in source_set:
            source_row_of[p] = n_src_local
            n_src_local += 1
        source_rows.append(source_row_of.get(p, -1))
    gallery_rows_t = torch.tensor(gallery_rows, dtype=torch.long)  # (M,)
    source_rows_t = torch.tensor(source_rows, dtype=torch.long)  # (M,)
    my_queries = [q for q in range(n_queries) if slot[task.query_source[q]] % world_size == rank]
    logger.info("%s: %d images (%d on this rank), %d queries (%d on this rank), gallery %d", desc, len(used),
                len(mine), n_queries, len(my_queries), len(task.gallery))

    loader = DataLoader(_KeyedImages(dataset, [task.image_keys[p] for p in mine]), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # worker seeds from its own generator: training's RNG stays put
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    training_flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            gallery_buf: torch.Tensor | None = None  # (n_gal_local, D) fp32
            state_buf: torch.Tensor | None = None  # (n_src_local, ...) the model's state dtype
            start = 0
            for imgs in tqdm(loader, desc=f"{desc} images", disable=not show):
                imgs = imgs.to(device, non_blocking=True)  # (B, 3, S, S) uint8
                with autocast:
                    embedding, state = model.image_features(imgs)  # (B, D), (B, ...)
                if not isinstance(state, torch.Tensor):
                    raise TypeError(f"model.image_features must return a tensor state, got {type(state).__name__}")
                g_rows = gallery_rows_t[start:start + imgs.shape[0]]  # (B,) on the CPU
                s_rows = source_rows_t[start:start + imgs.shape[0]]  # (B,) on the CPU
                start += imgs.shape[0]
                if gallery_buf is None and n_gal_local:
                    gallery_buf = torch.empty(n_gal_local, embedding.shape[1], dtype=torch.float32, device=device)
                if state_buf is None and n_src_local:
                    state_buf = torch.empty((n_src_local,) + tuple(state.shape[1:]), dtype=state.dtype,
                                            device=device)
                # which rows to keep is known on the CPU: index copies, no boolean mask on the device (host sync)
                if gallery_buf is not None:
                    _scatter_rows(gallery_buf, g_rows, embedding.float())
                if state_buf is not None:
                    _scatter_rows(state_buf, s_rows, state)

            query_parts = []
            for b in tqdm(range(0, len(my_queries), batch_size), desc=f"{desc} queries", disable=not show):
                batch = my_queries[b:b + batch_size]
                rows = torch.tensor([source_row_of[task.query_source[q]] for q in batch]).to(
                    device, non_blocking=True)  # (B,) no host sync
                with autocast:
                    text_feats = model.extract_text_feature([task.query_text[q] for q in batch])  # (B, T)
                    repres = model.compose_img_text_features(state_buf[rows], text_feats)["repres"]  # (B, D)
                query_parts.append(repres.float())
            query_local = torch.cat(query_parts) if query_parts else None  # (q_local, D)

            gallery_positions = torch.tensor([slot[p] for p in mine if p in gallery_set], dtype=torch.long)
            image_feats = _assemble_rows(gallery_buf, gallery_positions, len(used), world_size, device)  # (U, D)
            gallery_feats = image_feats[torch.tensor([slot[p] for p in task.gallery], dtype=torch.long,
                                                     device=device)]  # (G, D)
            query_feats = _assemble_rows(query_local, torch.tensor(my_queries, dtype=torch.long), n_queries,
                                         world_size, device)  # (Q, D)
            if query_feats.shape[1] != gallery_feats.shape[1]:  # no query or no gallery item: width unknown there
                dim = max(query_feats.shape[1], gallery_feats.shape[1])
                query_feats = query_feats.new_zeros(n_queries, dim) if query_feats.shape[1] == 0 else query_feats
                gallery_feats = (gallery_feats.new_zeros(len(task.gallery), dim) if gallery_feats.shape[1] == 0
                                 else gallery_feats)
            return query_feats, gallery_feats
    finally:
        for module, flag in training_flags:
            module.training = flag


def evaluate(model: torch.nn.Module, dataset: Any, task: RetrievalTask, *, batch_size: int = 32,
             device: torch.device | str | None = None, num_workers: int = 0, amp: bool = False,
             max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, ks: Sequence[int] | None = None, desc: str = "test",
             progress: bool = True, nonfinite: str = "refuse") -> OrderedDict[str, float]:
    """Recall@k of ``model`` on ``task``: the metrics of ``task.protocol`` (``task_metrics``) of the features of
    ``encode_task``; ``ks`` (the TIRG protocol's cut-offs) default: ``task_ks(task)``; non-finite features: see
    ``first_hit_ranks``."""
    query_feats, gallery_feats = encode_task(model, dataset, task, batch_size=batch_size, device=device,
                                             num_workers=num_workers, amp=amp, desc=desc, progress=progress)
    if task.protocol != "tirg":
        return task_metrics(task, query_feats, gallery_feats, max_chunk_elems=max_chunk_elems, nonfinite=nonfinite)
    return retrieval_metrics(task, query_feats, gallery_feats, ks=task_ks(task) if ks is None else ks,
                             max_chunk_elems=max_chunk_elems, nonfinite=nonfinite)


def task_ks(task: RetrievalTask) -> tuple[int, ...]:
    """The task's recall cut-offs: ``task.ks``, or the reference's ``DEFAULT_KS``."""
    return tuple(task.ks) if task.ks else DEFAULT_KS


# ----------------------------------------------------------------------------------------------------------------
# Single-target protocols of later work (CIRR, the standard Fashion IQ protocol), pure functions
# ----------------------------------------------------------------------------------------------------------------

CIRR_KS: tuple[int, ...] = (1, 5, 10, 50)  # CIRR's Recall@K (Liu et al., ICCV 2021, Sec. 5)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)  # CIRR's Recall_subset@K over the img_set members
FASHIONIQ_STANDARD_KS: tuple[int, ...] = (10, 50)  # R@10 and R@50 of CLIP4Cir and its successors


def target_ranks_from_sims(sims: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
                           candidates: torch.Tensor | None = None, exclude_mode: str = "removed") -> torch.Tensor:
    """0-based rank of each query's one target item in its similarity row.

    sims: (Q, G) similarities; targets: (Q,) gallery position of the target, -1 for none (rank = number of
    candidates: never a hit). exclude: (Q,) gallery position taken out of the query's ranking (its reference image),
    -1 for none. ``exclude_mode``: ``'removed'`` (CIRR: the item is not in the ranking at all, so a target equal to
    it is never found) or ``'last'`` (TIRG: the item stays, ranked after every other one).
    candidates: (Q, M) gallery positions that make up each query's ranking (CIRR's subset: the img_set members
    other than the reference), -1 for padding; None = the whole gallery.

    Ranking by descending similarity, ties to the lower gallery position (a stable sort of ``-sims``). Returns a
    LongTensor (Q,) on ``sims.device``.
    """
    if exclude_mode not in ("removed", "last"):
        raise ValueError(f"exclude_mode must be 'removed' or 'last', got {exclude_mode!r}")
    n_queries, n_gallery = sims.shape
    device = sims.device
    sims = sims.float().clone()  # (Q, G)
    targets = targets.to(device=device, dtype=torch.long)  # (Q,)
    rows = torch.arange(n_queries, device=device)  # (Q,)
    if candidates is None:
        candidates = torch.arange(n_gallery, device=device).expand(n_queries, n_gallery)  # (Q, G) a view
    candidates = candidates.to(device=device, dtype=torch.long)  # (Q, M)
    valid = candidates >= 0  # (Q, M)
    if exclude is not None:
        exclude = exclude.to(device=device, dtype=torch.long)  # (Q,)
        is_excluded = (candidates == exclude.unsqueeze(1)) & (exclude.unsqueeze(1) >= 0)  # (Q, M)
        if exclude_mode == "removed":
            valid = valid & ~is_excluded
        else:
            cols = exclude.clamp_min(0)
            sims[rows, cols] = torch.where(exclude >= 0, float("-inf"), sims[rows, cols])
    cand_sims = sims.gather(1, candidates.clamp_min(0))  # (Q, M)
    is_target = (candidates == targets.unsqueeze(1)) & valid & (targets.unsqueeze(1) >= 0)  # (Q, M)
    found = is_target.any(dim=1)  # (Q,)
    t_sim = torch.where(is_target, cand_sims, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    before = valid & ((cand_sims > t_sim) | ((cand_sims == t_sim) & (candidates < targets.unsqueeze(1))))  # (Q, M)
    n_valid = valid.sum(dim=1)  # (Q,)
    return torch.where(found, before.sum(dim=1), n_valid)


def _similarities(query_feats: torch.Tensor, gallery_unit: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (Q, G) in full fp32: the query rows L2-normalised here, ``gallery_unit`` already
    ``normalize_rows`` (normalised once by the caller, not once per query chunk; a zero row stays zero)."""
    with torch.autocast(device_type=query_feats.device.type, enabled=False), _full_fp32_matmul():
        queries = F.normalize(query_feats.float(), dim=1)  # (Q, D)
        return queries @ gallery_unit.to(device=query_feats.device).t()  # (Q, G)


def _target_positions(task: RetrievalTask, view: str = "image") -> torch.Tensor:
    """(Q,) gallery position of each query's target label (its first occurrence), -1 where it is absent."""
    first: dict[Any, int] = {}
    for g, label in enumerate(task.gallery_labels[view]):
        first.setdefault(label, g)
    return torch.tensor([first.get(t, -1) for t in task.query_targets[view]], dtype=torch.long)


def _query_chunks(n_queries: int, n_columns: int, max_chunk_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, int(max_chunk_elems) // max(1, n_columns))
    for start in range(0, n_queries, step):
        yield start, min(start + step, n_queries)


def cirr_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                 max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> OrderedDict[str, float]:
    """CIRR's official validation protocol (Liu et al., ICCV 2021; the CIRR repository's evaluation).

    The gallery is every image of the split, the reference image is removed from its own ranking
    (``task.query_exclude``), the hit is ``target_hard`` (``task.query_targets['image']``):
    ``recall_top{1,5,10,50}_correct_composition``. ``recall_subset_top{1,2,3}_correct_composition``: the same
    similarities ranked over ``task.query_subsets`` only (the img_set members other than the reference).
    """
    n_queries = len(task.query_source)
    targets = _target_positions(task)  # (Q,)
    exclude = torch.tensor(task.query_exclude if task.query_exclude is not None else [-1] * n_queries)  # (Q,)
    width = max((len(s) for s in task.query_subsets or []), default=0)
    subsets = torch.full((n_queries, width), -1, dtype=torch.long)  # (Q, M)
    for q, members in enumerate(task.query_subsets or []):
        subsets[q, :len(members)] = torch.tensor(members, dtype=torch.long)
    ranks, subset_ranks = [], []
    gallery_unit = normalize_rows(gallery_feats)  # (G, D)
    for start, stop in _query_chunks(n_queries, len(task.gallery), max_chunk_elems):
        sims = _similarities(query_feats[start:stop], gallery_unit)  # (C, G)
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
    labels = task.gallery_labels["image"]
    out: OrderedDict[str, float] = OrderedDict()
    per_group: dict[str, dict[int, float]] = {}
    for group, members in task.query_groups.items():
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
        for start, stop in _query_chunks(len(q_idx), len(g_idx), max_chunk_elems):
            sims = _similarities(query_feats[q_idx[start:stop].to(query_feats.device)], group_gallery)  # (C, Gc)
            ranks.append(target_ranks_from_sims(sims, targets[start:stop]).cpu())
        per_group[group] = recall_at_k(torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long),
                                       FASHIONIQ_STANDARD_KS)
    for k in FASHIONIQ_STANDARD_KS:
        for group in task.query_groups:
            out[f"recall_top{k}_correct_{group}"] = per_group[group][k]
        out[f"recall_top{k}_correct_mean"] = sum(per_group[g][k] for g in per_group) / max(1, len(per_group))
    return out


def task_metrics(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                 max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse") -> OrderedDict[str, float]:
    """The metrics of ``task.protocol``: ``'tirg'`` (``retrieval_metrics``, at ``task.ks`` when given),
    ``'cirr'`` (``cirr_metrics``) or ``'fashioniq_standard'`` (``fashioniq_standard_metrics``).

    Non-finite features: the TIRG protocol follows ``nonfinite`` (see ``first_hit_ranks``); the later-work
    protocols always refuse them (``NonFiniteFeaturesError``)."""
    if task.protocol != "tirg":
        _finite_rows(query_feats, gallery_feats, "refuse")
    if task.protocol == "cirr":
        return cirr_metrics(task, query_feats, gallery_feats, max_chunk_elems)
    if task.protocol == "fashioniq_standard":
        return fashioniq_standard_metrics(task, query_feats, gallery_feats, max_chunk_elems)
    if task.protocol != "tirg":
        raise ValueError(f"unknown retrieval protocol {task.protocol!r}")
    return retrieval_metrics(task, query_feats, gallery_feats, ks=task_ks(task), max_chunk_elems=max_chunk_elems,
                             nonfinite=nonfinite)


def ranked_names(task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int,
                 subset_k: int, max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> tuple[list[list], list[list]]:
    """Per query, the ``k`` best gallery labels with the reference removed (``top_k`` with its exclusion), and the
    ``subset_k`` best of ``task.query_subsets`` (the CIRR test-server submission's two lists)."""
    labels = task.gallery_labels["image"]
    exclude = torch.tensor(task.query_exclude, dtype=torch.long) if task.query_exclude is not None else None
    _, idx = top_k(query_feats, gallery_feats, k, exclude, max_chunk_elems)  # (Q, k)
    top = [[labels[i] for i in row] for row in idx.tolist()]
    subset_top = []
    gallery_unit = normalize_rows(gallery_feats)  # (G, D)
    for start, stop in _query_chunks(len(task.query_source), len(task.gallery), max_chunk_elems):
        sims = _similarities(query_feats[start:stop], gallery_unit).cpu()  # (C, G)
        for c, q in enumerate(range(start, stop)):
            members = sorted(m for m in task.query_subsets[q] if exclude is None or m != int(exclude[q]))
            member_sims = sims[c, torch.tensor(members, dtype=torch.long)] if members else torch.empty(0)
            order = torch.sort(member_sims, descending=True, stable=True).indices[:subset_k].tolist()
            subset_top.append([labels[members[i]] for i in order])
    return top, subset_top
