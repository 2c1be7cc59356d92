"""Search over a feature file (``feature_store.FeatureFile``): exact, and approximate with FAISS re-ranked exactly.

``exact_top_k`` ranks as the evaluation ranks (``test_retrieval.top_k``): cosine similarity of the L2-normalised
query against the stored rows in fp32 (float16 rows converted chunk by chunk), descending, ties to the lower
gallery position. It converts the rows chunk by chunk into one reused float32 buffer (``FeatureFile.chunks``),
gathers their similarities into a buffer of at most ``MAX_SIM_ELEMS``, keeps that buffer's top k with the tie rule
and merges it into the running top k, so its memory is those two buffers' whatever the gallery's size.

The FAISS backend (faiss-cpu, an optional dependency) is an inverted-file index with scalar-quantised codes (SQ8,
SQ4 for a large gallery: ``faiss_spec``). It proposes ``CANDIDATES_PER_RESULT * k`` candidates per query, whose stored
rows are read back and scored exactly (``rerank``): every score it reports is the exact cosine of the stored
vectors, and its order is the exact search's order among the candidates. ``build_faiss`` trains it, adds the rows
chunk by chunk, and picks the smallest ``nprobe`` (lists visited per query) whose recall@10 against exact search
reaches ``RECALL_TARGET`` on gallery rows held out of its training (each left out of its own results), recording
the figure.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserInputError
from feature_store import ROW_ALIGN, FeatureFile, check_similarities
from seeding import Stream, seeded_rng
from torch_functions import full_fp32_matmul

FAISS_MISSING = "--backend faiss needs faiss: pip install faiss-cpu"
BACKENDS = ("exact", "faiss")
MAX_SIM_ELEMS = 1 << 24  # (queries x gallery rows) similarities held at once: 64 MiB of fp32
CANDIDATES_PER_RESULT = 10  # FAISS candidates re-ranked exactly per result asked for
RERANK_BLOCK = 64  # queries re-ranked together: their candidates' rows read once, one matmul
RECALL_TARGET = 0.985  # recall@10 that build_faiss tunes nprobe for, on held-out rows
RECALL_QUERIES = 1000  # held-out rows that build_faiss measures recall on
SQ8_MAX_CODE_BYTES = 2 << 30  # SQ8 codes (rows x dim bytes) up to this size; SQ4 above it
TRAIN_POINTS_PER_LIST = 64  # k-means training rows per inverted list (FAISS warns below 39)


def import_faiss() -> Any:
    """The ``faiss`` module; UserInputError ``FAISS_MISSING`` when it is not installed."""
    try:
        import faiss  # an optional dependency: only --backend faiss needs it
    except ImportError:
        raise UserInputError(FAISS_MISSING) from None
    return faiss


# ----------------------------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------------------------

def _order(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of every row of ``(scores, ids)`` (Q, n), by score descending, ties to the lower id."""
    ids_sorted, perm = torch.sort(ids, dim=1, stable=True)  # (Q, n) ascending ids
    scores = scores.gather(1, perm)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k)
    return scores.gather(1, order), ids_sorted.gather(1, order)


def _chunk_top_k(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, column ids)`` (Q, min(k, C)) of the best ``k`` columns of ``sims`` (Q, C), descending, ties to
    the lower column: ``torch.topk``, then a stable sort of a row whose k-th score is shared with a column that
    ``topk`` left out."""
    kk = min(k, sims.shape[1])
    vals, idx = torch.topk(sims, kk, dim=1, sorted=False)  # (Q, kk)
    kth = vals.min(dim=1, keepdim=True).values  # (Q, 1)
    crowded = torch.nonzero((sims >= kth).sum(dim=1) > kk).flatten()  # rows with a tie across the cut
    for r in crowded.tolist():
        idx[r] = torch.sort(sims[r], descending=True, stable=True).indices[:kk]
        vals[r] = sims[r, idx[r]]
    return _order(vals, idx, kk)


class RunningTopK:
    """The best ``k`` columns per query row seen so far over chunks of similarities, descending, ties to the
    lower column: each chunk's top k (``_chunk_top_k``) merged with the kept ones."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = int(k)
        self.scores = torch.empty(n_queries, 0)  # (Q, <=k)
        self.ids = torch.empty(n_queries, 0, dtype=torch.long)  # (Q, <=k)

    def add(self, sims: torch.Tensor, first_column: int) -> None:
        """Merges the similarities ``sims`` (Q, C) of the columns ``first_column ...`` (after the kept ones)."""
        s, i = _chunk_top_k(sims, self.k)
        self.merge(s, i + first_column)

    def merge(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Merges ranked ``(scores, ids)`` (Q, n) of columns after the kept ones (a shard's ``exact_top_k``)."""
        self.scores, self.ids = _order(torch.cat([self.scores, scores], 1), torch.cat([self.ids, ids], 1), self.k)


def _blocks(n_queries: int, rows: int, rows_per_chunk: int) -> tuple[int, int]:
    """``(queries per block, similarity columns per block)``: at most ``MAX_SIM_ELEMS`` similarities, the columns a
    multiple of ``rows_per_chunk`` and no more than the gallery needs."""
    block = max(1, min(n_queries, MAX_SIM_ELEMS // rows_per_chunk))
    columns = max(rows_per_chunk, MAX_SIM_ELEMS // block // rows_per_chunk * rows_per_chunk)
    return block, min(columns, -(-rows // rows_per_chunk) * rows_per_chunk)


@contextlib.contextmanager
def _query_blocks(queries: torch.Tensor, rows: int,
                  rows_per_chunk: int) -> Iterator[tuple[list[tuple[int, torch.Tensor]], int, torch.Tensor]]:
    """``(blocks, columns, buffer)`` for scoring the queries (Q, D) against ``rows`` stored rows, with autocast off
    and fp32 matmuls (``full_fp32_matmul``) while the context is open: the L2-normalised queries cut into blocks of
    ``_blocks`` rows as ``(first query, block (B, D))``, the columns a buffer holds, and that buffer (B, columns)."""
    block, columns = _blocks(queries.shape[0], rows, rows_per_chunk)
    sims_buf = torch.empty(block, columns)  # (B, S)
    with torch.autocast(device_type="cpu", enabled=False), full_fp32_matmul():
        normed = F.normalize(queries.float().cpu(), dim=1)  # (Q, D)
        yield [(q0, normed[q0:q0 + block]) for q0 in range(0, queries.shape[0], block)], columns, sims_buf


def _similarities(features: FeatureFile, q: torch.Tensor, sims_buf: torch.Tensor, s0: int, s_n: int,
                  stop: int) -> torch.Tensor:
    """(B, s_n) similarities of the query block ``q`` (B, D) to the stored rows ``[s0, s0 + s_n)`` (none past
    ``stop``), written into ``sims_buf``: read in padded chunks of one shape (``FeatureFile.chunks(padded=True)``),
    so every chunk is one matmul of one shape and a row's score does not depend on its chunk."""
    for row0, chunk in features.chunks(s0, s0 + s_n, padded=True):
        n = min(features.rows_per_chunk, stop - row0)
        sims_buf[:q.shape[0], row0 - s0:row0 - s0 + n] = (q @ chunk.t())[:, :n]  # one matmul shape
    return sims_buf[:q.shape[0], :s_n]


def exact_top_k(features: FeatureFile, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, positions)`` (Q, min(k, G)) of every query (Q, D) against the stored rows ``[start, stop)`` (a
    shard; default all), as ``test_retrieval.top_k`` ranks them (cosine in fp32, descending, ties to the lower
    position); positions are the gallery's. ``exclude`` (Q,) is a position left out of that query's ranking (-1
    for none): it comes last with score -inf. Shards' results merge with ``RunningTopK.merge`` in row order.

    The rows are read in chunks of one shape (``FeatureFile.chunks(padded=True)``: a row's score does not depend on
    its chunk), and their similarities gathered into a (queries, columns) buffer of at most ``MAX_SIM_ELEMS``
    (``_blocks``), whose top k is merged into the running top k (``RunningTopK``)."""
    stop = features.rows if stop is None else min(stop, features.rows)
    n_queries, rows = queries.shape[0], max(0, stop - start)
    kk = min(int(k), rows)
    scores = torch.empty(n_queries, kk, dtype=torch.float32)  # (Q, k)
    positions = torch.empty(n_queries, kk, dtype=torch.long)  # (Q, k)
    if n_queries == 0 or kk == 0:
        return scores, positions
    with _query_blocks(queries, rows, features.rows_per_chunk) as (blocks, columns, sims_buf):
        for q0, q in blocks:  # q: (B, D)
            excl = None if exclude is None else exclude[q0:q0 + q.shape[0]].cpu()  # (B,)
            best = RunningTopK(q.shape[0], kk)
            for s0 in range(start, stop, columns):
                s_n = min(columns, stop - s0)
                sims = _similarities(features, q, sims_buf, s0, s_n, stop)  # (B, s_n)
                check_similarities(sims, s0)
                if excl is not None:
                    local = excl - s0  # (B,)
                    hit = torch.nonzero((local >= 0) & (local < s_n)).flatten()
                    sims[hit, local[hit]] = float("-inf")
                best.add(sims, s0)
            scores[q0:q0 + q.shape[0]], positions[q0:q0 + q.shape[0]] = best.scores, best.ids
    return scores, positions


def target_ranks(features: FeatureFile, queries: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor) -> list[tuple[int, float]]:
    """``(rank, score)`` per query (Q, D) of its target position (Q,) (-1 for none: ``(0, nan)``) over every stored
    row, as ``exact_top_k`` ranks: rank = 1 + #(rows scoring higher) + #(rows scoring equal at a lower position),
    the excluded position (Q,) not counted (a target that is the excluded position: ``(0, nan)``). The
    similarities are ``exact_top_k``'s computation (the same query blocks, ``_blocks``, and padded chunks of one
    shape, in fp32), so the score equals the one exact search reports, bit for bit."""
    n_queries, rows = queries.shape[0], features.rows
    targets, exclude = targets.cpu().long(), exclude.cpu().long()  # (Q,), (Q,)
    out = [(0, float("nan"))] * n_queries
    wanted = (targets >= 0) & (targets < rows) & (targets != exclude)  # (Q,)
    if n_queries == 0 or rows == 0 or not bool(wanted.any()):
        return out
    with _query_blocks(queries, rows, features.rows_per_chunk) as (blocks, columns, sims_buf):
        for q0, q in blocks:  # q: (B, D)
            b = slice(q0, q0 + q.shape[0])
            t, excl, want = targets[b], exclude[b], wanted[b]  # (B,)
            target_score = torch.full((q.shape[0],), float("nan"))  # (B,)
            for s0 in range(0, rows, columns):  # the target's own score first
                s_n = min(columns, rows - s0)
                sims = _similarities(features, q, sims_buf, s0, s_n, rows)  # (B, s_n)
                local = t - s0  # (B,)
                hit = torch.nonzero(want & (local >= 0) & (local < s_n)).flatten()
                target_score[hit] = sims[hit, local[hit]]
            above = torch.zeros(q.shape[0], dtype=torch.long)  # (B,) rows ranked before the target
            for s0 in range(0, rows, columns):
                s_n = min(columns, rows - s0)
                sims = _similarities(features, q, sims_buf, s0, s_n, rows)  # (B, s_n)
                check_similarities(sims, s0)
                position = torch.arange(s0, s0 + s_n)  # (s_n,)
                before = (sims > target_score[:, None]) | (
                    (sims == target_score[:, None]) & (position[None, :] < t[:, None]))  # (B, s_n)
                before &= position[None, :] != excl[:, None]
                above += before.sum(dim=1)
            for i in torch.nonzero(want).flatten().tolist():
                out[q0 + i] = (int(above[i]) + 1, float(target_score[i]))
    return out


def as_hits(scores: torch.Tensor, positions: torch.Tensor, k: int,
            exclude: torch.Tensor) -> list[list[tuple[int, float]]]:
    """``[(position, score)]`` per query: the first ``k`` that are not the excluded position (Q,)."""
    out = []
    for s, p, e in zip(scores.tolist(), positions.tolist(), exclude.tolist()):
        out.append([(g, v) for g, v in zip(p, s) if g != e][:k])
    return out


def exact_search(features: FeatureFile, queries: torch.Tensor, k: int,
                 exclude: torch.Tensor) -> list[list[tuple[int, float]]]:
    """``[(gallery position, score)] * min(k, ...)`` per query (Q, D) by ``exact_top_k``, the excluded position
    (Q,) (-1 for none) left out: the ranking of ``retrieve.rank`` on the same rows."""
    scores, positions = exact_top_k(features, queries, k + 1, exclude)
    return as_hits(scores, positions, k, exclude)


# ----------------------------------------------------------------------------------------------------------------
# FAISS: approximate candidates, exact re-ranking
# ----------------------------------------------------------------------------------------------------------------

def faiss_spec(rows: int, dim: int) -> str:
    """The FAISS index factory string for ``rows`` vectors of ``dim``: an inverted file of ``nlist`` ~ sqrt(rows)
    lists (fewer for a small gallery, so that each gets ``TRAIN_POINTS_PER_LIST`` training rows), its residuals
    scalar-quantised: 8 bits per value (SQ8, dim bytes per vector) while the codes take up to
    ``SQ8_MAX_CODE_BYTES``, 4 bits above (SQ4: 10 M x 512 in 2.6 GB).

    Chosen from measurements on 200 k x 512 clustered vectors (index_bench.py, 1 thread, a loaded 2-core
    machine), candidates re-ranked exactly: IVF450 with SQ8, SQ4 and PQ256 (256 bytes) all reach recall@10
    0.998-0.999 at nprobe 1, built in 15 s, 11 s and 790 s; PQ128 stays at 0.945 even visiting every list (its
    error exceeds the gaps between neighbours); 4 sqrt(rows) lists instead of sqrt(rows) build 3x slower for the
    same recall. HNSW builds too slowly at 10 M on 2 cores."""
    nlist = max(1, min(int(round(math.sqrt(rows))), rows // TRAIN_POINTS_PER_LIST))
    bits = 8 if rows * dim <= SQ8_MAX_CODE_BYTES else 4
    return f"IVF{nlist},SQ{bits}"


def rerank(features: FeatureFile, queries: torch.Tensor, candidates: np.ndarray, k: int,
           exclude: torch.Tensor) -> list[list[tuple[int, float]]]:
    """``[(position, exact score)] * <= k`` per query (Q, D): its candidate positions (Q, n) (-1 for none, as FAISS
    pads) scored against their stored rows in fp32, descending, ties to the lower position, the excluded one
    left out. The rows of all the queries' candidates are read once (``FeatureFile.gather``) and scored in one
    matmul, its columns padded to a multiple of ``ROW_ALIGN`` (one kernel path for every column: equal rows get
    equal scores)."""
    cand = np.asarray(candidates, dtype=np.int64)  # (Q, n)
    valid = (cand >= 0) & (cand != exclude.numpy()[:, None])  # (Q, n)
    ids = np.unique(cand[valid])  # (U,) ascending
    if len(ids) == 0:
        return [[] for _ in range(len(cand))]
    rows = torch.zeros(-(-len(ids) // ROW_ALIGN) * ROW_ALIGN, features.dim)  # (U', D)
    rows[:len(ids)] = features.gather(ids)
    with torch.autocast(device_type="cpu", enabled=False), full_fp32_matmul():
        sims = F.normalize(queries.float().cpu(), dim=1) @ rows.t()  # (Q, U')
    column = torch.from_numpy(np.searchsorted(ids, np.where(valid, cand, ids[0])))  # (Q, n)
    scores = torch.where(torch.from_numpy(valid), sims.gather(1, column), float("-inf"))  # (Q, n)
    positions = torch.from_numpy(np.where(valid, cand, np.iinfo(np.int64).max))  # (Q, n) invalid: last
    scores, positions = _order(scores, positions, k)
    return [[(g, v) for g, v in zip(p, sc) if v != float("-inf")]
            for p, sc in zip(positions.tolist(), scores.tolist())]


def faiss_search(index: Any, features: FeatureFile, queries: torch.Tensor, k: int, exclude: torch.Tensor,
                 nprobe: int) -> list[list[tuple[int, float]]]:
    """``[(position, exact score)] * <= k`` per query (Q, D): ``CANDIDATES_PER_RESULT * k`` candidates from the
    FAISS ``index`` visiting ``nprobe`` lists, re-ranked exactly (``rerank``, ``RERANK_BLOCK`` queries at a time),
    the excluded position (Q,) left out."""
    faiss = import_faiss()
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    n = min(features.rows, CANDIDATES_PER_RESULT * k + 1)
    normed = np.ascontiguousarray(F.normalize(queries.float().cpu(), dim=1).numpy(), dtype=np.float32)  # (Q, D)
    out = []
    for q0 in range(0, len(normed), RERANK_BLOCK):  # (block, block x n) similarities at a time
        _, candidates = index.search(normed[q0:q0 + RERANK_BLOCK], n)  # (B, n)
        out += rerank(features, queries[q0:q0 + RERANK_BLOCK], candidates, k, exclude[q0:q0 + RERANK_BLOCK])
    return out


def _sample(pool: np.ndarray | int, n: int, seed: int, draw: int) -> np.ndarray:
    """``min(n, len(pool))`` distinct members of ``pool`` (an int: ``range(pool)``), ascending, drawn by the
    seeded stream ``(seed, Stream.INDEX_SAMPLE, draw)``."""
    size = pool if isinstance(pool, int) else len(pool)
    return np.sort(seeded_rng(seed, Stream.INDEX_SAMPLE, draw).choice(pool, size=min(n, size), replace=False))


def _recall_at_10(index: Any, features: FeatureFile, held_out: np.ndarray, truth: list[list[int]],
                  nprobe: int) -> float:
    """Mean share of the exact top 10 (``truth``, per held-out row) that ``faiss_search`` finds."""
    queries = features.gather(held_out)
    hits = faiss_search(index, features, queries, 10, torch.from_numpy(held_out), nprobe)
    found = [len({g for g, _ in h} & set(t)) / max(1, len(t)) for h, t in zip(hits, truth)]
    return float(np.mean(found)) if found else 1.0


def build_faiss(features: FeatureFile, out_path: str, seed: int = 0, log=print, spec: str | None = None) -> dict:
    """Builds the FAISS index of the stored rows into ``out_path`` (``faiss_spec``): k-means and quantiser
    trained on ``TRAIN_POINTS_PER_LIST`` rows per list that are not among the ``RECALL_QUERIES`` held-out rows
    (where the gallery has that many),
    every row added chunk by chunk, then ``nprobe`` doubled from 1 until recall@10 against ``exact_top_k`` on the
    held-out rows (each left out of its own results) reaches ``RECALL_TARGET``. Returns ``{spec, nprobe,
    recall_at_10, recall_queries, build_s}``; ``log`` gets one line with the recall. ``spec``: another FAISS
    index factory string with an inverted file (for measurements)."""
    faiss = import_faiss()
    start = time.perf_counter()
    spec = spec or faiss_spec(features.rows, features.dim)
    index = faiss.index_factory(features.dim, spec, faiss.METRIC_INNER_PRODUCT)
    held_out = _sample(features.rows, RECALL_QUERIES, seed, 0)
    nlist = faiss.extract_index_ivf(index).nlist
    pool = np.setdiff1d(np.arange(features.rows), held_out)
    if len(pool) < nlist * TRAIN_POINTS_PER_LIST:  # a small gallery: every row trains (FAISS wants 39 per list)
        pool = np.arange(features.rows)
    train_ids = _sample(pool, nlist * TRAIN_POINTS_PER_LIST, seed, 1)
    index.train(np.ascontiguousarray(features.gather(train_ids).numpy()))
    for _, chunk in features.chunks():
        index.add(np.ascontiguousarray(chunk.numpy()))
    scores, positions = exact_top_k(features, features.gather(held_out), 11, torch.from_numpy(held_out))
    truth = [[g for g, _ in h] for h in as_hits(scores, positions, 10, torch.from_numpy(held_out))]
    nprobe, recall = 1, 0.0
    while True:
        recall = _recall_at_10(index, features, held_out, truth, nprobe)
        if recall >= RECALL_TARGET or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    tmp = f"{out_path}.tmp{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_path)
    info = {"spec": spec, "nprobe": nprobe, "recall_at_10": round(recall, 4), "recall_queries": len(held_out),
            "build_s": round(time.perf_counter() - start, 2)}
    log(f"faiss index {spec}, nprobe {nprobe}: recall@10 {recall:.4f} against exact search on {len(held_out)} "
        f"held-out gallery vectors")
    return info


def read_faiss(path: str) -> Any:
    """The FAISS index saved at ``path``."""
    return import_faiss().read_index(path)


def search(backend: str, features: FeatureFile, queries: torch.Tensor, k: int, exclude: torch.Tensor,
           faiss_index: Any = None, nprobe: int = 1) -> list[list[tuple[int, float]]]:
    """``exact_search`` or ``faiss_search`` by ``backend`` (``BACKENDS``)."""
    if backend == "exact":
        return exact_search(features, queries, k, exclude)
    return faiss_search(faiss_index, features, queries, k, exclude, nprobe)


def set_threads(threads: int) -> None:
    """Torch's CPU threads and, when FAISS is installed, its OpenMP threads (0: leave the defaults)."""
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    try:
        import faiss  # optional: set its threads only when it is there
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)
