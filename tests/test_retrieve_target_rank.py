"""retrieve.py: a target outside the top k is ranked over the whole gallery (``ann.target_ranks``), printed, put in
the JSON and written under the query's picture; index.html's legend, CSS and escaped names."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ann
import visualize
from feature_store import FeatureFile, FeatureWriter

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # test_retrieve's helpers; appended, so that
# the repository's test_retrieval module is not shadowed by tests/test_retrieval.py
from test_retrieve import gallery  # noqa: F401  (its gallery fixture, with queries.csv)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("max_sim", [ann.MAX_SIM_ELEMS, 64 * 5])
def test_target_rank_is_the_position_in_the_full_exact_ranking(tmp_path, monkeypatch, max_sim):
    monkeypatch.setattr(ann, "MAX_SIM_ELEMS", max_sim)  # 64 * 5: query blocks of 5, one chunk of columns
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(150, 8, generator=g)
    rows[100:120] = rows[10]  # equal rows: ties broken by position
    rows = torch.nn.functional.normalize(rows, dim=1)
    path = str(tmp_path / "f.bin")
    with FeatureWriter(path, 8, "float32") as writer:
        writer.append(rows)
    queries = torch.randn(12, 8, generator=g)
    queries[3] = rows[10] * 2  # its target ties with 20 other rows
    targets = torch.tensor([0, 149, 10, 110, 5, -1, 7, 7, 60, 119, 1, 2])
    exclude = torch.tensor([-1, 3, 10, 10, -1, -1, 7, 8, 100, -1, 2, 140])  # query 6: its target is excluded
    with FeatureFile(path, 150, 8, "float32", chunk_bytes=8 * 4 * 64) as features:  # 3 chunks of 64 rows
        scores, positions = ann.exact_top_k(features, queries, 150, exclude)
        found = ann.target_ranks(features, queries, targets, exclude)
    ranks = [r for r, _ in found]
    for q in range(12):
        t, e = int(targets[q]), int(exclude[q])
        if t < 0 or t == e:
            assert ranks[q] == 0
            continue
        order = [p for p in positions[q].tolist() if p != e]
        assert ranks[q] == order.index(t) + 1
        assert found[q][1] == float(scores[q, positions[q].tolist().index(t)])  # bit for bit
    assert ranks[3] > 1  # tied rows at lower positions come first


def _queries_csv(folder: str, rows: list[list[str]]) -> str:
    path = os.path.join(folder, "q.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "target"])
        w.writerows(rows)
    return path


def test_missed_target_rank_line_json_picture_and_index_html(triplets_run, gallery, tmp_path,  # noqa: F811
                                                             run_retrieve):
    with open(os.path.join(gallery, "queries.csv"), newline="") as f:
        rows = [[os.path.join(gallery, r["image"]), r["text"], os.path.join(gallery, r["target"])]
                for r in csv.DictReader(f)]
    hostile = tmp_path / 'a<b>&"c".jpg'
    shutil.copy(rows[0][0], hostile)
    rows.append([str(hostile), "<script>x</script>", rows[0][2]])
    queries = _queries_csv(str(tmp_path), rows)
    base = ["--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--device", "cpu", "--queries",
            queries]
    rc, full_out, err = run_retrieve(*base, "--top_k", "1000", "--json", str(tmp_path / "full.jsonl"))
    assert rc == 0, err
    rc, out, err = run_retrieve(*base, "--top_k", "1", "--json", str(tmp_path / "one.jsonl"), "--out_dir",
                                str(tmp_path / "pics"), "--thumb", "64")
    assert rc == 0, err
    full = [json.loads(line) for line in open(tmp_path / "full.jsonl")]
    one = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    blocks = out.split("query ")[1:]
    missed = 0
    for n, (q, f, o, block) in enumerate(zip(rows, full, one, blocks), 1):
        target = os.path.relpath(q[2], gallery)
        listed = [r["path"] for r in f["results"]]
        assert f["target_rank"] == o["target_rank"] == listed.index(target) + 1
        score = f["results"][listed.index(target)]["score"]
        picture = np.asarray(Image.open(tmp_path / "pics" / f"query_{n:04d}.png").convert("RGB"))
        y = visualize.PAD + 64 + 2 * visualize.LINE
        note_strip = picture[y:y + visualize.LINE, visualize.PAD:visualize.PAD + 64]  # the last caption line
        if o["target_rank"] > 1:
            missed += 1
            assert f"   target {target} at rank {o['target_rank']} (score {score:.4f})" in block.splitlines()
            assert (note_strip != 255).any()
        else:
            assert "   target " not in block and (note_strip == 255).all()
    assert 0 < missed < len(rows)
    assert "   target " not in full_out  # every target is in a top k that holds the whole gallery
    page = (tmp_path / "pics" / "index.html").read_text()
    assert "a green frame marks the target" in page
    assert "target outside the top k: its rank is written under the query" in page
    assert "<style>" in page and "display: grid" in page and "max-width: 100%" in page
    assert "a&lt;b&gt;&amp;&quot;c&quot;.jpg" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script>" not in page and 'a<b>' not in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_json_without_target_has_no_target_rank(triplets_run, gallery, tmp_path, run_retrieve):  # noqa: F811
    rc, _, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--device", "cpu",
                              "--image", os.path.join(gallery, "images/blue clock/000.jpg"), "--text", "green",
                              "--top_k", "2", "--json", str(tmp_path / "r.jsonl"))
    assert rc == 0, err
    assert "target_rank" not in json.loads(open(tmp_path / "r.jsonl").read())
