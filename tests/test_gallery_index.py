"""The gallery index on its own (no model): chunked exact search ranks as the evaluation ranks, float16 storage,
resumable and concurrent builds, FAISS candidates re-ranked exactly, bounded memory, and the benchmark's
measurement function."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import ann
import gallery_index
import index_bench
import retrieve
import test_retrieval
from feature_store import FeatureFile, FeatureWriter, IndexDamaged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def tricky_gallery(n: int = 3000, dim: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery (n, dim) normalised with exact duplicates and a scaled copy, queries (40, dim)), some queries
    equal to gallery rows: ties that only the tie rule orders."""
    gen = torch.Generator().manual_seed(seed)
    gallery = torch.randn(n, dim, generator=gen)
    gallery[7] = gallery[3] * 2
    gallery[n - 5] = gallery[3]
    gallery[100:130] = gallery[50]  # 31 equal rows across chunk boundaries
    queries = torch.randn(40, dim, generator=gen)
    queries[0], queries[1] = gallery[3], gallery[50]
    return test_retrieval.normalize_rows(gallery), queries


def write_features(path: str, rows: torch.Tensor, dtype: str = "float32") -> str:
    with FeatureWriter(path, rows.shape[1], dtype) as writer:
        for start in range(0, rows.shape[0], 777):  # appended in pieces
            writer.append(rows[start:start + 777])
    return path


@pytest.mark.parametrize("chunk_bytes", [1, 48 * 4 * 200, 1 << 22])
def test_chunked_exact_search_equals_the_evaluation_ranking(tmp_path, chunk_bytes):
    gallery, queries = tricky_gallery()
    path = write_features(str(tmp_path / "f.f32"), gallery)
    exclude = torch.tensor([-1, 2, 3, 0, 2999] + [-1] * 35)
    with FeatureFile(path, *gallery.shape, "float32", chunk_bytes=chunk_bytes) as features:
        got = ann.exact_search(features, queries, 40, exclude)
        chunks = -(-gallery.shape[0] // features.rows_per_chunk)
        assert (chunks > 1) == (chunk_bytes < 1 << 22)
    want = retrieve.rank(queries, gallery, 40, exclude)  # test_retrieval.top_k, as the evaluation ranks
    assert got == want  # the same positions and bit-identical scores
    assert [g for g, _ in got[1][:31]] == [50] + list(range(100, 130))  # equal rows: the lower position first
    assert [g for g, _ in got[0][:3]] == [3, 7, 2995]  # ties with the query itself, then its scaled copy
    assert all(3 not in [g for g, _ in hits] for hits in got[2:3])


def test_query_blocks_and_similarity_buffer_are_bounded_and_give_the_same_ranking(tmp_path, monkeypatch):
    gallery, queries = tricky_gallery()
    path = write_features(str(tmp_path / "f.f32"), gallery)
    with FeatureFile(path, *gallery.shape, "float32", chunk_bytes=48 * 4 * 64) as features:
        whole = ann.exact_top_k(features, queries, 12)
        monkeypatch.setattr(ann, "MAX_SIM_ELEMS", 3 * 64)  # 3 queries x one 64-row chunk at a time
        assert ann._blocks(40, 3000, 64) == (3, 64)
        small = ann.exact_top_k(features, queries, 12)
        assert features.buffer_bytes == 64 * 48 * 4  # one float32 chunk, whatever the gallery's size
    # the query block's size is the matmul's height, which may move a score by an ulp; equal rows stay equal
    assert torch.equal(whole[1], small[1]) and torch.allclose(whole[0], small[0], rtol=0, atol=1e-6)


def test_shards_of_rows_merge_into_the_whole_search(tmp_path):
    gallery, queries = tricky_gallery()
    path = write_features(str(tmp_path / "f.f32"), gallery)
    exclude = torch.tensor([-1, 2, 3, 0, 2999] + [-1] * 35)
    with FeatureFile(path, *gallery.shape, "float32", chunk_bytes=48 * 4 * 64) as features:
        whole = ann.exact_top_k(features, queries, 20, exclude)
        merged = ann.RunningTopK(40, 20)
        for start, stop in ((0, 1216), (1216, 2000), (2000, 3000)):  # row ranges; a shard's positions are global
            scores, positions = ann.exact_top_k(features, queries, 20, exclude, start, stop)
            assert bool(((positions >= start) & (positions < stop)).all())
            merged.merge(scores, positions)
    assert torch.equal(merged.ids, whole[1]) and torch.equal(merged.scores, whole[0])
    assert merged.ids[1, :5].tolist() == [50, 100, 101, 102, 103]  # ties across shards: the lower position


def near_tie_equal(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]], exact: torch.Tensor,
                   tol: float) -> None:
    """Every position that one top-k holds and the other does not scores (exactly, ``exact`` (Q, G)) within
    ``tol`` of the k-th exact score: the lists differ only by near-ties."""
    for q, (g, w) in enumerate(zip(got, want)):
        kth = exact[q, w[-1][0]].item()
        for pos in {p for p, _ in g} ^ {p for p, _ in w}:
            assert abs(exact[q, pos].item() - kth) <= tol, (q, pos)
        assert max(abs(a - exact[q, p].item()) for p, a in g) <= tol


def test_float16_storage_gives_the_same_top10_up_to_near_ties(tmp_path):
    gen = torch.Generator().manual_seed(1)
    centres = test_retrieval.normalize_rows(torch.randn(20, 64, generator=gen))
    gallery = test_retrieval.normalize_rows(centres[torch.randint(0, 20, (4000,), generator=gen)]
                                            + 0.05 * torch.randn(4000, 64, generator=gen))  # near-ties aplenty
    queries = centres[:10] + 0.05 * torch.randn(10, 64, generator=gen)
    exact = torch.nn.functional.normalize(queries, dim=1) @ gallery.t()  # (Q, G)
    exclude = torch.full((10,), -1)
    results = {}
    for dtype in ("float32", "float16"):
        path = write_features(str(tmp_path / f"f.{dtype}"), gallery, dtype)
        assert os.path.getsize(path) == 4000 * 64 * (4 if dtype == "float32" else 2)  # float16 halves it
        with FeatureFile(path, 4000, 64, dtype, chunk_bytes=64 * 2 * 512) as features:
            results[dtype] = ann.exact_search(features, queries, 10, exclude)
    assert results["float16"] != results["float32"]  # float16 rounding moves scores: the check is not trivial
    near_tie_equal(results["float16"], results["float32"], exact, tol=2e-3)
    overlap = np.mean([len({p for p, _ in a} & {p for p, _ in b}) / 10
                       for a, b in zip(results["float16"], results["float32"])])
    assert overlap >= 0.8


# ----------------------------------------------------------------------------------------------------------------
# Builds
# ----------------------------------------------------------------------------------------------------------------

DIM = 16
IDENTITY = {"checkpoint_sha256": "ab" * 32, "image_size": 32, "model": "tirg"}


def fake_features(path: str) -> torch.Tensor:
    """A unit vector (DIM,) that depends only on the path."""
    gen = torch.Generator().manual_seed(int(hashlib.sha256(path.encode()).hexdigest()[:12], 16))
    return torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0)


class Encoder:
    """Records the paths of every call; raises ``Stop`` on call ``stop_at`` (a process killed while encoding);
    paths in ``bad`` are unreadable."""

    class Stop(Exception):
        pass

    def __init__(self, stop_at: int | None = None, bad: tuple[str, ...] = (), delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.stop_at, self.bad, self.delay = stop_at, bad, delay

    def __call__(self, paths: list[str]) -> tuple[torch.Tensor, set[int]]:
        self.calls.append(list(paths))
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise Encoder.Stop()
        time.sleep(self.delay)
        feats = torch.stack([fake_features(p) if p not in self.bad else torch.zeros(DIM) for p in paths])
        return feats, {i for i, p in enumerate(paths) if p in self.bad}


def entries(n: int) -> list[tuple[str, int, int]]:
    return [(f"img/{i:03d}.jpg", 100 + i, 1_700_000_000_000_000_000 + i) for i in range(n)]


def stored(path: str) -> tuple[list[str], torch.Tensor]:
    index = gallery_index.load_index(path, IDENTITY)
    return index["files"], index["features"].float().clone()


def test_a_stopped_build_resumes_without_encoding_the_recorded_images_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gallery_index, "BUILD_CHUNK", 4)
    path, files = str(tmp_path / "index.json"), entries(18)
    first = Encoder(stop_at=3, bad=("img/005.jpg",))
    with pytest.raises(Encoder.Stop):
        gallery_index.update_index(path, IDENTITY, "float32", files, DIM, first)
    assert [len(c) for c in first.calls] == [4, 4, 4] and not os.path.exists(path)
    record = json.loads((tmp_path / "index.json.build.json").read_text())
    assert record["rows"] == 8 and record["bad"] == [5]
    (build_file,) = [p for p in os.listdir(tmp_path) if p.endswith(".f32")]
    with open(tmp_path / build_file, "ab") as f:  # rows written after the last record are not trusted
        f.write(np.full(3 * DIM, np.nan, dtype=np.float32).tobytes())
    second = Encoder()
    update = gallery_index.update_index(path, IDENTITY, "float32", files, DIM, second)
    update.features.close()
    assert second.calls == [[f[0] for f in files[8:12]], [f[0] for f in files[12:16]], [f[0] for f in files[16:]]]
    assert "resuming the build of" in capsys.readouterr().err and update.bad == ["img/005.jpg"]
    names, feats = stored(path)
    assert names == [f[0] for f in files if f[0] != "img/005.jpg"]
    assert torch.equal(feats, torch.stack([fake_features(n) for n in names]))
    assert sorted(os.listdir(tmp_path)) == sorted(["index.json", "index.json.lock", os.path.basename(
        gallery_index.load_index(path, IDENTITY)["feature_path"])])  # the build's files are gone


def test_a_stopped_build_of_another_file_list_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_index, "BUILD_CHUNK", 4)
    path, files = str(tmp_path / "index.json"), entries(12)
    with pytest.raises(Encoder.Stop):
        gallery_index.update_index(path, IDENTITY, "float32", files, DIM, Encoder(stop_at=2))
    changed = files[1:] + [("img/zzz.jpg", 1, 1)]  # the first file removed, one added
    again = Encoder()
    update = gallery_index.update_index(path, IDENTITY, "float32", changed, DIM, again)
    update.features.close()
    assert sorted(p for call in again.calls for p in call) == [f[0] for f in files[4:]] + ["img/zzz.jpg"]
    names, feats = stored(path)
    assert names == [f[0] for f in changed] and torch.equal(feats, torch.stack([fake_features(n) for n in names]))


def test_two_processes_building_one_index_leave_a_valid_index(tmp_path):
    path, files = str(tmp_path / "index.json"), entries(10)
    encoders, errors = [Encoder(delay=0.2), Encoder(delay=0.2)], []

    def build(encoder: Encoder) -> None:
        try:
            gallery_index.update_index(path, IDENTITY, "float16", files, DIM, encoder).features.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(e,)) for e in encoders]  # each takes the flock on its own fd
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(sum(len(c) for c in e.calls) for e in encoders) == [0, 10]  # the second found it up to date
    names, feats = stored(path)
    assert names == [f[0] for f in files]
    assert torch.allclose(feats, torch.stack([fake_features(n) for n in names]), atol=1e-3)


def test_nan_in_the_stored_rows_is_found_by_the_search(tmp_path):
    gallery, queries = tricky_gallery(n=500)
    gallery[321, 5] = float("nan")
    path = write_features(str(tmp_path / "f.f32"), gallery)
    with FeatureFile(path, 500, 48, "float32", chunk_bytes=48 * 4 * 64) as features:
        with pytest.raises(IndexDamaged, match="NaN or infinite values in row 321"):
            ann.exact_search(features, queries, 5, torch.full((40,), -1))
        with pytest.raises(IndexDamaged, match="row 321"):
            features.gather([3, 321])


# ----------------------------------------------------------------------------------------------------------------
# FAISS
# ----------------------------------------------------------------------------------------------------------------

def test_faiss_candidates_are_re_ranked_with_exact_scores(tmp_path):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(2)
    centres = test_retrieval.normalize_rows(torch.randn(30, 32, generator=gen))
    gallery = test_retrieval.normalize_rows(centres[torch.randint(0, 30, (6000,), generator=gen)]
                                            + 0.1 * torch.randn(6000, 32, generator=gen))
    gallery[4000] = gallery[17]  # an exact tie: the lower position first
    queries = torch.cat([gallery[17:18], centres[:19] + 0.1 * torch.randn(19, 32, generator=gen)])
    path = write_features(str(tmp_path / "f.f16"), gallery, "float16")
    lines: list[str] = []
    with FeatureFile(path, 6000, 32, "float16") as features:
        info = ann.build_faiss(features, str(tmp_path / "f.faiss"), log=lines.append)
        index = ann.read_faiss(str(tmp_path / "f.faiss"))
        exclude = torch.tensor([-1, 5] + [-1] * 18)
        got = ann.faiss_search(index, features, queries, 10, exclude, info["nprobe"])
        stored_rows = torch.from_numpy(np.fromfile(path, dtype=np.float16).reshape(6000, 32)).double()
        exact = torch.nn.functional.normalize(queries.double(), dim=1) @ stored_rows.t()  # (Q, G) float64
        assert [len(hits) for hits in got] == [10] * 20 and 5 not in [g for g, _ in got[1]]
        for q, hits in enumerate(got):
            for g, score in hits:  # every score is the exact cosine of the stored vector
                assert abs(score - exact[q, g].item()) < 1e-6
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert [g for g, _ in got[0][:2]] == [17, 4000]
        want = ann.exact_search(features, queries, 10, exclude)
    recall = np.mean([len({g for g, _ in a} & {g for g, _ in b}) / 10 for a, b in zip(got, want)])
    assert recall >= ann.RECALL_TARGET - 0.05
    assert info["spec"] == ann.faiss_spec(6000, 32) and 0 < info["recall_at_10"] <= 1
    assert lines == [f"faiss index {info['spec']}, nprobe {info['nprobe']}: recall@10 {info['recall_at_10']:.4f} "
                     f"against exact search on 1000 held-out gallery vectors"]


def test_faiss_spec_scales_the_lists_and_the_code_size():
    assert ann.faiss_spec(18, 512) == "IVF1,SQ8"
    assert ann.faiss_spec(1_000_000, 512) == "IVF1000,SQ8"
    assert ann.faiss_spec(10_000_000, 512) == "IVF3162,SQ4"  # SQ8 codes would be 5.1 GB


# ----------------------------------------------------------------------------------------------------------------
# Memory and the measurement function
# ----------------------------------------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, sys, torch, ann
from feature_store import FeatureFile
def status(key):
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith(key)][0]) * 1024
torch.set_num_threads(1)
features = FeatureFile(sys.argv[1], int(sys.argv[2]), 512, "float32")
query = torch.randn(2, 512)
before = status("VmRSS")
hits = ann.exact_search(features, query, 10, torch.tensor([-1, -1]))
print(json.dumps({"before": before, "peak": status("VmHWM"), "hits": len(hits[0]), "buffer": features.buffer_bytes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_exact_search_over_a_200_mb_file_keeps_its_memory_bounded(tmp_path):
    rows = 100_000  # x 512 float32 = 205 MB
    path = str(tmp_path / "big.f32")
    gen = np.random.default_rng(0)
    with FeatureWriter(path, 512, "float32") as writer:
        for _ in range(rows // 10_000):
            block = gen.standard_normal((10_000, 512), dtype=np.float32)
            writer.append(block / np.linalg.norm(block, axis=1, keepdims=True))
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, str(rows)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["hits"] == 10 and got["buffer"] == 2048 * 512 * 4
    assert got["peak"] - got["before"] < 64 << 20, got  # the file is 205 MB; a full map or read would show


def test_measure_backend_returns_every_key_on_a_tiny_gallery(tmp_path):
    pytest.importorskip("faiss")
    rows = []
    for backend in ("exact", "faiss"):
        rows.append(index_bench.measure_backend(backend, 3000, 16, "float16", False, 0, str(tmp_path), threads=1,
                                                n_single=5))
    for row in rows:
        assert set(index_bench.KEYS) <= set(row)
        assert row["gallery_size"] == 3000 and row["index_bytes"] >= 3000 * 16 * 2
        assert 0 < row["query_ms_p50"] <= row["query_ms_p95"] and row["batch64_ms_p50"] > 0
        assert 0.5 <= row["recall_at_10"] <= 1 and row["peak_rss_bytes"] > 0 and row["build_s"] >= 0
    assert rows[0]["recall_at_10"] >= 0.99  # float16 exact search: the float32 truth up to rounding
    assert rows[1]["index_bytes"] > rows[0]["index_bytes"]  # the FAISS file beside the features
    uniform = index_bench.measure_backend("exact", 500, 16, "float32", True, 1, str(tmp_path), n_single=2)
    assert uniform["recall_at_10"] == 1.0  # float32 storage: exactly the truth
