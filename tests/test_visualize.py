"""visualize.py: the retrieval picture, and the picture that training writes at each evaluation."""
from __future__ import annotations

import glob
import io
import os

import numpy as np
import torch
from PIL import Image

import datasets
import visualize


def solid(colour, size=(20, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_picture_is_a_png_of_the_expected_size_with_correct_results_framed_green():
    rows = [visualize.QueryRow(solid((200, 0, 0)), "make it a much longer text that needs wrapping over lines",
                               [visualize.Result(solid((0, 0, 200)), 1, 0.9, True, "a/b/c.jpg"),
                                visualize.Result(torch.full((3, 8, 8), 90, dtype=torch.uint8), 2, 0.5, False),
                                visualize.Result(np.full((5, 5, 3), 30, dtype=np.uint8), 3, 0.1, None)]),
            visualize.QueryRow(solid((0, 200, 0)), "short", [])]
    picture = visualize.retrieval_picture(rows, k=3, thumb=40)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    png = Image.open(io.BytesIO(buf.getvalue()))
    assert png.format == "PNG"
    # PAD 6 + QUERY_GAP 12 + 4 cells of (40 + 6); 6 + 2 rows of (40 + 3 caption lines of 12 + 6)
    assert png.size == (202, 170) == visualize.picture_size(2, 3, 40)
    px = np.asarray(png.convert("RGB"))  # (H, W, 3)
    y = 6
    x_query, x1, x2 = 6, 6 + 12 + 46, 6 + 12 + 2 * 46
    assert tuple(px[y + 20, x_query + 20]) == (200, 0, 0)  # the query image
    assert tuple(px[y + 20, x1 + 20]) == (0, 0, 200)  # result 1 ...
    assert tuple(px[y + 20, x1 + 1]) == visualize.GREEN  # ... framed green: correct
    assert tuple(px[y + 20, x2 + 1]) == (90, 90, 90)  # result 2 not framed: wrong
    assert tuple(px[y + 20, x2 + 20]) == (90, 90, 90)
    assert tuple(px[6 + 82 + 20, x_query + 20]) == (0, 200, 0)  # the second row's query
    assert tuple(px[6 + 82 + 20, x1 + 20]) == visualize.BACKGROUND  # which has no results
    assert (px[y + 40:y + 76, x_query:x_query + 40] < 100).all(axis=2).sum() > 20  # its text is written under it


def test_training_picture_shows_the_evaluation_ranking(triplets_data):
    _, testset = datasets.build_datasets("triplets", triplets_data, image_size=32)
    task = testset.test_task()
    paths = task.gallery_labels["composition"]
    where = {p: i for i, p in enumerate(paths)}
    gallery = torch.eye(len(paths))  # (G, D)
    targets = torch.tensor([where[t] for t in task.query_targets["composition"]])
    queries = gallery[torch.tensor(task.query_exclude)] + 0.5 * gallery[targets]  # source (ranked last), then target
    picture = visualize.training_picture(testset, task, queries, gallery, seed=0, n_queries=8, k=5, thumb=24)
    assert picture.size == visualize.picture_size(8, 5, 24)
    px = np.asarray(picture)
    for r in range(8):
        y = visualize.PAD + r * (24 + 36 + visualize.PAD)
        first, second = (visualize.PAD + visualize.QUERY_GAP + c * (24 + visualize.PAD) for c in (1, 2))
        assert tuple(px[y + 12, first]) == visualize.GREEN, r  # the target is first, framed
        assert tuple(px[y + 12, second]) != visualize.GREEN, r
    again = visualize.training_picture(testset, task, queries, gallery, seed=0, n_queries=8, k=5, thumb=24)
    other = visualize.training_picture(testset, task, queries, gallery, seed=1, n_queries=8, k=5, thumb=24)
    assert np.array_equal(np.asarray(again), px) and not np.array_equal(np.asarray(other), px)  # seeded sample


def test_training_writes_the_picture_to_tensorboard_and_the_run_folder(triplets_run):
    folder = triplets_run["folder"]
    png = Image.open(os.path.join(folder, "retrievals_2.png"))
    assert png.format == "PNG"
    assert png.size == visualize.picture_size(visualize.TRAINING_QUERIES, visualize.TRAINING_TOP_K,
                                              visualize.TRAINING_THUMB)
    from tensorboard.backend.event_processing import event_accumulator as ea

    (events,) = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    acc = ea.EventAccumulator(events, size_guidance={ea.IMAGES: 0})
    acc.Reload()
    assert "test/retrievals" in acc.Tags()["images"]
    (image,) = acc.Images("test/retrievals")
    assert image.step == 2 and (image.width, image.height) == png.size
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")),
                          np.asarray(png.convert("RGB")))
