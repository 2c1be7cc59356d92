"""retrieve.py with its gallery index: --index_dtype float16, --backend faiss (exact re-ranking, its recall in the
manifest, the one line when faiss is missing) and a stopped build resumed."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import factory
import gallery_index
import retrieve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def query(triplets_run, gallery, gallery_tools) -> list[str]:
    return gallery_tools.query_flags(triplets_run["ckpt"], gallery, 17)


@pytest.fixture
def ask(query, tmp_path, run_retrieve):
    """``ask(*extra)``: retrieve.py's ``query`` with the ``extra`` flags, its --json read back -> (results,
    stderr)."""
    def ask(*extra: str) -> tuple[list[dict], str]:
        out = str(tmp_path / "r.jsonl")
        rc, _, err = run_retrieve(*query, "--json", out, *extra)
        assert rc == 0, err
        with open(out) as f:
            return json.load(f)["results"], err

    return ask


def manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_faiss_backend_re_ranks_exactly_and_records_its_recall(ask, tmp_path):
    pytest.importorskip("faiss")
    index = str(tmp_path / "index.json")
    exact, _ = ask("--index", index)
    approx, err = ask("--index", index, "--backend", "faiss")
    info = manifest(index)["faiss"]
    assert info["spec"] == "IVF1,SQ8" and info["recall_at_10"] == 1.0 and info["recall_queries"] == 18
    assert err.splitlines() == [f"retrieve.py: faiss index IVF1,SQ8, nprobe 1: recall@10 1.0000 against exact "
                                f"search on 18 held-out gallery vectors"]
    assert os.path.isfile(tmp_path / info["file"]) and info["feature_file"] == manifest(index)["feature_file"]
    # one list holds every image: every one is a candidate, re-ranked with its exact score
    assert [r["path"] for r in approx] == [r["path"] for r in exact]
    assert [r["score"] for r in approx] == pytest.approx([r["score"] for r in exact], abs=1e-6)
    again, err = ask("--index", index, "--backend", "faiss")
    assert again == approx and err == ""  # the FAISS file is reused


def test_without_faiss_the_faiss_backend_is_one_line_before_the_model_is_built(query, monkeypatch, run_retrieve):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError

    def boom(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(factory, "model_from_checkpoint", boom)
    rc, out, err = run_retrieve(*query, "--backend", "faiss")
    assert rc == 2 and out == "" and err.splitlines() == [
        "retrieve.py: error: --backend faiss needs faiss: pip install faiss-cpu"]


def test_float16_index_halves_the_features_and_ranks_alike(ask, tmp_path):
    index32, index16 = str(tmp_path / "i32.json"), str(tmp_path / "i16.json")
    full, _ = ask("--index", index32)
    half, _ = ask("--index", index16, "--index_dtype", "float16")
    sizes = [os.path.getsize(tmp_path / manifest(p)["feature_file"]) for p in (index32, index16)]
    assert sizes[0] == 2 * sizes[1] > 0 and manifest(index16)["dtype"] == "float16"
    scores = {r["path"]: r["score"] for r in full}
    for r in half:  # a different order only among scores closer than float16's rounding
        assert abs(r["score"] - scores[r["path"]]) < 2e-3
    assert sorted(scores) == sorted(r["path"] for r in half)  # every other image: 17 of 18
    _, err = ask("--index", index32, "--index_dtype", "float16")
    assert err.splitlines() == [f"retrieve.py: {index32} holds float32 features, and --index_dtype is float16; "
                                f"rebuilding it"]
    assert manifest(index32)["dtype"] == "float16"


def test_a_stopped_build_resumes_where_it_stopped(query, ask, gallery, tmp_path, monkeypatch, run_retrieve):
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
        run_retrieve(*query, "--index", index)
    assert [len(e) for e in encoded] == [0, 4, 4, 4] and not os.path.exists(index)
    stop_at_call, encoded = None, []
    resumed, err = ask("--index", index)
    assert [len(e) for e in encoded] == [0, 4, 4, 2] and "resuming the build of" in err  # 8 of 18 were kept
    os.remove(index)
    fresh, _ = ask("--index", index)
    assert [r["path"] for r in fresh] == [r["path"] for r in resumed]
    assert [r["score"] for r in fresh] == pytest.approx([r["score"] for r in resumed], abs=1e-5)


def test_a_diverged_checkpoint_is_one_line_exit_1_and_stores_no_features(query, triplets_run, tmp_path, run_retrieve,
                                                                         gallery_tools):
    def diverged(state: dict) -> None:
        state["model_state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                     for k, v in state["model_state_dict"].items()}

    bad = gallery_tools.edited_checkpoint(triplets_run["ckpt"], str(tmp_path / "nan.pth"), diverged)
    index = str(tmp_path / "index.json")
    rc, out, err = run_retrieve(*gallery_tools.with_flag(query, "--model_checkpoint", bad), "--index", index)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and out == "" and lines == [
        "retrieve.py: error: the features of 1 of 1 queries and 18 of 18 gallery items are not finite (NaN or "
        "infinite): the model's weights or activations diverged, so no recall is reported"], err
    assert not os.path.exists(index)  # nothing finite to keep
