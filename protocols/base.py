"""What every retrieval protocol shares: the ``Protocol`` interface that ``test_retrieval.task_metrics`` dispatches
to, L2-normalised rows and cosine similarities in full fp32, the rank of a query's one target in its similarity
row, and recall@k over ranks. Pure functions of tensors."""
from __future__ import annotations

import abc
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from datasets import RetrievalTask
from torch_functions import full_fp32_matmul

DEFAULT_MAX_CHUNK_ELEMS: int = 2 ** 25  # similarity entries held at once (128 MiB of fp32 per buffer)


class Protocol(abc.ABC):
    """A retrieval protocol: the metric names it gives for a task, the metrics of query and gallery features, and
    whether it refuses non-finite features (``test_retrieval.task_metrics`` then raises
    ``NonFiniteFeaturesError`` before computing anything) or follows the caller's ``nonfinite`` policy."""

    refuses_nonfinite: bool = True

    @abc.abstractmethod
    def metric_names(self, task: RetrievalTask) -> list[str]:
        """The names ``metrics`` gives for ``task``, in its order, without computing anything."""

    @abc.abstractmethod
    def metrics(self, task: RetrievalTask, query_feats: torch.Tensor, gallery_feats: torch.Tensor, *,
                max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS, nonfinite: str = "refuse",
                ks: Sequence[int] | None = None) -> OrderedDict[str, float]:
        """The metrics of the task's query features (Q, D) against its gallery features (G, D). ``nonfinite``: the
        policy for non-finite rows where the protocol does not refuse them; ``ks``: recall cut-offs where the
        protocol lets the caller choose them (None: the protocol's or the task's)."""


def normalize_rows(feats: torch.Tensor) -> torch.Tensor:
    """(N, D) rows L2-normalised in fp32 as the ranking normalises them (a zero row stays zero)."""
    return F.normalize(feats.float(), dim=1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """recall@k = mean(rank < k) over the (Q,) first-hit ranks; NaN for an empty set of queries."""
    if ranks.numel() == 0:
        return {k: math.nan for k in ks}
    return {k: (ranks < k).double().mean().item() for k in ks}


def similarities(query_feats: torch.Tensor, gallery_unit: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (Q, G) in full fp32: the query rows L2-normalised here, ``gallery_unit`` already
    ``normalize_rows`` (normalised once by the caller, not once per query chunk; a zero row stays zero)."""
    with torch.autocast(device_type=query_feats.device.type, enabled=False), full_fp32_matmul():
        queries = F.normalize(query_feats.float(), dim=1)  # (Q, D)
        return queries @ gallery_unit.to(device=query_feats.device).t()  # (Q, G)


def query_chunks(n_queries: int, n_columns: int, max_chunk_elems: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive query chunks whose (chunk, n_columns) buffer holds at most
    ``max_chunk_elems`` entries (at least one query per chunk)."""
    step = max(1, int(max_chunk_elems) // max(1, n_columns))
    for start in range(0, n_queries, step):
        yield start, min(start + step, n_queries)


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
