"""The synthetic dataset's public names (``retrieval_datasets.synthetic``, re-exported): ``generate_synthetic``
writes the small MIT-States-layout dataset of ``--dataset synthetic``, ``write_triplets_csv`` the same data as a
``triplets.csv`` for ``--dataset triplets``."""
from __future__ import annotations

from retrieval_datasets.synthetic import (SYNTHETIC_ADJECTIVES, SYNTHETIC_FORMAT, SYNTHETIC_MANIFEST,
                                          SYNTHETIC_TEST_NOUNS, SYNTHETIC_TRAIN_NOUNS, generate_synthetic,
                                          render_synthetic_image, write_triplets_csv)

__all__ = ["SYNTHETIC_ADJECTIVES", "SYNTHETIC_FORMAT", "SYNTHETIC_MANIFEST", "SYNTHETIC_TEST_NOUNS",
           "SYNTHETIC_TRAIN_NOUNS", "generate_synthetic", "render_synthetic_image", "write_triplets_csv"]
