"""--dataset triplets: your own (source, text, target, split) rows in DIR/triplets.csv."""
from __future__ import annotations

import csv
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import synthetic
import test_retrieval
from errors import UserInputError

METRIC = re.compile(r"^     (train|test) (recall_top\d+_correct_\w+) (\S+)$")


def metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if METRIC.match(line)]


def read_rows(data: str) -> list[dict]:
    with open(os.path.join(data, "triplets.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_synthetic_writer_lists_the_data_as_triplets(triplets_data, triplets_tools):
    rows = read_rows(triplets_data)
    assert list(rows[0]) == ["source", "text", "target", "split"]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(train) == 18  # one row per training image
    assert len(test) == 36  # every test image with each of the 2 other adjectives of its noun
    for r in rows:
        src_adj, src_noun = r["source"].split("/")[1].split()
        tgt_adj, tgt_noun = r["target"].split("/")[1].split()
        assert src_noun == tgt_noun and tgt_adj == r["text"] != src_adj
        assert (src_noun in synthetic.SYNTHETIC_TEST_NOUNS) == (r["split"] == "test")
        assert os.path.isfile(os.path.join(triplets_data, r["source"]))
    synthetic.write_triplets_csv(triplets_data, seed=0, **triplets_tools.tiny)  # the same arguments: the same file
    assert read_rows(triplets_data) == rows


def test_protocol_gallery_hit_by_path_and_source_ranked_last(triplets_data):
    trainset, testset = datasets.build_datasets("triplets", triplets_data, image_size=32)
    rows = [r for r in read_rows(triplets_data) if r["split"] == "test"]
    task = testset.test_task()
    paths = task.gallery_labels["composition"]
    assert len(paths) == 18 and paths == sorted(paths)  # every image of the split's rows, once
    assert task.ks == (1, 5, 10, 50)  # 18 images: no recall@100
    where = {p: i for i, p in enumerate(paths)}
    for q, r in enumerate(rows):
        assert paths[task.query_exclude[q]] == os.path.join(triplets_data, r["source"])
        assert task.query_targets["composition"][q] == os.path.join(triplets_data, r["target"])
        assert task.query_text[q] == r["text"]
    gallery = torch.eye(18)  # (G, D) one direction per image
    targets = torch.tensor([where[t] for t in task.query_targets["composition"]])
    sources = torch.tensor(task.query_exclude)
    # each query closest to its source, next to its target: the source is ranked last, so the target is first
    queries = gallery[sources] + 0.5 * gallery[targets]  # (Q, D)
    metrics = test_retrieval.retrieval_metrics(task, queries, gallery, ks=test_retrieval.task_ks(task))
    assert list(metrics) == [f"recall_top{k}_correct_composition" for k in (1, 5, 10, 50)]
    assert metrics["recall_top1_correct_composition"] == 1.0
    # the hit is the target image itself, not another image of the target's class
    same_class = torch.tensor([where[p.replace("000.jpg", "001.jpg") if p.endswith("000.jpg") else
                                     p[:-7] + "000.jpg"] for p in task.query_targets["composition"]])
    metrics = test_retrieval.retrieval_metrics(task, gallery[same_class], gallery)
    assert metrics["recall_top1_correct_composition"] == 0.0
    # training pairs are the train rows, in order of the file
    train_rows = [r for r in read_rows(triplets_data) if r["split"] == "train"]
    assert len(trainset) == 18 and trainset.get_all_texts() == [r["text"] for r in train_rows]
    item = trainset[(3, 5, 0)]
    from image_cache import load_rgb_uint8

    assert torch.equal(item["source_img"], load_rgb_uint8(os.path.join(triplets_data, train_rows[5]["source"]), 32))
    assert torch.equal(item["target_img"], load_rgb_uint8(os.path.join(triplets_data, train_rows[5]["target"]), 32))
    sampler = datasets.EpochBatchSampler(trainset, 4, seed=0, drop_last=False)
    assert sorted(k[1] for k in sampler.epoch_keys(0)) == list(range(18))
    assert sampler.epoch_keys(0) != sampler.epoch_keys(1)
    # the train-split metrics: a seeded sample of train rows, against the images of those rows
    a, b, c = trainset.train_task(6, 1), trainset.train_task(6, 1), trainset.train_task(6, 2)
    assert a == b and a.query_source != c.query_source or a.query_text != c.query_text
    assert len(a.query_source) == 6 and set(a.gallery_labels["composition"]) == {
        p for q in range(6) for p in (a.gallery_labels["composition"][a.query_exclude[q]],
                                      a.query_targets["composition"][q])}


def write_images(folder: str, n: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)).save(os.path.join(folder, name))
        names.append(f"imgs/{name}")
    return names


def test_recall_at_100_when_the_gallery_has_more_than_100_images(tmp_path):
    names = write_images(str(tmp_path / "imgs"), 102)
    lines = ["source,text,target,split"] + [f"{names[i]},t,{names[i + 51]},test" for i in range(51)]
    lines += [f"{names[0]},t,{names[1]},train"]
    (tmp_path / "triplets.csv").write_text("\n".join(lines) + "\n")
    ds = datasets.Triplets(str(tmp_path), "test", image_size=8)
    task = ds.test_task()
    assert len(task.gallery) == 102 and task.ks == (1, 5, 10, 50, 100)
    feats = torch.randn(102, 4, generator=torch.Generator().manual_seed(0))
    metrics = test_retrieval.retrieval_metrics(task, feats[:51], feats, ks=test_retrieval.task_ks(task))
    assert metrics["recall_top100_correct_composition"] == 1.0  # 101 images besides the source
    # a .csv path works as --dataset_path too
    assert datasets.Triplets(str(tmp_path / "triplets.csv"), "test", image_size=8).rows == ds.rows


def test_training_evaluation_and_test_only_give_equal_numbers(triplets_run):
    trained, tested = metric_lines(triplets_run["train_stdout"]), metric_lines(triplets_run["test_stdout"])
    names = [f"{split} recall_top{k}_correct_composition" for split in ("train", "test") for k in (1, 5, 10, 50)]
    assert [" ".join(line.split()[:2]) for line in trained] == names
    assert trained == tested
    assert os.path.isfile(os.path.join(triplets_run["folder"], "latest_checkpoint.pth"))


def _write(folder, text: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "triplets.csv"), "w") as f:
        f.write(text)
    return str(folder)


@pytest.mark.parametrize("case", ["empty", "header_only", "missing_column", "unknown_split", "missing_images",
                                  "no_train_rows", "empty_cell", "no_folder"])
def test_bad_triplets_file_one_line_exit_2(tmp_path, capsys, triplets_data, triplets_tools, case):
    rows = read_rows(triplets_data)
    header = "source,text,target,split\n"

    def line(r, **change):
        r = {**r, **change}
        return ",".join(os.path.join(triplets_data, r[c]) if c in ("source", "target") else r[c]
                        for c in ("source", "text", "target", "split")) + "\n"

    good = line(rows[0]) + line(rows[-1])
    text, expect = {
        "empty": ("", "is empty"),
        "header_only": (header, "no rows"),
        "missing_column": ("source,text,target\n" + "a,b,c\n", "lacks the column split"),
        "unknown_split": (header + good + line(rows[1], split="dev"), "line 4: unknown split 'dev'"),
        "missing_images": (header + good + line(rows[1], source="nope/a.jpg") + line(rows[2], target="nope/b.jpg"),
                           "line 4: image " + os.path.join(triplets_data, "nope/a.jpg") + " does not exist "
                           "(2 listed images missing)"),
        "no_train_rows": (header + line(rows[-1]) + line(rows[-2]), "no train rows"),
        "empty_cell": (header + good + line(rows[1], text=""), "line 4: empty text"),
        "no_folder": (None, "triplets.csv is missing"),
    }[case]
    if text is None:
        (tmp_path / "no_csv").mkdir()
    data = str(tmp_path / "no_csv") if text is None else _write(tmp_path / "d", text)
    rc, out = triplets_tools.run(triplets_tools.cli(data, tmp_path / "logs", "--num_iters", "1"))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("main.py: error: ") and expect in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "logs"), "a failed start leaves nothing behind"


def test_triplets_class_refuses_unknown_split(triplets_data):
    with pytest.raises(UserInputError, match="split 'dev'"):
        datasets.Triplets(triplets_data, "dev")
