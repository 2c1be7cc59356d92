"""Fashion IQ (Wu et al., CVPR 2021 / arXiv 1905.12794) in its published layout, as ComposeAE (Anwaar et al., WACV
2021, Sec. 4.1) uses it, and CLIP4Cir's standard protocol."""
from __future__ import annotations

import os
from typing import Any, Sequence

from errors import UserInputError

from .base import (DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions, _read_json, _RetrievalDataset, json_type,
                   text_problem)

FASHION_IQ_CATEGORIES = ("dress", "shirt", "toptee")  # the order of category 'all', as the original
FASHION_IQ_PROTOCOLS = ("composeae", "standard")
FASHION_IQ_CAPTIONS = 2  # relative captions per entry in the published files


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
                problem = text_problem(name, "an image name string")
                if problem:
                    raise UserInputError(f"{split_file}: entry {i} {problem}; re-download Fashion IQ or fix the file")
            split_names += names
            self.category_gallery[cat] = list(dict.fromkeys(names))
            caption_file = os.path.join(path, "captions", f"cap.{cat}.{split}.json")
            self.index_files += [split_file, caption_file]
            self.entries += [self._entry(caption_file, i, entry, cat)
                             for i, entry in enumerate(self._read_json_list(caption_file))]
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
        """The JSON list in ``file_path``; anything else is a one-line UserInputError naming the file."""
        return _read_json(file_path, list, f"Fashion IQ needs {FashionIQ._layout()}")

    def _entry(self, caption_file: str, i: int, entry: Any, cat: str) -> dict:
        """Caption entry ``i`` of category ``cat``, its field types checked, with its query text."""
        def bad(what: str) -> UserInputError:
            return UserInputError(f"{caption_file}: entry {i} is malformed: {what}; expected {{'candidate': name, "
                                  f"'target': name, 'captions': [text, text]}}")

        if not isinstance(entry, dict):
            raise bad(f"it is a {json_type(entry)}, not an object")
        for field in ("candidate", "target", "captions"):
            if field not in entry:
                raise bad(f"{field!r} is missing")
        for field in ("candidate", "target"):
            problem = text_problem(entry[field], "an image name string")
            if problem:
                raise bad(f"{field!r} {problem}")
        captions = entry["captions"]
        if not isinstance(captions, list) or len(captions) != FASHION_IQ_CAPTIONS:
            got = f"a list of {len(captions)}" if isinstance(captions, list) else json_type(captions)
            raise bad(f"'captions' must be a list of {FASHION_IQ_CAPTIONS} strings, got {got} {str(captions)[:60]!r}")
        for k, caption in enumerate(captions):
            problem = text_problem(caption, "a string")
            if problem:
                raise bad(f"'captions[{k}]' {problem}")
        if self.protocol == "standard":
            text = fashioniq_standard_text(captions)
        elif self.category == "all":
            text = (cat + " " + " and it ".join(captions)).lower()
        else:
            text = " ".join(captions).lower()
        return {"category": cat, "candidate": entry["candidate"], "target": entry["target"],
                "captions": list(captions), "text": text}

    def listed_groups(self) -> dict[str, list[str]]:
        """Category -> the image files its split and caption files list (completeness counts per category)."""
        groups = {}
        for cat, names in self.category_gallery.items():
            named = names + [e[k] for e in self.entries if e["category"] == cat for k in ("candidate", "target")]
            groups[cat] = [os.path.join(self.images_dir, n + ".jpg") for n in dict.fromkeys(named)]
        return groups

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


def build_splits(options: SplitOptions) -> dict[str, FashionIQ]:
    """``--dataset fashionIQ``: train, and 'val' as the test split (as the original). With ``--select_on val``:
    val, with test = the 'test' split, which needs targets in ``cap.<cat>.test.json`` (the public release withholds
    them: then there is no labelled split to test on, and this refuses)."""
    fiq = dict(category=options.category, protocol=options.fashioniq_protocol, **options.common())
    splits = {"train": FashionIQ(options.path, "train", **fiq)}
    if not options.val:
        splits["test"] = FashionIQ(options.path, "val", **fiq)
        return splits
    FashionIQ.check_labelled_test(options.path, options.category)
    splits["val"] = FashionIQ(options.path, "val", **fiq)
    splits["test"] = FashionIQ(options.path, "test", **fiq)
    return splits
