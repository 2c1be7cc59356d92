"""A small synthetic dataset in the MIT-States layout: drawn objects as nouns, visual states (colour, size,
texture) as adjectives, deterministic per seed. It is the embedded default of ``main.py`` and the tests' data;
``--dataset synthetic`` generates it on first use (``build_splits``) and reads it as MIT-States."""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw

from checkpoint import atomic_write
from errors import UserInputError
from seeding import Stream, seeded_rng as _rng

from . import mitstates
from .base import SplitOptions
from .triplets import TRIPLETS_COLUMNS, TRIPLETS_FILE

logger = logging.getLogger("datasets")  # the name its log lines carry


# ----------------------------------------------------------------------------------------------------------------
# Synthetic dataset in the MIT-States layout
# ----------------------------------------------------------------------------------------------------------------

SYNTHETIC_FORMAT = "composeae-synthetic/1"
SYNTHETIC_MANIFEST = "synthetic_manifest.json"
# Nouns are drawn objects. Training nouns are outside the original's 49 test nouns, test nouns inside it, so that
# MITStates puts them in the right split.
SYNTHETIC_TRAIN_NOUNS = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "arrow",
                         "pentagon", "heart")
SYNTHETIC_TEST_NOUNS = ("clock", "plate", "wheel", "window", "fish", "table")
# Adjectives are visual states: each one sets one attribute; the attributes it does not name stay neutral
# (grey, medium size, solid), so a caption describes its image without ambiguity.
SYNTHETIC_ADJECTIVES: dict[str, tuple[str, Any]] = {
    "red": ("colour", (215, 45, 40)), "green": ("colour", (40, 180, 60)), "blue": ("colour", (50, 90, 235)),
    "yellow": ("colour", (235, 215, 40)), "purple": ("colour", (150, 60, 200)),
    "small": ("size", 0.28), "large": ("size", 0.82),
    "striped": ("texture", "striped"), "dotted": ("texture", "dotted"), "hollow": ("texture", "hollow"),
}
_NEUTRAL = {"colour": (150, 150, 150), "size": 0.55, "texture": "solid"}
_BACKGROUND = (28, 30, 36)


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, radii: Sequence[float] = (1.0,),
             sx: float = 1.0) -> list[tuple[float, float]]:
    """Vertices of a (possibly star-shaped) polygon: n points, radius r * radii[k % len(radii)]."""
    pts = []
    for k in range(n):
        a = angle + 2 * math.pi * k / n
        rr = r * radii[k % len(radii)]
        pts.append((cx + sx * rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated(points: Sequence[tuple[float, float]], cx: float, cy: float, r: float, angle: float) -> list:
    """Points given in units of r around (0, 0), rotated by ``angle`` and placed at (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _draw_noun(draw: ImageDraw.ImageDraw, noun: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draws ``noun`` as a mask (255 = object, 0 = background / cut-outs) of half-size ``r``."""
    def ell(k: float, ky: float | None = None, fill: int = 255) -> None:
        ky = k if ky is None else ky
        draw.ellipse([cx - k * r, cy - ky * r, cx + k * r, cy + ky * r], fill=fill)

    def poly(points: Sequence[tuple[float, float]], fill: int = 255) -> None:
        draw.polygon(_rotated(points, cx, cy, r, angle), fill=fill)

    def bar(x0: float, y0: float, x1: float, y1: float, fill: int = 255) -> None:
        poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    if noun == "circle":
        ell(1.0)
    elif noun == "square":
        bar(-0.8, -0.8, 0.8, 0.8)
    elif noun == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle - math.pi / 2), fill=255)
    elif noun == "star":
        draw.polygon(_polygon(cx, cy, r, 10, angle - math.pi / 2, (1.0, 0.42)), fill=255)
    elif noun == "cross":
        bar(-1.0, -0.3, 1.0, 0.3)
        bar(-0.3, -1.0, 0.3, 1.0)
    elif noun == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, angle, sx=0.6), fill=255)
    elif noun == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=255)
    elif noun == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, angle - math.pi / 2), fill=255)
    elif noun == "arrow":
        poly([(-1.0, -0.25), (0.2, -0.25), (0.2, -0.65), (1.0, 0.0), (0.2, 0.65), (0.2, 0.25), (-1.0, 0.25)])
    elif noun == "heart":
        for x in (-0.45, 0.45):
            draw.ellipse([cx + (x - 0.5) * r, cy - 0.85 * r, cx + (x + 0.5) * r, cy + 0.15 * r], fill=255)
        draw.polygon([(cx - 0.95 * r, cy - 0.2 * r), (cx + 0.95 * r, cy - 0.2 * r), (cx, cy + r)], fill=255)
    elif noun == "clock":
        ell(1.0)
        w = max(1, int(r * 0.14))
        draw.line([(cx, cy), *_rotated([(0.0, -0.75)], cx, cy, r, angle)], fill=0, width=w)
        draw.line([(cx, cy), *_rotated([(0.5, 0.0)], cx, cy, r, angle)], fill=0, width=w)
    elif noun == "plate":
        ell(1.0, 0.62)
        ell(0.68, 0.4, fill=0)
        ell(0.56, 0.32, fill=255)
    elif noun == "wheel":
        ell(1.0)
        ell(0.78, fill=0)
        ell(0.22)
        w = max(1, int(r * 0.12))
        for k in range(3):
            a = angle + k * math.pi / 3
            draw.line([(cx - 0.8 * r * math.cos(a), cy - 0.8 * r * math.sin(a)),
                       (cx + 0.8 * r * math.cos(a), cy + 0.8 * r * math.sin(a))], fill=255, width=w)
    elif noun == "window":
        bar(-0.85, -0.85, 0.85, 0.85)
        bar(-0.85, -0.08, 0.85, 0.08, fill=0)
        bar(-0.08, -0.85, 0.08, 0.85, fill=0)
    elif noun == "fish":
        poly([(-0.55, 0.0), (-1.0, -0.5), (-1.0, 0.5)])
        draw.ellipse([cx - 0.7 * r, cy - 0.45 * r, cx + r, cy + 0.45 * r], fill=255)
    elif noun == "table":
        bar(-1.0, -0.6, 1.0, -0.3)
        bar(-0.85, -0.3, -0.65, 0.8)
        bar(0.65, -0.3, 0.85, 0.8)
    else:
        raise ValueError(f"no drawing for synthetic noun {noun!r}")


def _min_filter(a: np.ndarray, k: int) -> np.ndarray:
    """PIL's ``ImageFilter.MinFilter(k)`` (k odd; borders replicated) as two 1-D sliding minima: the same pixels,
    ~50x faster at k = 25 (the square filter dominated the drawing of 'hollow' images)."""
    r = k // 2
    padded = np.pad(a, r, mode="edge")
    return sliding_window_view(sliding_window_view(padded, k, axis=0).min(-1), k, axis=1).min(-1)


def render_synthetic_image(noun: str, adj: str, image_size: int, rng: np.random.Generator,
                           noise_std: float = 6.0) -> np.ndarray:
    """One image (S, S, 3) uint8 of ``noun`` in state ``adj``, with position/size/angle jitter and noise."""
    attrs = dict(_NEUTRAL)
    kind, value = SYNTHETIC_ADJECTIVES[adj]
    attrs[kind] = value
    s = image_size
    big = 2 * s  # drawn at twice the size and downsampled: smooth edges
    r = 0.5 * big * attrs["size"] * float(rng.uniform(0.9, 1.1))
    margin = max(0.0, 0.5 * big - r)
    cx = 0.5 * big + float(rng.uniform(-0.6, 0.6)) * margin
    cy = 0.5 * big + float(rng.uniform(-0.6, 0.6)) * margin
    angle = float(rng.uniform(-0.25, 0.25))
    mask_img = Image.new("L", (big, big), 0)
    _draw_noun(ImageDraw.Draw(mask_img), noun, cx, cy, r, angle)
    if attrs["texture"] == "hollow":
        k = max(3, (big // 10) | 1)
        inner = _min_filter(np.asarray(mask_img), k)
        mask = np.asarray(mask_img, dtype=np.float32) - inner.astype(np.float32)
        mask_img = Image.fromarray(np.clip(mask, 0, 255).astype(np.uint8))
    mask = np.asarray(mask_img.resize((s, s), Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255.0
    colour = np.asarray(attrs["colour"], dtype=np.float32) + rng.normal(0, 6, size=3).astype(np.float32)
    fill = np.broadcast_to(colour, (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s]
    period = max(4, s // 8)
    if attrs["texture"] == "striped":
        phase = int(rng.integers(period))
        fill[((xx + yy + phase) // (period // 2)) % 2 == 0] *= 0.35
    elif attrs["texture"] == "dotted":
        ox, oy = int(rng.integers(period)), int(rng.integers(period))
        d2 = ((xx + ox) % period - period / 2) ** 2 + ((yy + oy) % period - period / 2) ** 2
        fill[d2 <= (period * 0.28) ** 2] *= 0.3
    background = np.asarray(_BACKGROUND, dtype=np.float32) + rng.normal(0, 4, size=3).astype(np.float32)
    img = background * (1.0 - mask) + fill * mask
    img = img + rng.normal(0, noise_std, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _synthetic_plan(seed: int, n_train_nouns: int, n_test_nouns: int,
                    adjectives_per_noun: int) -> dict[str, list[str]]:
    """noun -> its adjectives; test nouns use adjectives that some training noun has."""
    if not 1 <= n_train_nouns <= len(SYNTHETIC_TRAIN_NOUNS):
        raise UserInputError(f"synthetic: n_train_nouns must be 1..{len(SYNTHETIC_TRAIN_NOUNS)}, got {n_train_nouns}")
    if not 1 <= n_test_nouns <= len(SYNTHETIC_TEST_NOUNS):
        raise UserInputError(f"synthetic: n_test_nouns must be 1..{len(SYNTHETIC_TEST_NOUNS)}, got {n_test_nouns}")
    if not 2 <= adjectives_per_noun <= len(SYNTHETIC_ADJECTIVES):
        raise UserInputError(f"synthetic: adjectives_per_noun must be 2..{len(SYNTHETIC_ADJECTIVES)}, "
                             f"got {adjectives_per_noun}")
    rng = _rng(seed, Stream.SYNTHETIC)
    pool = list(SYNTHETIC_ADJECTIVES)
    plan: dict[str, list[str]] = {}
    for noun in SYNTHETIC_TRAIN_NOUNS[:n_train_nouns]:
        plan[noun] = [pool[i] for i in sorted(rng.choice(len(pool), adjectives_per_noun, replace=False))]
    seen = sorted({a for adjs in plan.values() for a in adjs}, key=pool.index)
    for noun in SYNTHETIC_TEST_NOUNS[:n_test_nouns]:
        k = min(adjectives_per_noun, len(seen))
        plan[noun] = [seen[i] for i in sorted(rng.choice(len(seen), k, replace=False))]
    return plan


def _manifest_matches(path: str, manifest: dict) -> bool:
    try:
        with open(os.path.join(path, SYNTHETIC_MANIFEST)) as f:
            return json.load(f) == manifest
    except (OSError, ValueError):
        return False


def _write_synthetic_images(job: tuple) -> None:
    """Images ``first..last-1`` of one class folder (a process-pool job of ``generate_synthetic``)."""
    folder, seed, c, a, noun, adj, image_size, first, last, noise_std = job
    os.makedirs(folder, exist_ok=True)
    for k in range(first, last):
        rng = _rng(seed, c, a, k, Stream.SYNTHETIC)
        pixels = render_synthetic_image(noun, adj, image_size, rng, noise_std)
        Image.fromarray(pixels).save(os.path.join(folder, f"{k:03d}.jpg"), quality=92)


def generate_synthetic(path: str, seed: int = 0, image_size: int = 64, n_train_nouns: int = 8,
                       n_test_nouns: int = 4, adjectives_per_noun: int = 6, images_per_class: int = 10,
                       noise_std: float = 6.0, num_workers: int = 1) -> None:
    """Writes a small synthetic dataset in the MIT-States layout ``<path>/images/<adj noun>/*.jpg``.

    Drawn objects are the nouns (training: circle, square, ...; test: names from the original's 49 test nouns,
    clock, plate, ...), visual states the adjectives (colour, size, texture). Nothing is written when
    ``<path>/synthetic_manifest.json`` already holds the same parameters; otherwise the data is generated into a
    temporary folder beside ``path`` and renamed into place (a folder that is not a synthetic dataset is never
    replaced). The same arguments give byte-identical files, with any ``num_workers`` (processes drawing the
    images; every image has its own seed).
    """
    plan = _synthetic_plan(seed, n_train_nouns, n_test_nouns, adjectives_per_noun)
    if images_per_class < 1 or image_size < 8:
        raise UserInputError(f"synthetic: images_per_class >= 1 and image_size >= 8 needed, got "
                             f"{images_per_class}, {image_size}")
    manifest = {"format": SYNTHETIC_FORMAT, "seed": int(seed), "image_size": int(image_size),
                "n_train_nouns": n_train_nouns, "n_test_nouns": n_test_nouns,
                "adjectives_per_noun": adjectives_per_noun, "images_per_class": images_per_class,
                "noise_std": float(noise_std), "classes": plan}
    if _manifest_matches(path, manifest):
        return
    if os.path.exists(path):
        ours = os.path.isfile(os.path.join(path, SYNTHETIC_MANIFEST))
        if not os.path.isdir(path) or (os.listdir(path) and not ours):
            raise UserInputError(f"{path} exists and is not a synthetic dataset: pass a new or empty folder as "
                                 f"--dataset_path for --dataset synthetic")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    try:
        chunk = 32  # images per job
        jobs = [(os.path.join(tmp, "images", f"{adj} {noun}"), seed, c, a, noun, adj, image_size, k,
                 min(k + chunk, images_per_class), noise_std)
                for c, (noun, adjs) in enumerate(plan.items()) for a, adj in enumerate(adjs)
                for k in range(0, images_per_class, chunk)]
        if num_workers > 1 and len(jobs) > 1:
            with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(jobs))) as pool:
                list(pool.map(_write_synthetic_images, jobs))
        else:
            for job in jobs:
                _write_synthetic_images(job)
        with open(os.path.join(tmp, SYNTHETIC_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if os.path.exists(path):  # an empty folder or an older synthetic dataset: move it aside, then replace
            old = f"{tmp}.old"
            try:
                os.rename(path, old)
            except OSError:
                if _manifest_matches(path, manifest):
                    return
                raise
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError:  # another process installed it first
                if not _manifest_matches(path, manifest):
                    raise
        logger.info("synthetic dataset written to %s (%d classes)", path, sum(len(a) for a in plan.values()))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The same data as your own triplets (triplets.Triplets)
# ----------------------------------------------------------------------------------------------------------------

def write_triplets_csv(path: str, seed: int = 0, **params: Any) -> str:
    """Writes the synthetic dataset (``generate_synthetic(path, seed, **params)``) and ``<path>/triplets.csv``
    listing it as triplets (``--dataset triplets``); returns the CSV's path.

    Every image is the source of rows: a training image of one row, towards another adjective of its noun; a test
    image of one row per other adjective of its noun (the MIT-States test queries). Each row's target is one
    seeded image of the target class, the text the target adjective; paths are relative to ``path``.
    """
    generate_synthetic(path, seed=seed, **params)
    images = os.path.join(path, "images")
    classes: dict[str, dict[str, list[str]]] = {}  # noun -> adj -> relative image paths
    for folder in sorted(os.listdir(images)):
        adj, noun = folder.split()
        files = sorted(f for f in os.listdir(os.path.join(images, folder)) if f.endswith(".jpg"))
        classes.setdefault(noun, {})[adj] = [f"images/{folder}/{f}" for f in files]
    rows = []
    for n, (noun, adjs) in enumerate(classes.items()):
        split = "test" if noun in SYNTHETIC_TEST_NOUNS else "train"
        for a, (adj, files) in enumerate(adjs.items()):
            others = [x for x in adjs if x != adj]
            for i, source in enumerate(files):
                rng = _rng(seed, n, a, i, Stream.TRIPLETS)
                targets = others if split == "test" else [others[int(rng.integers(len(others)))]]
                for target_adj in targets:
                    target_files = adjs[target_adj]
                    rows.append((source, target_adj, target_files[int(rng.integers(len(target_files)))], split))
    csv_path = os.path.join(path, TRIPLETS_FILE)

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TRIPLETS_COLUMNS)
        w.writerows(rows)

    atomic_write(csv_path, write, mode="w")
    return csv_path


def build_splits(options: SplitOptions) -> dict[str, mitstates.MITStates]:
    """``--dataset synthetic``: the dataset generated under ``options.path`` with ``options.seed`` (nothing is
    written when it is there already), read as MIT-States (``mitstates.held_out_splits``)."""
    mitstates.require_val_nouns(options, "synthetic")
    generate_synthetic(options.path, seed=options.seed)
    return mitstates.held_out_splits(options)
