"""Datasets in their published layouts (MIT-States, Fashion200k, Fashion IQ) and a synthetic one."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RetrievalTask:
    """One retrieval benchmark: queries (source image + text) ranked against a gallery."""

    image_keys: list  # unique images to encode, in order; dataset.load_image(key)
    gallery: list[int]  # (G,) positions in image_keys, gallery order
    query_source: list[int]  # (Q,) positions in image_keys
    query_text: list[str]  # (Q,)
    gallery_labels: dict[str, list[str]]  # view -> (G,) labels, e.g. composition / adj / noun
    query_targets: dict[str, list[str]]  # view -> (Q,) target labels, same views
    query_exclude: list[int] | None = None  # (Q,) gallery position ranked last (the source), -1 for none
    query_groups: dict[str, list[bool]] | None = None  # Fashion IQ: category -> (Q,) membership
