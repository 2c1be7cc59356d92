"""CIRR (Liu et al., ICCV 2021; github Cuberick-Orion/CIRR) in its published layout."""
from __future__ import annotations

import collections
import os
from typing import Any, Sequence

from errors import UserInputError

from .base import (DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions, _read_json, _RetrievalDataset, json_type,
                   text_problem)

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
        self.index_files = [split_file, caption_file]
        name2rel = self._read_json(split_file, dict)
        for i, (name, rel) in enumerate(name2rel.items()):
            problem = text_problem(name, "an image name") or text_problem(rel, "a relative image path string")
            if problem:
                raise UserInputError(f"{split_file}: entry {i} ({name!r}): the value {problem}; re-download CIRR or "
                                     f"fix the file")
        self.labelled = split != "test1"
        self.entries = [self._entry(caption_file, i, e) for i, e in enumerate(self._read_json(caption_file, list))]
        if not self.labelled:
            self._refuse_duplicate_pairids(caption_file)
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
        return _read_json(file_path, kind, f"CIRR needs {CIRR._layout()}")

    def _entry(self, caption_file: str, i: int, e: Any) -> dict:
        """Caption entry ``i``, its field types checked: ``{pairid, reference, target, caption, members}``."""
        fields = ["pairid", "reference", "caption", "img_set"] + (["target_hard"] if self.labelled else [])

        def bad(what: str) -> UserInputError:
            return UserInputError(f"{caption_file}: entry {i} is malformed: {what}; expected "
                                  f"{{{', '.join(fields)}: {{members: [image names]}}}} (re-download CIRR or fix "
                                  f"the file)")

        if not isinstance(e, dict):
            raise bad(f"it is a {json_type(e)}, not an object")
        for field in fields:
            if field not in e:
                raise bad(f"{field!r} is missing")
        if not isinstance(e["pairid"], int) or isinstance(e["pairid"], bool):
            raise bad(f"'pairid' must be an integer, got {json_type(e['pairid'])} {str(e['pairid'])[:40]!r}")
        for field in fields[1:]:
            problem = "" if field == "img_set" else text_problem(e[field], "a string")
            if problem:
                raise bad(f"{field!r} {problem}")
        if not isinstance(e["img_set"], dict):
            raise bad(f"'img_set' must be an object holding 'members', got {json_type(e['img_set'])} "
                      f"{str(e['img_set'])[:40]!r}")
        members = e["img_set"].get("members")
        if not isinstance(members, list):
            raise bad(f"'img_set.members' must be a list of image names, got {json_type(members)}")
        for k, m in enumerate(members):
            problem = text_problem(m, "an image name string")
            if problem:
                raise bad(f"'img_set.members[{k}]' {problem}")
        return {"pairid": e["pairid"], "reference": e["reference"], "target": e.get("target_hard"),
                "caption": e["caption"], "members": list(members)}

    def _refuse_duplicate_pairids(self, caption_file: str) -> None:
        """test1: the CIRR server keys its predictions by pairid, so a repeated pairid would keep one of its pairs
        in the submission files; refused, naming the first few."""
        counts = collections.Counter(e["pairid"] for e in self.entries)
        repeated = [p for p, c in counts.items() if c > 1]
        if repeated:
            shown = ", ".join(str(p) for p in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
            raise UserInputError(f"{caption_file}: {len(repeated)} pairid{'s' if len(repeated) > 1 else ''} "
                                 f"listed more than once ({shown}; {sum(counts[p] for p in repeated)} entries); the "
                                 f"CIRR server scores one prediction per pairid: list each pair once")

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


def build_splits(options: SplitOptions) -> dict[str, CIRR]:
    """``--dataset cirr``: train, and val as the test split (test1's targets are not public). With
    ``--select_on val``: val, with test = test1, which only the CIRR server scores (``--submission_dir``)."""
    common = options.common()
    splits = {"train": CIRR(options.path, "train", **common)}
    if options.val:
        splits["val"] = CIRR(options.path, "val", **common)
        splits["test"] = CIRR(options.path, "test1", **common)
    else:
        splits["test"] = CIRR(options.path, "val", **common)
    return splits


def test1_split(options: SplitOptions) -> CIRR:
    """CIRR's test1 split (no public targets), for the prediction files of the CIRR server."""
    return CIRR(options.path, "test1", image_size=options.image_size, seed=options.seed,
                image_cache=options.image_cache)
