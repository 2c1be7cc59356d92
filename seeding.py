"""Every seeded random stream of the project, keyed by one tag each.

A stream is a numpy Generator seeded by the run's ``--seed``, the stream's ``Stream`` tag and any further integers
(epoch, index, ...): ``seeded_rng(seed, epoch, index, Stream.SAMPLER)``. Distinct tags keep the streams independent;
``Stream`` is an ``enum.unique`` IntEnum, so two streams cannot share a tag.
"""
from __future__ import annotations

import enum

import numpy as np

_U64 = 1 << 64
_BASE = 1 << 40  # larger than any epoch, index or query count; non-zero (SeedSequence drops trailing zero words)


@enum.unique
class Stream(enum.IntEnum):
    """The tag of each random stream (an extra entropy word of its SeedSequence)."""

    SAMPLER = _BASE + 1  # the training batches' order (EpochBatchSampler)
    TRAIN_TASK = _BASE + 2  # the seeded sample of training queries for the train-split metrics
    SYNTHETIC = _BASE + 3  # the embedded synthetic dataset's images and captions
    TRIPLETS = _BASE + 4  # the generated triplets.csv example set
    PICTURE = _BASE + 5  # the queries of the retrieval pictures drawn during training
    VAL_NOUNS = _BASE + 6  # MIT-States: the training nouns held out by --val_nouns (shared SYNTHETIC's tag before)
    INDEX_SAMPLE = _BASE + 20  # the gallery rows a FAISS index trains on and measures its recall on (ann.py)
    INDEX_BENCH = _BASE + 21  # the synthetic gallery and query vectors of index_bench.measure_backend


def seed_words(*parts: int) -> list[int]:
    """``parts`` as unsigned 64-bit words (negative seeds wrap modulo 2**64)."""
    return [int(p) % _U64 for p in parts]


def seeded_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator that depends only on the integers ``parts`` (negative seeds wrap modulo 2**64)."""
    return np.random.default_rng(seed_words(*parts))


def torch_seed(*parts: int) -> int:
    """A 64-bit ``torch.Generator`` seed that depends only on the integers ``parts`` (a sampler's epoch order)."""
    return int(np.random.SeedSequence(seed_words(*parts)).generate_state(1, np.uint64)[0])
