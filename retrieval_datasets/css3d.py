"""TIRG's CSS3D (Vo et al., CVPR 2019, Sec. 4.1) in its published layout: the scene file and its 3-D renders, or
each scene drawn in 2-D (``css3d_render``)."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from errors import UserInputError
from seeding import Stream, seeded_rng

from . import css3d_render
from .base import DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions, _pick, _RetrievalDataset

logger = logging.getLogger("datasets")  # the name its log lines carry

CSS3D_FILE = "css_toy_dataset_novel2_small.dup.npy"


class CSS3D(_RetrievalDataset):
    """TIRG's CSS3D (Vo et al., CVPR 2019, Sec. 4.1) in its published layout: ``<path>/<CSS3D_FILE>`` and
    ``<path>/images/css_<split>_<%06d>.png``; without ``images/`` every scene is drawn in 2-D from its objects
    (``css3d_render.render_2d``, as TIRG's ``get_img(get_2d=True)``).

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
        if split not in ("train", "test"):
            raise UserInputError(f"CSS3D split {split!r} is unknown: use 'train' or 'test'")
        scene_file = os.path.join(path, CSS3D_FILE)
        if not os.path.isfile(scene_file):
            raise UserInputError(f"{scene_file} is missing: CSS3D needs the layout {self._layout()}")
        data = css3d_render.load_scene_file(scene_file)
        self.index_files = [scene_file]
        if split not in data or not isinstance(data[split], dict):
            raise UserInputError(f"{scene_file} has no {split!r} split (it holds {sorted(map(str, data))})")
        part = data[split]
        images_dir = os.path.join(path, "images")
        self.rendered = not os.path.isdir(images_dir)
        check_split(scene_file, split, part, self.rendered)
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
            if split == "train" and not sources:
                raise UserInputError(f"{scene_file}: train mods[{m}] has no (from, to) pairs; TIRG's sampling draws "
                                     f"a pair of any mod: re-download the dataset or fix the file")
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
        if self.rendered:
            logger.info("CSS3D %s: %s is missing, drawing the 2-D version of each scene", split, images_dir)
        else:
            self._set_image_paths([os.path.join(images_dir, f"css_{split}_{i:06d}.png") for i in range(n)],
                                  self.name)

    @classmethod
    def _layout(cls) -> str:
        return f"<path>/{CSS3D_FILE} and, for the 3-D renders, <path>/images/css_<split>_<%06d>.png"

    def listed_paths(self) -> list[str]:
        """The split's image files; drawn in 2-D (no images/), one name per scene, all present."""
        return [f"scene {i}" for i in range(len(self.objects))] if self.rendered else super().listed_paths()

    def __len__(self) -> int:
        return len(self.objects)

    def get_all_texts(self) -> list[str]:
        """The mods' texts (TIRG's vocabulary source)."""
        return [mod["to_str"] for mod in self.mods]

    def _load_id(self, i: int) -> torch.Tensor:
        if not self.rendered:
            return super()._load_id(i)
        # late: importing torchvision takes seconds (5.6 s measured), and only drawing a scene needs it here, as
        # image_cache.load_rgb_uint8 imports it only to decode a file
        import torchvision.transforms.functional as TF

        img = Image.fromarray(css3d_render.render_2d(self.objects[i]))
        if self.image_size != css3d_render.RENDER_SIZE:  # the same Resize + CenterCrop as the image files
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
        """``n_queries`` seeded training queries (slot 0 of TIRG's sampling; at most as many as the split's
        (source, mod) pairs) against a gallery of their targets."""
        if n_queries < 0:
            raise ValueError(f"n_queries must be >= 0, got {n_queries}")
        pairs = []
        for q in range(min(n_queries, len(self.test_queries()))):  # at most as many as its (source, mod) pairs
            source, (mod, target), _ = self.sample_pair(seeded_rng(seed, q, Stream.TRAIN_TASK))
            pairs.append((source, mod, target))
        keys, where = self._positions([i for s, _, t in pairs for i in (s, t)])
        captions = [self.captions[t] for _, _, t in pairs]
        return RetrievalTask(
            image_keys=keys, gallery=[where[t] for _, _, t in pairs], query_source=[where[s] for s, _, _ in pairs],
            query_text=[self.mods[m]["to_str"] for _, m, _ in pairs], gallery_labels={"composition": captions},
            query_targets={"composition": list(captions)}, query_exclude=None)


def _describe(value: Any) -> str:
    """``'<type> <repr>'`` of a value, the repr cut at 40 characters."""
    return f"{type(value).__name__} {repr(value)[:40]}"


def _is_sequence(value: Any) -> bool:
    """A list, a tuple or a numpy array of at least one dimension."""
    if isinstance(value, np.ndarray):
        return value.ndim >= 1
    return isinstance(value, (list, tuple))


def _index_list_problem(value: Any) -> str | None:
    """Why ``value`` is not a list of image indices (ints, numpy ints included; not bools), or None."""
    if not _is_sequence(value) or (isinstance(value, np.ndarray) and value.ndim != 1):
        return f"got {_describe(value)}"
    for v in value:
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            return f"got {type(value).__name__} holding {_describe(v)}"
    return None


def check_split(scene_file: str, split: str, part: dict, rendered: bool) -> None:
    """Type-checks a split of the scene file once, at load: ``objects_img`` a list of scenes (each a list of
    objects that ``css3d_render.render_2d`` can draw, when ``rendered``), ``labels`` (if any) one per scene, and
    ``mods`` a non-empty list of dicts with ``from`` / ``to`` lists of image indices and a ``to_str`` string.
    Raises a one-line UserInputError naming the split and the entry at fault."""
    def bad(where: str, what: str) -> UserInputError:
        return UserInputError(f"{scene_file}: {split} {where}: {what}; re-download the dataset or fix the file")

    for key in ("objects_img", "mods"):
        if key not in part:
            raise UserInputError(f"{scene_file}: the {split} split lacks {key!r}")
    objects = part["objects_img"]
    if not _is_sequence(objects) or len(objects) == 0:
        raise bad("objects_img", f"must be a non-empty list of scenes, got {_describe(objects)}")
    for i, scene in enumerate(objects):
        if not _is_sequence(scene):
            raise bad(f"objects_img[{i}]", f"must be a list of objects, got {_describe(scene)}")
        for j, obj in enumerate(scene if rendered else ()):
            problem = css3d_render.object_problem(obj)
            if problem:
                raise bad(f"objects_img[{i}][{j}]", problem)
    labels = part.get("labels")
    if labels is not None and (not _is_sequence(labels) or len(labels) != len(objects)):
        got = f"{len(labels)} labels" if _is_sequence(labels) else _describe(labels)
        raise bad("labels", f"must hold one label per scene of objects_img ({len(objects)}), got {got}")
    mods = part["mods"]
    if not _is_sequence(mods) or len(mods) == 0:
        raise bad("mods", f"must be a non-empty list of mods, got {_describe(mods)}")
    for m, mod in enumerate(mods):
        if not isinstance(mod, dict):
            raise bad(f"mods[{m}]", f"must be a dict with 'from', 'to' and 'to_str', got {_describe(mod)}")
        for key in ("from", "to", "to_str"):
            if key not in mod:
                raise bad(f"mods[{m}]", f"lacks {key!r} (a mod holds 'from', 'to' and 'to_str')")
        for key in ("from", "to"):
            problem = _index_list_problem(mod[key])
            if problem:
                raise bad(f"mods[{m}]", f"{key!r} must be a list of image indices, {problem}")
        if not isinstance(mod["to_str"], str):
            raise bad(f"mods[{m}]", f"'to_str' must be a string, got {_describe(mod['to_str'])}")


def build_splits(options: SplitOptions) -> dict[str, CSS3D]:
    """``--dataset css3d``: the train and test splits of the scene file (no validation split)."""
    common = options.common()
    return {"train": CSS3D(options.path, "train", **common), "test": CSS3D(options.path, "test", **common)}
