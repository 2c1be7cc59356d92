"""A dataset that says when it is incomplete: listed / present / unreadable counts per split (unreadable images met
in DataLoader workers included), the not-comparable warnings, metrics.json's "data" and the index files'
fingerprint (retrieval_datasets/completeness.py)."""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys

import torch
from torch import nn

import datasets
import test_retrieval
import training
from retrieval_datasets import completeness

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # test_datasets' layout builders; appended, so that
# the project's test_retrieval module stays first
from test_datasets import _jpg, _truncated_jpg, make_fashion200k, make_fashioniq, make_mitstates

S = 16

# 12 training images whose captions pair up by one word, 4 test images with 2 queries
F200K_TRAIN = [(f"women/dresses/{c}_{m}.jpg", f"{c} {m} dress") for c in ("red", "blue", "green")
               for m in ("silk", "wool", "cotton", "linen")]
F200K_TEST = [(f"women/test/{c}.jpg", f"{c} wool coat") for c in ("black", "white", "grey", "brown")]


def make_f200k(root) -> str:
    """A Fashion200k layout of 12 training and 4 test images (one label file each) and 2 test queries."""
    root = str(root)
    os.makedirs(os.path.join(root, "labels"))
    for split, rows in (("train", F200K_TRAIN), ("test", F200K_TEST)):
        with open(os.path.join(root, "labels", f"dress_{split}_detect_all.txt"), "w") as f:
            for k, (p, caption) in enumerate(rows):
                f.write(f"{p}\t0.5\t{caption}\n")
                _jpg(os.path.join(root, p), seed=k)
    with open(os.path.join(root, "test_queries.txt"), "w") as f:
        f.write(f"{F200K_TEST[0][0]} {F200K_TEST[1][0]}\n{F200K_TEST[2][0]} {F200K_TEST[3][0]}\n")
    return root


def test_missing_line_has_the_exact_form():
    assert completeness.problem_line("Fashion IQ dress train", 905, 11452, "missing") == (
        "Fashion IQ dress train: 905 of 11,452 listed images are missing (7.9 %); recalls are not comparable with "
        "published numbers")


def test_fashion200k_run_records_three_missing_images(tmp_path, run_main_cli):
    root = make_f200k(tmp_path / "f200k")
    for p, _ in F200K_TRAIN[:3]:
        os.remove(os.path.join(root, p))
    log_dir = tmp_path / "logs"
    rc, out, err = run_main_cli([
        "--dataset", "fashion200k", "--dataset_path", root, "--model", "tirg", "--use_bert", "False",
        "--lstm_dim", "8", "--image_size", "32", "--batch_size", "4", "--num_iters", "1", "--image_weights", "none",
        "--train_eval_queries", "4", "--eval_every", "1000", "--device", "cpu", "--loader_num_workers", "0",
        "--log_dir", str(log_dir)])
    assert rc == 0, err
    line = ("Fashion200k train: 3 of 12 listed images are missing (25.0 %); recalls are not comparable with "
            "published numbers")
    assert (out + err).count(line) == 1
    assert (out + err).count("listed images are") == 1 and "skipping unreadable image" not in out + err
    (folder,) = glob.glob(os.path.join(str(log_dir), "*"))
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["data"] == {"train": {"listed": 12, "present": 9, "unreadable": 0},
                               "test": {"listed": 4, "present": 4, "unreadable": 0}}
    fp = metrics["data_fingerprint"]
    assert set(fp["files"]) == {"labels/dress_train_detect_all.txt", "labels/dress_test_detect_all.txt",
                                "test_queries.txt"}
    assert fp == completeness.fingerprint(datasets.build_splits("fashion200k", root, image_size=32))
    # an evaluation of the test split counts (and warns of) the test split only
    rc, out, err = run_main_cli(["--test_only", "True", "--model_checkpoint",
                                 os.path.join(folder, "latest_checkpoint.pth"), "--eval_splits", "test",
                                 "--dataset_path", root, "--log_dir", str(tmp_path / "eval"), "--device", "cpu",
                                 "--loader_num_workers", "0"])
    assert rc == 0, err
    assert "listed images are" not in out + err
    (evaluation,) = glob.glob(os.path.join(str(tmp_path / "eval"), "*"))
    with open(os.path.join(evaluation, "metrics.json")) as f:
        assert json.load(f)["data"] == {"test": {"listed": 4, "present": 4, "unreadable": 0}}


def _counts(ds):
    return completeness.counts({"train": ds})["train"]


def test_complete_sets_count_every_listed_image_present(tmp_path):
    f200k = datasets.Fashion200k(make_fashion200k(tmp_path / "f"), "test", image_size=S)
    assert _counts(f200k) == {"listed": 2, "present": 2, "unreadable": 0}  # a path listed twice counts once
    mit = datasets.MITStates(make_mitstates(tmp_path / "mit"), "train", image_size=S)
    assert _counts(mit) == {"listed": 8, "present": 8, "unreadable": 0}
    fiq = datasets.FashionIQ(make_fashioniq(tmp_path / "fiq"), "val", image_size=S)
    assert completeness.counts({"test": fiq}) == {
        "dress test": {"listed": 3, "present": 3, "unreadable": 0},
        "shirt test": {"listed": 2, "present": 2, "unreadable": 0},
        "toptee test": {"listed": 2, "present": 2, "unreadable": 0}}


def test_fashioniq_counts_a_missing_image_in_its_category(tmp_path, caplog):
    root = make_fashioniq(tmp_path / "fiq")
    os.remove(os.path.join(root, "images", "dB.jpg"))
    splits = {"test": datasets.FashionIQ(root, "val", image_size=S)}
    with caplog.at_level(logging.WARNING, logger="datasets"):
        record = completeness.DataRecord(splits, "Fashion IQ")
    assert record()["data"]["dress test"] == {"listed": 3, "present": 2, "unreadable": 0}
    assert record()["data"]["shirt test"]["present"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "Fashion IQ dress test: 1 of 3 listed images are missing (33.3 %); recalls are not comparable with "
        "published numbers"]


def test_unreadable_images_are_counted_and_warned_once(tmp_path, caplog):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    train = datasets.MITStates(root, "train", image_size=S)
    record = completeness.DataRecord({"train": train}, "MIT-States")
    assert record()["data"]["train"]["unreadable"] == 0
    bad_id = [img["file_path"] for img in train.imgs].index(os.path.join(root, "images", "ripe apple", "r1.jpg"))
    assert torch.equal(train.load_image(bad_id), torch.zeros(3, S, S, dtype=torch.uint8))  # met here
    with caplog.at_level(logging.WARNING, logger="datasets"):
        first, second = record(), record()
    assert first == second and first["data"]["train"] == {"listed": 9, "present": 9, "unreadable": 1}
    lines = [r.getMessage() for r in caplog.records if "not comparable" in r.getMessage()]
    assert lines == ["MIT-States train: 1 of 9 listed images are unreadable (11.1 %); recalls are not comparable "
                     "with published numbers"]


def test_image_cache_counts_its_bad_images_as_missing_or_unreadable(tmp_path):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    os.remove(os.path.join(root, "images", "red apple", "a0.jpg"))
    cached = datasets.MITStates(root, "train", image_size=S, image_cache=str(tmp_path / "cache"))
    assert _counts(cached) == {"listed": 8, "present": 8, "unreadable": 1}  # the folder is the list: all present
    labelled = datasets.Fashion200k(make_f200k(tmp_path / "f"), "train", image_size=S)
    _truncated_jpg(os.path.join(labelled.path, F200K_TRAIN[0][0]))
    os.remove(os.path.join(labelled.path, F200K_TRAIN[1][0]))
    cached = datasets.Fashion200k(labelled.path, "train", image_size=S, image_cache=str(tmp_path / "cache"))
    assert _counts(cached) == {"listed": 12, "present": 11, "unreadable": 1}


def _four_epochs_with_two_workers(train) -> None:
    """The training loop's batches (``training.epoch_batches``) of 4 epochs, loaded by 2 worker processes; the
    loader is gone (its workers ended) when this returns."""
    sampler = datasets.EpochBatchSampler(train, batch_size=3, seed=0, drop_last=False)
    args = argparse.Namespace(loader_num_workers=2, seed=0, num_iters=4 * len(sampler), dataset_path=train.path)
    loader = training.make_train_loader(args, train, sampler, torch.device("cpu"))
    p = training.Progress()
    for _ in training.epoch_batches(loader, sampler, p, args):
        p.it += 1


def test_unreadable_image_met_in_loader_workers_is_counted(tmp_path):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    bad = os.path.join(root, "images", "ripe apple", "r1.jpg")
    train = datasets.MITStates(root, "train", image_size=S, seed=0)
    _four_epochs_with_two_workers(train)
    assert train.bad_images == {bad}  # met in a worker, recorded in this process
    assert _counts(train)["unreadable"] == 1


class _Model(nn.Module):
    """The evaluation API: a linear image embedding, texts as zeros."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * S * S, 4)

    def image_features(self, imgs):
        e = self.lin(imgs.flatten(1).float())
        return e, e

    def extract_text_feature(self, texts):
        return torch.zeros(len(texts), 4)

    def compose_img_text_features(self, state, text_features):
        return {"repres": state + text_features}


def test_unreadable_image_met_in_evaluation_workers_is_counted(tmp_path):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    train = datasets.MITStates(root, "train", image_size=S)
    q, g = test_retrieval.encode_task(_Model(), train, train.test_task(), batch_size=4, num_workers=2,
                                      progress=False)
    assert g.shape == (9, 4) and train.bad_images == {os.path.join(root, "images", "ripe apple", "r1.jpg")}
    assert _counts(train)["unreadable"] == 1


def test_collate_carries_the_notes_of_bad_paths():
    img = torch.zeros(3, S, S, dtype=torch.uint8)
    item = {"source_img": img, "target_img": img, "text": "t", "source_img_id": 0, "target_img_id": 1,
            "target_caption": "c"}
    batch = datasets.collate_train([item, None, item, {"bad_paths": ["/x.jpg"]}])
    assert batch["bad_paths"] == ["/x.jpg"] and batch["text"] == ["t", "t"]
    assert datasets.collate_train([None, {"bad_paths": ["/y"]}])["bad_paths"] == ["/y"]
    assert datasets.collate_train([item])["bad_paths"] == []


def test_fingerprint_follows_the_index_files_not_the_folder(tmp_path):
    root = make_f200k(tmp_path / "a")
    copy = str(tmp_path / "b")
    shutil.copytree(root, copy)

    def digest(path):
        return completeness.fingerprint(datasets.build_splits("fashion200k", path, image_size=S))["sha256"]

    assert digest(root) == digest(copy)  # the same copy elsewhere: the same digest
    with open(os.path.join(copy, "labels", "dress_test_detect_all.txt"), "a") as f:
        f.write(f"{F200K_TEST[0][0]}\t0.5\tblack wool coat\n")
    assert digest(root) != digest(copy)


def test_fingerprint_of_a_folder_layout_is_its_listing(tmp_path):
    root = make_mitstates(tmp_path / "mit")

    def fp():
        return completeness.fingerprint(datasets.build_splits("mitstates", root, image_size=S))

    before = fp()
    assert list(before["files"]) == [completeness.LISTING_KEY] and before == fp()
    _jpg(os.path.join(root, "images", "red apple", "a9.jpg"), seed=99)
    assert fp()["sha256"] != before["sha256"]


def test_triplets_list_only_present_images(triplets_data):
    splits = datasets.build_splits("triplets", triplets_data, image_size=32)
    data = completeness.counts(splits)
    assert all(c["listed"] == c["present"] > 0 and c["unreadable"] == 0 for c in data.values())
    assert list(completeness.fingerprint(splits)["files"]) == ["triplets.csv"]


def test_css3d_and_cirr_count_what_their_files_list(tmp_path):
    from test_cirr import make_cirr
    from test_css3d import make_css

    drawn = datasets.build_splits("css3d", make_css(tmp_path / "drawn"), image_size=S)
    data = completeness.counts(drawn)
    assert all(c["listed"] == c["present"] > 0 and c["unreadable"] == 0 for c in data.values())  # 2-D drawn
    assert list(completeness.fingerprint(drawn)["files"]) == [datasets.CSS3D_FILE]
    rendered = make_css(tmp_path / "rendered", with_images=True)
    os.remove(os.path.join(rendered, "images", "css_test_000001.png"))
    test = completeness.counts(datasets.build_splits("css3d", rendered, image_size=S))["test"]
    assert test["listed"] - test["present"] == 1 and test["listed"] == data["test"]["listed"]
    root = make_cirr(tmp_path / "cirr")
    os.remove(glob.glob(os.path.join(root, "img_raw", "dev", "*-7-*.png"))[0])  # the 8th of 8 val images
    splits = datasets.build_splits("cirr", root, image_size=S)
    assert completeness.counts(splits)["test"] == {"listed": 8, "present": 7, "unreadable": 0}
    assert sorted(completeness.fingerprint(splits)["files"]) == [
        "captions/cap.rc2.train.json", "captions/cap.rc2.val.json", "image_splits/split.rc2.train.json",
        "image_splits/split.rc2.val.json"]
