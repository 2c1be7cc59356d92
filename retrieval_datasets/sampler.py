"""Sampling and batching of the training items: the ``(epoch, index, slot)`` keys of a seeded epoch
(``EpochBatchSampler``) and their batches (``collate_train``)."""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from errors import UserInputError
from seeding import Stream, torch_seed


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, index, slot)`` keys: a seeded permutation per epoch, exact mid-epoch resume.

    The permutation of the sources comes from a torch.Generator seeded from ``(seed, epoch)``. With
    ``dataset.items_per_source == 2`` (MIT-States) each drawn source fills two consecutive slots (0 and 1), and an
    epoch has ``len(dataset)`` items, as the original (its shuffled loader paired consecutive items). ``batch_size``
    is the global batch; with ``world_size > 1`` rank r gets the r-th contiguous share of every global batch, so the
    shares of all ranks concatenate to the single-process batch. ``set_epoch(e)`` selects the epoch (and resets
    the start batch); ``set_start_batch(n)`` then skips the first n batches of that epoch.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise UserInputError(f"batch size {batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserInputError(f"rank {rank} / world size {world_size} is not a valid process layout")
        if batch_size % world_size:
            raise UserInputError(f"batch size {batch_size} does not divide evenly over {world_size} processes: "
                                 f"use a multiple of {world_size}")
        self.n_items = len(dataset)
        self.items_per_source = int(getattr(dataset, "items_per_source", 1))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start_batch = 0

    def set_start_batch(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"start batch must be >= 0, got {n}")
        self.start_batch = int(n)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_items // self.batch_size
        return math.ceil(self.n_items / self.batch_size)

    def epoch_keys(self, epoch: int) -> list[tuple[int, int, int]]:
        """All ``(epoch, index, slot)`` keys of an epoch, in order (before batching)."""
        generator = torch.Generator().manual_seed(torch_seed(self.seed, epoch, Stream.SAMPLER))
        perm = torch.randperm(self.n_items, generator=generator).tolist()
        k = self.items_per_source
        return [(epoch, perm[j // k], j % k) for j in range(self.n_items)]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        keys = self.epoch_keys(self.epoch)
        share = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            batch = keys[b * self.batch_size:(b + 1) * self.batch_size]
            if len(batch) == self.batch_size:
                yield batch[self.rank * share:(self.rank + 1) * share]
            else:  # the last partial batch (drop_last=False): near-equal contiguous shares
                bounds = np.linspace(0, len(batch), self.world_size + 1).round().astype(int)
                yield batch[bounds[self.rank]:bounds[self.rank + 1]]


def collate_train(items: Sequence[dict | None], keep_size: bool = False) -> dict:
    """Stacks training items into a batch; items that are None (an unreadable image) are dropped. The batch's
    ``bad_paths`` lists the unreadable image files that the notes ``{'bad_paths': [...]}`` among the items name
    (``_RetrievalDataset.__getitems__``: met in the process that loaded the batch, maybe a DataLoader worker).

    ``keep_size=True`` (several processes, whose batch shares must stay equal for the all-gathers) replaces them
    by copies of the first readable item instead.
    """
    bad_paths = [p for it in items if it is not None and "source_img" not in it for p in it.get("bad_paths", ())]
    items = [it for it in items if it is None or "source_img" in it]
    if keep_size and any(it is None for it in items):
        first = next((it for it in items if it is not None), None)
        if first is None:
            raise UserInputError("every image of a training batch share is unreadable; fix the dataset's images")
        items = [first if it is None else it for it in items]
    items = [it for it in items if it is not None]
    if not items:
        return {"source_img": torch.empty(0, 3, 0, 0, dtype=torch.uint8),
                "target_img": torch.empty(0, 3, 0, 0, dtype=torch.uint8), "text": [],
                "source_img_id": torch.empty(0, dtype=torch.long), "target_img_id": torch.empty(0, dtype=torch.long),
                "target_caption": [], "bad_paths": bad_paths}
    return {
        "source_img": torch.stack([it["source_img"] for it in items]),  # (B, 3, S, S) uint8
        "target_img": torch.stack([it["target_img"] for it in items]),  # (B, 3, S, S) uint8
        "text": [it["text"] for it in items],
        "source_img_id": torch.tensor([it["source_img_id"] for it in items], dtype=torch.long),  # (B,)
        "target_img_id": torch.tensor([it["target_img_id"] for it in items], dtype=torch.long),  # (B,)
        "target_caption": [it["target_caption"] for it in items],
        "bad_paths": bad_paths,  # unreadable image files met while loading this batch
    }
