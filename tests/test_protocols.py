"""The protocols of later work on hand-made similarities (CIRR: reference removed, subset restricted to the
members; the standard Fashion IQ protocol beside ComposeAE's), the comparability record of the complete text query,
and --select_on val (picks on validation, evaluates test once)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os

import pytest
import torch
from PIL import Image

import datasets
import main
import synthetic
import test_retrieval
from datasets import RetrievalTask


# ------------------------------------------------------------------------------------------------------------------
# target ranks on hand-made similarity matrices
def test_target_ranks_removed_last_ties_and_subsets():
    sims = torch.tensor([[0.9, 0.5, 0.7, 0.5],
                         [0.2, 0.8, 0.8, 0.1],
                         [0.3, 0.3, 0.3, 0.3]])  # (Q=3, G=4)
    targets = torch.tensor([1, 2, 0])
    ranks = test_retrieval.target_ranks_from_sims
    assert ranks(sims, targets).tolist() == [2, 1, 0]  # ties to the lower gallery position
    exclude = torch.tensor([0, 1, -1])  # q0, q1: the most similar item is the reference
    assert ranks(sims, targets, exclude).tolist() == [1, 0, 0]
    assert ranks(sims, targets, exclude, exclude_mode="last").tolist() == [1, 0, 0]
    # a target that is the reference: never found when removed (rank = items left), last when ranked last
    self_target = torch.tensor([0, 1, 3])
    assert ranks(sims, self_target, exclude).tolist() == [3, 3, 3]
    assert ranks(sims, self_target, exclude, exclude_mode="last").tolist() == [3, 3, 3]
    assert ranks(sims[:1], torch.tensor([0]), torch.tensor([0]), exclude_mode="removed").item() == 3
    assert ranks(sims[:1], torch.tensor([2]), torch.tensor([0]), exclude_mode="last").item() == 0
    # the subset: only the candidates rank (-1 = padding)
    candidates = torch.tensor([[1, 3, -1], [2, 3, 0], [0, 1, 2]])
    assert ranks(sims, targets, exclude, candidates).tolist() == [0, 0, 0]
    assert ranks(sims, torch.tensor([3, 0, 2]), None, candidates).tolist() == [1, 1, 2]
    assert ranks(sims, torch.tensor([2, -1, 3]), None, candidates).tolist() == [2, 3, 3]  # not a candidate: miss


def _cirr_task(query_exclude, subsets) -> RetrievalTask:
    names = [f"img{i}" for i in range(6)]
    return RetrievalTask(image_keys=names, gallery=list(range(6)), query_source=[0, 1], query_text=["a", "b"],
                         gallery_labels={"image": names}, query_targets={"image": ["img3", "img5"]},
                         query_exclude=query_exclude, protocol="cirr", query_subsets=subsets)


def test_cirr_metrics_reference_removed_and_subset_restricted():
    gallery = torch.eye(6)  # (G, D): similarity = the query's coordinate of each image
    queries = torch.tensor([[9.0, 0, 8, 7, 0, 0],  # q0: reference img0 first, then img2, the target img3 third
                            [0, 9, 0, 0, 0, 5]])  # q1: reference img1 first, the target img5 second
    task = _cirr_task([0, 1], [[2, 3, 4], [3, 4, 5]])
    m = test_retrieval.cirr_metrics(task, queries, gallery)
    assert list(m) == [f"recall_top{k}_correct_composition" for k in (1, 5, 10, 50)] + \
        [f"recall_subset_top{k}_correct_composition" for k in (1, 2, 3)]
    assert m["recall_top1_correct_composition"] == 0.5  # q1's target is first once its reference is removed
    assert m["recall_top5_correct_composition"] == 1.0
    assert m["recall_subset_top1_correct_composition"] == 0.5  # q0: img2 outranks img3 among the members
    assert m["recall_subset_top2_correct_composition"] == 1.0
    kept = test_retrieval.cirr_metrics(_cirr_task(None, [[2, 3, 4], [3, 4, 5]]), queries, gallery)
    assert kept["recall_top1_correct_composition"] == 0.0  # with the references in the ranking
    # evaluate() dispatches on the task's protocol
    assert test_retrieval.task_metrics(task, queries, gallery) == m


def test_protocol_registry_refusal_and_unknown_name():
    """task_metrics and metric_names go through test_retrieval.PROTOCOLS: the later-work protocols refuse non-finite
    features whatever ``nonfinite`` says, TIRG's follows it, and an unknown protocol is a ValueError naming it."""
    gallery = torch.eye(6)
    queries = torch.tensor([[9.0, 0, 8, 7, 0, 0], [math.nan, 9, 0, 0, 0, 5]])  # q1 is not finite
    cirr = _cirr_task([0, 1], [[2, 3, 4], [3, 4, 5]])
    assert test_retrieval.PROTOCOLS["cirr"].refuses_nonfinite and not test_retrieval.PROTOCOLS["tirg"].refuses_nonfinite
    with pytest.raises(test_retrieval.NonFiniteFeaturesError):
        test_retrieval.task_metrics(cirr, queries, gallery, nonfinite="rank_last")
    tirg = RetrievalTask(**{**cirr.__dict__, "protocol": "tirg", "query_subsets": None, "ks": (1, 5)})
    ranked = test_retrieval.task_metrics(tirg, queries, gallery, nonfinite="rank_last")
    names = ["recall_top1_correct_image", "recall_top5_correct_image"]
    assert list(ranked) == test_retrieval.metric_names(tirg) == names
    # q0: its reference img0 ranked last, img2 outranks its target img3 (rank 1); q1 is never a hit
    assert (ranked["recall_top1_correct_image"], ranked["recall_top5_correct_image"]) == (0.0, 0.5)
    assert test_retrieval.task_metrics(tirg, queries, gallery, nonfinite="rank_last", ks=(3,)) == \
        {"recall_top3_correct_image": 0.5}  # the caller's cut-offs
    unknown = RetrievalTask(**{**cirr.__dict__, "protocol": "cirr_v9"})
    for call in (lambda: test_retrieval.task_metrics(unknown, queries[:1].repeat(2, 1), gallery),
                 lambda: test_retrieval.metric_names(unknown)):
        with pytest.raises(ValueError, match="unknown retrieval protocol 'cirr_v9'"):
            call()


# ------------------------------------------------------------------------------------------------------------------
# the standard Fashion IQ protocol against ComposeAE's, on a hand-made case where they differ
DRESSES = [f"d{i}" for i in range(12)]
SHIRTS = [f"s{i}" for i in range(4)]
TOPTEES = ["t0", "t1"]


def make_fiq(root, labelled_test: bool = False) -> str:
    root = str(root)
    for sub in ("captions", "image_splits", "images"):
        os.makedirs(os.path.join(root, sub))
    galleries = {"dress": DRESSES, "shirt": SHIRTS, "toptee": TOPTEES}
    queries = {"dress": [{"candidate": "d0", "target": "d11", "captions": ["Is shorter.", "has red dots?"]}],
               "shirt": [{"candidate": "s0", "target": "s1", "captions": ["is blue", "longer"]}],
               "toptee": [{"candidate": "t0", "target": "t1", "captions": ["is plain", "no print"]}]}
    for split in ("train", "val", "test"):
        for cat in datasets.FASHION_IQ_CATEGORIES:
            caps = queries[cat] if split != "test" or labelled_test else [
                {k: v for k, v in e.items() if k != "target"} for e in queries[cat]]
            json.dump(caps, open(os.path.join(root, "captions", f"cap.{cat}.{split}.json"), "w"))
            json.dump(galleries[cat], open(os.path.join(root, "image_splits", f"split.{cat}.{split}.json"), "w"))
    for i, name in enumerate(DRESSES + SHIRTS + TOPTEES):
        Image.new("RGB", (20, 16), (10 * i, 50, 90)).save(os.path.join(root, "images", name + ".jpg"))
    return root


def _feature(similarity: float) -> list[float]:
    return [similarity, math.sqrt(max(0.0, 1 - similarity ** 2))]  # unit vector: cosine with [1, 0] = similarity


def _features(task: RetrievalTask) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query is [1, 0]; d1..d9 and all shirts outrank the dress target d11 (similarity 0.5)."""
    sim = {**{f"d{i}": 0.9 - 0.01 * i for i in range(1, 11)}, "d0": 0.0, "d11": 0.5,
           **{s: 0.95 for s in SHIRTS}, "s1": 0.99, "t0": 0.0, "t1": 0.3}
    gallery = torch.tensor([_feature(sim[task.image_keys[g]]) for g in task.gallery])  # (G, 2)
    return torch.tensor([[1.0, 0.0]] * len(task.query_source)), gallery


def test_fashioniq_standard_differs_from_composeae(tmp_path):
    root = make_fiq(tmp_path / "fiq")
    composeae = datasets.FashionIQ(root, "val", image_size=16)
    standard = datasets.FashionIQ(root, "val", image_size=16, protocol="standard")
    assert composeae.entries[0]["text"] == "dress is shorter. and it has red dots?"  # the original's join
    assert standard.entries[0]["text"] == "Is shorter and has red dots"  # CLIP4Cir's join
    ctask, stask = composeae.test_task(), standard.test_task()
    c = test_retrieval.retrieval_metrics(ctask, *_features(ctask))
    s = test_retrieval.task_metrics(stask, *_features(stask))
    # one gallery: 4 shirts + d1..d10 outrank d11 (rank 14); the dress gallery: d1..d10 only (rank 10)
    assert c["recall_top10_correct_dress"] == 0.0 and c["recall_top50_correct_dress"] == 1.0
    assert list(s) == [f"recall_top{k}_correct_{g}" for k in (10, 50) for g in ("dress", "shirt", "toptee", "mean")]
    assert s["recall_top10_correct_dress"] == 0.0  # rank 10 is the 11th: still a miss at 10 ...
    assert s["recall_top10_correct_toptee"] == 1.0 and s["recall_top10_correct_shirt"] == 1.0
    assert s["recall_top10_correct_mean"] == pytest.approx(2 / 3)
    # ... and with d10 below the target the two protocols differ at 10
    stask2 = standard.test_task()
    q, g = _features(stask2)
    g[stask2.gallery.index(stask2.image_keys.index("d10"))] = torch.tensor(_feature(0.1))
    assert test_retrieval.task_metrics(stask2, q, g)["recall_top10_correct_dress"] == 1.0
    q, g = _features(ctask)
    g[ctask.gallery.index(ctask.image_keys.index("d10"))] = torch.tensor(_feature(0.1))
    assert test_retrieval.retrieval_metrics(ctask, q, g)["recall_top10_correct_dress"] == 0.0  # rank 13


def _flags(dataset: str, path: str, log_dir, *extra: str) -> list[str]:
    return ["--dataset", dataset, "--dataset_path", path, "--image_size", "32", "--batch_size", "2",
            "--train_eval_queries", "4", "--loader_num_workers", "0", "--log_dir", str(log_dir), "--device", "cpu",
            "--image_weights", "none", "--use_bert", "False", "--lstm_dim", "16", "--model", "tirg", *extra]


def _record(log_dir) -> dict:
    (folder,) = os.listdir(log_dir)
    return json.load(open(os.path.join(log_dir, folder, "metrics.json")))


def test_cli_fashioniq_standard_records_protocol_and_select_on_val_refusals(run_main, tmp_path, capsys):
    root = make_fiq(tmp_path / "fiq")
    rc, out = run_main(_flags("fashionIQ", root, tmp_path / "a", "--num_iters", "1", "--fashioniq_protocol", "standard"))
    assert rc == 0 and "     test recall_top50_correct_mean" in out and "recall_top1_correct" not in out
    assert _record(tmp_path / "a")["fashioniq_protocol"] == "standard"
    capsys.readouterr()
    # the public test captions hold no targets: no labelled split to test on besides val
    rc = main.main(_flags("fashionIQ", root, tmp_path / "b", "--select_on", "val"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--select_on test" in err and "cap.dress.test.json" in err
    rc = main.main(_flags("fashion200k", str(tmp_path), tmp_path / "c", "--select_on", "val"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no validation split" in err and "--select_on test" in err
    rc = main.main(_flags("mitstates", str(tmp_path), tmp_path / "d", "--select_on", "val"))
    assert rc == 2 and "--val_nouns N" in capsys.readouterr().err


def test_fashioniq_select_on_val_with_a_labelled_test_split(tmp_path):
    splits = datasets.build_splits("fashionIQ", make_fiq(tmp_path / "fiq", labelled_test=True), image_size=16,
                                   select_on="val")
    assert (splits["val"].split, splits["test"].split) == ("val", "test")


# ------------------------------------------------------------------------------------------------------------------
# --select_on val on MIT-States (--val_nouns) and the complete text query's record
@pytest.fixture(scope="module")
def mit(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mit"))
    synthetic.generate_synthetic(path, seed=0, image_size=16, n_train_nouns=3, n_test_nouns=1,
                                 adjectives_per_noun=3, images_per_class=2)
    return path


def test_val_nouns_are_seeded_and_disjoint(mit):
    train = datasets.MITStates(mit, "train", image_size=16, val_nouns=1, seed=4)
    val = datasets.MITStates(mit, "val", image_size=16, val_nouns=1, seed=4)
    test = datasets.MITStates(mit, "test", image_size=16, val_nouns=1, seed=4)
    nouns = [{img["noun"] for img in d.imgs} for d in (train, val, test)]
    assert len(nouns[1]) == 1 and len(nouns[0]) == 2 and len(nouns[2]) == 1
    assert not (nouns[0] & nouns[1]) and not (nouns[0] & nouns[2]) and not (nouns[1] & nouns[2])
    again = datasets.MITStates(mit, "val", image_size=16, val_nouns=1, seed=4)
    assert [img["file_path"] for img in again.imgs] == [img["file_path"] for img in val.imgs]
    drawn = {next(iter(datasets.MITStates.held_out_nouns(os.path.join(mit, "images"), 1, s))) for s in range(12)}
    assert len(drawn) > 1  # the seed decides which noun


def test_cli_select_on_val_picks_on_val_and_tests_once(run_main, mit, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        rc, out = run_main(_flags("mitstates", mit, tmp_path, "--num_iters", "3", "--eval_every", "1",
                              "--select_on", "val", "--val_nouns", "1", "--use_complete_text_query", "True"))
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if "not comparable" in r.getMessage()]
    assert len(warnings) == 1 and "query text holds the target's label" in warnings[0]
    record = _record(tmp_path)
    assert record["query_text"] == "complete (holds the target label)" and record["select_on"] == "val"
    history = record["history"]
    during, final = history[:-1], history[-1]
    assert [h["it"] for h in during] == [1, 2, 3]
    assert all("val recall_top1_correct_composition" in h and not any(k.startswith("test ") for k in h)
               for h in during)
    scores = [h["val recall_top1_correct_composition"] for h in during]
    best_it = during[scores.index(max(scores))]["it"]  # the first best, as best_checkpoint.pth keeps it
    assert record["best_it"] == best_it and final["it"] == best_it
    assert "test recall_top1_correct_composition" in final and not any(k.startswith("val ") for k in final)
    assert out.count("     test recall_top1_correct_composition") == 1  # the test split, once
    assert f"best_checkpoint.pth: iteration {best_it}, selected on val" in out
    (folder,) = os.listdir(tmp_path)
    assert torch.load(os.path.join(tmp_path, folder, "best_checkpoint.pth"), weights_only=False)["it"] == best_it


def test_best_score_reads_the_selection_split():
    import training
    from torch_functions import UserInputError

    metrics = {"train recall_top1_correct_composition": 0.9, "val recall_top1_correct_composition": 0.2,
               "test recall_top1_correct_composition": 0.7, "val recall_top5_correct_composition": 0.4}
    assert training.best_score(metrics, "auto", "val") == 0.2
    assert training.best_score(metrics, "auto") == 0.7  # the original's selection on test
    assert training.best_score(metrics, "recall_top5_correct_composition", "val") == 0.4
    with pytest.raises(UserInputError, match="no such val metric"):
        training.best_score(metrics, "recall_top5_correct_adj", "val")
    tasks = {"train": 1, "val": 2, "test": 3}
    assert list(training.selection_tasks(argparse.Namespace(select_on="val"), tasks)) == ["train", "val"]
    assert list(training.selection_tasks(argparse.Namespace(select_on="test"), tasks)) == ["train", "val", "test"]


def test_run_info_records_the_complete_text_query_on_the_tirg_datasets(caplog):
    import factory

    def info(dataset, complete):
        return factory.run_info(argparse.Namespace(dataset=dataset, use_complete_text_query=complete,
                                                   select_on="test", fashioniq_protocol="composeae"))

    with caplog.at_level(logging.WARNING):
        assert info("fashion200k", True)["query_text"] == "complete (holds the target label)"
    assert len([r for r in caplog.records if "not comparable" in r.getMessage()]) == 1
    assert "query_text" not in info("fashion200k", False) and "query_text" not in info("fashionIQ", True)
    assert info("fashionIQ", False)["fashioniq_protocol"] == "composeae"


def test_triplets_select_on_val_uses_the_val_rows(tmp_path):
    import csv

    from torch_functions import UserInputError

    path = synthetic.write_triplets_csv(str(tmp_path / "t"), image_size=16, n_train_nouns=2, n_test_nouns=1,
                                        adjectives_per_noun=2, images_per_class=2)
    rows = list(csv.DictReader(open(path)))
    tests = [r for r in rows if r["split"] == "test"]
    for r in tests[: len(tests) // 2]:
        r["split"] = "val"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    splits = datasets.build_splits("triplets", path, image_size=16, select_on="val")
    assert (splits["val"].split, splits["test"].split) == ("val", "test")
    assert len(splits["val"]) + len(splits["test"]) == len(tests)
    for r in rows:
        r["split"] = "val" if r["split"] == "test" else r["split"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserInputError, match="has no test rows"):
        datasets.build_splits("triplets", path, image_size=16, select_on="val")
