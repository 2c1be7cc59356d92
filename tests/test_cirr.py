"""CIRR on tiny files in its published layout (captions/, image_splits/, img_raw/ or the dataset folder), its traps
(val images in dev/, test1 without targets, a target_soft without the hard target, a one-space caption, non-ASCII
captions, non-square images of different sizes), and the test-server submission files."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch
from PIL import Image

import cirr_submission
import datasets
import main
from errors import UserInputError

S = 24


def _names(split: str, n: int) -> list[str]:
    prefix = "dev" if split == "val" else split
    return [f"{prefix}-{i}-{i % 2}-img{i % 2}" for i in range(n)]


def _entries(split: str, names: list[str]) -> list[dict]:
    """Three pairs per split; pairids as in the real files (ints), members = 6 images with the reference."""
    out = []
    for q in range(3):
        ref, target = names[q], names[q + 3]
        members = [names[(q + j) % len(names)] for j in range(6)]
        e = {"pairid": 100 * (1 + datasets.CIRR_SPLITS.index(split)) + q, "reference": ref,
             "caption": ["add a dog", "make it caf\u00e9 style", "remove the cat"][q],
             "img_set": {"id": q, "members": members, "reference_rank": 0}}
        if split != "test1":
            e["target_hard"] = target
            e["target_soft"] = {target: 1.0} if q != 1 else {names[0]: 0.5}  # a soft set lacking the hard target
            e["img_set"]["target_rank"] = members.index(target)
        out.append(e)
    if split == "test1":
        out[2]["caption"] = " "  # the one-space caption of the real test1
    return out


def make_cirr(root, layout: str = "img_raw") -> str:
    root = str(root)
    for sub in ("captions", "image_splits"):
        os.makedirs(os.path.join(root, sub))
    image_root = os.path.join(root, "img_raw") if layout == "img_raw" else root
    for split in datasets.CIRR_SPLITS:
        names = _names(split, 8)
        rel = {}
        for i, name in enumerate(names):
            folder = {"train": f"./train/{i % 3}", "val": "./dev", "test1": "./test1"}[split]
            rel[name] = f"{folder}/{name}.png"
            path = os.path.join(image_root, rel[name])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.new("RGB", (30 + 7 * i, 20 + 3 * i), (20 * i, 100, 255 - 20 * i)).save(path)  # not square
        with open(os.path.join(root, "image_splits", f"split.rc2.{split}.json"), "w") as f:
            json.dump(rel, f)
        with open(os.path.join(root, "captions", f"cap.rc2.{split}.json"), "w", encoding="utf-8") as f:
            json.dump(_entries(split, names), f, ensure_ascii=False)
    return root


@pytest.fixture(scope="module")
def cirr(tmp_path_factory) -> str:
    return make_cirr(tmp_path_factory.mktemp("cirr"))


def test_layouts_and_image_root(cirr, tmp_path):
    val = datasets.CIRR(cirr, "val", image_size=S)
    assert val.image_root == os.path.join(cirr, "img_raw")
    assert val._paths[0].endswith(os.path.join("img_raw", "dev", "dev-0-0-img0.png"))
    flat = datasets.CIRR(make_cirr(tmp_path / "flat", layout="flat"), "val", image_size=S)
    assert flat.image_root == str(tmp_path / "flat")
    sizes = {tuple(Image.open(p).size) for p in val._paths}
    assert len(sizes) == 8 and all(w != h for w, h in sizes)  # non-square, all different
    assert all(val.load_image(n).shape == (3, S, S) for n in val.image_names)
    os.rename(os.path.join(cirr, "img_raw"), os.path.join(cirr, "moved"))
    try:
        with pytest.raises(UserInputError) as err:
            datasets.CIRR(cirr, "val", image_size=S)
        message = str(err.value)
        assert "\n" not in message and "./dev/dev-0-0-img0.png" in message and "img_raw" in message
    finally:
        os.rename(os.path.join(cirr, "moved"), os.path.join(cirr, "img_raw"))


def test_val_and_test1_tasks(cirr):
    val = datasets.CIRR(cirr, "val", image_size=S)
    task = val.test_task()
    assert task.protocol == "cirr" and task.image_keys == val.image_names and task.gallery == list(range(8))
    assert task.query_source == [0, 1, 2] and task.query_exclude == [0, 1, 2]  # the reference, removed
    assert task.query_targets["image"] == ["dev-3-1-img1", "dev-4-0-img0", "dev-5-1-img1"]  # target_hard
    assert task.query_text[1] == "make it caf\u00e9 style"
    assert task.query_subsets == [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5, 6, 7]]  # members but the reference
    test1 = datasets.CIRR(cirr, "test1", image_size=S)
    assert not test1.labelled and test1.test_task().query_ids == [300, 301, 302]
    assert test1.get_all_texts()[2] == " "
    with pytest.raises(KeyError, match="no targets"):
        test1[0]
    train = datasets.CIRR(cirr, "train", image_size=S)
    item = train[(0, 1, 0)]
    assert item["text"] == "make it caf\u00e9 style" and item["target_caption"] == "train-4-0-img0"
    sample = train.train_task(2, seed=0)
    assert sample.protocol == "cirr" and all(len(s) == 5 for s in sample.query_subsets)


def test_malformed_entry_is_one_line(tmp_path):
    root = make_cirr(tmp_path / "bad")
    path = os.path.join(root, "captions", "cap.rc2.val.json")
    entries = json.load(open(path))
    del entries[1]["target_hard"]
    json.dump(entries, open(path, "w"))
    with pytest.raises(UserInputError, match=r"cap\.rc2\.val\.json: entry 1 is malformed"):
        datasets.CIRR(root, "val")


def test_submission_dicts_format(cirr):
    test1 = datasets.CIRR(cirr, "test1", image_size=S)
    task = test1.test_task()
    gallery = torch.eye(8)  # (G, D)
    queries = torch.eye(8)[[0, 1, 2]] + 0.1 * torch.eye(8)[[6, 6, 6]]  # each query closest to its own reference
    recall, subset = cirr_submission.submission_dicts(task, queries, gallery)
    assert recall["version"] == subset["version"] == "rc2"
    assert recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    assert set(recall) - {"version", "metric"} == set(subset) - {"version", "metric"} == {"300", "301", "302"}
    for q, pairid in enumerate(["300", "301", "302"]):
        ref = test1.entries[q]["reference"]
        assert len(recall[pairid]) == 7 and ref not in recall[pairid]  # min(50, G - 1): the reference removed
        assert len(set(recall[pairid])) == 7 and recall[pairid][0] == "test1-6-0-img0"
        members = set(test1.entries[q]["members"]) - {ref}
        assert len(subset[pairid]) == 3 and set(subset[pairid]) <= members
    assert subset["300"][0] == "test1-1-1-img1"  # among members 1..5 the ties go to the lower gallery position


def _flags(cirr, log_dir) -> list[str]:
    return ["--dataset", "cirr", "--dataset_path", cirr, "--image_size", str(S), "--batch_size", "3",
            "--train_eval_queries", "3", "--loader_num_workers", "0", "--log_dir", str(log_dir), "--device", "cpu",
            "--image_weights", "none", "--use_bert", "False", "--lstm_dim", "16", "--model", "tirg"]


def _check_submission(folder: str, test1) -> None:
    recall = json.load(open(os.path.join(folder, cirr_submission.RECALL_FILE)))
    subset = json.load(open(os.path.join(folder, cirr_submission.SUBSET_FILE)))
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert set(recall) == set(subset) == {"version", "metric"} | {str(e["pairid"]) for e in test1.entries}
    for e in test1.entries:
        names, sub = recall[str(e["pairid"])], subset[str(e["pairid"])]
        assert len(names) == 7 and e["reference"] not in names and set(names) <= set(test1.image_names)
        assert len(sub) == 3 and e["reference"] not in sub and set(sub) <= set(e["members"])


def test_cli_val_protocol_select_on_val_and_submission(run_main, cirr, tmp_path):
    test1 = datasets.CIRR(cirr, "test1", image_size=S)
    rc, out = run_main(_flags(cirr, tmp_path / "a") + ["--num_iters", "2", "--eval_every", "1"])
    assert rc == 0
    names = re.findall(r"^     test (\S+) ", out, re.M)
    assert names[:7] == [f"recall_top{k}_correct_composition" for k in (1, 5, 10, 50)] + \
        [f"recall_subset_top{k}_correct_composition" for k in (1, 2, 3)]
    (run,) = os.listdir(tmp_path / "a")
    ckpt = os.path.join(tmp_path, "a", run, "latest_checkpoint.pth")
    rc, out = run_main(_flags(cirr, tmp_path / "b") + ["--test_only", "True", "--model_checkpoint", ckpt,
                                                    "--submission_dir", str(tmp_path / "sub")])
    assert rc == 0
    _check_submission(str(tmp_path / "sub"), test1)
    # --select_on val: val picks the checkpoint; test1 (the server's) gets the best checkpoint's predictions
    rc, out = run_main(_flags(cirr, tmp_path / "c") + ["--num_iters", "2", "--eval_every", "1", "--select_on", "val",
                                                    "--submission_dir", str(tmp_path / "sub_val")])
    assert rc == 0 and "     val recall_subset_top1_correct_composition" in out and "     test " not in out
    _check_submission(str(tmp_path / "sub_val"), test1)
    # a test1 file that repeats a pairid is refused before --test_only evaluates anything
    (cap,) = glob.glob(os.path.join(cirr, "**", "cap.rc2.test1.json"), recursive=True)
    entries = json.load(open(cap))
    entries[1]["pairid"] = entries[0]["pairid"]
    json.dump(entries, open(cap, "w"))
    rc, out = run_main(_flags(cirr, tmp_path / "d") + ["--test_only", "True", "--model_checkpoint", ckpt,
                                                    "--submission_dir", str(tmp_path / "sub_dup")])
    assert rc == 2 and "recall" not in out
    assert [files for _, _, files in os.walk(tmp_path / "d") if files] == []  # no evaluation folder left


def test_cli_select_on_val_needs_a_submission_dir(cirr, tmp_path, capsys):
    rc = main.main(_flags(cirr, tmp_path) + ["--select_on", "val"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--submission_dir" in err
    rc = main.main(["--dataset", "mitstates", "--dataset_path", str(tmp_path), "--submission_dir", str(tmp_path)])
    assert rc == 2 and "CIRR" in capsys.readouterr().err
