"""Datasets: the published layouts (quirks included), pair sampling, batching, the image cache, bad input."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import image_cache
import synthetic
from errors import UserInputError

S = 16  # image size used by the tests


# ----------------------------------------------------------------------------------------------------------------
# Tiny data in the published layouts
# ----------------------------------------------------------------------------------------------------------------

def _jpg(path, size=(20, 14), mode="RGB", seed=0) -> str:
    """A small noisy JPEG; ``mode`` 'L' (grayscale) or 'CMYK' like the odd MIT-States files."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="JPEG")
    return str(path)


def _truncated_jpg(path) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    return str(path)


def make_mitstates(root, corrupt: bool = False) -> str:
    """MIT-States layout: train nouns apple/ball/cup(one adjective), test nouns clock/plate/sky(one adjective)."""
    img = os.path.join(str(root), "images")
    files = {
        "red apple": ["a0.jpg", "a1.JPEG"], "green apple": ["g0.jpg"], "ripe apple": ["r0.jpg"],
        "small ball": ["s0.jpg", "s1.jpg"], "large ball": ["l0.jpg"], "lonely cup": ["c0.jpg"],
        "adj apple": ["x0.jpg"], "nospace": ["n0.jpg"],  # skipped: unlabelled and no '<adj> <noun>' name
        "old clock": ["o0.jpg", "o1.jpg"], "new clock": ["n0.jpg"], "broken clock": ["b0.jpg"],
        "white plate": ["w0.jpg"], "dirty plate": ["d0.jpg", "d1.jpg"], "blue sky": ["k0.jpg"],
    }
    for k, (folder, names) in enumerate(sorted(files.items())):
        for j, name in enumerate(names):
            _jpg(os.path.join(img, folder, name), seed=100 * k + j)
    _jpg(os.path.join(img, "red apple", "a1.JPEG"), mode="L", seed=7)  # grayscale
    _jpg(os.path.join(img, "green apple", "g0.jpg"), mode="CMYK", seed=8)  # CMYK
    with open(os.path.join(img, "red apple", "notes.txt"), "w") as f:  # not an image: ignored
        f.write("x")
    if corrupt:
        _truncated_jpg(os.path.join(img, "ripe apple", "r1.jpg"))
    return str(root)


# Train images in sorted order: 0 green apple, 1 large ball, 2 lonely cup, 3-4 red apple, 5 ripe apple,
# 6-7 small ball. Test: 0 blue sky, 1 broken clock, 2-3 dirty plate, 4 new clock, 5-6 old clock, 7 white plate.


@pytest.fixture()
def mit(tmp_path):
    return make_mitstates(tmp_path / "mit")


def make_fashion200k(root) -> str:
    root = str(root)
    train = {"dress": [("women/dresses/d0.jpg", "red silk dress"), ("women/dresses/d1.jpg", "red silk dress"),
                       ("women/dresses/d2.jpg", "blue silk dress"), ("women/dresses/d3.jpg", "tan tank top")],
             "skirt": [("women/skirts/s0.jpg", "black & white skirt"), ("women/skirts/s1.jpg", "k top x")]}
    test = {"dress": [("women/t0.jpg", "green wool coat"), ("women/t1.jpg", "grey wool coat"),
                      ("women/t0.jpg", "dark green wool coat")]}  # repeated path: the last index wins
    os.makedirs(os.path.join(root, "labels"))
    for split, groups in (("train", train), ("test", test)):
        for cat, rows in groups.items():
            with open(os.path.join(root, "labels", f"{cat}_{split}_detect_all.txt"), "w") as f:
                for k, (p, caption) in enumerate(rows):
                    f.write(f"{p}\t{0.5 + 0.01 * k:.3f}\t{caption}\n")
                    _jpg(os.path.join(root, p), seed=k + 50 * len(p))
                f.write("\n")  # a trailing blank line
    with open(os.path.join(root, "test_queries.txt"), "w") as f:
        f.write("women/t0.jpg women/t1.jpg\nwomen/t1.jpg women/t0.jpg\n")
    return root


FIQ_VAL = {
    "dress": [{"candidate": "dA", "target": "dB", "captions": ["Is Red", "has long sleeves"]},
              {"candidate": "dC", "target": "dA", "captions": ["is shorter", "is blue"]}],
    "shirt": [{"candidate": "sA", "target": "sB", "captions": ["Has a collar", "is white"]}],
    "toptee": [{"candidate": "tA", "target": "tB", "captions": ["is striped", "is green"]}],
}
FIQ_VAL_SPLITS = {"dress": ["dA", "dB", "dA"], "shirt": ["sB"], "toptee": ["tA", "tB"]}
FIQ_TRAIN = {
    "dress": [{"candidate": "xA", "target": "xB", "captions": ["is long", "is pink"]}],
    "shirt": [{"candidate": "yA", "target": "yB", "captions": ["is plaid", "has buttons"]}],
    "toptee": [{"candidate": "zA", "target": "zB", "captions": ["is loose", "is grey"]},
               {"candidate": "zB", "target": "zA", "captions": ["is tight", "is black"]}],
}
FIQ_TRAIN_SPLITS = {"dress": ["xA", "xB"], "shirt": ["yA", "yB"], "toptee": ["zA", "zB"]}


def make_fashioniq(root, images_folder: str = "images") -> str:
    root = str(root)
    for sub in ("captions", "image_splits"):
        os.makedirs(os.path.join(root, sub))
    names = set()
    for split, caps, splits in (("val", FIQ_VAL, FIQ_VAL_SPLITS), ("train", FIQ_TRAIN, FIQ_TRAIN_SPLITS)):
        for cat in datasets.FASHION_IQ_CATEGORIES:
            with open(os.path.join(root, "captions", f"cap.{cat}.{split}.json"), "w") as f:
                json.dump(caps[cat], f)
            with open(os.path.join(root, "image_splits", f"split.{cat}.{split}.json"), "w") as f:
                json.dump(splits[cat], f)
            names |= set(splits[cat]) | {e[k] for e in caps[cat] for k in ("candidate", "target")}
    for k, name in enumerate(sorted(names)):
        _jpg(os.path.join(root, images_folder, name + ".jpg"), seed=300 + k)
    return root


def _collect(loader) -> list[dict]:
    return [batch for batch in loader]


# ----------------------------------------------------------------------------------------------------------------
# Image loading
# ----------------------------------------------------------------------------------------------------------------

def test_load_rgb_uint8_matches_reference_transform(tmp_path):
    import torchvision

    path = _jpg(tmp_path / "x.jpg", size=(30, 20), seed=3)
    out = image_cache.load_rgb_uint8(path, S)
    ref = torchvision.transforms.Compose([torchvision.transforms.Resize(S), torchvision.transforms.CenterCrop(S),
                                          torchvision.transforms.PILToTensor()])(Image.open(path).convert("RGB"))
    assert out.dtype == torch.uint8 and out.shape == (3, S, S)
    assert torch.equal(out, ref)
    gray = image_cache.load_rgb_uint8(_jpg(tmp_path / "g.jpg", mode="L"), S)
    assert gray.shape == (3, S, S) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert image_cache.load_rgb_uint8(_jpg(tmp_path / "c.jpg", mode="CMYK"), S).shape == (3, S, S)


def test_truncated_and_garbage_images_raise_bad_image_error(tmp_path):
    bad = _truncated_jpg(tmp_path / "t.jpg")
    with pytest.raises(datasets.BadImageError) as info:
        image_cache.load_rgb_uint8(bad, S)
    assert info.value.path == bad and bad in str(info.value)
    (tmp_path / "g.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(datasets.BadImageError):
        image_cache.load_rgb_uint8(str(tmp_path / "g.jpg"), S)
    with pytest.raises(datasets.BadImageError):
        image_cache.load_rgb_uint8(str(tmp_path / "missing.jpg"), S)
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# ----------------------------------------------------------------------------------------------------------------
# MIT-States
# ----------------------------------------------------------------------------------------------------------------

def test_mitstates_layout_split_and_index(mit, caplog):
    with caplog.at_level(logging.WARNING, logger="datasets"):
        train = datasets.MITStates(mit, "train", image_size=S)
    assert [img["captions"][0] for img in train.imgs] == [
        "green apple", "large ball", "lonely cup", "red apple", "red apple", "ripe apple", "small ball", "small ball"]
    assert os.path.basename(train.imgs[4]["file_path"]) == "a1.JPEG"  # upper-case extension accepted
    assert train.noun2adjs == {"apple": ["green", "red", "ripe"], "ball": ["large", "small"], "cup": ["lonely"]}
    assert train.caption2imgids["red apple"] == [3, 4]
    assert any("cup" in r.getMessage() for r in caplog.records)  # one-adjective noun warned about
    assert len(train) == 8 and train.items_per_source == 2
    assert train.get_all_texts() == [img["captions"][0] for img in train.imgs]
    test = datasets.MITStates(mit, "test", image_size=S)
    assert {img["noun"] for img in test.imgs} == {"clock", "plate", "sky"}
    assert all(n in datasets.MIT_STATES_TEST_NOUNS for n in ("clock", "plate", "sky"))
    assert len(test) == 8
    for ds in (train, test):  # grayscale / CMYK files come out as RGB
        for i in range(len(ds)):
            assert ds.load_image(i).shape == (3, S, S)


def test_mitstates_test_task_queries_and_views(mit):
    test = datasets.MITStates(mit, "test", image_size=S)
    task = test.test_task()
    # clock: 4 images x 2 other adjectives, plate: 3 images x 1, sky (one adjective): none.
    assert len(task.query_text) == 11 and len(task.query_source) == 11
    assert task.image_keys == list(range(8)) and task.gallery == list(range(8))
    assert list(task.gallery_labels) == ["composition", "adj", "noun"]
    assert task.gallery_labels["composition"][1] == "broken clock"
    assert task.gallery_labels["adj"][1] == "broken" and task.gallery_labels["noun"][1] == "clock"
    assert task.query_source[:2] == [1, 1] and task.query_text[:2] == ["new", "old"]
    assert task.query_targets["composition"][:2] == ["new clock", "old clock"]
    assert task.query_targets["adj"][:2] == ["new", "old"] and task.query_targets["noun"][:2] == ["clock", "clock"]
    assert task.query_exclude == task.query_source
    assert 0 not in task.query_source  # 'blue sky' is in the gallery only
    complete = datasets.MITStates(mit, "test", image_size=S, use_complete_text_query=True).test_task()
    assert complete.query_text[:2] == ["new clock", "old clock"]


def test_mitstates_pairs_two_slots_differ_and_stay_in_noun(mit):
    train = datasets.MITStates(mit, "train", image_size=S, seed=3)
    seen_same_adj = False
    for epoch in range(6):
        for index in range(len(train)):
            a, b = train[(epoch, index, 0)], train[(epoch, index, 1)]
            assert a["source_img_id"] == b["source_img_id"]
            src = train.imgs[a["source_img_id"]]
            assert src["noun"] != "cup"  # the one-adjective noun is never a source
            if index != 2:
                assert a["source_img_id"] == index
            ta, tb = train.imgs[a["target_img_id"]], train.imgs[b["target_img_id"]]
            assert ta["noun"] == tb["noun"] == src["noun"]
            assert ta["adj"] != tb["adj"]
            assert a["text"] == ta["adj"] and a["target_caption"] == ta["captions"][0]
            seen_same_adj |= ta["adj"] == src["adj"]
    assert seen_same_adj  # as the original, a target may have the source's adjective


def test_mitstates_exclude_source_adj_and_complete_text(mit):
    train = datasets.MITStates(mit, "train", image_size=S, exclude_source_adj=True, use_complete_text_query=True)
    for epoch in range(4):
        for index in range(len(train)):
            for slot in (0, 1):
                item = train[(epoch, index, slot)]
                src, tgt = train.imgs[item["source_img_id"]], train.imgs[item["target_img_id"]]
                assert tgt["adj"] != src["adj"]
                assert item["text"] == f"{tgt['adj']} {tgt['noun']}" == item["target_caption"]


def test_pairs_are_pure_functions_of_seed_epoch_index(mit):
    a = datasets.MITStates(mit, "train", image_size=S, seed=5)
    b = datasets.MITStates(mit, "train", image_size=S, seed=5)
    keys = [(e, i, s) for e in range(3) for i in range(len(a)) for s in (0, 1)]
    pairs_a = [a.training_pair(*k) for k in reversed(keys)][::-1]  # order of calls must not matter
    assert pairs_a == [b.training_pair(*k) for k in keys]
    by_epoch = [[a.training_pair(e, i, s) for i in range(len(a)) for s in (0, 1)] for e in range(5)]
    assert any(by_epoch[0] != other for other in by_epoch[1:])
    other_seed = datasets.MITStates(mit, "train", image_size=S, seed=6)
    assert [other_seed.training_pair(*k) for k in keys] != pairs_a


def test_mitstates_train_task(mit):
    train = datasets.MITStates(mit, "train", image_size=S)
    task = train.train_task(5, seed=1)
    assert len(task.query_text) == len(task.gallery) == 5
    sources = [task.image_keys[p] for p in task.query_source]
    assert len(set(sources)) == 5 and 2 not in sources  # without replacement, no one-adjective noun
    for q in range(5):
        src, tgt = train.imgs[sources[q]], train.imgs[task.image_keys[task.gallery[q]]]
        assert tgt["noun"] == src["noun"]
        assert task.query_text[q] == tgt["adj"] == task.query_targets["adj"][q]
        assert task.gallery_labels["composition"][q] == tgt["captions"][0] == task.query_targets["composition"][q]
    assert task.query_exclude is None and list(task.gallery_labels) == ["composition", "adj", "noun"]
    assert len(set(task.image_keys)) == len(task.image_keys)
    again = train.train_task(5, seed=1)
    assert again == task and train.train_task(5, seed=2) != task
    big = train.train_task(20, seed=1)  # more queries than sources: each source once
    assert len(big.query_text) == len({big.image_keys[p] for p in big.query_source}) == len(train._sources) < 20


# ----------------------------------------------------------------------------------------------------------------
# Sampler and loader
# ----------------------------------------------------------------------------------------------------------------

def test_sampler_epoch_structure(mit):
    train = datasets.MITStates(mit, "train", image_size=S)
    sampler = datasets.EpochBatchSampler(train, batch_size=2, seed=0)
    assert len(sampler) == 4
    sampler.set_epoch(1)
    keys = [k for batch in sampler for k in batch]
    assert len(keys) == len(train) and all(k[0] == 1 for k in keys)
    assert [k[2] for k in keys] == [0, 1] * 4  # a source fills two consecutive slots
    assert all(keys[j][1] == keys[j + 1][1] for j in range(0, 8, 2))
    assert len({keys[j][1] for j in range(0, 8, 2)}) == 4
    firsts = set()
    for e in range(6):
        sampler.set_epoch(e)
        firsts.add(tuple(k[1] for b in sampler for k in b))
    assert len(firsts) > 1  # the permutation changes with the epoch
    odd = datasets.EpochBatchSampler(train, batch_size=3, seed=0, drop_last=False)
    assert len(odd) == 3 and [len(b) for b in odd] == [3, 3, 2]


def test_sampler_start_batch_equals_skipping(mit):
    train = datasets.MITStates(mit, "train", image_size=S)
    sampler = datasets.EpochBatchSampler(train, batch_size=2, seed=4)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_start_batch(2)
    assert list(sampler) == full[2:]
    sampler.set_epoch(3)  # a new epoch starts from its first batch again
    assert list(sampler) == full


def test_sampler_rank_shares_concatenate(mit):
    train = datasets.MITStates(mit, "train", image_size=S)
    for drop_last in (True, False):
        single = datasets.EpochBatchSampler(train, batch_size=6, seed=2, drop_last=drop_last)
        ranks = [datasets.EpochBatchSampler(train, batch_size=6, seed=2, drop_last=drop_last, rank=r, world_size=2)
                 for r in range(2)]
        for s in [single] + ranks:
            s.set_epoch(1)
        merged = [a + b for a, b in zip(*(list(s) for s in ranks))]
        assert merged == list(single)
        assert all(len(b) == 3 for b in list(ranks[0])[: len(single) if drop_last else 1])
    with pytest.raises(UserInputError, match="divide"):
        datasets.EpochBatchSampler(train, batch_size=5, seed=0, world_size=2)


def test_loader_workers_reproduce_batches(mit):
    train = datasets.MITStates(mit, "train", image_size=S, seed=9)
    runs = []
    for workers in (0, 2):
        sampler = datasets.EpochBatchSampler(train, batch_size=4, seed=9)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=workers,
                                             collate_fn=datasets.collate_train)
        runs.append(_collect(loader))
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs):
        assert a["text"] == b["text"] and a["target_caption"] == b["target_caption"]
        assert torch.equal(a["source_img_id"], b["source_img_id"])
        assert torch.equal(a["target_img_id"], b["target_img_id"])
        assert torch.equal(a["source_img"], b["source_img"]) and torch.equal(a["target_img"], b["target_img"])
        assert a["source_img"].dtype == torch.uint8 and a["source_img"].shape == (4, 3, S, S)


def test_collate_drops_none():
    img = torch.zeros(3, S, S, dtype=torch.uint8)
    item = {"source_img": img, "target_img": img + 1, "text": "red", "source_img_id": 3, "target_img_id": 4,
            "target_caption": "red apple"}
    batch = datasets.collate_train([None, item, None, item])
    assert batch["source_img"].shape == (2, 3, S, S) and batch["text"] == ["red", "red"]
    assert batch["source_img_id"].dtype == torch.long and batch["target_img_id"].tolist() == [4, 4]
    empty = datasets.collate_train([None])
    assert empty["text"] == [] and empty["source_img"].shape[0] == 0


def test_corrupt_image_is_skipped_with_warning(tmp_path, caplog):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    bad = os.path.join(root, "images", "ripe apple", "r1.jpg")
    train = datasets.MITStates(root, "train", image_size=S, seed=0)
    assert len(train) == 9
    bad_id = [img["file_path"] for img in train.imgs].index(bad)
    sampler = datasets.EpochBatchSampler(train, batch_size=3, seed=0, drop_last=False)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=0,
                                         collate_fn=datasets.collate_train)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        total, used = 0, 0
        for epoch in range(4):
            sampler.set_epoch(epoch)
            for batch in loader:
                total += 1
                used += len(batch["text"])
                assert bad_id not in batch["source_img_id"].tolist() + batch["target_img_id"].tolist()
    assert total == 12
    assert used < 4 * 9  # some items held the corrupt image and were dropped, the rest went through
    assert train.bad_images == {bad}
    assert any(bad in r.getMessage() for r in caplog.records)
    assert torch.equal(train.load_image(bad_id), torch.zeros(3, S, S, dtype=torch.uint8))  # evaluation survives


# ----------------------------------------------------------------------------------------------------------------
# Image cache
# ----------------------------------------------------------------------------------------------------------------

def test_image_cache_equals_fresh_decode(tmp_path, caplog):
    root = make_mitstates(tmp_path / "mit", corrupt=True)
    cache = str(tmp_path / "cache")
    fresh = datasets.MITStates(root, "train", image_size=S)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        cached = datasets.MITStates(root, "train", image_size=S, image_cache=cache)
    bad = os.path.join(root, "images", "ripe apple", "r1.jpg")
    assert cached.bad_images == {bad} and any(bad in r.getMessage() for r in caplog.records)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".u8")
    for i in range(len(fresh)):
        assert torch.equal(cached.load_image(i), fresh.load_image(i))
        if fresh.imgs[i]["file_path"] != bad:
            assert torch.equal(cached.load_image(i), image_cache.load_rgb_uint8(fresh.imgs[i]["file_path"], S))
    for key in [(0, i, s) for i in range(len(fresh)) for s in (0, 1)]:
        a, b = fresh[key], cached[key]
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a["source_img"], b["source_img"]) and torch.equal(a["target_img"], b["target_img"])
    mtime = os.path.getmtime(os.path.join(cache, files[1]))
    again = pickle.loads(pickle.dumps(datasets.MITStates(root, "train", image_size=S, image_cache=cache)))
    assert os.path.getmtime(os.path.join(cache, files[1])) == mtime and sorted(os.listdir(cache)) == files  # reused
    assert torch.equal(again.load_image(3), fresh.load_image(3))
    _jpg(os.path.join(root, "images", "red apple", "a0.jpg"), size=(24, 24), seed=99)  # a changed file
    changed = datasets.MITStates(root, "train", image_size=S, image_cache=cache)
    assert len(os.listdir(cache)) == 4
    assert torch.equal(changed.load_image(3), image_cache.load_rgb_uint8(changed.imgs[3]["file_path"], S))


# ----------------------------------------------------------------------------------------------------------------
# Fashion200k
# ----------------------------------------------------------------------------------------------------------------

def test_fashion200k_caption_cleanup_and_different_word():
    assert datasets.fashion200k_caption(" a.b & c?* \n") == "adotmarkb andmark cquestionmarkstarmark"
    assert datasets.get_different_word("red silk dress", "blue silk dress")[2] == "replace red with blue"
    # all words shared: the loops fall through to the last words, as the original
    assert datasets.get_different_word("a b", "b a") == ("b", "a", "replace b with a")


def test_fashion200k_train_index_and_pairs(tmp_path):
    root = make_fashion200k(tmp_path / "f200k")
    train = datasets.Fashion200k(root, "train", image_size=S, seed=1)
    assert len(train) == 6 and train.items_per_source == 1
    assert train.imgs[4]["captions"] == ["black andmark white skirt"]
    assert train.imgs[0]["detection_score"] == "0.500"
    assert train.parent2children_captions["silk dress"] == ["red silk dress", "blue silk dress"]
    assert train.parent2children_captions["k top"] == ["tan tank top", "k top x"]  # substring-replace quirk kept
    assert [img["modifiable"] for img in train.imgs] == [True, True, True, True, False, True]
    expected = {0: ({2}, "replace red with blue"), 1: ({2}, "replace red with blue"),
                2: ({0, 1}, "replace blue with red"), 3: ({5}, "replace tan with k"), 5: ({3}, "replace k with tan")}
    for epoch in range(5):
        for index in range(6):
            item = train[(epoch, index, 0)]
            src = item["source_img_id"]
            assert src == index or (index == 4 and train.imgs[src]["modifiable"])  # s0 is redrawn
            targets, text = expected[src]
            assert item["target_img_id"] in targets and item["text"] == text
            assert item["target_caption"] == train.imgs[item["target_img_id"]]["captions"][0]
    complete = datasets.Fashion200k(root, "train", image_size=S, use_complete_text_query=True)
    item = complete[(0, 0, 0)]
    assert item["text"] == "blue silk dress" == item["target_caption"]
    task = train.train_task(4, seed=0)
    assert len(task.query_text) == 4 and list(task.gallery_labels) == ["composition"]
    assert all(task.image_keys[p] != 4 for p in task.query_source) and task.query_exclude is None


def test_fashion200k_test_queries(tmp_path):
    root = make_fashion200k(tmp_path / "f200k")
    test = datasets.Fashion200k(root, "test", image_size=S)
    assert len(test) == 3
    task = test.test_task()
    assert task.query_source == [2, 1]  # the repeated path maps to its last index
    assert task.query_text == ["replace dark with grey", "replace grey with dark"]
    assert task.query_targets == {"composition": ["grey wool coat", "dark green wool coat"]}
    assert task.gallery_labels == {"composition": ["green wool coat", "grey wool coat", "dark green wool coat"]}
    assert task.query_exclude == [2, 1] and task.image_keys == [0, 1, 2]
    complete = datasets.Fashion200k(root, "test", image_size=S, use_complete_text_query=True).test_task()
    assert complete.query_text == ["grey wool coat", "dark green wool coat"]


def test_fashion200k_bad_files(tmp_path):
    root = make_fashion200k(tmp_path / "f200k")
    with open(os.path.join(root, "test_queries.txt"), "a") as f:
        f.write("women/t0.jpg women/nope.jpg\n")
    with pytest.raises(UserInputError, match=r"test_queries.txt:3.*women/nope.jpg"):
        datasets.Fashion200k(root, "test", image_size=S)
    with open(os.path.join(root, "labels", "skirt_train_detect_all.txt"), "a") as f:
        f.write("women/skirts/s9.jpg\tonly two fields\n")
    with pytest.raises(UserInputError, match=r"skirt_train_detect_all.txt:4: malformed"):
        datasets.Fashion200k(root, "train", image_size=S)
    open(os.path.join(root, "labels", "skirt_train_detect_all.txt"), "w").close()
    with pytest.raises(UserInputError, match=r"skirt_train_detect_all.txt is empty"):
        datasets.Fashion200k(root, "train", image_size=S)
    with pytest.raises(UserInputError, match=r"labels is missing"):
        datasets.Fashion200k(str(tmp_path), "train", image_size=S)


# ----------------------------------------------------------------------------------------------------------------
# Fashion IQ
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["images", "all_imgs"])
def test_fashioniq_all_categories(tmp_path, folder):
    root = make_fashioniq(tmp_path / "fiq", folder)
    val = datasets.FashionIQ(root, "val", image_size=S)
    assert len(val) == 4 and val.items_per_source == 1
    texts = ["dress is red and it has long sleeves", "dress is shorter and it is blue",
             "shirt has a collar and it is white", "toptee is striped and it is green"]
    assert val.get_all_texts() == texts  # whole strings, never characters
    task = val.test_task()
    assert task.query_text == texts
    assert task.image_keys == ["dA", "dB", "sB", "tA", "tB", "dC", "sA"]
    assert task.gallery == [0, 1, 2, 3, 4] and task.gallery_labels == {"image": ["dA", "dB", "sB", "tA", "tB"]}
    assert [task.image_keys[p] for p in task.query_source] == ["dA", "dC", "sA", "tA"]
    assert task.query_targets == {"image": ["dB", "dA", "sB", "tB"]}
    assert task.query_exclude is None
    assert task.query_groups == {"dress": [True, True, False, False], "shirt": [False, False, True, False],
                                 "toptee": [False, False, False, True]}
    for key in task.image_keys:
        assert val.load_image(key).shape == (3, S, S)
    item = val[(7, 1, 0)]
    assert val.image_names[item["source_img_id"]] == "dC" and val.image_names[item["target_img_id"]] == "dA"
    assert item["text"] == item["target_caption"] == texts[1]
    assert torch.equal(item["target_img"], val.load_image("dA"))
    same = datasets.FashionIQ(root, "val", image_size=S, use_complete_text_query=True)
    assert same.get_all_texts() == texts


def test_fashioniq_single_category_and_train_task(tmp_path):
    root = make_fashioniq(tmp_path / "fiq")
    dress = datasets.FashionIQ(root, "val", category="dress", image_size=S)
    task = dress.test_task()
    assert task.query_text == ["is red has long sleeves", "is shorter is blue"]
    assert task.image_keys == ["dA", "dB", "dC"] and task.gallery_labels == {"image": ["dA", "dB"]}
    assert task.query_groups == {"dress": [True, True]}
    train = datasets.FashionIQ(root, "train", image_size=S)
    assert len(train) == 4
    tt = train.train_task(3, seed=0)
    assert len(tt.query_text) == 3 and len(set(tt.query_text)) == 3
    assert tt.gallery_labels == {"image": ["xA", "xB", "yA", "yB", "zA", "zB"]}
    assert tt == train.train_task(3, seed=0)


def test_fashioniq_bad_input(tmp_path):
    root = make_fashioniq(tmp_path / "fiq")
    with pytest.raises(UserInputError, match="unknown Fashion IQ category 'pants'"):
        datasets.FashionIQ(root, "val", category="pants", image_size=S)
    with open(os.path.join(root, "captions", "cap.shirt.val.json"), "w") as f:
        json.dump([{"candidate": "sA", "captions": ["x", "y"]}], f)
    with pytest.raises(UserInputError, match=r"cap.shirt.val.json: entry 0 is malformed"):
        datasets.FashionIQ(root, "val", image_size=S)
    os.rename(os.path.join(root, "images"), os.path.join(root, "pictures"))
    with pytest.raises(UserInputError, match="all_imgs"):
        datasets.FashionIQ(root, "val", image_size=S)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserInputError, match="captions is missing"):
        datasets.FashionIQ(str(tmp_path / "empty"), "val", image_size=S)


# ----------------------------------------------------------------------------------------------------------------
# Bad input, pickling, build_datasets
# ----------------------------------------------------------------------------------------------------------------

def test_mitstates_bad_input(tmp_path):
    with pytest.raises(UserInputError, match="does-not-exist"):
        datasets.MITStates(str(tmp_path / "does-not-exist"), "train")
    os.makedirs(tmp_path / "noimages")
    with pytest.raises(UserInputError, match=r"images is missing.*<adj noun>"):
        datasets.MITStates(str(tmp_path / "noimages"), "train")
    _jpg(tmp_path / "onlyskipped" / "images" / "adj apple" / "a.jpg")
    _jpg(tmp_path / "onlyskipped" / "images" / "nospace" / "a.jpg")
    with pytest.raises(UserInputError, match="no train images found"):
        datasets.MITStates(str(tmp_path / "onlyskipped"), "train")
    with pytest.raises(UserInputError, match="unknown dataset 'cifar'"):
        datasets.build_datasets("cifar", str(tmp_path))


def test_datasets_pickle_without_state(mit, tmp_path):
    for ds in (datasets.MITStates(mit, "train", image_size=S),
               datasets.Fashion200k(make_fashion200k(tmp_path / "f"), "train", image_size=S),
               datasets.FashionIQ(make_fashioniq(tmp_path / "q"), "train", image_size=S)):
        clone = pickle.loads(pickle.dumps(ds))
        key = (1, 1, 0)
        a, b = ds[key], clone[key]
        assert a["text"] == b["text"] and a["target_img_id"] == b["target_img_id"]


def test_build_datasets(mit, tmp_path):
    train, test = datasets.build_datasets("mitstates", mit, image_size=S, use_complete_text_query=True, seed=3,
                                          exclude_source_adj=True)
    assert (train.split, test.split, train.seed, train.exclude_source_adj) == ("train", "test", 3, True)
    assert test.test_task().query_text[0] == "new clock"
    tr, va = datasets.build_datasets("fashionIQ", make_fashioniq(tmp_path / "q"), image_size=S, category="shirt")
    assert (tr.split, va.split, va.category) == ("train", "val", "shirt")
    tr, te = datasets.build_datasets("fashion200k", make_fashion200k(tmp_path / "f"), image_size=S)
    assert (len(tr), len(te)) == (6, 3)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------------

SMALL = dict(image_size=24, n_train_nouns=3, n_test_nouns=2, adjectives_per_noun=3, images_per_class=2)


def _tree_digest(root) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def test_synthetic_deterministic_and_split(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synthetic.generate_synthetic(a, seed=0, **SMALL)
    synthetic.generate_synthetic(b, seed=0, **SMALL)
    synthetic.generate_synthetic(c, seed=1, **SMALL)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert len(da) == 5 * 3 * 2 + 1 and da == db
    assert da != dc
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders left
    train = datasets.MITStates(a, "train", image_size=S)
    test = datasets.MITStates(a, "test", image_size=S)
    train_nouns, test_nouns = set(train.noun2adjs), set(test.noun2adjs)
    assert train_nouns == set(synthetic.SYNTHETIC_TRAIN_NOUNS[:3])
    assert test_nouns == set(synthetic.SYNTHETIC_TEST_NOUNS[:2])
    assert not train_nouns & set(datasets.MIT_STATES_TEST_NOUNS) and test_nouns <= set(datasets.MIT_STATES_TEST_NOUNS)
    assert all(len(adjs) == 3 for adjs in {**train.noun2adjs, **test.noun2adjs}.values())
    train_adjs = {a for adjs in train.noun2adjs.values() for a in adjs}
    assert {a for adjs in test.noun2adjs.values() for a in adjs} <= train_adjs
    assert len(test.test_task().query_text) == 2 * 3 * 2 * 2  # nouns x adjectives x images x other adjectives
    img = np.asarray(Image.open(train.imgs[0]["file_path"]))
    assert img.shape == (24, 24, 3)


def test_synthetic_reuse_regenerate_and_refuse(tmp_path):
    path = str(tmp_path / "syn")
    synthetic.generate_synthetic(path, seed=0, **SMALL)
    manifest = os.path.join(path, synthetic.SYNTHETIC_MANIFEST)
    stamp = os.stat(manifest).st_mtime_ns
    synthetic.generate_synthetic(path, seed=0, **SMALL)
    assert os.stat(manifest).st_mtime_ns == stamp  # already there: untouched
    synthetic.generate_synthetic(path, seed=0, **{**SMALL, "images_per_class": 3})  # other parameters: replaced
    with open(manifest) as f:
        assert json.load(f)["images_per_class"] == 3
    assert len(os.listdir(os.path.join(path, "images", sorted(os.listdir(os.path.join(path, "images")))[0]))) == 3
    other = tmp_path / "real"
    _jpg(other / "images" / "red apple" / "a.jpg")
    with pytest.raises(UserInputError, match="not a synthetic dataset"):
        synthetic.generate_synthetic(str(other), seed=0, **SMALL)
    assert os.path.exists(other / "images" / "red apple" / "a.jpg")  # never deleted


def test_build_synthetic_default(tmp_path):
    train, test = datasets.build_datasets("synthetic", str(tmp_path / "syn"), image_size=32, seed=0)
    assert len(train) == 8 * 6 * 10 and len(test) == 4 * 6 * 10
    item = train[(0, 5, 1)]
    assert item["source_img"].shape == (3, 32, 32) and item["text"] in train.noun2adjs[train.imgs[5]["noun"]]
