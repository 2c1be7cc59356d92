"""The datasets' public names in one module: the loaders in their published layouts (MIT-States, Fashion200k,
Fashion IQ, CSS3D, CIRR, your own triplets.csv; the synthetic dataset uses the MIT-States layout), the training
sampler and batches, and ``build_splits`` / ``build_datasets``, which build the splits of any ``--dataset``
through its registry entry. Each lives in the package ``retrieval_datasets`` (one module per dataset,
``retrieval_datasets.registry`` for the entries); this module only re-exports them.
"""
from __future__ import annotations

from image_cache import BadImageError
from retrieval_datasets.base import DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions
from retrieval_datasets.cirr import CIRR, CIRR_SPLITS
from retrieval_datasets.css3d import CSS3D, CSS3D_FILE
from retrieval_datasets.fashion200k import Fashion200k, fashion200k_caption, get_different_word
from retrieval_datasets.fashioniq import (FASHION_IQ_CATEGORIES, FASHION_IQ_PROTOCOLS, FashionIQ,
                                         fashioniq_standard_text)
from retrieval_datasets.mitstates import MIT_STATES_TEST_NOUNS, MITStates
from retrieval_datasets.registry import (DATASET_NAMES, DATASETS, SELECT_ON, DatasetSpec, build_datasets, build_splits,
                                         dataset_spec)
from retrieval_datasets.sampler import EpochBatchSampler, collate_train
from retrieval_datasets.triplets import (TRIPLETS_COLUMNS, TRIPLETS_FILE, TRIPLETS_KS, TRIPLETS_SPLITS, Triplets,
                                         read_triplets_csv, triplets_csv_path)

__all__ = [
    "BadImageError", "DEFAULT_IMAGE_SIZE", "RetrievalTask", "SplitOptions", "CIRR", "CIRR_SPLITS", "CSS3D",
    "CSS3D_FILE", "Fashion200k", "fashion200k_caption", "get_different_word", "FASHION_IQ_CATEGORIES",
    "FASHION_IQ_PROTOCOLS", "FashionIQ", "fashioniq_standard_text", "MIT_STATES_TEST_NOUNS", "MITStates",
    "DATASET_NAMES", "DATASETS", "SELECT_ON", "DatasetSpec", "build_datasets", "build_splits", "dataset_spec",
    "EpochBatchSampler", "collate_train", "TRIPLETS_COLUMNS", "TRIPLETS_FILE", "TRIPLETS_KS", "TRIPLETS_SPLITS",
    "Triplets", "read_triplets_csv", "triplets_csv_path",
]
