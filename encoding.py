"""The model's features of a retrieval task, as the evaluation computes them (``encode_task``).

Each image that a task's gallery or one of its queries uses is loaded and encoded once (``model.image_features``):
its embedding is kept if it is in the gallery, its composition state if it is a query source; the queries are then
composed in batches (``model.compose_img_text_features``) to their ``'repres'`` feature. With a process group of
several ranks, each rank encodes a strided share of the images and the rows are exchanged at the end.
``test_retrieval.evaluate`` ranks these features; ``retrieve.py`` encodes its gallery and queries with them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from datasets import RetrievalTask
from distributed import all_gather_rows, distributed_world
from progress import progress
from retrieval_datasets import completeness

__all__ = ["encode_task"]

logger = logging.getLogger("test_retrieval")  # the name its log lines carry


class _KeyedImages(Dataset):
    """``dataset.load_image(key)`` for a list of keys, so a DataLoader can prefetch them (uint8 (3, S, S))."""

    def __init__(self, dataset: Any, keys: list) -> None:
        self.dataset = dataset
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load_image(self.keys[i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """A batch (B, 3, S, S) and the unreadable files met meanwhile, which a worker thus sends back (the
        loader's collate_fn=tuple keeps the pair)."""
        return torch.stack([self[i] for i in indices]), completeness.take_new_bad(self.dataset)


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


@dataclasses.dataclass
class _Share:
    """This process's part of a task's encoding: its images, the buffer rows where each one's embedding (gallery)
    and composition state (query source) are kept, and the queries it composes."""

    used: list[int]  # (U,) positions in task.image_keys that the gallery or a query needs, sorted
    slot: dict[int, int]  # position -> index in `used`
    mine: list[int]  # (M,) this rank's images: used[rank::world_size]
    gallery_rows: torch.Tensor  # (M,) row in the gallery buffer of each image of `mine`, -1: not kept
    source_rows: torch.Tensor  # (M,) row in the state buffer of each image of `mine`, -1: not kept
    source_row_of: dict[int, int]  # position -> row in the state buffer
    n_gallery: int  # rows of the gallery buffer
    n_sources: int  # rows of the state buffer
    queries: list[int]  # the queries whose source image this rank encodes


def _share(task: RetrievalTask, rank: int, world_size: int) -> _Share:
    """Rank ``rank``'s strided share of the images the task uses, and its queries."""
    gallery_set, source_set = set(task.gallery), set(task.query_source)
    used = sorted(gallery_set | source_set)
    slot = {p: i for i, p in enumerate(used)}
    mine = used[rank::world_size]
    gallery_rows, source_rows, source_row_of = [], [], {}
    n_gal_local = n_src_local = 0
    for p in mine:
        gallery_rows.append(n_gal_local if p in gallery_set else -1)
        n_gal_local += p in gallery_set
        if p in source_set:
            source_row_of[p] = n_src_local
            n_src_local += 1
        source_rows.append(source_row_of.get(p, -1))
    queries = [q for q in range(len(task.query_source)) if slot[task.query_source[q]] % world_size == rank]
    return _Share(used, slot, mine, torch.tensor(gallery_rows, dtype=torch.long),
                  torch.tensor(source_rows, dtype=torch.long), source_row_of, n_gal_local, n_src_local, queries)


def _encode_images(model: torch.nn.Module, loader: DataLoader, share: _Share, device: torch.device,
                   autocast: torch.autocast, desc: str, show: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every image of the share through ``model.image_features`` once: ``(gallery embeddings (n_gallery, D) fp32,
    query source states (n_sources, ...))``, None where the share keeps none."""
    gallery_buf: torch.Tensor | None = None  # (n_gallery, D) fp32
    state_buf: torch.Tensor | None = None  # (n_sources, ...) the model's state dtype
    start = 0
    for imgs, bad_paths in progress(loader, desc=f"{desc} images", disable=not show):
        completeness.add_bad(loader.dataset.dataset, bad_paths)  # met in a DataLoader worker: into the record
        imgs = imgs.to(device, non_blocking=True)  # (B, 3, S, S) uint8
        with autocast:
            embedding, state = model.image_features(imgs)  # (B, D), (B, ...)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"model.image_features must return a tensor state, got {type(state).__name__}")
        g_rows = share.gallery_rows[start:start + imgs.shape[0]]  # (B,) on the CPU
        s_rows = share.source_rows[start:start + imgs.shape[0]]  # (B,) on the CPU
        start += imgs.shape[0]
        if gallery_buf is None and share.n_gallery:
            gallery_buf = torch.empty(share.n_gallery, embedding.shape[1], dtype=torch.float32, device=device)
        if state_buf is None and share.n_sources:
            state_buf = torch.empty((share.n_sources,) + tuple(state.shape[1:]), dtype=state.dtype, device=device)
        # which rows to keep is known on the CPU: index copies, no boolean mask on the device (host sync)
        if gallery_buf is not None:
            _scatter_rows(gallery_buf, g_rows, embedding.float())
        if state_buf is not None:
            _scatter_rows(state_buf, s_rows, state)
    return gallery_buf, state_buf


def _compose_queries(model: torch.nn.Module, task: RetrievalTask, share: _Share, state_buf: torch.Tensor | None,
                     batch_size: int, device: torch.device, autocast: torch.autocast, desc: str,
                     show: bool) -> torch.Tensor | None:
    """The share's queries composed in batches from the kept source states and their texts: the ``'repres'``
    features (q_local, D) fp32, None for no query."""
    query_parts = []
    for b in progress(range(0, len(share.queries), batch_size), desc=f"{desc} queries", disable=not show):
        batch = share.queries[b:b + batch_size]
        rows = torch.tensor([share.source_row_of[task.query_source[q]] for q in batch]).to(
            device, non_blocking=True)  # (B,) no host sync
        with autocast:
            text_feats = model.extract_text_feature([task.query_text[q] for q in batch])  # (B, T)
            repres = model.compose_img_text_features(state_buf[rows], text_feats)["repres"]  # (B, D)
        query_parts.append(repres.float())
    return torch.cat(query_parts) if query_parts else None  # (q_local, D)


def _complete_features(task: RetrievalTask, share: _Share, gallery_buf: torch.Tensor | None,
                       query_local: torch.Tensor | None, world_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows put together: the task's query features (Q, D) and gallery features (G, D)."""
    n_queries = len(task.query_source)
    gallery_set = set(task.gallery)
    gallery_positions = torch.tensor([share.slot[p] for p in share.mine if p in gallery_set], dtype=torch.long)
    image_feats = _assemble_rows(gallery_buf, gallery_positions, len(share.used), world_size, device)  # (U, D)
    gallery_feats = image_feats[torch.tensor([share.slot[p] for p in task.gallery], dtype=torch.long,
                                             device=device)]  # (G, D)
    query_feats = _assemble_rows(query_local, torch.tensor(share.queries, dtype=torch.long), n_queries,
                                 world_size, device)  # (Q, D)
    if query_feats.shape[1] != gallery_feats.shape[1]:  # no query or no gallery item: width unknown there
        dim = max(query_feats.shape[1], gallery_feats.shape[1])
        query_feats = query_feats.new_zeros(n_queries, dim) if query_feats.shape[1] == 0 else query_feats
        gallery_feats = (gallery_feats.new_zeros(len(task.gallery), dim) if gallery_feats.shape[1] == 0
                         else gallery_feats)
    return query_feats, gallery_feats


def encode_task(model: torch.nn.Module, dataset: Any, task: RetrievalTask, *, batch_size: int = 32,
                device: torch.device | str | None = None, num_workers: int = 0, amp: bool = False,
                desc: str = "test", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's query features (Q, D) and gallery features (G, D), fp32 on ``device`` (not normalised), as the
    evaluation computes them (see ``test_retrieval``'s module docstring for the protocol).

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
    share = _share(task, rank, world_size)
    logger.info("%s: %d images (%d on this rank), %d queries (%d on this rank), gallery %d", desc, len(share.used),
                len(share.mine), n_queries, len(share.queries), len(task.gallery))
    loader = DataLoader(_KeyedImages(dataset, [task.image_keys[p] for p in share.mine]), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda", collate_fn=tuple,
                        generator=torch.Generator())  # worker seeds from its own generator: training's RNG stays put
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    training_flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            gallery_buf, state_buf = _encode_images(model, loader, share, device, autocast, desc, show)
            query_local = _compose_queries(model, task, share, state_buf, batch_size, device, autocast, desc, show)
            return _complete_features(task, share, gallery_buf, query_local, world_size, device)
    finally:
        for module, flag in training_flags:
            module.training = flag
