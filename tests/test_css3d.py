"""CSS3D (TIRG's third dataset) on a tiny scene file written in the published layout: a Python-2 protocol-2 pickle
of a dict in an .npy file, the train split without ``labels``."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
import re
import struct

import numpy as np
import numpy.lib.format as npy_format
import pytest
import torch
from PIL import Image

import config
import datasets
import main
import test_retrieval
from errors import UserInputError
from retrieval_datasets import css3d_render

S = 32

# ------------------------------------------------------------------------------------------------------------------
# A Python-2-style pickle writer (the .npy file TIRG published was saved by Python 2's numpy)
_PY2_MODULES = {"numpy._core.multiarray": "numpy.core.multiarray", "builtins": "__builtin__"}


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: every ``str`` / ``bytes`` a Python 2 byte string (SHORT_BINSTRING /
    BINSTRING opcodes of latin-1 bytes), and globals under their Python 2 / numpy 1 module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = _PY2_MODULES.get(pickle.whichmodule(obj, name), pickle.whichmodule(obj, name))
        self.write(pickle.GLOBAL + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n")
        self.memoize(obj)

    dispatch[type] = save_global
    dispatch[type(len)] = save_global  # builtin functions: numpy's _reconstruct and scalar


def save_py2_npy(path: str, obj, pickle_bytes: bytes | None = None) -> None:
    """``numpy.save(path, obj)`` as Python 2 wrote it: a version 1.0 header of a 0-d object array, then the array
    as a Python 2 protocol-2 pickle (or ``pickle_bytes`` verbatim)."""
    if pickle_bytes is None:
        array = np.empty((), dtype=object)
        array[()] = obj
        buf = io.BytesIO()
        Py2Pickler(buf).dump(array)
        pickle_bytes = buf.getvalue()
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(pickle_bytes)


def obj(color, shape, size, y, x):
    return {"color": color, "shape": shape, "size": size, "pos": np.array([y, x]), "material": "metal"}


# train: 4 scenes, no labels (captions '0'..'3'); source 0 has two mods, source 1 only one
TRAIN = {
    "objects_img": [[obj("red", "rectangle", "large", 0.5, 0.5)], [obj("blue", "circle", "small", 0.3, 0.3)],
                    [obj("green", "triangle", "large", 0.6, 0.4)], [obj("yellow", "rectangle", "small", 0.2, 0.8)]],
    "mods": [{"from": np.array([0, 1]), "to": np.array([1, 2]), "to_str": "make it blue"},
             {"from": [0, 2], "to": [3, 3], "to_str": "add yellow rectangle"}],
}
# test: 4 scenes; labels make scene 2 a copy of scene 0 (both '10')
TEST = {
    "objects_img": [[obj("red", "rectangle", "large", 0.5, 0.5)], [obj("cyan", "circle", "large", 0.5, 0.5)],
                    [obj("red", "rectangle", "large", 0.5, 0.5)], [obj("gray", "triangle", "small", 0.5, 0.5)]],
    "mods": [{"from": [0, 1], "to": [1, 3], "to_str": "make it cyan caf\xe9"},  # a latin-1 byte in a py2 str
             {"from": [2], "to": [0], "to_str": "remove nothing"}],
    "labels": np.array([10, 11, 10, 12]),
}


def make_css(root, with_images: bool = False) -> str:
    root = str(root)
    os.makedirs(root, exist_ok=True)
    save_py2_npy(os.path.join(root, datasets.CSS3D_FILE), {"train": TRAIN, "test": TEST})
    if with_images:
        os.makedirs(os.path.join(root, "images"))
        for split, part in (("train", TRAIN), ("test", TEST)):
            for i in range(len(part["objects_img"])):
                Image.new("RGB", (40, 40), (i * 60, 7, 200)).save(os.path.join(root, "images", f"css_{split}_{i:06d}.png"))
    return root


@pytest.fixture(scope="module")
def css(tmp_path_factory) -> str:
    return make_css(tmp_path_factory.mktemp("css"))


# ------------------------------------------------------------------------------------------------------------------
def test_scene_file_is_a_real_python2_pickle(css):
    data = open(os.path.join(css, datasets.CSS3D_FILE), "rb").read()
    body = data[data.index(b"\x80\x02"):]
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in body  # Python 2's module name
    ops = {op.name for op, _, _ in pickletools.genops(body)}
    assert "SHORT_BINSTRING" in ops and not ops & {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES"}  # py2 strings
    with pytest.raises(UnicodeError):  # Python 3's default ASCII decoding cannot read its latin-1 strings
        np.load(os.path.join(css, datasets.CSS3D_FILE), allow_pickle=True)
    loaded = css3d_render.load_scene_file(os.path.join(css, datasets.CSS3D_FILE))
    assert loaded["test"]["mods"][0]["to_str"] == "make it cyan caf\xe9"
    assert loaded["test"]["labels"].tolist() == [10, 11, 10, 12] and "labels" not in loaded["train"]


def test_scene_file_refuses_other_globals(tmp_path):
    evil = b"\x80\x02cos\nsystem\nq\x00U\x0bexit 3 >&2q\x01\x85q\x02Rq\x03."  # os.system('...') in protocol 2
    save_py2_npy(str(tmp_path / datasets.CSS3D_FILE), None, pickle_bytes=evil)
    with pytest.raises(UserInputError, match=r"refusing to load os\.system"):
        css3d_render.load_scene_file(str(tmp_path / datasets.CSS3D_FILE))
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(UserInputError, match="float64 array"):
        css3d_render.load_scene_file(str(tmp_path / "plain.npy"))


def test_captions_labels_and_test_queries(css):
    train = datasets.CSS3D(css, "train", image_size=S)
    test = datasets.CSS3D(css, "test", image_size=S)
    assert train.captions == ["0", "1", "2", "3"]  # no labels: str(index)
    assert test.captions == ["10", "11", "10", "12"]  # str(label)
    assert train.get_all_texts() == ["make it blue", "add yellow rectangle"]
    task = test.test_task()
    assert task.query_source == [0, 1, 2] and task.query_exclude == [0, 1, 2]  # for each mod, for each pair
    assert task.query_text == ["make it cyan caf\xe9", "make it cyan caf\xe9", "remove nothing"]
    assert task.query_targets["composition"] == ["11", "12", "10"] and task.gallery == [0, 1, 2, 3]
    assert task.gallery_labels["composition"] == ["10", "11", "10", "12"]


def test_source_ranked_last_and_a_copy_of_the_target_counts(css):
    task = datasets.CSS3D(css, "test", image_size=S).test_task()
    gallery = torch.eye(4)  # (G, D)
    queries = torch.stack([torch.tensor([0.0, 0, 0, 1]),  # q0 (target '11' = image 1): ranks image 3 first
                           torch.tensor([0.0, 0, 0, 1]),  # q1 (target '12' = image 3): hit at rank 0
                           torch.tensor([0.0, 0, 1, 0.5])])  # q2: its source (2, '10') would be the hit
    m = test_retrieval.retrieval_metrics(task, queries, gallery)
    assert list(m) == [f"recall_top{k}_correct_composition" for k in (1, 5, 10, 50, 100)]
    # q2: source 2 ranked last, so image 3 comes first and image 0 (the same caption '10') second
    assert m["recall_top1_correct_composition"] == pytest.approx(1 / 3)
    assert m["recall_top5_correct_composition"] == 1.0
    no_exclusion = datasets.RetrievalTask(**{**task.__dict__, "query_exclude": None})
    assert test_retrieval.retrieval_metrics(no_exclusion, queries, gallery)["recall_top1_correct_composition"] \
        == pytest.approx(2 / 3)


def test_training_pairs_follow_tirg_sampling_and_are_seeded(css):
    train = datasets.CSS3D(css, "train", image_size=S, seed=5)
    for index in range(len(train)):
        for epoch in range(6):
            (s0, m0, t0), (s1, m1, t1) = (train.training_pair(epoch, index, slot) for slot in (0, 1))
            assert s0 == s1 == 0  # the only source with two mods
            assert m0 != m1 and (m0, t0) in train.pairs_of[0] and (m1, t1) in train.pairs_of[0]
            assert train.training_pair(epoch, index, 0) == (s0, m0, t0)  # a function of (seed, epoch, index)
    item = train[(3, 1, 1)]
    _, mod, target = train.training_pair(3, 1, 1)
    assert item["text"] == train.mods[mod]["to_str"] and item["target_caption"] == str(target)
    draws = {train.training_pair(e, 0, 0)[1] for e in range(20)}
    assert draws == {0, 1}  # both mods are drawn for slot 0
    other_seed = datasets.CSS3D(css, "train", image_size=S, seed=6)
    assert [train.training_pair(e, 0, 0) for e in range(20)] != [other_seed.training_pair(e, 0, 0) for e in range(20)]


def test_2d_rendering_without_images_and_files_with_them(css, tmp_path):
    rendered = datasets.CSS3D(css, "test", image_size=64)
    assert rendered.rendered
    img = rendered.load_image(0)  # a large red square (half-size 8) centred in a white 64 x 64 image
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
    assert img[:, 32, 32].tolist() == [244, 35, 35] and img[:, 2, 2].tolist() == [255, 255, 255]
    assert img[:, 24, 24].tolist() == [244, 35, 35] and img[:, 23, 32].tolist() == [255, 255, 255]
    assert datasets.CSS3D(css, "test", image_size=S).load_image(3).shape == (3, S, S)
    diamond = css3d_render.render_2d([obj("blue", "circle", "large", 0.5, 0.5)])
    assert diamond[32, 30].tolist() == [42, 75, 215] and diamond[25, 25].tolist() == [255, 255, 255]
    with_files = datasets.CSS3D(make_css(tmp_path / "files", with_images=True), "train", image_size=S)
    assert not with_files.rendered and with_files.load_image(2)[:, 5, 5].tolist() == [120, 7, 200]


def test_css3d_trains_the_resnet_body_at_the_full_rate_as_tirg(css):
    import factory

    for dataset, body_scale, extra in (("css3d", 1.0, []), ("mitstates", 0.1, []),
                                       ("css3d", 0.5, ["--resnet_lr_scale", "0.5"])):
        args = config.resolve_defaults(config.get_args_parser().parse_args(
            ["--dataset", dataset, "--dataset_path", css, "--image_weights", "none", "--model", "tirg",
             "--lstm_dim", "16", *extra]))
        _, optimizer, _ = factory.create_model_and_optimizer(args, ["make it blue"])
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01 * body_scale, 0.01])


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match=re.escape(datasets.CSS3D_FILE) + " is missing"):
        datasets.CSS3D(str(tmp_path), "train")


def test_cli_trains_and_reports_tirg_metrics(css, tmp_path):
    argv = ["--dataset", "css3d", "--dataset_path", css, "--image_size", "32", "--batch_size", "2",
            "--train_eval_queries", "4", "--loader_num_workers", "0", "--log_dir", str(tmp_path), "--device", "cpu",
            "--image_weights", "none", "--use_bert", "False", "--lstm_dim", "16", "--num_iters", "2",
            "--model", "tirg", "--eval_every", "1000"]
    out = io.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only contends
    try:
        with contextlib.redirect_stdout(out):
            assert main.main(argv) == 0
    finally:
        torch.set_num_threads(before)
    names = re.findall(r"^     test (\S+) ", out.getvalue(), re.M)
    assert names == [f"recall_top{k}_correct_composition" for k in (1, 5, 10, 50, 100)]
    (folder,) = os.listdir(tmp_path)
    record = json.load(open(os.path.join(tmp_path, folder, "metrics.json")))
    assert record["dataset"] == "css3d" and record["select_on"] == "test" and "query_text" not in record
