"""Pictures of what a model retrieves: one row per query, the query image with its text, then the top-k gallery
images with their rank and score, the correct ones framed in green (PIL only, PIL's default font).

``retrieval_picture`` draws the rows; ``training_picture`` picks a fixed, seeded sample of a retrieval task's
queries and draws them from the features the evaluation has already computed (``training.evaluate_all``);
``retrieve.py`` draws its own queries with it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import test_retrieval
from seeding import Stream, seeded_rng

PAD = 6  # pixels between cells and around the picture
QUERY_GAP = 12  # extra pixels between the query cell and the first result
LINE = 12  # pixels per caption line
CAPTION_LINES = 3  # caption lines under every cell
FRAME = 3  # width of the green frame of a correct result
GREEN = (0, 190, 0)
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
TRAINING_QUERIES = 8  # queries of the training picture
TRAINING_TOP_K = 5  # results per query in the training picture
TRAINING_THUMB = 96  # thumbnail side of the training picture


@dataclasses.dataclass
class Result:
    """One retrieved gallery image: ``correct`` True (framed green), False, or None (unknown: no target)."""

    image: Any  # PIL image, uint8 tensor (3, H, W) or uint8 array (H, W, 3)
    rank: int
    score: float
    correct: bool | None = None
    label: str = ""  # e.g. the file's path, cut at its start to fit


@dataclasses.dataclass
class QueryRow:
    """A query's image, its text and its results; ``note`` (e.g. 'target at rank 37') is written on the last
    caption line under the query, the text taking the lines above it."""

    image: Any  # as Result.image
    text: str
    results: Sequence[Result]
    note: str = ""


def picture_size(n_rows: int, k: int, thumb: int) -> tuple[int, int]:
    """(width, height) of a picture of ``n_rows`` queries with ``k`` result columns and ``thumb``-pixel cells."""
    cell_h = thumb + CAPTION_LINES * LINE
    width = PAD + QUERY_GAP + (1 + k) * (thumb + PAD)
    height = PAD + n_rows * (cell_h + PAD)
    return width, height


def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 tensor (3, H, W) or a uint8 array (H, W, 3)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)  # (H, W, C)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def _thumbnail(image: Any, thumb: int) -> Image.Image:
    """The image scaled to fit a thumb x thumb cell (aspect kept), centred on the background."""
    img = to_pil(image)
    scale = thumb / max(img.size)
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    cell = Image.new("RGB", (thumb, thumb), BACKGROUND)
    cell.paste(img, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
    return cell


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut to ``width`` pixels, with '...' where it was cut."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _fit_tail(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut at its start to ``width`` pixels, with '...' where it was cut (file paths end in the name)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, lines: int, font) -> list[str]:
    """``text`` wrapped at spaces into at most ``lines`` lines of ``width`` pixels (the last one cut with '...')."""
    words, out, current = text.split(), [], ""
    for i, word in enumerate(words):
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
            continue
        out.append(current)
        current = word
        if len(out) == lines - 1:
            current = " ".join(words[i:])
            break
    if current:
        out.append(current)
    return [_fit(draw, line, width, font) for line in out[:lines]]


def retrieval_picture(rows: Sequence[QueryRow], k: int | None = None, thumb: int = 128) -> Image.Image:
    """One row per query: the query image with its text (up to 3 lines), a gap, then its results with
    '#rank score' and their label under them; correct results framed in green; a row's ``note`` under its
    query. ``k`` columns (default: the most results of any row); the size is ``picture_size(len(rows), k, thumb)``.
    """
    k = max((len(r.results) for r in rows), default=0) if k is None else k
    font = ImageFont.load_default()
    picture = Image.new("RGB", picture_size(len(rows), k, thumb), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    cell_h = thumb + CAPTION_LINES * LINE
    for r, row in enumerate(rows):
        y = PAD + r * (cell_h + PAD)
        picture.paste(_thumbnail(row.image, thumb), (PAD, y))
        text_lines = CAPTION_LINES - 1 if row.note else CAPTION_LINES
        for i, line in enumerate(_wrap(draw, f'"{row.text}"', thumb, text_lines, font)):
            draw.text((PAD, y + thumb + i * LINE), line, fill=INK, font=font)
        if row.note:
            draw.text((PAD, y + thumb + text_lines * LINE), _fit(draw, row.note, thumb, font), fill=INK, font=font)
        for c, res in enumerate(row.results[:k]):
            x = PAD + QUERY_GAP + (1 + c) * (thumb + PAD)
            picture.paste(_thumbnail(res.image, thumb), (x, y))
            if res.correct:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=GREEN, width=FRAME)
            draw.text((x, y + thumb), _fit(draw, f"#{res.rank} ({res.score:.3f})", thumb, font), fill=INK, font=font)
            if res.label:
                draw.text((x, y + thumb + LINE), _fit_tail(draw, res.label, thumb, font), fill=INK, font=font)
    return picture


def training_picture(dataset: Any, task: Any, query_feats: torch.Tensor, gallery_feats: torch.Tensor, *,
                     seed: int = 0, n_queries: int = TRAINING_QUERIES, k: int = TRAINING_TOP_K,
                     thumb: int = TRAINING_THUMB) -> Image.Image | None:
    """The picture of a fixed, seeded sample of ``n_queries`` of the task's queries (in task order), from the
    evaluation's features (Q, D) / (G, D): source image, text, the top-``k`` as the evaluation ranks them
    (``test_retrieval.top_k``, the source left out); a result is correct when its label in the task's first view
    equals the query's target (MIT-States: the composition; Fashion IQ, triplets: the image). None without queries.
    """
    n_total = len(task.query_source)
    if n_total == 0 or len(task.gallery) == 0:
        return None
    rng = seeded_rng(seed, Stream.PICTURE)
    chosen = sorted(int(i) for i in rng.choice(n_total, size=min(n_queries, n_total), replace=False))
    view = next(iter(task.gallery_labels))
    labels, targets = task.gallery_labels[view], task.query_targets[view]
    exclude = None
    if task.query_exclude is not None:
        exclude = torch.tensor([task.query_exclude[q] for q in chosen], dtype=torch.long)  # (n,)
    chosen_t = torch.tensor(chosen, dtype=torch.long, device=query_feats.device)
    scores, indices = test_retrieval.top_k(query_feats.index_select(0, chosen_t), gallery_feats, k, exclude)
    scores, indices = scores.cpu(), indices.cpu()  # (n, k)
    rows = []
    for i, q in enumerate(chosen):
        results = [Result(dataset.load_image(task.image_keys[task.gallery[g]]), rank + 1, float(scores[i, rank]),
                          labels[g] == targets[q])
                   for rank, g in enumerate(indices[i].tolist())]
        rows.append(QueryRow(dataset.load_image(task.image_keys[task.query_source[q]]), task.query_text[q], results))
    return retrieval_picture(rows, k=k, thumb=thumb)
