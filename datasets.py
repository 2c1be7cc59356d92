"""Dataset loaders in their published layouts (MIT-States, Fashion200k, Fashion IQ; the synthetic dataset of
``synthetic.py`` uses the MIT-States layout).

The three benchmarks are the ones of TIRG (Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 4) and ComposeAE
(Anwaar et al., WACV 2021, arXiv 2006.11149, Sec. 4.1). Every dataset returns images as uint8 tensors (3, S, S)
(PIL -> RGB -> Resize(S) -> CenterCrop(S)); the ImageNet normalisation happens on the device in the model.

Training items are addressed by ``(epoch, index, slot)`` and are a pure function of ``(seed, epoch, index, slot)``,
so any number of DataLoader workers, ranks and resumes see the same pairs. ``EpochBatchSampler`` produces these
keys; ``collate_train`` stacks the items. ``test_task()`` / ``train_task(n, seed)`` describe the retrieval
benchmarks as ``RetrievalTask`` objects that ``test_retrieval.evaluate`` consumes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from image_cache import BadImageError, ImageCache, load_rgb_uint8  # noqa: F401 (BadImageError: part of the API)
from errors import UserInputError
from seeding import Stream, seeded_rng, torch_seed

logger = logging.getLogger(__name__)


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
    # The metrics: 'tirg' (test_retrieval.retrieval_metrics), 'cirr' (reference removed, recall and recall_subset)
    # or 'fashioniq_standard' (per-category galleries, R@10 / R@50); see test_retrieval.task_metrics.
    protocol: str = "tirg"
    ks: tuple[int, ...] | None = None  # recall cut-offs ('tirg'); None = test_retrieval.DEFAULT_KS
    gallery_groups: dict[str, list[bool]] | None = None  # group -> (G,) membership: a query's group's gallery only
    query_subsets: list[list[int]] | None = None  # CIRR: (Q,) gallery positions of the img_set members
    query_ids: list | None = None  # CIRR: (Q,) pairids, for the test-server submission


# ----------------------------------------------------------------------------------------------------------------
# Constants of the original code
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_IMAGE_SIZE = 224  # the original's Resize(224) + CenterCrop(224)

# The original's 49 MIT-States test nouns (data, not code): train = the other nouns, test = these.
MIT_STATES_TEST_NOUNS = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock", "clothes", "coffee",
    "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden", "gate", "glass", "horse", "island",
    "laptop", "lead", "lightning", "mirror", "orange", "paint", "persimmon", "plastic", "plate", "potato", "road",
    "rubber", "sand", "shell", "sky", "smoke", "steel", "stream", "table", "tea", "tomato", "vacuum", "wax",
    "wheel", "window", "wool",
)
_MIT_TEST_NOUN_SET = frozenset(MIT_STATES_TEST_NOUNS)

FASHION_IQ_CATEGORIES = ("dress", "shirt", "toptee")  # the order of category 'all', as the original
FASHION_IQ_PROTOCOLS = ("composeae", "standard")

_JPEG_SUFFIXES = (".jpg", ".jpeg")

def _pick(rng: np.random.Generator, seq: Sequence) -> Any:
    """Uniform choice of one element of ``seq`` (non-empty)."""
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------------

class _RetrievalDataset(torch.utils.data.Dataset):
    """Shared image access, bad-image bookkeeping and item assembly of the three datasets."""

    name = "dataset"
    items_per_source = 1

    def __init__(self, path: str, split: str, image_size: int, use_complete_text_query: bool, seed: int,
                 image_cache: str | None) -> None:
        super().__init__()
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
        if not isinstance(path, str) or not os.path.isdir(path):
            raise UserInputError(f"dataset path {path!r} is not a folder: pass --dataset_path pointing at the "
                                 f"{self.name} dataset ({self._layout()})")
        if int(image_size) < 1:
            raise UserInputError(f"image size {image_size} must be a positive number of pixels")
        self.path = path
        self.split = split
        self.image_size = int(image_size)
        self.use_complete_text_query = bool(use_complete_text_query)
        self.seed = int(seed)
        self.image_cache_dir = image_cache
        self.bad_images: set[str] = set()  # unreadable files seen by this process (workers keep their own)
        self._paths: list[str] = []
        self._cache: ImageCache | None = None

    @classmethod
    def _layout(cls) -> str:
        return ""

    def _set_image_paths(self, paths: list[str], cache_name: str) -> None:
        """Registers the image files (image id = position) and builds/opens the decode-once cache if asked."""
        self._paths = paths
        if self.image_cache_dir:
            self._cache = ImageCache(self.image_cache_dir, cache_name, self.split, self.image_size, paths)
            for i in sorted(self._cache.bad):
                self._report_bad(paths[i])

    def _report_bad(self, path: str) -> None:
        if path not in self.bad_images:
            self.bad_images.add(path)
            logger.warning("skipping unreadable image %s (%d unreadable so far)", path, len(self.bad_images))

    def _load_id(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S) of image id ``i``; raises BadImageError."""
        if self._cache is not None:
            return self._cache.get(i)
        return load_rgb_uint8(self._paths[i], self.image_size)

    def _key_to_id(self, key: Any) -> int:
        return int(key)

    def load_image(self, key: Any) -> torch.Tensor:
        """uint8 (3, S, S) image for a ``RetrievalTask.image_keys`` entry; zeros (after a warning) if unreadable."""
        i = self._key_to_id(key)
        try:
            return self._load_id(i)
        except BadImageError as exc:
            self._report_bad(exc.path)
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)

    def _item(self, source: int, target: int, text: str, target_caption: str) -> dict | None:
        try:
            source_img = self._load_id(source)
            target_img = self._load_id(target)
        except BadImageError as exc:
            self._report_bad(exc.path)
            return None
        return {"source_img": source_img, "target_img": target_img, "text": text, "source_img_id": int(source),
                "target_img_id": int(target), "target_caption": target_caption}

    @staticmethod
    def _parse_key(key: Any) -> tuple[int, int, int]:
        """``(epoch, index, slot)``; a bare int is read as ``(0, index, 0)``."""
        if isinstance(key, (tuple, list)):
            if len(key) != 3:
                raise KeyError(f"dataset keys are (epoch, index, slot) tuples, got {key!r}")
            return int(key[0]), int(key[1]), int(key[2])
        return 0, int(key), 0

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")

    @staticmethod
    def _sample_sources(pool: Sequence[int], n: int, seed: int) -> list[int]:
        """``n`` sources from ``pool``, seeded: without replacement when ``n <= len(pool)``."""
        if n < 0:
            raise ValueError(f"n_queries must be >= 0, got {n}")
        if n == 0:
            return []
        rng = seeded_rng(seed, Stream.TRAIN_TASK)
        chosen = rng.choice(np.asarray(pool, dtype=np.int64), size=n, replace=n > len(pool))
        return [int(i) for i in chosen]

    @staticmethod
    def _positions(ids: Sequence[int]) -> tuple[list[int], dict[int, int]]:
        """Unique ids in first-seen order and id -> position."""
        keys: list[int] = []
        where: dict[int, int] = {}
        for i in ids:
            if i not in where:
                where[i] = len(keys)
                keys.append(i)
        return keys, where


# ----------------------------------------------------------------------------------------------------------------
# MIT-States
# ----------------------------------------------------------------------------------------------------------------

class MITStates(_RetrievalDataset):
    """MIT-States (Isola et al., CVPR 2015) in its published layout ``<path>/images/<adj noun>/*.jpg``.

    As in TIRG Sec. 4.3 / ComposeAE Sec. 4.1: images of the 49 test nouns form the test split, the other nouns
    the training split; the query text is the target adjective (or ``'<adj> <noun>'`` with
    ``use_complete_text_query``); a test query is every test image with every other adjective of its noun.
    """

    name = "mitstates"
    items_per_source = 2  # each source gives two targets with different adjectives in consecutive slots

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None,
                 exclude_source_adj: bool = False, val_nouns: int = 0) -> None:
        super().__init__(path, split, image_size, use_complete_text_query, seed, image_cache)
        if split not in ("train", "val", "test"):
            raise UserInputError(f"MIT-States split {split!r} is unknown: use 'train', 'val' or 'test'")
        if split == "val" and val_nouns < 1:
            raise UserInputError("the MIT-States val split needs --val_nouns N (training nouns held out)")
        self.exclude_source_adj = bool(exclude_source_adj)
        images_dir = os.path.join(path, "images")
        if not os.path.isdir(images_dir):
            raise UserInputError(f"{images_dir} is missing: MIT-States needs the layout {self._layout()}")
        self.val_noun_set = self.held_out_nouns(images_dir, int(val_nouns), self.seed)

        self.imgs: list[dict] = []
        # Sorted listings: the original used os.listdir order, which depends on the file system (fix: the image ids
        # and therefore the pairs are the same on every machine).
        for folder in sorted(os.listdir(images_dir)):
            folder_path = os.path.join(images_dir, folder)
            if " " not in folder or not os.path.isdir(folder_path):
                continue
            words = folder.split()
            if len(words) != 2:
                # The original crashed on such a folder (tuple unpacking); skip it with a warning instead.
                logger.warning("skipping MIT-States folder %r: its name is not '<adj> <noun>'", folder_path)
                continue
            adj, noun = words
            if adj == "adj":  # the unlabelled 'adj <noun>' folders, skipped as the original
                continue
            noun_split = "test" if noun in _MIT_TEST_NOUN_SET else "val" if noun in self.val_noun_set else "train"
            if noun_split != split:
                continue
            for file_name in sorted(os.listdir(folder_path)):
                # The original asserted every file ends with 'jpg'; other files are ignored here.
                if not file_name.lower().endswith(_JPEG_SUFFIXES):
                    continue
                self.imgs.append({"file_path": os.path.join(folder_path, file_name), "captions": [folder],
                                  "adj": adj, "noun": noun})
        if not self.imgs:
            nouns = {"test": "one of the 49 test nouns", "val": "the held-out --val_nouns",
                     "train": "nouns outside the 49 test nouns (and the held-out --val_nouns)"}[split]
            raise UserInputError(f"no {split} images found under {images_dir}: expected {self._layout()} with {nouns}")

        self.caption2imgids: dict[str, list[int]] = {}
        self.noun2adjs: dict[str, list[str]] = {}  # adjectives in first-seen order
        for i, img in enumerate(self.imgs):
            self.caption2imgids.setdefault(img["captions"][0], []).append(i)
            adjs = self.noun2adjs.setdefault(img["noun"], [])
            if img["adj"] not in adjs:
                adjs.append(img["adj"])
        lonely = sorted(noun for noun, adjs in self.noun2adjs.items() if len(adjs) < 2)
        if lonely:
            # The original asserted every noun has >= 2 adjectives; such nouns stay in the gallery but give no
            # training pairs and no queries.
            logger.warning("MIT-States %s: %d noun(s) with a single adjective give no queries: %s", split,
                           len(lonely), ", ".join(lonely))
        self._lonely_nouns = frozenset(lonely)
        self._sources = [i for i, img in enumerate(self.imgs) if img["noun"] not in self._lonely_nouns]  # (P,)
        self._is_source = np.zeros(len(self.imgs), dtype=bool)
        self._is_source[self._sources] = True
        if not self._sources:
            raise UserInputError(f"no {split} noun under {images_dir} has two adjectives: MIT-States queries need "
                                 f"at least two '<adj> <noun>' folders for one noun")
        self._test_queries: list[dict] | None = None
        self._set_image_paths([img["file_path"] for img in self.imgs], self.name)

    @classmethod
    def _layout(cls) -> str:
        return "<path>/images/<adj noun>/*.jpg"

    @staticmethod
    def held_out_nouns(images_dir: str, n: int, seed: int) -> frozenset[str]:
        """``n`` training nouns (outside the 49 test nouns) drawn with ``seed``: the val split of ``--val_nouns``.

        Only nouns with at least two adjectives are drawn (the others give no queries); the draw is a seeded
        permutation of the sorted nouns, so it is the same on every machine and disjoint from train and test.
        """
        if n <= 0:
            return frozenset()
        adjs: dict[str, set[str]] = {}
        for folder in os.listdir(images_dir):
            words = folder.split()
            if len(words) == 2 and words[0] != "adj" and words[1] not in _MIT_TEST_NOUN_SET \
                    and os.path.isdir(os.path.join(images_dir, folder)):
                adjs.setdefault(words[1], set()).add(words[0])
        usable = sorted(noun for noun, a in adjs.items() if len(a) >= 2)
        if n >= len(usable):
            raise UserInputError(f"--val_nouns {n}: only {len(usable)} training nouns with two adjectives under "
                                 f"{images_dir}; hold out fewer so that some remain for training")
        order = seeded_rng(seed, Stream.VAL_NOUNS).permutation(len(usable))
        return frozenset(usable[int(i)] for i in order[:n])

    def __len__(self) -> int:
        return len(self.imgs)

    def get_all_texts(self) -> list[str]:
        """Captions ``'adj noun'`` of all images (the original's vocabulary source)."""
        return [c for img in self.imgs for c in img["captions"]]

    def _query_text(self, target_adj: str, noun: str) -> str:
        return f"{target_adj} {noun}" if self.use_complete_text_query else target_adj

    # -- training pairs ------------------------------------------------------------------------------------------
    def sample_pair(self, rng: np.random.Generator, index: int) -> tuple[int, int, int]:
        """``(source, target_slot0, target_slot1)`` drawn from ``rng`` for source ``index``.

        Replaces the original's ``saved_item`` (state shared between consecutive ``__getitem__`` calls, wrong with
        several loader workers): both targets of a source come from one generator. The two target adjectives are
        drawn uniformly with replacement among the noun's adjectives, redrawn until they differ (as the original);
        the source's own adjective is allowed unless ``exclude_source_adj``. A source whose noun has one adjective
        is replaced by a uniformly drawn usable source.
        """
        source = int(index)
        if not self._is_source[source]:
            source = self._sources[int(rng.integers(len(self._sources)))]
        img = self.imgs[source]
        noun = img["noun"]
        adjs = self.noun2adjs[noun]
        if self.exclude_source_adj:
            adjs = [a for a in adjs if a != img["adj"]]
        if len(adjs) >= 2:
            while True:
                adj0, adj1 = _pick(rng, adjs), _pick(rng, adjs)
                if adj0 != adj1:
                    break
        else:  # exclude_source_adj with a two-adjective noun: one other adjective, used for both slots
            adj0 = adj1 = adjs[0]
        target0 = _pick(rng, self.caption2imgids[f"{adj0} {noun}"])
        target1 = _pick(rng, self.caption2imgids[f"{adj1} {noun}"])
        return source, target0, target1

    def training_pair(self, epoch: int, index: int, slot: int) -> tuple[int, int]:
        """``(source, target)`` image ids of item ``(epoch, index, slot)``; a function of the seed and these."""
        self._check_index(index)
        if slot not in (0, 1):
            raise KeyError(f"MIT-States slot must be 0 or 1, got {slot}")
        source, target0, target1 = self.sample_pair(seeded_rng(self.seed, epoch, index), index)
        return source, (target0 if slot == 0 else target1)

    def __getitem__(self, key: Any) -> dict | None:
        epoch, index, slot = self._parse_key(key)
        source, target = self.training_pair(epoch, index, slot)
        target_img = self.imgs[target]
        return self._item(source, target, self._query_text(target_img["adj"], target_img["noun"]),
                          target_img["captions"][0])

    # -- retrieval tasks -----------------------------------------------------------------------------------------
    @property
    def test_queries(self) -> list[dict]:
        """Every image of a usable noun with every other adjective of its noun (the original's test queries)."""
        if self._test_queries is None:
            queries = []
            for i, img in enumerate(self.imgs):
                for target_adj in self.noun2adjs[img["noun"]]:
                    if target_adj != img["adj"]:
                        queries.append({"source_img_id": i, "target_caption": f"{target_adj} {img['noun']}",
                                        "text": self._query_text(target_adj, img["noun"])})
            self._test_queries = queries
        return self._test_queries

    @staticmethod
    def _views(captions: Sequence[str]) -> dict[str, list[str]]:
        return {"composition": list(captions), "adj": [c.split()[0] for c in captions],
                "noun": [c.split()[1] for c in captions]}

    def test_task(self) -> RetrievalTask:
        """All queries against all images of the split; the source image is ranked last (as the original)."""
        queries = self.test_queries
        everything = list(range(len(self.imgs)))
        return RetrievalTask(
            image_keys=everything, gallery=everything,
            query_source=[q["source_img_id"] for q in queries], query_text=[q["text"] for q in queries],
            gallery_labels=self._views([img["captions"][0] for img in self.imgs]),
            query_targets=self._views([q["target_caption"] for q in queries]),
            query_exclude=[q["source_img_id"] for q in queries])

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """A fixed, seeded sample of ``n_queries`` training queries, each against a gallery of all their targets.

        The original approximated training retrieval with 9,600 items ``trainset[i]`` and never flushed a last
        partial batch (fix: exactly ``n_queries`` queries with seeded sources and targets). The gallery holds one
        entry per query, its target image (the same image may appear several times), with no exclusion.
        """
        sources = self._sample_sources(self._sources, n_queries, seed)
        pairs = []
        for q, s in enumerate(sources):
            source, target, _ = self.sample_pair(seeded_rng(seed, q, s, Stream.TRAIN_TASK), s)
            pairs.append((source, target))
        keys, where = self._positions([i for pair in pairs for i in pair])
        target_captions = [self.imgs[t]["captions"][0] for _, t in pairs]
        return RetrievalTask(
            image_keys=keys, gallery=[where[t] for _, t in pairs], query_source=[where[s] for s, _ in pairs],
            query_text=[self._query_text(self.imgs[t]["adj"], self.imgs[t]["noun"]) for _, t in pairs],
            gallery_labels=self._views(target_captions), query_targets=self._views(target_captions),
            query_exclude=None)


# ----------------------------------------------------------------------------------------------------------------
# Fashion200k
# ----------------------------------------------------------------------------------------------------------------

def fashion200k_caption(raw: str) -> str:
    """The original's caption clean-up: strip, then '.', '?', '&', '*' spelled out as words."""
    return (raw.strip().replace(".", "dotmark").replace("?", "questionmark").replace("&", "andmark")
            .replace("*", "starmark"))


def get_different_word(source_caption: str, target_caption: str) -> tuple[str, str, str]:
    """``(source_word, target_word, 'replace <source_word> with <target_word>')`` as the original.

    The first source word absent from the target and the first target word absent from the source; when every
    word is shared the loop falls through and the last word is used (the original's behaviour, kept).
    """
    source_words = source_caption.split()
    target_words = target_caption.split()
    source_word = target_word = ""  # the original raised NameError on an empty caption
    for source_word in source_words:
        if source_word not in target_words:
            break
    for target_word in target_words:
        if target_word not in source_words:
            break
    return source_word, target_word, f"replace {source_word} with {target_word}"


class Fashion200k(_RetrievalDataset):
    """Fashion200k (Han et al., ICCV 2017) as TIRG Sec. 4.2 uses it.

    Layout: ``<path>/labels/*_<split>_detect_all.txt`` (``image_path TAB detection_score TAB caption``), images at
    ``<path>/<image_path>``, and ``<path>/test_queries.txt`` (``source_path target_path`` a line). A training pair
    is two images whose captions differ in one word (they share a 'parent' caption); the text is
    ``'replace <word> with <word>'``, or the target caption with ``use_complete_text_query``.
    """

    name = "fashion200k"
    items_per_source = 1

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None) -> None:
        super().__init__(path, split, image_size, use_complete_text_query, seed, image_cache)
        labels_dir = os.path.join(path, "labels")
        if not os.path.isdir(labels_dir):
            raise UserInputError(f"{labels_dir} is missing: Fashion200k needs the layout {self._layout()}")
        suffix = f"_{split}_detect_all.txt"  # the original took every file whose name contains the split name
        label_files = sorted(f for f in os.listdir(labels_dir)
                             if f.endswith(suffix) and os.path.isfile(os.path.join(labels_dir, f)))
        if not label_files:
            raise UserInputError(f"no label files *{suffix} in {labels_dir}: Fashion200k needs {self._layout()}")
        self.imgs: list[dict] = []
        for file_name in label_files:
            label_path = os.path.join(labels_dir, file_name)
            lines = _read_utf8_lines(label_path)
            count = 0
            for line_no, line in enumerate(lines, 1):
                if not line.strip():  # blank lines (a trailing one crashed the original)
                    continue
                fields = line.rstrip("\r").split("\t")
                if len(fields) < 3 or not fields[0]:
                    raise UserInputError(f"{label_path}:{line_no}: malformed line {line[:80]!r}: expected "
                                         f"'image_path<TAB>detection_score<TAB>caption'")
                self.imgs.append({"file_path": fields[0], "detection_score": fields[1],
                                  "captions": [fashion200k_caption(fields[2])], "split": split,
                                  "modifiable": False})
                count += 1
            if count == 0:
                raise UserInputError(f"{label_path} is empty: expected lines "
                                     f"'image_path<TAB>detection_score<TAB>caption'")
        logger.info("Fashion200k %s: %d images", split, len(self.imgs))
        self._index_built = False
        self.test_queries: list[dict] = []
        if split == "train":
            self._build_caption_index()
        else:
            self._read_test_queries()
        self._set_image_paths([os.path.join(path, img["file_path"]) for img in self.imgs], self.name)

    @classmethod
    def _layout(cls) -> str:
        return ("<path>/labels/*_<split>_detect_all.txt (image_path<TAB>score<TAB>caption), images at "
                "<path>/<image_path>, <path>/test_queries.txt")

    def __len__(self) -> int:
        return len(self.imgs)

    def get_all_texts(self) -> list[str]:
        return [c for img in self.imgs for c in img["captions"]]

    def _query_text(self, source: int, target: int) -> str:
        target_caption = self.imgs[target]["captions"][0]
        if self.use_complete_text_query:
            return target_caption
        return get_different_word(self.imgs[source]["captions"][0], target_caption)[2]

    def _read_test_queries(self) -> None:
        file2imgid = {img["file_path"]: i for i, img in enumerate(self.imgs)}  # a repeated path keeps its last id
        queries_path = os.path.join(self.path, "test_queries.txt")
        if not os.path.isfile(queries_path):
            raise UserInputError(f"{queries_path} is missing: Fashion200k evaluation needs it "
                                 f"('source_path target_path' a line)")
        lines = _read_utf8_lines(queries_path)
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise UserInputError(f"{queries_path}:{line_no}: malformed line {line[:80]!r}: expected "
                                     f"'source_path target_path'")
            for p in fields:
                if p not in file2imgid:
                    raise UserInputError(f"{queries_path}:{line_no}: image {p!r} is not in the {self.split} label "
                                         f"files under {os.path.join(self.path, 'labels')}")
            source, target = file2imgid[fields[0]], file2imgid[fields[1]]
            self.test_queries.append({"source_img_id": source, "target_img_id": target,
                                      "target_caption": self.imgs[target]["captions"][0],
                                      "text": self._query_text(source, target)})
        if not self.test_queries:
            raise UserInputError(f"{queries_path} is empty: expected 'source_path target_path' lines")

    def _build_caption_index(self) -> None:
        """The original's parent/child caption index: a parent is a caption with one word removed."""
        caption2imgids: dict[str, list[int]] = {}
        for i, img in enumerate(self.imgs):
            for c in img["captions"]:
                caption2imgids.setdefault(c, []).append(i)
        parent2children: dict[str, list[str]] = {}
        for c in caption2imgids:
            for w in c.split():
                # str.replace removes every occurrence of the word, also inside other words (the original's quirk,
                # kept so that the same pairs exist); then one pass collapses double spaces.
                p = c.replace(w, "").replace("  ", " ").strip()
                children = parent2children.setdefault(p, [])
                if c not in children:
                    children.append(c)
        for img in self.imgs:
            img["modifiable"] = False
            img["parent_captions"] = []
        for p, children in parent2children.items():
            if len(children) >= 2:
                for c in children:
                    for i in caption2imgids[c]:
                        self.imgs[i]["modifiable"] = True
                        self.imgs[i]["parent_captions"].append(p)
        self.caption2imgids = caption2imgids
        self.parent2children_captions = parent2children
        self._modifiable = [i for i, img in enumerate(self.imgs) if img["modifiable"]]
        self._index_built = True
        logger.info("Fashion200k %s: %d unique captions, %d modifiable images", self.split, len(caption2imgids),
                    len(self._modifiable))
        if not self._modifiable:
            raise UserInputError(f"no two {self.split} captions in {os.path.join(self.path, 'labels')} differ by "
                                 f"one word: Fashion200k training pairs cannot be formed")

    def sample_pair(self, rng: np.random.Generator, index: int) -> tuple[int, int]:
        """``(source, target)`` by the original's loop, with its random calls drawn from ``rng``."""
        if not self._index_built:
            self._build_caption_index()
        idx = int(index)
        while not self.imgs[idx]["modifiable"]:  # as the original: redraw any image until a modifiable one
            idx = int(rng.integers(0, len(self.imgs)))
        img = self.imgs[idx]
        while True:
            p = _pick(rng, img["parent_captions"])
            c = _pick(rng, self.parent2children_captions[p])
            if c not in img["captions"]:
                break
        return idx, _pick(rng, self.caption2imgids[c])

    def training_pair(self, epoch: int, index: int, slot: int = 0) -> tuple[int, int]:
        self._check_index(index)
        if slot != 0:
            raise KeyError(f"Fashion200k has one slot per source, got slot {slot}")
        return self.sample_pair(seeded_rng(self.seed, epoch, index), index)

    def __getitem__(self, key: Any) -> dict | None:
        epoch, index, slot = self._parse_key(key)
        source, target = self.training_pair(epoch, index, slot)
        return self._item(source, target, self._query_text(source, target), self.imgs[target]["captions"][0])

    def test_task(self) -> RetrievalTask:
        """The test_queries.txt queries against all test images; the source is ranked last (as the original)."""
        everything = list(range(len(self.imgs)))
        return RetrievalTask(
            image_keys=everything, gallery=everything,
            query_source=[q["source_img_id"] for q in self.test_queries],
            query_text=[q["text"] for q in self.test_queries],
            gallery_labels={"composition": [img["captions"][0] for img in self.imgs]},
            query_targets={"composition": [q["target_caption"] for q in self.test_queries]},
            query_exclude=[q["source_img_id"] for q in self.test_queries])

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """Seeded sample of ``n_queries`` modifiable sources with a sampled target each; gallery = the targets.

        Replaces the original's 9,600 items ``trainset[i]`` whose last partial batch was never flushed.
        """
        if not self._index_built:
            self._build_caption_index()
        sources = self._sample_sources(self._modifiable, n_queries, seed)
        pairs = [self.sample_pair(seeded_rng(seed, q, s, Stream.TRAIN_TASK), s) for q, s in enumerate(sources)]
        keys, where = self._positions([i for pair in pairs for i in pair])
        captions = [self.imgs[t]["captions"][0] for _, t in pairs]
        return RetrievalTask(
            image_keys=keys, gallery=[where[t] for _, t in pairs], query_source=[where[s] for s, _ in pairs],
            query_text=[self._query_text(s, t) for s, t in pairs], gallery_labels={"composition": captions},
            query_targets={"composition": list(captions)}, query_exclude=None)


# ----------------------------------------------------------------------------------------------------------------
# Fashion IQ
# ----------------------------------------------------------------------------------------------------------------

def fashioniq_standard_text(captions: Sequence[str]) -> str:
    """CLIP4Cir's deterministic join of a query's captions: ``'<C1> and <c2>'``, each stripped of '.', '?', ',' and
    spaces at both ends, the first capitalised (``str.capitalize``: the rest lower-cased)."""
    parts = [c.strip(".?, ") for c in captions]
    if not parts:
        return ""
    return " and ".join([parts[0].capitalize()] + parts[1:])


class FashionIQ(_RetrievalDataset):
    """Fashion IQ (Wu et al., CVPR 2021 / arXiv 1905.12794) as ComposeAE Sec. 4.1 uses it.

    Layout: ``<path>/captions/cap.<cat>.<split>.json`` (a list of ``{candidate, target, captions}``),
    ``<path>/image_splits/split.<cat>.<split>.json`` (a list of image names) and ``<path>/images/<name>.jpg``
    (or the original's ``<path>/all_imgs/<name>.jpg``).

    ``protocol='composeae'`` (the original's): a query is the candidate image with its two captions joined
    (``'<cat> <c1> and it <c2>'`` for category 'all', ``'<c1> <c2>'`` otherwise, lower-cased); the gallery is the
    split's image list over all the categories; recall@{1,5,10,50,100} per category.
    ``protocol='standard'`` (CLIP4Cir's ``validate.py`` and its successors): the captions joined as
    ``'<C1> and <c2>'`` (each stripped of '.?, ' at both ends, the first capitalised); the queries of a category are
    ranked against that category's images only; recall@10 and @50 per category and their mean
    (``test_retrieval.fashioniq_standard_metrics``). In neither is the reference image removed (as both codes).
    """

    name = "fashioniq"
    items_per_source = 1

    def __init__(self, path: str, split: str, category: str = "all", image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None,
                 protocol: str = "composeae") -> None:
        super().__init__(path, split, image_size, use_complete_text_query, seed, image_cache)
        if protocol not in FASHION_IQ_PROTOCOLS:
            raise UserInputError(f"unknown Fashion IQ protocol {protocol!r}: use {' or '.join(FASHION_IQ_PROTOCOLS)}")
        self.protocol = protocol
        if category != "all" and category not in FASHION_IQ_CATEGORIES:
            raise UserInputError(f"unknown Fashion IQ category {category!r}: use all, "
                                 f"{', '.join(FASHION_IQ_CATEGORIES)}")
        self.category = category
        categories = list(FASHION_IQ_CATEGORIES) if category == "all" else [category]
        for sub in ("captions", "image_splits"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise UserInputError(f"{os.path.join(path, sub)} is missing: Fashion IQ needs {self._layout()}")
        self.images_dir = next((os.path.join(path, d) for d in ("images", "all_imgs")
                                if os.path.isdir(os.path.join(path, d))), None)
        if self.images_dir is None:
            raise UserInputError(f"neither {os.path.join(path, 'images')} nor {os.path.join(path, 'all_imgs')} "
                                 f"exists: Fashion IQ needs <path>/images/<name>.jpg")

        split_names: list[str] = []
        self.category_gallery: dict[str, list[str]] = {}  # category -> its split's image names, repeats removed
        self.entries: list[dict] = []
        for cat in categories:
            split_file = os.path.join(path, "image_splits", f"split.{cat}.{split}.json")
            names = self._read_json_list(split_file)
            for i, name in enumerate(names):
                if not isinstance(name, str):
                    raise UserInputError(f"{split_file}: entry {i} is {name!r}, expected an image name string")
            split_names += names
            self.category_gallery[cat] = list(dict.fromkeys(names))
            caption_file = os.path.join(path, "captions", f"cap.{cat}.{split}.json")
            for i, entry in enumerate(self._read_json_list(caption_file)):
                ok = (isinstance(entry, dict) and isinstance(entry.get("candidate"), str)
                      and isinstance(entry.get("target"), str) and isinstance(entry.get("captions"), list)
                      and all(isinstance(c, str) for c in entry["captions"]))
                if not ok:
                    raise UserInputError(f"{caption_file}: entry {i} is malformed: expected "
                                         f"{{'candidate': name, 'target': name, 'captions': [text, text]}}")
                if protocol == "standard":
                    text = fashioniq_standard_text(entry["captions"])
                elif category == "all":
                    text = (cat + " " + " and it ".join(entry["captions"])).lower()
                else:
                    text = " ".join(entry["captions"]).lower()
                self.entries.append({"category": cat, "candidate": entry["candidate"], "target": entry["target"],
                                     "captions": list(entry["captions"]), "text": text})
        if not self.entries:
            raise UserInputError(f"no {split} caption entries in {os.path.join(path, 'captions')}: "
                                 f"expected cap.<category>.{split}.json lists")
        # The gallery is the split's image list with repeats removed, keeping the first occurrence (the original
        # de-duplicated its ranking the same way).
        self.gallery_names = list(dict.fromkeys(split_names))
        names = list(self.gallery_names)
        gallery_set = set(names)
        candidates_only = [n for n in dict.fromkeys(e["candidate"] for e in self.entries) if n not in gallery_set]
        names += candidates_only
        self._n_query_keys = len(names)  # gallery names, then candidates outside the gallery
        known = set(names)
        names += [n for n in dict.fromkeys(e["target"] for e in self.entries) if n not in known]
        self.image_names = names
        self._name2id = {n: i for i, n in enumerate(names)}
        self._set_image_paths([os.path.join(self.images_dir, n + ".jpg") for n in names],
                              f"{self.name}-{category}")

    @classmethod
    def _layout(cls) -> str:
        return ("<path>/captions/cap.<cat>.<split>.json, <path>/image_splits/split.<cat>.<split>.json, "
                "<path>/images/<name>.jpg")

    @staticmethod
    def check_labelled_test(path: str, category: str) -> None:
        """Refuses (one line) unless every ``cap.<cat>.test.json`` exists and names a target in each entry."""
        for cat in (FASHION_IQ_CATEGORIES if category == "all" else [category]):
            file_path = os.path.join(path, "captions", f"cap.{cat}.test.json")
            ok = os.path.isfile(file_path) and all(
                isinstance(e, dict) and "target" in e for e in FashionIQ._read_json_list(file_path))
            if not ok:
                raise UserInputError(f"--select_on val on Fashion IQ needs a labelled test split, but {file_path} "
                                     f"is missing or holds no targets (the public release withholds them), so val "
                                     f"is the only test split; pass --select_on test")

    @staticmethod
    def _read_json_list(file_path: str) -> list:
        if not os.path.isfile(file_path):
            raise UserInputError(f"{file_path} is missing: Fashion IQ needs {FashionIQ._layout()}")
        try:
            with open(file_path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack allows
            raise UserInputError(f"{file_path}: not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(data, list):
            raise UserInputError(f"{file_path}: expected a JSON list, got {type(data).__name__}")
        return data

    def __len__(self) -> int:
        return len(self.entries)

    def get_all_texts(self) -> list[str]:
        """The query strings. The original did ``texts += captions_string`` and so added single characters to
        the vocabulary (fix: whole strings)."""
        return [e["text"] for e in self.entries]

    def _key_to_id(self, key: Any) -> int:
        if isinstance(key, str):
            return self._name2id[key]
        return int(key)

    def __getitem__(self, key: Any) -> dict | None:
        _, index, slot = self._parse_key(key)
        self._check_index(index)
        if slot != 0:
            raise KeyError(f"Fashion IQ has one slot per source, got slot {slot}")
        e = self.entries[index]  # candidate -> target: no randomness
        return self._item(self._name2id[e["candidate"]], self._name2id[e["target"]], e["text"], e["text"])

    def _task(self, entry_ids: Sequence[int]) -> RetrievalTask:
        entries = [self.entries[i] for i in entry_ids]
        keys = list(self.gallery_names)
        where = {n: i for i, n in enumerate(keys)}
        for e in entries:
            if e["candidate"] not in where:
                where[e["candidate"]] = len(keys)
                keys.append(e["candidate"])
        categories = list(FASHION_IQ_CATEGORIES) if self.category == "all" else [self.category]
        groups = {c: [e["category"] == c for e in entries] for c in categories}
        if self.protocol == "standard":  # one gallery per category: its own split list (positions may repeat)
            gallery = [where[n] for c in categories for n in self.category_gallery[c]]
            owner = [c for c in categories for _ in self.category_gallery[c]]
            return RetrievalTask(
                image_keys=keys, gallery=gallery, query_source=[where[e["candidate"]] for e in entries],
                query_text=[e["text"] for e in entries], gallery_labels={"image": [keys[g] for g in gallery]},
                query_targets={"image": [e["target"] for e in entries]}, query_exclude=None, query_groups=groups,
                protocol="fashioniq_standard", gallery_groups={c: [o == c for o in owner] for c in categories})
        return RetrievalTask(
            image_keys=keys, gallery=list(range(len(self.gallery_names))),
            query_source=[where[e["candidate"]] for e in entries], query_text=[e["text"] for e in entries],
            gallery_labels={"image": list(self.gallery_names)},
            query_targets={"image": [e["target"] for e in entries]},
            # The original does not rank the source image last in Fashion IQ (kept: no exclusion).
            query_exclude=None,
            query_groups=groups)

    def test_task(self) -> RetrievalTask:
        """All caption entries against the split's images; recall per category (the original's fiq_test)."""
        return self._task(range(len(self.entries)))

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """A seeded sample of ``n_queries`` caption entries against this split's images."""
        return self._task(self._sample_sources(range(len(self.entries)), n_queries, seed))


# ----------------------------------------------------------------------------------------------------------------
# Your own triplets: triplets.csv
# ----------------------------------------------------------------------------------------------------------------

TRIPLETS_FILE = "triplets.csv"
TRIPLETS_COLUMNS = ("source", "text", "target", "split")
TRIPLETS_SPLITS = ("train", "val", "test")
TRIPLETS_KS = (1, 5, 10, 50)  # recall@100 is added when the gallery has more than 100 images


def triplets_csv_path(path: str) -> str:
    """``<path>/triplets.csv``, or ``path`` itself when it names a .csv file."""
    return path if str(path).lower().endswith(".csv") else os.path.join(path, TRIPLETS_FILE)


def read_triplets_csv(csv_path: str) -> list[dict]:
    """The rows of a triplets file, checked: ``[{source, text, target, split, line}]`` with the image paths made
    absolute (relative ones are relative to the file's folder) and normalised, so one image has one path.

    Raises UserInputError (one line) for a missing or empty file, a missing column, an unknown split, an empty
    cell, or listed images that do not exist (the first one with its line, and how many are missing).
    """
    if not os.path.isfile(csv_path):
        raise UserInputError(f"{csv_path} is missing: --dataset triplets needs --dataset_path DIR holding "
                             f"{TRIPLETS_FILE} with the header {','.join(TRIPLETS_COLUMNS)}")
    folder = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserInputError(f"{csv_path} is empty: expected the header {','.join(TRIPLETS_COLUMNS)} and one "
                                 f"row per (source, text, target) triplet")
        header = [h.strip() for h in header]
        missing = [c for c in TRIPLETS_COLUMNS if c not in header]
        if missing:
            raise UserInputError(f"{csv_path}: the header lacks the column{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(missing)}; expected {','.join(TRIPLETS_COLUMNS)}")
        reader.fieldnames = header
        rows = []
        for raw in reader:
            line = reader.line_num
            row = {c: (raw.get(c) or "").strip() for c in TRIPLETS_COLUMNS}
            if not any(row.values()):
                continue  # a blank line
            empty = [c for c in TRIPLETS_COLUMNS if not row[c]]
            if empty:
                raise UserInputError(f"{csv_path}, line {line}: empty {', '.join(empty)}")
            if row["split"] not in TRIPLETS_SPLITS:
                raise UserInputError(f"{csv_path}, line {line}: unknown split {row['split']!r}; use "
                                     f"{', '.join(TRIPLETS_SPLITS)}")
            for c in ("source", "target"):
                row[c] = os.path.normpath(os.path.join(folder, os.path.expanduser(row[c])))
            row["line"] = line
            rows.append(row)
    if not rows:
        raise UserInputError(f"{csv_path} has a header but no rows: add one row per (source, text, target) triplet")
    absent: dict[str, int] = {}  # missing image -> first line naming it
    for row in rows:
        for c in ("source", "target"):
            if row[c] not in absent and not os.path.isfile(row[c]):
                absent[row[c]] = row["line"]
    if absent:
        first = min(absent, key=absent.get)
        raise UserInputError(f"{csv_path}, line {absent[first]}: image {first} does not exist ({len(absent)} listed "
                             f"image{'s' if len(absent) > 1 else ''} missing)")
    if not any(r["split"] == "train" for r in rows):
        raise UserInputError(f"{csv_path} has no train rows: training needs rows with split=train")
    return rows


class Triplets(_RetrievalDataset):
    """Your own (source image, modification text, target image) triplets, listed in ``<path>/triplets.csv`` with
    the header ``source,text,target,split`` (split: train, val or test; image paths relative to the file's folder
    or absolute).

    Protocol: the training pairs are the train rows (one item per row, no randomness); a split's gallery is every
    image that appears in its rows, as source or target, once each, in sorted path order; a query is a row, its
    hit the row's target image (by path), its own source image ranked last; recall@1, 5, 10, 50, and 100 when the
    gallery has more than 100 images, as ``recall_top{k}_correct_composition``. The ``test`` split evaluates; a
    file without test rows evaluates on its ``val`` rows.
    """

    name = "triplets"
    items_per_source = 1

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None) -> None:
        csv_path = triplets_csv_path(path)
        super().__init__(os.path.dirname(os.path.abspath(csv_path)), split, image_size, use_complete_text_query,
                         seed, image_cache)
        if split not in TRIPLETS_SPLITS:
            raise UserInputError(f"triplets split {split!r} is unknown: use {', '.join(TRIPLETS_SPLITS)}")
        rows = read_triplets_csv(csv_path)
        self.csv_path = csv_path
        mine = [r for r in rows if r["split"] == split]
        if not mine and split == "test":
            mine = [r for r in rows if r["split"] == "val"]
            if mine:
                logger.info("%s has no test rows: evaluating on its %d val rows", csv_path, len(mine))
                self.split = "val"
        if not mine:
            raise UserInputError(f"{csv_path} has no {split} rows" + (" and no val rows: evaluation needs one of "
                                                                       "them" if split == "test" else ""))
        self.rows = mine
        self.image_paths = sorted({r[c] for r in mine for c in ("source", "target")})
        self._path2id = {p: i for i, p in enumerate(self.image_paths)}
        self._set_image_paths(list(self.image_paths), self.name)

    @classmethod
    def _layout(cls) -> str:
        return f"<path>/{TRIPLETS_FILE} with the header {','.join(TRIPLETS_COLUMNS)}"

    def __len__(self) -> int:
        return len(self.rows)

    def get_all_texts(self) -> list[str]:
        return [r["text"] for r in self.rows]

    def __getitem__(self, key: Any) -> dict | None:
        _, index, slot = self._parse_key(key)
        self._check_index(index)
        if slot != 0:
            raise KeyError(f"triplets have one slot per row, got slot {slot}")
        r = self.rows[index]
        return self._item(self._path2id[r["source"]], self._path2id[r["target"]], r["text"], r["text"])

    def _task(self, row_ids: Sequence[int]) -> RetrievalTask:
        rows = [self.rows[i] for i in row_ids]
        paths = sorted({r[c] for r in rows for c in ("source", "target")})
        where = {p: i for i, p in enumerate(paths)}
        ks = TRIPLETS_KS + ((100,) if len(paths) > 100 else ())
        return RetrievalTask(
            image_keys=[self._path2id[p] for p in paths], gallery=list(range(len(paths))),
            query_source=[where[r["source"]] for r in rows], query_text=[r["text"] for r in rows],
            gallery_labels={"composition": paths}, query_targets={"composition": [r["target"] for r in rows]},
            query_exclude=[where[r["source"]] for r in rows], ks=ks)

    def test_task(self) -> RetrievalTask:
        """Every row of the split against every image of the split."""
        return self._task(range(len(self.rows)))

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """A seeded sample of ``n_queries`` rows against every image of the sampled rows (the same protocol)."""
        return self._task(self._sample_sources(range(len(self.rows)), n_queries, seed))


# ----------------------------------------------------------------------------------------------------------------
# CSS3D
# ----------------------------------------------------------------------------------------------------------------

CSS3D_FILE = "css_toy_dataset_novel2_small.dup.npy"


class CSS3D(_RetrievalDataset):
    """TIRG's CSS3D (Vo et al., CVPR 2019, Sec. 4.1) in its published layout: ``<path>/<CSS3D_FILE>`` and
    ``<path>/images/css_<split>_<%06d>.png``; without ``images/`` every scene is drawn in 2-D from its objects
    (``css_scenes.render_2d``, as TIRG's ``get_img(get_2d=True)``).

    Per split the scene file holds ``objects_img`` (the objects of each scene), ``mods`` (``from``, ``to``: image
    ids, ``to_str``: the one text of all these pairs) and, in the test split only, ``labels``; an image's caption is
    ``str(label)``, else ``str(index)``. A test query is, for each mod and each of its (from, to) pairs, the source
    image with the text ``to_str``; the hit is any gallery image with the target's caption (a copy of the target
    scene counts), and the source is ranked last. Training items come in two slots per source (TIRG's sampling):
    slot 0 is a uniformly drawn mod and one of its pairs, slot 1 another mod of the same source.
    """

    name = "css3d"
    items_per_source = 2

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None) -> None:
        super().__init__(path, split, image_size, use_complete_text_query, seed, image_cache)
        import css_scenes

        if split not in ("train", "test"):
            raise UserInputError(f"CSS3D split {split!r} is unknown: use 'train' or 'test'")
        scene_file = os.path.join(path, CSS3D_FILE)
        if not os.path.isfile(scene_file):
            raise UserInputError(f"{scene_file} is missing: CSS3D needs the layout {self._layout()}")
        data = css_scenes.load_scene_file(scene_file)
        if split not in data or not isinstance(data[split], dict):
            raise UserInputError(f"{scene_file} has no {split!r} split (it holds {sorted(map(str, data))})")
        part = data[split]
        for key in ("objects_img", "mods"):
            if key not in part:
                raise UserInputError(f"{scene_file}: the {split} split lacks {key!r}")
        self.objects = list(part["objects_img"])
        labels = part.get("labels")  # the test split only: copies of a scene share a label
        self.captions = [str(labels[i]) if labels is not None else str(i) for i in range(len(self.objects))]
        self.mods: list[dict] = []
        n = len(self.objects)
        for m, mod in enumerate(part["mods"]):
            sources, targets = [int(i) for i in mod["from"]], [int(i) for i in mod["to"]]
            if len(sources) != len(targets) or any(not 0 <= i < n for i in sources + targets):
                raise UserInputError(f"{scene_file}: {split} mod {m} has from/to lists of different lengths or "
                                     f"image ids outside 0..{n - 1}")
            self.mods.append({"from": sources, "to": targets, "to_str": str(mod["to_str"])})
        self.pairs_of: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # source -> [(mod, target)]
        for m, mod in enumerate(self.mods):
            for s, t in zip(mod["from"], mod["to"]):
                self.pairs_of[s].append((m, t))
        # (mod, pair) entries whose source has a second mod: TIRG's slot 1 needs one (its loop never ended
        # otherwise); slot 0 is drawn as TIRG's, conditioned on that
        self._two_mod_sources = np.array([len({m for m, _ in p}) >= 2 for p in self.pairs_of], dtype=bool)
        if split == "train" and not self._two_mod_sources.any():
            raise UserInputError(f"{scene_file}: no training image is the source of two different mods; TIRG's "
                                 f"pairs need one")
        images_dir = os.path.join(path, "images")
        self.rendered = not os.path.isdir(images_dir)
        if self.rendered:
            logger.info("CSS3D %s: %s is missing, drawing the 2-D version of each scene", split, images_dir)
        else:
            self._set_image_paths([os.path.join(images_dir, f"css_{split}_{i:06d}.png") for i in range(n)],
                                  self.name)

    @classmethod
    def _layout(cls) -> str:
        return f"<path>/{CSS3D_FILE} and, for the 3-D renders, <path>/images/css_<split>_<%06d>.png"

    def __len__(self) -> int:
        return len(self.objects)

    def get_all_texts(self) -> list[str]:
        """The mods' texts (TIRG's vocabulary source)."""
        return [mod["to_str"] for mod in self.mods]

    def _load_id(self, i: int) -> torch.Tensor:
        if not self.rendered:
            return super()._load_id(i)
        import css_scenes
        import torchvision.transforms.functional as TF
        from PIL import Image

        img = Image.fromarray(css_scenes.render_2d(self.objects[i]))
        if self.image_size != css_scenes.RENDER_SIZE:  # the same Resize + CenterCrop as the image files
            img = TF.center_crop(TF.resize(img, self.image_size, interpolation=TF.InterpolationMode.BILINEAR),
                                 [self.image_size, self.image_size])
        return TF.pil_to_tensor(img).contiguous()  # (3, S, S) uint8

    # -- training pairs ------------------------------------------------------------------------------------------
    def sample_pair(self, rng: np.random.Generator) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """``(source, (mod0, target0), (mod1, target1))``: TIRG's two queries of one source.

        As TIRG's ``get_1st_training_query`` / ``get_2nd_training_query``: a uniform mod, a uniform (from, to) pair
        of it; then a uniform (mod, to) entry of the same source, redrawn until its mod differs. TIRG kept the first
        query in the dataset object between two ``__getitem__`` calls (wrong with several loader workers); here
        both come from one generator.
        """
        while True:
            m0 = int(rng.integers(len(self.mods)))
            j = int(rng.integers(len(self.mods[m0]["from"])))
            source = self.mods[m0]["from"][j]
            if self._two_mod_sources[source]:
                break
        target0 = self.mods[m0]["to"][j]
        while True:
            m1, target1 = _pick(rng, self.pairs_of[source])
            if m1 != m0:
                break
        return source, (m0, target0), (m1, target1)

    def training_pair(self, epoch: int, index: int, slot: int) -> tuple[int, int, int]:
        """``(source, mod, target)`` of item ``(epoch, index, slot)``; a function of the seed and these."""
        self._check_index(index)
        if slot not in (0, 1):
            raise KeyError(f"CSS3D slot must be 0 or 1, got {slot}")
        source, first, second = self.sample_pair(seeded_rng(self.seed, epoch, index))
        mod, target = first if slot == 0 else second
        return source, mod, target

    def __getitem__(self, key: Any) -> dict | None:
        epoch, index, slot = self._parse_key(key)
        source, mod, target = self.training_pair(epoch, index, slot)
        return self._item(source, target, self.mods[mod]["to_str"], self.captions[target])

    # -- retrieval tasks -----------------------------------------------------------------------------------------
    def test_queries(self) -> list[tuple[int, str, str]]:
        """TIRG's test queries ``(source, text, target caption)``: every (from, to) pair of every mod."""
        return [(s, mod["to_str"], self.captions[t]) for mod in self.mods for s, t in zip(mod["from"], mod["to"])]

    def test_task(self) -> RetrievalTask:
        """All queries against all images of the split; the source image ranked last (as TIRG)."""
        queries = self.test_queries()
        everything = list(range(len(self.objects)))
        return RetrievalTask(
            image_keys=everything, gallery=everything, query_source=[s for s, _, _ in queries],
            query_text=[text for _, text, _ in queries], gallery_labels={"composition": list(self.captions)},
            query_targets={"composition": [c for _, _, c in queries]}, query_exclude=[s for s, _, _ in queries])

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """``n_queries`` seeded training queries (slot 0 of TIRG's sampling) against a gallery of their targets."""
        if n_queries < 0:
            raise ValueError(f"n_queries must be >= 0, got {n_queries}")
        pairs = []
        for q in range(n_queries):
            source, (mod, target), _ = self.sample_pair(seeded_rng(seed, q, Stream.TRAIN_TASK))
            pairs.append((source, mod, target))
        keys, where = self._positions([i for s, _, t in pairs for i in (s, t)])
        captions = [self.captions[t] for _, _, t in pairs]
        return RetrievalTask(
            image_keys=keys, gallery=[where[t] for _, _, t in pairs], query_source=[where[s] for s, _, _ in pairs],
            query_text=[self.mods[m]["to_str"] for _, m, _ in pairs], gallery_labels={"composition": captions},
            query_targets={"composition": list(captions)}, query_exclude=None)


# ----------------------------------------------------------------------------------------------------------------
# CIRR
# ----------------------------------------------------------------------------------------------------------------

CIRR_SPLITS = ("train", "val", "test1")


class CIRR(_RetrievalDataset):
    """CIRR (Liu et al., ICCV 2021; github Cuberick-Orion/CIRR) in its published layout.

    ``<path>/captions/cap.rc2.<split>.json``: a list of ``{pairid, reference, target_hard, target_soft, caption,
    img_set: {id, members (6, the reference among them), ...}}`` (test1 has no target keys);
    ``<path>/image_splits/split.rc2.<split>.json``: image name -> relative path (``./train/<n>/x.png``,
    ``./dev/x.png`` for val, ``./test1/x.png``), resolved under ``<path>/img_raw/`` (the CIRR README's layout) or
    ``<path>/`` (CLIP4Cir's). A query is the reference image with its caption, as written (one test1 caption is a
    single space); the target is ``target_hard`` (``target_soft`` is not used: a few of its entries lack the hard
    target). Evaluation: ``test_retrieval.cirr_metrics``; the gallery is every image of the split.
    """

    name = "cirr"
    items_per_source = 1

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None) -> None:
        super().__init__(path, split, image_size, use_complete_text_query, seed, image_cache)
        if split not in CIRR_SPLITS:
            raise UserInputError(f"CIRR split {split!r} is unknown: use one of {', '.join(CIRR_SPLITS)}")
        split_file = os.path.join(path, "image_splits", f"split.rc2.{split}.json")
        caption_file = os.path.join(path, "captions", f"cap.rc2.{split}.json")
        name2rel = self._read_json(split_file, dict)
        self.labelled = split != "test1"
        self.entries: list[dict] = []
        for i, e in enumerate(self._read_json(caption_file, list)):
            members = e.get("img_set", {}).get("members") if isinstance(e, dict) else None
            ok = (isinstance(e, dict) and isinstance(e.get("pairid"), int) and isinstance(e.get("reference"), str)
                  and isinstance(e.get("caption"), str) and isinstance(members, list)
                  and all(isinstance(m, str) for m in members)
                  and (not self.labelled or isinstance(e.get("target_hard"), str)))
            if not ok:
                target = ", target_hard" if self.labelled else ""
                raise UserInputError(f"{caption_file}: entry {i} is malformed: expected pairid, reference{target}, "
                                     f"caption and img_set.members")
            self.entries.append({"pairid": e["pairid"], "reference": e["reference"],
                                 "target": e.get("target_hard"), "caption": e["caption"], "members": list(members)})
        if not self.entries:
            raise UserInputError(f"{caption_file} holds no pairs")
        self.image_names = list(name2rel)
        for e in self.entries:
            for name in [e["reference"], *e["members"]] + ([e["target"]] if self.labelled else []):
                if name not in name2rel:
                    raise UserInputError(f"{caption_file}: pair {e['pairid']} names image {name!r}, which "
                                         f"{split_file} does not list")
        self._name2id = {n: i for i, n in enumerate(self.image_names)}
        self.image_root = self._find_image_root(path, [name2rel[n] for n in self.image_names], split_file)
        self._set_image_paths([os.path.normpath(os.path.join(self.image_root, name2rel[n]))
                               for n in self.image_names], f"{self.name}-{split}")

    @classmethod
    def _layout(cls) -> str:
        return ("<path>/captions/cap.rc2.<split>.json, <path>/image_splits/split.rc2.<split>.json and the images "
                "at <path>/img_raw/<relative path> (or <path>/<relative path>)")

    @staticmethod
    def _read_json(file_path: str, kind: type) -> Any:
        if not os.path.isfile(file_path):
            raise UserInputError(f"{file_path} is missing: CIRR needs {CIRR._layout()}")
        try:
            with open(file_path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as exc:
            raise UserInputError(f"{file_path}: not valid JSON ({exc})") from None
        if not isinstance(data, kind):
            raise UserInputError(f"{file_path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
        return data

    @staticmethod
    def _find_image_root(path: str, relative: list[str], split_file: str) -> str:
        """``<path>/img_raw`` or ``<path>``: the first where the split's first image paths resolve."""
        sample = relative[:3]
        for root in (os.path.join(path, "img_raw"), path):
            if sample and all(os.path.isfile(os.path.join(root, r)) for r in sample):
                return root
        first = sample[0] if sample else "./dev/<name>.png"
        raise UserInputError(f"CIRR images not found: {split_file} lists {first!r}, expected at "
                             f"{os.path.join(path, 'img_raw', first)} or {os.path.join(path, first)}")

    def __len__(self) -> int:
        return len(self.entries)

    def get_all_texts(self) -> list[str]:
        return [e["caption"] for e in self.entries]

    def _key_to_id(self, key: Any) -> int:
        return self._name2id[key] if isinstance(key, str) else int(key)

    def __getitem__(self, key: Any) -> dict | None:
        _, index, slot = self._parse_key(key)
        self._check_index(index)
        if slot != 0:
            raise KeyError(f"CIRR has one slot per source, got slot {slot}")
        if not self.labelled:
            raise KeyError("CIRR test1 has no targets: it is not a training split")
        e = self.entries[index]  # reference -> target_hard: no randomness
        return self._item(self._name2id[e["reference"]], self._name2id[e["target"]], e["caption"], e["target"])

    def _task(self, entry_ids: Sequence[int], gallery_names: Sequence[str]) -> RetrievalTask:
        entries = [self.entries[i] for i in entry_ids]
        keys = list(gallery_names)
        where = {n: i for i, n in enumerate(keys)}
        return RetrievalTask(
            image_keys=keys, gallery=list(range(len(keys))), query_source=[where[e["reference"]] for e in entries],
            query_text=[e["caption"] for e in entries], gallery_labels={"image": keys},
            query_targets={"image": [e["target"] if self.labelled else "" for e in entries]},
            query_exclude=[where[e["reference"]] for e in entries], protocol="cirr",
            query_subsets=[[where[m] for m in e["members"] if m != e["reference"]] for e in entries],
            query_ids=[e["pairid"] for e in entries])

    def test_task(self) -> RetrievalTask:
        """Every pair against every image of the split, the reference removed (CIRR's protocol)."""
        return self._task(range(len(self.entries)), self.image_names)

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """A seeded sample of ``n_queries`` pairs against the images of their img_sets and targets."""
        chosen = self._sample_sources(range(len(self.entries)), n_queries, seed)
        names = [n for i in chosen for n in [self.entries[i]["reference"], *self.entries[i]["members"],
                                             self.entries[i]["target"]]]
        return self._task(chosen, list(dict.fromkeys(names)))


# ----------------------------------------------------------------------------------------------------------------
# Sampling and batching
# ----------------------------------------------------------------------------------------------------------------

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


def _read_utf8_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file; any other encoding is a UserInputError naming the file and the byte."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().split("\n")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                             f"convert it to UTF-8") from None


def collate_train(items: Sequence[dict | None], keep_size: bool = False) -> dict:
    """Stacks training items into a batch; items that are None (an unreadable image) are dropped.

    ``keep_size=True`` (several processes, whose batch shares must stay equal for the all-gathers) replaces them
    by copies of the first readable item instead.
    """
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
                "target_caption": []}
    return {
        "source_img": torch.stack([it["source_img"] for it in items]),  # (B, 3, S, S) uint8
        "target_img": torch.stack([it["target_img"] for it in items]),  # (B, 3, S, S) uint8
        "text": [it["text"] for it in items],
        "source_img_id": torch.tensor([it["source_img_id"] for it in items], dtype=torch.long),  # (B,)
        "target_img_id": torch.tensor([it["target_img_id"] for it in items], dtype=torch.long),  # (B,)
        "target_caption": [it["target_caption"] for it in items],
    }


DATASET_NAMES = ("mitstates", "fashion200k", "fashionIQ", "synthetic", "triplets", "css3d", "cirr")
SELECT_ON = ("test", "val")


def build_datasets(name: str, path: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                   use_complete_text_query: bool = False, category: str = "all", seed: int = 0,
                   image_cache: str | None = None, exclude_source_adj: bool = False,
                   fashioniq_protocol: str = "composeae") -> tuple[Any, Any]:
    """``(trainset, testset)`` for ``--dataset name``; Fashion IQ tests on its 'val' split, as the original, and
    CIRR on its 'val' split (test1's targets are not public)."""
    splits = build_splits(name, path, image_size=image_size, use_complete_text_query=use_complete_text_query,
                          category=category, seed=seed, image_cache=image_cache,
                          exclude_source_adj=exclude_source_adj, fashioniq_protocol=fashioniq_protocol)
    return splits["train"], splits["test"]


def build_splits(name: str, path: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, category: str = "all", seed: int = 0,
                 image_cache: str | None = None, exclude_source_adj: bool = False,
                 fashioniq_protocol: str = "composeae", select_on: str = "test", val_nouns: int = 0) -> dict:
    """``{'train', 'test'[, 'val']}`` datasets for ``--dataset name``.

    ``select_on='test'`` (the original codes' selection): train and test only. ``select_on='val'``: also a
    validation split that picks the checkpoint, while 'test' is evaluated once at the end:

    * MIT-States / synthetic: ``val_nouns`` training nouns held out (``MITStates.held_out_nouns``); test = the 49
      test nouns;
    * Fashion IQ: val, with test = the 'test' split, which needs targets in ``cap.<cat>.test.json`` (the public
      release withholds them: then there is no labelled split to test on, and this refuses);
    * CIRR: val, with test = test1, which only the CIRR server scores (``--submission_dir``);
    * triplets.csv: its val rows, with test = its test rows (both needed);
    * Fashion200k and CSS3D have no validation split: refused.
    """
    if select_on not in SELECT_ON:
        raise UserInputError(f"--select_on {select_on!r}: use test or val")
    if val_nouns and (name not in ("mitstates", "synthetic") or select_on != "val"):
        raise UserInputError("--val_nouns N holds out MIT-States training nouns for --select_on val; use it with "
                             "--dataset mitstates (or synthetic) and --select_on val")
    common = dict(image_size=image_size, use_complete_text_query=use_complete_text_query, seed=seed,
                  image_cache=image_cache)
    val = select_on == "val"
    if name in ("mitstates", "synthetic"):
        if val and val_nouns < 1:
            raise UserInputError(f"--select_on val on {name}: pass --val_nouns N (training nouns held out as the "
                                 f"validation split)")
        if name == "synthetic":
            import synthetic

            synthetic.generate_synthetic(path, seed=seed)
        mit = dict(exclude_source_adj=exclude_source_adj, val_nouns=val_nouns, **common)
        splits = {"train": MITStates(path, "train", **mit), "test": MITStates(path, "test", **mit)}
        if val:
            splits["val"] = MITStates(path, "val", **mit)
        return splits
    if name in ("fashion200k", "css3d"):
        if val:
            raise UserInputError(f"--select_on val: {name} has no validation split (only train and test); pass "
                                 f"--select_on test")
        cls = Fashion200k if name == "fashion200k" else CSS3D
        return {"train": cls(path, "train", **common), "test": cls(path, "test", **common)}
    if name == "fashionIQ":
        fiq = dict(category=category, protocol=fashioniq_protocol, **common)
        splits = {"train": FashionIQ(path, "train", **fiq)}
        if not val:
            splits["test"] = FashionIQ(path, "val", **fiq)
            return splits
        FashionIQ.check_labelled_test(path, category)
        splits["val"] = FashionIQ(path, "val", **fiq)
        splits["test"] = FashionIQ(path, "test", **fiq)
        return splits
    if name == "triplets":
        splits = {"train": Triplets(path, "train", **common), "test": Triplets(path, "test", **common)}
        if val:
            if splits["test"].split != "test":  # no test rows: the val rows are the test split
                raise UserInputError(f"--select_on val: {triplets_csv_path(path)} has no test rows, so its val rows "
                                     f"are the test split; add test rows or pass --select_on test")
            splits["val"] = Triplets(path, "val", **common)
        return splits
    if name == "cirr":
        splits = {"train": CIRR(path, "train", **common)}
        if val:
            splits["val"] = CIRR(path, "val", **common)
            splits["test"] = CIRR(path, "test1", **common)
        else:
            splits["test"] = CIRR(path, "val", **common)
        return splits
    raise UserInputError(f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)}")
