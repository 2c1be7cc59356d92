"""Fashion200k (Han et al., ICCV 2017) in its published layout, as TIRG (Vo et al., CVPR 2019, Sec. 4.2) uses it."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from errors import UserInputError
from seeding import Stream, seeded_rng

from .base import DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions, _pick, _read_utf8_lines, _RetrievalDataset

logger = logging.getLogger("datasets")  # the name its log lines carry


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
        self.index_files = [os.path.join(labels_dir, f) for f in label_files]  # + test_queries.txt for test
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
        self.index_files.append(queries_path)
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


def build_splits(options: SplitOptions) -> dict[str, Fashion200k]:
    """``--dataset fashion200k``: its train and test label files (no validation split)."""
    common = options.common()
    return {"train": Fashion200k(options.path, "train", **common), "test": Fashion200k(options.path, "test", **common)}
