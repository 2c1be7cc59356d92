"""The random streams: one tag each, in one enum; the streams they seed are independent."""
from __future__ import annotations

import ast
import os

import numpy as np

import seeding
from seeding import Stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stream_tags_are_distinct_and_apart_from_indices():
    values = [s.value for s in Stream]
    assert len(values) == len(set(values))
    assert all(v > 1 << 40 for v in values)  # larger than any epoch, index or query count


def test_no_stream_tag_outside_seeding():
    """Every tag lives in seeding.Stream: no module assigns a *_TAG constant of its own."""
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, name), encoding="utf-8").read())
            tags = [t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name) and t.id.endswith("_TAG")]
            assert tags == [], f"{name} defines {tags}: add them to seeding.Stream"


def test_val_nouns_and_synthetic_streams_differ():
    a = seeding.seeded_rng(0, Stream.VAL_NOUNS).integers(1 << 30, size=8)
    b = seeding.seeded_rng(0, Stream.SYNTHETIC).integers(1 << 30, size=8)
    assert not np.array_equal(a, b)


def test_seeded_rng_depends_only_on_its_parts():
    a = seeding.seeded_rng(3, 7, Stream.SAMPLER).random(4)
    assert np.array_equal(a, seeding.seeded_rng(3, 7, Stream.SAMPLER).random(4))
    assert not np.array_equal(a, seeding.seeded_rng(3, 8, Stream.SAMPLER).random(4))
    assert np.array_equal(seeding.seeded_rng(-1).random(2), seeding.seeded_rng((1 << 64) - 1).random(2))
    assert seeding.torch_seed(1, 2) == seeding.torch_seed(1, 2) != seeding.torch_seed(1, 3)
