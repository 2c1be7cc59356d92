"""MIT-States (Isola et al., CVPR 2015) in its published layout, as TIRG (Vo et al., CVPR 2019, arXiv 1812.07119,
Sec. 4.3) and ComposeAE (Anwaar et al., WACV 2021, arXiv 2006.11149, Sec. 4.1) use it; the synthetic dataset
(``synthetic.py``) is written in this layout too."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from errors import UserInputError
from seeding import Stream, seeded_rng

from .base import DEFAULT_IMAGE_SIZE, _JPEG_SUFFIXES, RetrievalTask, SplitOptions, _pick, _RetrievalDataset

logger = logging.getLogger("datasets")  # the name its log lines carry

# The original's 49 MIT-States test nouns (data, not code): train = the other nouns, test = these.
MIT_STATES_TEST_NOUNS = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock", "clothes", "coffee",
    "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden", "gate", "glass", "horse", "island",
    "laptop", "lead", "lightning", "mirror", "orange", "paint", "persimmon", "plastic", "plate", "potato", "road",
    "rubber", "sand", "shell", "sky", "smoke", "steel", "stream", "table", "tea", "tomato", "vacuum", "wax",
    "wheel", "window", "wool",
)
_MIT_TEST_NOUN_SET = frozenset(MIT_STATES_TEST_NOUNS)


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
        for folder, adj, noun in self.labelled_folders(images_dir, warn=True):
            noun_split = "test" if noun in _MIT_TEST_NOUN_SET else "val" if noun in self.val_noun_set else "train"
            if noun_split != split:
                continue
            folder_path = os.path.join(images_dir, folder)
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
    def labelled_folders(images_dir: str, warn: bool = False) -> list[tuple[str, str, str]]:
        """``[(folder, adj, noun)]``: the ``'<adj> <noun>'`` folders under ``images_dir``, sorted by name.

        Skipped: entries that are not folders or have no space in their name, the unlabelled ``'adj <noun>'``
        folders (as the original), and, with a warning when ``warn``, names of more than two words (the original
        crashed on them) and names that are not UTF-8 (``os.listdir`` returns their undecodable bytes as lone
        surrogates, which would reach the vocabulary and the text model).
        """
        found = []
        # Sorted listings: the original used os.listdir order, which depends on the file system (fix: the image ids
        # and therefore the pairs are the same on every machine).
        for folder in sorted(os.listdir(images_dir)):
            folder_path = os.path.join(images_dir, folder)
            if " " not in folder or not os.path.isdir(folder_path):
                continue
            try:
                folder.encode("utf-8")
            except UnicodeEncodeError:
                if warn:
                    logger.warning("skipping MIT-States folder %r: its name is not UTF-8; rename it in UTF-8",
                                   folder_path)
                continue
            words = folder.split()
            if len(words) != 2:
                if warn:
                    logger.warning("skipping MIT-States folder %r: its name is not '<adj> <noun>'", folder_path)
                continue
            if words[0] != "adj":
                found.append((folder, words[0], words[1]))
        return found

    @staticmethod
    def held_out_nouns(images_dir: str, n: int, seed: int) -> frozenset[str]:
        """``n`` training nouns (outside the 49 test nouns) drawn with ``seed``: the val split of ``--val_nouns``.

        Only nouns with at least two adjectives are drawn (the others give no queries); the draw is a seeded
        permutation of the sorted nouns, so it is the same on every machine and disjoint from train and test.
        """
        if n <= 0:
            return frozenset()
        adjs: dict[str, set[str]] = {}
        for _, adj, noun in MITStates.labelled_folders(images_dir):
            if noun not in _MIT_TEST_NOUN_SET:
                adjs.setdefault(noun, set()).add(adj)
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


def require_val_nouns(options: SplitOptions, dataset: str) -> None:
    """Refuses ``--select_on val`` without ``--val_nouns N`` on a dataset in the MIT-States layout."""
    if options.val and options.val_nouns < 1:
        raise UserInputError(f"--select_on val on {dataset}: pass --val_nouns N (training nouns held out as the "
                             f"validation split)")


def held_out_splits(options: SplitOptions) -> dict[str, MITStates]:
    """``{'train', 'test'[, 'val']}`` of the MIT-States layout under ``options.path``: test = the 49 test nouns;
    with ``--select_on val``, val = ``--val_nouns`` training nouns held out (``MITStates.held_out_nouns``)."""
    mit = dict(exclude_source_adj=options.exclude_source_adj, val_nouns=options.val_nouns, **options.common())
    splits = {"train": MITStates(options.path, "train", **mit), "test": MITStates(options.path, "test", **mit)}
    if options.val:
        splits["val"] = MITStates(options.path, "val", **mit)
    return splits


def build_splits(options: SplitOptions) -> dict[str, MITStates]:
    """``--dataset mitstates``: ``held_out_splits`` (``--select_on val`` needs ``--val_nouns N``)."""
    require_val_nouns(options, MITStates.name)
    return held_out_splits(options)
