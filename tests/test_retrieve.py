"""retrieve.py: queries against a folder of images ranked as the evaluation ranks, the gallery index, outputs and
errors."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import provenance
import retrieve
import visualize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gallery(gallery, triplets_data, gallery_tools) -> str:
    """conftest's gallery (the test split's images in a folder of their own) with queries.csv = every test row."""
    with open(os.path.join(gallery, "queries.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "target"])
        w.writerows([r["source"], r["text"], r["target"]] for r in gallery_tools.test_rows(triplets_data))
    return gallery


def printed(stdout: str, name: str) -> float:
    (value,) = re.findall(rf"^     test {name} (\S+)$", stdout, flags=re.M)
    return float(value)


def test_every_test_query_ranks_as_the_evaluation(triplets_run, gallery, tmp_path, run_retrieve):
    out = str(tmp_path / "results.jsonl")
    rc, stdout, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--device", "cpu",
                                   "--queries", os.path.join(gallery, "queries.csv"), "--top_k", "10", "--json", out,
                                   "--batch_size", "4")
    assert rc == 0, err
    with open(out) as f:
        results = [json.loads(line) for line in f]
    with open(os.path.join(gallery, "queries.csv"), newline="") as f:
        queries = list(csv.DictReader(f))
    assert len(results) == len(queries) == 36
    for q, r in zip(queries, results):
        assert (r["image"], r["text"], r["target"]) == (q["image"], q["text"], q["target"])  # input order
        assert [x["rank"] for x in r["results"]] == list(range(1, 11))
        assert q["image"] not in [x["path"] for x in r["results"]]  # the query's own image is left out
        scores = [x["score"] for x in r["results"]]
        assert scores == sorted(scores, reverse=True)
    recalls = []
    for k in (1, 10):
        recall = sum(q["target"] in [x["path"] for x in r["results"][:k]] for q, r in zip(queries, results)) / 36
        assert round(recall, 4) == printed(triplets_run["test_stdout"], f"recall_top{k}_correct_composition")
        recalls.append(recall)
    assert 0 < recalls[0] < recalls[1] < 1  # neither comparison is a trivial 0 == 0 or 1 == 1
    # the stdout table: a header per query, then rank, score and path relative to --gallery, the target marked
    lines = stdout.splitlines()
    assert lines[0] == f'query 1: {queries[0]["image"]} "{queries[0]["text"]}"'
    assert lines[2].split()[0] == "1" and lines[2].split()[2:4] == results[0]["results"][0]["path"].split()


def read_index(path: str) -> dict:
    """The manifest (JSON) with ``files`` its paths, ``sizes`` a tensor and ``features`` its feature file (G, D)."""
    with open(path) as f:
        index = json.load(f)
    raw = np.fromfile(os.path.join(os.path.dirname(path), index["feature_file"]), dtype=index["dtype"])
    return {**index, "files": [e[0] for e in index["files"]], "sizes": torch.tensor([e[1] for e in index["files"]]),
            "features": torch.from_numpy(raw.reshape(index["rows"], index["dim"]).astype(np.float32))}


def perturbed(state: dict) -> None:
    """The checkpoint's first floating-point weight tensor plus 0.5."""
    key = next(k for k, v in state["model_state_dict"].items() if v.is_floating_point())
    state["model_state_dict"][key] = state["model_state_dict"][key] + 0.5


def test_index_is_reused_updated_and_rebuilt_for_another_checkpoint(triplets_run, gallery, tmp_path, monkeypatch,
                                                                    run_retrieve, gallery_tools):
    folder = str(tmp_path / "g")
    shutil.copytree(gallery, folder)
    index = str(tmp_path / "index.pt")
    encoded: list[list[str]] = []
    real_encode = retrieve.encode

    def spy(model, image_size, paths, queries, **kw):
        encoded.append(sorted(os.path.relpath(p, folder) for p in paths))
        return real_encode(model, image_size, paths, queries, **kw)

    monkeypatch.setattr(retrieve, "encode", spy)
    query = ["--image", os.path.join(gallery, "images/blue clock/000.jpg"), "--text", "green", "--top_k", "18"]

    def ask(ckpt=triplets_run["ckpt"], *extra):
        rc, out, err = run_retrieve("--model_checkpoint", ckpt, "--gallery", folder, "--device", "cpu", "--index",
                                    index, *query, "--json", str(tmp_path / "r.jsonl"), *extra)
        assert rc == 0, err
        with open(tmp_path / "r.jsonl") as f:
            return json.load(f)["results"], err

    first, _ = ask()
    assert len(encoded[-1]) == 18 and os.path.isfile(index)
    saved = read_index(index)
    assert saved["files"] == sorted(saved["files"]) and len(saved["files"]) == 18
    assert saved["sizes"].tolist() == [os.path.getsize(os.path.join(folder, f)) for f in saved["files"]]
    assert tuple(saved["features"].shape)[0] == 18
    again, err = ask()
    assert encoded[-1] == [] and again == first and err == ""  # reused: nothing encoded

    # one file changed, one added, one removed: only the changed and the added one are encoded
    changed, removed = "images/green clock/000.jpg", "images/large plate/002.jpg"
    shutil.copy(os.path.join(folder, "images/green plate/001.jpg"), os.path.join(folder, changed))
    os.utime(os.path.join(folder, changed), ns=(1, 1))
    shutil.copy(os.path.join(folder, "images/green plate/001.jpg"), os.path.join(folder, "images/added.jpg"))
    os.remove(os.path.join(folder, removed))
    updated, _ = ask()
    assert encoded[-1] == sorted([changed, "images/added.jpg"])
    saved = read_index(index)
    assert removed not in saved["files"] and "images/added.jpg" in saved["files"] and len(saved["files"]) == 18
    assert removed not in [r["path"] for r in updated]
    os.remove(index)
    fresh, _ = ask()  # everything encoded anew gives the same ranking and scores
    assert [r["path"] for r in fresh] == [r["path"] for r in updated]
    assert [r["score"] for r in fresh] == pytest.approx([r["score"] for r in updated], abs=1e-5)
    new = read_index(index)
    assert torch.allclose(new["features"], saved["features"], atol=1e-5)

    # another checkpoint: a one-line notice, then everything is encoded again
    other = gallery_tools.edited_checkpoint(triplets_run["ckpt"], str(tmp_path / "other.pth"), perturbed)
    _, err = ask(other)
    assert len(encoded[-1]) == 18
    notice = [line for line in err.splitlines() if line.strip()]
    assert len(notice) == 1 and "was built with another checkpoint_sha256; rebuilding it" in notice[0], err
    assert read_index(index)["identity"]["checkpoint_sha256"] == provenance.file_sha256(other)


def test_original_code_lstm_checkpoint_needs_its_training_texts(triplets_run, triplets_data, gallery, tmp_path,
                                                                 run_retrieve, gallery_tools):
    path = gallery_tools.edited_checkpoint(triplets_run["ckpt"], str(tmp_path / "original.pth"),
                                           gallery_tools.original_code_state)  # no vocabulary, no args dict
    query = ["--gallery", gallery, "--device", "cpu", "--image", os.path.join(gallery, "images/blue clock/000.jpg"),
             "--text", "green", "--top_k", "5"]
    rc, out, err = run_retrieve("--model_checkpoint", path, *query)
    assert rc == 2 and err.startswith("retrieve.py: error: ") and "without a vocabulary" in err
    rc, rebuilt, err = run_retrieve("--model_checkpoint", path, "--dataset_path", triplets_data, *query)
    assert rc == 0, err
    rc, ours, _ = run_retrieve("--model_checkpoint", triplets_run["ckpt"], *query)
    assert rebuilt == ours  # the vocabulary rebuilt from the training texts is the saved one


def test_one_query_picture_json_and_unreadable_files(triplets_run, gallery, tmp_path, run_retrieve):
    folder = str(tmp_path / "g")
    shutil.copytree(gallery, folder)
    with open(os.path.join(folder, "images/broken.JPG"), "wb") as f:
        f.write(b"not an image")
    Image.new("RGB", (10, 10), (255, 0, 0)).save(os.path.join(folder, "images/extra.WebP"))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("ignored")
    png, index = str(tmp_path / "grid.png"), str(tmp_path / "index.pt")
    image = os.path.join(folder, "images/blue clock/000.jpg")
    for repeat in range(2):
        rc, out, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", folder, "--device", "cpu",
                                    "--image", image, "--text", "green", "--top_k", "5", "--out", png, "--thumb", "32",
                                    "--json", str(tmp_path / "r.jsonl"), "--index", index)
        assert rc == 0, err
        warning = [line for line in err.splitlines() if line.strip()]
        assert warning == ["retrieve.py: warning: skipped 1 unreadable gallery file: images/broken.JPG"]
        if repeat == 0:
            written = os.stat(index).st_mtime_ns
    assert os.stat(index).st_mtime_ns == written  # only the unreadable file was tried again: nothing to rewrite
    result = json.loads(open(tmp_path / "r.jsonl").read())
    assert set(result) == {"image", "text", "results"} and result["image"] == image
    paths = [r["path"] for r in result["results"]]
    assert len(paths) == 5 and "images/broken.JPG" not in paths and "images/blue clock/000.jpg" not in paths
    assert all(set(r) == {"rank", "path", "score"} for r in result["results"])
    assert [line.split()[2:] for line in out.splitlines()[2:]] == [p.split() for p in paths]
    picture = Image.open(png)
    assert picture.format == "PNG" and picture.size == visualize.picture_size(1, 5, 32)
    # the extra .WebP image is in the gallery: asking with it finds it excluded from its own results
    rc, out, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", folder, "--device", "cpu",
                                "--image", os.path.join(folder, "images/extra.WebP"), "--text", "red", "--top_k", "100")
    assert rc == 0
    listed = [line.split()[2:] for line in out.splitlines()[2:]]
    assert len(listed) == 18 and ["images/extra.WebP"] not in listed  # 20 files, 1 unreadable, 1 the query


def test_out_dir_pictures_and_index_html(triplets_run, gallery, tmp_path, run_retrieve):
    queries = tmp_path / "q" / "three.csv"
    queries.parent.mkdir()
    rel = os.path.relpath(gallery, queries.parent)
    queries.write_text("image,text,target\n" + "".join(
        f"{rel}/images/blue clock/00{i}.jpg,green,{rel}/images/green clock/00{i}.jpg\n" for i in range(3)))
    out_dir = tmp_path / "pictures"
    rc, out, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--device", "cpu",
                                "--queries", str(queries), "--top_k", "17", "--out_dir", str(out_dir), "--thumb", "16")
    assert rc == 0, err
    names = sorted(os.listdir(out_dir))
    assert names == ["index.html", "query_0001.png", "query_0002.png", "query_0003.png"]
    page = (out_dir / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in names[1:])
    for n in names[1:]:  # 17 results = every other image, so the target is among them, framed green
        picture = Image.open(out_dir / n)
        assert picture.size == visualize.picture_size(1, 17, 16)
        row = [picture.getpixel((visualize.PAD + visualize.QUERY_GAP + c * (16 + visualize.PAD) + 1,
                                 visualize.PAD + 8)) for c in range(1, 18)]
        assert row.count(visualize.GREEN) == 1
    assert out.count("(target)") == 3


@pytest.mark.parametrize("case", ["no_checkpoint", "no_gallery", "empty_gallery", "no_image", "empty_text",
                                  "csv_missing_image", "csv_empty_text", "csv_no_column", "both_forms",
                                  "out_with_queries", "bad_top_k"])
def test_errors_one_line_exit_2(triplets_run, gallery, tmp_path, case, run_retrieve):
    ckpt, image = triplets_run["ckpt"], os.path.join(gallery, "images/blue clock/000.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    bad_csv = tmp_path / "bad.csv"
    base = ["--model_checkpoint", ckpt, "--gallery", gallery, "--device", "cpu"]
    argv, expect = {
        "no_checkpoint": (["--model_checkpoint", str(tmp_path / "x.pth"), "--gallery", gallery, "--image", image,
                           "--text", "t"], "x.pth does not exist"),
        "no_gallery": (["--model_checkpoint", ckpt, "--gallery", str(tmp_path / "nowhere"), "--image", image,
                        "--text", "t"], "is not a folder"),
        "empty_gallery": (["--model_checkpoint", ckpt, "--gallery", str(tmp_path / "empty"), "--image", image,
                           "--text", "t"], "holds no image files"),
        "no_image": (base + ["--image", str(tmp_path / "none.jpg"), "--text", "t"], "none.jpg does not exist"),
        "empty_text": (base + ["--image", image, "--text", "  "], "--text is empty"),
        "csv_missing_image": (base + ["--queries", str(bad_csv)], "bad.csv, line 3: "),
        "csv_empty_text": (base + ["--queries", str(bad_csv)], "bad.csv, line 2: empty text"),
        "csv_no_column": (base + ["--queries", str(bad_csv)], "the header lacks text"),
        "both_forms": (base + ["--image", image, "--text", "t", "--queries", str(bad_csv)], "not both"),
        "out_with_queries": (base + ["--queries", str(bad_csv), "--out", "x.png"], "use --out_dir"),
        "bad_top_k": (base + ["--image", image, "--text", "t", "--top_k", "0"], "--top_k must be at least 1"),
    }[case]
    bad_csv.write_text({"csv_missing_image": f"image,text\n{image},t\nmissing.jpg,t\n",
                        "csv_empty_text": f"image,text\n{image},\n",
                        "csv_no_column": "image\nx.jpg\n"}.get(case, "image,text\n"))
    rc, out, err = run_retrieve(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("retrieve.py: error: ") and expect in lines[0], lines[0]
    assert out == ""


def test_bad_flag_one_line_exit_2(capsys):
    assert retrieve.main(["--gallery", "x", "--top_k", "many"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("retrieve.py: error: ")


def test_top_k_on_a_normalised_gallery_is_the_same_ranking():
    import test_retrieval

    gen = torch.Generator().manual_seed(0)
    gallery = torch.randn(40, 6, generator=gen) * torch.rand(40, 1, generator=gen) * 5
    gallery[7] = gallery[3] * 2  # a tie: the lower position first
    queries = torch.randn(5, 6, generator=gen)
    queries[0] = gallery[3]
    exclude = torch.tensor([-1, 2, -1, 0, 39])
    for ex in (None, exclude):
        plain = test_retrieval.top_k(queries, gallery, 12, ex)
        stored = test_retrieval.top_k(queries, test_retrieval.normalize_rows(gallery), 12, ex, gallery_normalized=True)
        assert torch.equal(plain[0], stored[0]) and torch.equal(plain[1], stored[1])
    assert plain[1][0, :2].tolist() == [3, 7]
    # retrieve.rank: a query without an excluded image keeps all k results
    ranked = retrieve.rank(queries, test_retrieval.normalize_rows(gallery), 40, exclude)
    assert [len(r) for r in ranked] == [40, 39, 40, 39, 39]
    assert 2 not in [g for g, _ in ranked[1]] and 39 not in [g for g, _ in ranked[4]]


def test_benchmark_retrieve_mode_runs(tmp_path, capsys):
    import benchmark

    assert benchmark.main(["--mode", "retrieve", "--device", "cpu", "--text", "lstm", "--image_size", "32",
                           "--model", "tirg", "--gallery_size", "300", "--repeats", "1",
                           "--data_dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gallery_size"] == 300 and result["settings"]["image_size"] == 32
    assert 0 < result["median_rank_s"] < result["median_query_s"]
