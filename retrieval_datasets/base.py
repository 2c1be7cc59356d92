"""What every dataset of the package shares: the retrieval benchmark a split describes (``RetrievalTask``), the
options its splits are built with (``SplitOptions``), the base class of the loaders (image access, bad-image
bookkeeping, item assembly) and small helpers.

Every dataset returns images as uint8 tensors (3, S, S) (PIL -> RGB -> Resize(S) -> CenterCrop(S)); the ImageNet
normalisation happens on the device in the model. Training items are addressed by ``(epoch, index, slot)`` and are
a pure function of ``(seed, epoch, index, slot)``, so any number of DataLoader workers, ranks and resumes see the
same pairs. ``test_task()`` / ``train_task(n, seed)`` describe the retrieval benchmarks as ``RetrievalTask``
objects that ``test_retrieval.evaluate`` consumes.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils.data

from errors import UserInputError
from image_cache import BadImageError, ImageCache, load_rgb_uint8
from seeding import Stream, seeded_rng

from . import completeness

logger = logging.getLogger("datasets")  # the name its log lines carry


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


DEFAULT_IMAGE_SIZE = 224  # the original's Resize(224) + CenterCrop(224)
_JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """The settings a dataset's splits are built with: ``--dataset_path`` and the run's data flags."""

    path: Any  # --dataset_path (a folder; for triplets also the .csv file itself)
    image_size: int = DEFAULT_IMAGE_SIZE
    use_complete_text_query: bool = False
    category: str = "all"  # --category_to_train (Fashion IQ)
    seed: int = 0
    image_cache: str | None = None
    exclude_source_adj: bool = False  # MIT-States layout
    fashioniq_protocol: str = "composeae"
    select_on: str = "test"
    val_nouns: int = 0  # MIT-States layout, with select_on 'val'

    @property
    def val(self) -> bool:
        """Whether a validation split is built (``--select_on val``)."""
        return self.select_on == "val"

    def common(self) -> dict[str, Any]:
        """The keyword arguments that every dataset class takes."""
        return dict(image_size=self.image_size, use_complete_text_query=self.use_complete_text_query,
                    seed=self.seed, image_cache=self.image_cache)


def _pick(rng: np.random.Generator, seq: Sequence) -> Any:
    """Uniform choice of one element of ``seq`` (non-empty)."""
    return seq[int(rng.integers(len(seq)))]


class _RetrievalDataset(torch.utils.data.Dataset):
    """Shared image access, bad-image bookkeeping and item assembly of every dataset of the package."""

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
        self.bad_images: set[str] = set()  # unreadable files seen by this process (and added from its workers)
        self._new_bad: list[str] = []  # unreadable files met since ``take_new_bad`` last ran (a worker's batch)
        self.missing: frozenset[str] = frozenset()  # listed image files absent at the start (``completeness``)
        self.index_files: list[str] = []  # the release's files that list the split's images; [] = the folder
        self._paths: list[str] = []
        self._cache: ImageCache | None = None

    @classmethod
    def _layout(cls) -> str:
        return ""

    def _set_image_paths(self, paths: list[str], cache_name: str) -> None:
        """Registers the image files (image id = position), notes the absent ones (``missing``: one stat each) and
        builds/opens the decode-once cache if asked."""
        self._paths = paths
        self.missing = completeness.missing_paths(paths)
        if self.image_cache_dir:
            self._cache = ImageCache(self.image_cache_dir, cache_name, self.split, self.image_size, paths)
            for i in sorted(self._cache.bad):
                self._report_bad(paths[i])

    def _report_bad(self, path: str) -> None:
        """Records an image that failed to load; a present one (unreadable) with a warning, a missing one quietly
        (``missing`` holds it from the start, and a run warns of its split's count: ``completeness.DataRecord``)."""
        if path not in self.bad_images:
            self.bad_images.add(path)
            if path in self.missing:
                return
            self._new_bad.append(path)
            logger.warning("skipping unreadable image %s (%d unreadable so far)", path,
                           len(self.bad_images - self.missing))

    def take_new_bad(self) -> list[str]:
        """The unreadable files met by this process since the last call (``completeness.take_new_bad``)."""
        new, self._new_bad = self._new_bad, []
        return new

    def listed_paths(self) -> list[str]:
        """The image files the split's index files list, each once."""
        return list(dict.fromkeys(self._paths))

    def listed_groups(self) -> dict[str, list[str]]:
        """``{'': listed_paths()}``; a dataset counted per category (Fashion IQ) returns one list per category."""
        return {"": self.listed_paths()}

    def __getitems__(self, keys: Sequence[Any]) -> list:
        """The items of ``keys`` (None where an image is unreadable), then, when this process met unreadable images
        since the last batch, a note ``{'bad_paths': [...]}`` that ``collate_train`` carries back to the main
        process (DataLoader workers keep their own ``bad_images``)."""
        items: list = [self[k] for k in keys]
        new = self.take_new_bad()
        return items + [{"bad_paths": new}] if new else items

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
        """``min(n, len(pool))`` sources from ``pool``, seeded, without replacement (never more queries than
        there are)."""
        if n < 0:
            raise ValueError(f"n_queries must be >= 0, got {n}")
        n = min(n, len(pool))
        if n == 0:
            return []
        rng = seeded_rng(seed, Stream.TRAIN_TASK)
        chosen = rng.choice(np.asarray(pool, dtype=np.int64), size=n, replace=False)
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


def read_utf8_text(path: str) -> str:
    """The text of a UTF-8 file, a leading byte-order mark dropped; an unreadable file or any other encoding is a
    UserInputError naming the file (and the first bad byte and its offset in the file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserInputError(f"{path} cannot be read ({exc.strerror or exc}); check the file and its "
                             f"permissions") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        raise UserInputError(f"{path}: not UTF-8 text (byte {raw[offset]:#04x} at offset {offset}); "
                             f"convert it to UTF-8") from None


def _read_utf8_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (``read_utf8_text``), split at '\\n'."""
    return read_utf8_text(path).split("\n")


_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, list, string, number, boolean or null."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _read_json(path: str, kind: type, missing: str) -> Any:
    """The parsed JSON file ``path``, which must hold a ``kind`` (dict or list). A missing file is a UserInputError
    ``'<path> is missing: <missing>'``; an unreadable, non-UTF-8 or invalid file (nested deeper than Python's stack
    allows included), or another JSON type, is one naming the file."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path} is missing: {missing}")
    text = read_utf8_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack allows
        raise UserInputError(f"{path}: not valid JSON ({' '.join(str(exc)[:200].split())})") from None
    if not isinstance(data, kind):
        raise UserInputError(f"{path}: expected a JSON {_JSON_TYPES[kind]}, got {json_type(data)}")
    return data


def text_problem(value: Any, expected: str) -> str | None:
    """Why the parsed JSON ``value`` is not ``expected``, a string that UTF-8 can encode (JSON may hold lone
    surrogates such as '\\udcff'), or None when it is."""
    if not isinstance(value, str):
        return f"must be {expected}, got {json_type(value)} {str(value)[:40]!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"must be {expected}, got text with a lone surrogate {value[:40]!r} (not UTF-8)"
    return None
