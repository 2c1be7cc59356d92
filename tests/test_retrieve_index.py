"""retrieve.py with its gallery index: --index_dtype float16, --backend faiss (exact re-ranking, its recall in the
manifest, the one line when faiss is missing) and a stopped build resumed."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sys

import pytest
import torch

import factory
import gallery_index
import retrieve
from checkpoint import read_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call(*argv: str) -> tuple[int, str, str]:
    """retrieve.main(argv) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = retrieve.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, triplets_data) -> str:
    """The test split's 18 images in a folder of their own."""
    folder = str(tmp_path_factory.mktemp("gallery"))
    with open(os.path.join(triplets_data, "triplets.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    for rel in sorted({r[c] for r in rows for c in ("source", "target")}):
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(triplets_data, rel), os.path.join(folder, rel))
    return folder


@pytest.fixture
def query(triplets_run, gallery) -> list[str]:
    return ["--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--device", "cpu",
            "--image", os.path.join(gallery, "images/blue clock/000.jpg"), "--text", "green", "--top_k", "17"]


def ask(query: list[str], tmp_path, *extra: str) -> tuple[list[dict], str]:
    out = str(tmp_path / "r.jsonl")
    rc, _, err = call(*query, "--json", out, *extra)
    assert rc == 0, err
    with open(out) as f:
        return json.load(f)["results"], err


def manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_faiss_backend_re_ranks_exactly_and_records_its_recall(query, tmp_path):
    pytest.importorskip("faiss")
    index = str(tmp_path / "index.json")
    exact, _ = ask(query, tmp_path, "--index", index)
    approx, err = ask(query, tmp_path, "--index", index, "--backend", "faiss")
    info = manifest(index)["faiss"]
    assert info["spec"] == "IVF1,SQ8" and info["recall_at_10"] == 1.0 and info["recall_queries"] == 18
    assert err.splitlines() == [f"retrieve.py: faiss index IVF1,SQ8, nprobe 1: recall@10 1.0000 against exact "
                                f"search on 18 held-out gallery vectors"]
    assert os.path.isfile(tmp_path / info["file"]) and info["feature_file"] == manifest(index)["feature_file"]
    # one list holds every image: every one is a candidate, re-ranked with its exact score
    assert [r["path"] for r in approx] == [r["path"] for r in exact]
    assert [r["score"] for r in approx] == pytest.approx([r["score"] for r in exact], abs=1e-6)
    again, err = ask(query, tmp_path, "--index", index, "--backend", "faiss")
    assert again == approx and err == ""  # the FAISS file is reused


def test_without_faiss_the_faiss_backend_is_one_line_before_the_model_is_built(query, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError

    def boom(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(factory, "model_from_checkpoint", boom)
    rc, out, err = call(*query, "--backend", "faiss")
    assert rc == 2 and out == "" and err.splitlines() == [
        "retrieve.py: error: --backend faiss needs faiss: pip install faiss-cpu"]


def test_float16_index_halves_the_features_and_ranks_alike(query, tmp_path):
    index32, index16 = str(tmp_path / "i32.json"), str(tmp_path / "i16.json")
    full, _ = ask(query, tmp_path, "--index", index32)
    half, _ = ask(query, tmp_path, "--index", index16, "--index_dtype", "float16")
    sizes = [os.path.getsize(tmp_path / manifest(p)["feature_file"]) for p in (index32, index16)]
    assert sizes[0] == 2 * sizes[1] > 0 and manifest(index16)["dtype"] == "float16"
    scores = {r["path"]: r["score"] for r in full}
    for r in half:  # a different order only among scores closer than float16's rounding
        assert abs(r["score"] - scores[r["path"]]) < 2e-3
    assert sorted(scores) == sorted(r["path"] for r in half)  # every other image: 17 of 18
    _, err = ask(query, tmp_path, "--index", index32, "--index_dtype", "float16")
    assert err.splitlines() == [f"retrieve.py: {index32} holds float32 features, and --index_dtype is float16; "
                                f"rebuilding it"]
    assert manifest(index32)["dtype"] == "float16"


def test_a_stopped_build_resumes_where_it_stopped(query, gallery, tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_index, "BUILD_CHUNK", 4)
    index = str(tmp_path / "index.json")
    encoded: list[list[str]] = []
    real_encode = retrieve.encode

    class Killed(BaseException):  # as a kill: past retrieve.py's last resort, which catches every Exception
        pass

    def spy(model, image_size, paths, queries, **kw):
        encoded.append(sorted(os.path.relpath(p, gallery) for p in paths))
        if stop_at_call is not None and len(encoded) == stop_at_call:
            raise Killed()
        return real_encode(model, image_size, paths, queries, **kw)

    monkeypatch.setattr(retrieve, "encode", spy)
    stop_at_call = 4  # the queries alone, then chunks of 4 images: the third chunk is never recorded
    with pytest.raises(Killed):
        call(*query, "--index", index)
    assert [len(e) for e in encoded] == [0, 4, 4, 4] and not os.path.exists(index)
    stop_at_call, encoded = None, []
    resumed, err = ask(query, tmp_path, "--index", index)
    assert [len(e) for e in encoded] == [0, 4, 4, 2] and "resuming the build of" in err  # 8 of 18 were kept
    os.remove(index)
    fresh, _ = ask(query, tmp_path, "--index", index)
    assert [r["path"] for r in fresh] == [r["path"] for r in resumed]
    assert [r["score"] for r in fresh] == pytest.approx([r["score"] for r in resumed], abs=1e-5)


def test_a_diverged_checkpoint_is_one_line_exit_1_and_stores_no_features(query, triplets_run, tmp_path):
    state = read_checkpoint(triplets_run["ckpt"])
    state["model_state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                 for k, v in state["model_state_dict"].items()}
    bad = str(tmp_path / "nan.pth")
    save_checkpoint(bad, state)
    argv = list(query)
    argv[argv.index("--model_checkpoint") + 1] = bad
    index = str(tmp_path / "index.json")
    rc, out, err = call(*argv, "--index", index)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and out == "" and lines == [
        "retrieve.py: error: the features of 1 of 1 queries and 18 of 18 gallery items are not finite (NaN or "
        "infinite): the model's weights or activations diverged, so no recall is reported"], err
    assert not os.path.exists(index)  # nothing finite to keep
