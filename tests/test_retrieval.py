"""Tests of the retrieval evaluation (test_retrieval.py): ranks, recalls, metric names, ``evaluate``.

The reference functions below restate the published evaluation (TIRG / ComposeAE ``test`` and ``fiq_test``) as plain
numpy loops, to check that the vectorised implementation gives the same numbers.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load_impl():
    """The module under test, loaded from its path.

    This test file has the same basename as the module it tests; depending on pytest's import mode this file may
    itself be registered as ``test_retrieval``, so the implementation is loaded under a private name.
    """
    name = "_retrieval_impl_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "test_retrieval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


R = _load_impl()
RetrievalTask = sys.modules["datasets"].RetrievalTask  # the dataclass the implementation uses

KS = (1, 5, 10, 50, 100)


def _lt(rows):
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# first_hit_ranks / recall_at_k on hand-made matrices
# ----------------------------------------------------------------------------------------------------------------

def _unit_gallery():
    """4 gallery items along the axes; one query whose similarities are g0 > g1 > g2 > g3 (= 0)."""
    gallery = torch.eye(4)  # (4, 4)
    query = torch.tensor([[0.9, 0.5, 0.1, 0.0]])  # (1, 4) not normalised on purpose
    return query, gallery


def test_ranks_first_positive_counts_and_no_positive_is_g():
    query, gallery = _unit_gallery()
    # labels A=0, B=1, C=2, D=3 (absent). Gallery labels: A, B, A, C; A appears twice (duplicates).
    gallery_labels = _lt([[0], [1], [0], [2]])
    for target, expected in [(0, 0), (1, 1), (2, 3), (3, 4)]:
        ranks = R.first_hit_ranks(query, gallery, _lt([[target]]), gallery_labels)
        assert ranks.tolist() == [[expected]], target
    # several views at once, each with its own labels
    ranks = R.first_hit_ranks(query, gallery, _lt([[1, 0, 3]]), _lt([[0, 0, 0], [1, 1, 1], [0, 0, 2], [2, 1, 3]]))
    assert ranks.tolist() == [[1, 0, 3]]
    assert ranks.dtype == torch.long


def test_ranks_exclusion_pushes_source_last_but_keeps_it():
    query, gallery = _unit_gallery()
    # A at g0 and g2: excluding g0 (the best item) leaves g2, ranked after g1 -> rank 1
    labels = _lt([[0], [1], [0], [2]])
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels, _lt([0])).tolist() == [[1]]
    # without exclusion (-1) it would be first
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels, _lt([-1])).tolist() == [[0]]
    # the excluded item as the only positive: ranked last (rank G - 1), not removed
    labels = _lt([[0], [1], [2], [3]])
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels, _lt([0])).tolist() == [[3]]
    # excluding another item moves the items after it one place up
    assert R.first_hit_ranks(query, gallery, _lt([[2]]), labels, _lt([1])).tolist() == [[1]]


def test_tiny_gallery_excluded_source_still_counts_at_k_ge_g():
    """Gallery of 3 < k: the reference's -10e10 source is still inside the top k, so it is a hit there."""
    gallery = torch.eye(3)
    query = torch.tensor([[1.0, 0.2, 0.1]])
    labels = _lt([[7], [8], [9]])
    ranks = R.first_hit_ranks(query, gallery, _lt([[7]]), labels, _lt([0]))
    assert ranks.tolist() == [[2]]
    recalls = R.recall_at_k(ranks[:, 0], (1, 2, 3, 5))
    assert recalls == {1: 0.0, 2: 0.0, 3: 1.0, 5: 1.0}


def test_ties_broken_by_lower_gallery_index():
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # g1, g2, g3 tie at the top
    query = torch.tensor([[3.0, 0.0]])
    labels = _lt([[0], [1], [0], [0]])  # X, Y, X, X
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels).tolist() == [[1]]  # g2 after g1
    assert R.first_hit_ranks(query, gallery, _lt([[1]]), labels).tolist() == [[0]]
    # the positive with the lower index wins the tie even if a higher-index negative ties with it
    labels = _lt([[1], [0], [1], [1]])  # Y, X, Y, Y
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels).tolist() == [[0]]
    # g0 (similarity 0) is after the whole tie
    assert R.first_hit_ranks(query, gallery, _lt([[1]]), labels).tolist() == [[1]]
    labels = _lt([[0], [1], [1], [1]])
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels).tolist() == [[3]]
    # excluding g1 from the tie makes g2 first
    labels = _lt([[0], [1], [0], [0]])
    assert R.first_hit_ranks(query, gallery, _lt([[0]]), labels, _lt([1])).tolist() == [[0]]


def test_recall_at_k():
    ranks = _lt([0, 1, 4, 10])
    assert R.recall_at_k(ranks, (1, 2, 5, 10, 11)) == {1: 0.25, 2: 0.5, 5: 0.75, 10: 0.75, 11: 1.0}
    assert all(np.isnan(v) for v in R.recall_at_k(_lt([]), (1, 5)).values())


def _brute_force_ranks(query_feats, gallery_feats, targets, labels, exclude):
    """Per-row stable argsort of -sims (the obvious, slow definition)."""
    q = torch.nn.functional.normalize(query_feats.float(), dim=1)
    g = torch.nn.functional.normalize(gallery_feats.float(), dim=1)
    sims = q @ g.t()
    n_gallery = g.shape[0]
    out = torch.full(targets.shape, n_gallery, dtype=torch.long)
    for i in range(q.shape[0]):
        row = sims[i].clone()
        if exclude is not None and exclude[i] >= 0:
            row[exclude[i]] = float("-inf")
        order = torch.from_numpy(np.argsort(-row.numpy(), kind="stable"))
        for v in range(targets.shape[1]):
            hits = (labels[order, v] == targets[i, v]).nonzero()
            if len(hits):
                out[i, v] = hits[0, 0]
    return out


def _random_rank_problem(seed, ties):
    g = torch.Generator().manual_seed(seed)
    n_q, n_g, dim, n_views = 37, 53, 6, 3
    if ties:  # one-hot gallery rows: similarities are exact copies of query coordinates, so many exact ties
        gallery = torch.eye(dim)[torch.randint(dim, (n_g,), generator=g)]
        queries = torch.randint(0, 4, (n_q, dim), generator=g).float()
    else:
        gallery = torch.randn(n_g, dim, generator=g)
        queries = torch.randn(n_q, dim, generator=g)
    labels = torch.randint(0, 9, (n_g, n_views), generator=g)
    targets = torch.randint(0, 11, (n_q, n_views), generator=g)  # labels 9, 10 have no positive
    exclude = torch.randint(-1, n_g, (n_q,), generator=g)
    return queries, gallery, targets, labels, exclude


@pytest.mark.parametrize("ties", [False, True])
def test_chunked_equals_one_block_and_brute_force(ties):
    queries, gallery, targets, labels, exclude = _random_rank_problem(3, ties)
    expected = _brute_force_ranks(queries, gallery, targets, labels, exclude)
    assert (expected == labels.shape[0]).any() and (expected < 3).any()  # the data exercise both cases
    for chunk in (1, 53, 53 * 5 + 7, 10 ** 9):
        got = R.first_hit_ranks(queries, gallery, targets, labels, exclude, max_chunk_elems=chunk)
        assert torch.equal(got, expected), chunk
    got = R.first_hit_ranks(queries, gallery, targets, labels, None, max_chunk_elems=100)
    assert torch.equal(got, _brute_force_ranks(queries, gallery, targets, labels, None))


def test_top_k_ties_go_to_the_lower_index_and_the_excluded_item_is_left_out():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (2, 2)
    gallery = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # g0 and g1 tie for query 0
    scores, idx = R.top_k(query, gallery, 3)
    assert idx.tolist() == [[0, 1, 3], [2, 3, 0]]
    assert torch.allclose(scores[0], torch.tensor([1.0, 1.0, 2 ** -0.5]))
    scores, idx = R.top_k(query, gallery, 10, _lt([0, -1]))  # query 0 excludes g0: k is capped at G - 1
    assert idx.tolist() == [[1, 3, 2], [2, 3, 0]]
    assert R.top_k(query, gallery[:0], 5)[1].shape == (2, 0)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_agrees_with_first_hit_ranks(ties):
    """The rank first_hit_ranks gives each query's first hit is that item's position in top_k's full ranking."""
    queries, gallery, targets, labels, exclude = _random_rank_problem(3, ties)
    ranks = R.first_hit_ranks(queries, gallery, targets[:, :1], labels[:, :1], None)[:, 0]  # (Q,)
    _, order = R.top_k(queries, gallery, gallery.shape[0], max_chunk_elems=53)  # (Q, G)
    for q in range(queries.shape[0]):
        hits = (labels[order[q], 0] == targets[q, 0]).nonzero()
        assert int(ranks[q]) == (int(hits[0]) if len(hits) else gallery.shape[0])


def test_ranks_are_fp32_inside_an_autocast_region():
    """A caller's bf16 autocast must not reach the similarity (bf16 would merge close similarities into ties)."""
    g = torch.Generator().manual_seed(0)
    gallery = torch.randn(200, 64, generator=g)
    queries = gallery[:50] + 1e-3 * torch.randn(50, 64, generator=g)
    labels = torch.arange(200).unsqueeze(1)
    targets = torch.randint(0, 200, (50, 1), generator=g)
    expected = R.first_hit_ranks(queries, gallery, targets, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.first_hit_ranks(queries.bfloat16(), gallery, targets, labels)
    assert torch.equal(got, R.first_hit_ranks(queries.bfloat16().float(), gallery, targets, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.first_hit_ranks(queries, gallery, targets, labels)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------
# retrieval_metrics against the reference evaluation
# ----------------------------------------------------------------------------------------------------------------

def reference_similarities(query_feats, gallery_feats) -> np.ndarray:
    """The reference's similarities: numpy float32 rows normalised one by one, then a dot product."""
    all_queries = query_feats.numpy().astype(np.float32).copy()
    all_imgs = gallery_feats.numpy().astype(np.float32).copy()
    for i in range(all_queries.shape[0]):
        all_queries[i, :] /= np.linalg.norm(all_queries[i, :])
    for i in range(all_imgs.shape[0]):
        all_imgs[i, :] /= np.linalg.norm(all_imgs[i, :])
    return all_queries.dot(all_imgs.T)


def reference_test(query_feats, gallery_feats, gallery_captions, target_captions, sources, mitstates=True):
    """The reference ``test()`` from its computed features on: row-normalise, dot, source at -10e10, top 110."""
    sims = reference_similarities(query_feats, gallery_feats)
    if sources is not None:
        for i, source in enumerate(sources):
            sims[i, source] = -10e10
    nn_result = [np.argsort(-sims[i, :], kind="stable")[:110] for i in range(sims.shape[0])]
    nn_result = [[gallery_captions[j] for j in row] for row in nn_result]
    out = []
    for k in KS:
        hits = sum(target_captions[i] in row[:k] for i, row in enumerate(nn_result))
        out.append((f"recall_top{k}_correct_composition", hits / len(nn_result)))
        if mitstates:
            hits = sum(target_captions[i].split()[0] in [c.split()[0] for c in row[:k]]
                       for i, row in enumerate(nn_result))
            out.append((f"recall_top{k}_correct_adj", hits / len(nn_result)))
            hits = sum(target_captions[i].split()[1] in [c.split()[1] for c in row[:k]]
                       for i, row in enumerate(nn_result))
            out.append((f"recall_top{k}_correct_noun", hits / len(nn_result)))
    return OrderedDict(out)


def _mitstates_like(seed, n_gallery=130, n_queries=90, dim=12):
    rng = np.random.default_rng(seed)
    adjs, nouns = ["red", "old", "wet", "tiny"], ["cat", "car", "box", "tree", "pot"]
    captions = [f"{rng.choice(adjs)} {rng.choice(nouns)}" for _ in range(n_gallery)]
    gallery = torch.from_numpy(rng.standard_normal((n_gallery, dim)).astype(np.float32))
    sources = rng.integers(0, n_gallery, n_queries)
    # queries lie near their source image, as composed queries tend to: excluding the source matters
    queries = gallery[torch.from_numpy(sources)] + 0.8 * torch.from_numpy(
        rng.standard_normal((n_queries, dim)).astype(np.float32))
    targets = [captions[s] if i % 3 == 0 else f"{rng.choice(adjs)} {rng.choice(nouns)}"
               for i, s in enumerate(sources)]
    targets[0] = "dry sofa"  # a target with no gallery image at all
    return queries, gallery, captions, targets, [int(s) for s in sources]


def _mitstates_task(captions, targets, sources, exclude):
    views = lambda caps: {"composition": list(caps), "adj": [c.split()[0] for c in caps],  # noqa: E731
                          "noun": [c.split()[1] for c in caps]}
    n_gallery = len(captions)
    return RetrievalTask(image_keys=list(range(n_gallery)), gallery=list(range(n_gallery)),
                         query_source=list(sources), query_text=["x"] * len(sources),
                         gallery_labels=views(captions), query_targets=views(targets),
                         query_exclude=list(sources) if exclude else None)


@pytest.mark.parametrize("exclude", [True, False])
def test_metrics_match_reference_test(exclude):
    queries, gallery, captions, targets, sources = _mitstates_like(1)
    task = _mitstates_task(captions, targets, sources, exclude)
    got = R.retrieval_metrics(task, queries, gallery)
    expected = reference_test(queries, gallery, captions, targets, sources if exclude else None)
    assert list(got) == list(expected)  # names and order: top1 composition, top1 adj, top1 noun, top5 ...
    assert list(got)[:4] == ["recall_top1_correct_composition", "recall_top1_correct_adj",
                             "recall_top1_correct_noun", "recall_top5_correct_composition"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    assert 0.0 < got["recall_top1_correct_composition"] < got["recall_top100_correct_composition"] < 1.0


def test_exclusion_changes_the_metrics():
    """The data of the agreement test are sensitive to the exclusion (so that test can tell)."""
    queries, gallery, captions, targets, sources = _mitstates_like(1)
    with_excl = R.retrieval_metrics(_mitstates_task(captions, targets, sources, True), queries, gallery)
    without = R.retrieval_metrics(_mitstates_task(captions, targets, sources, False), queries, gallery)
    assert without["recall_top1_correct_composition"] > with_excl["recall_top1_correct_composition"]


def test_metrics_chunked_equals_one_block():
    queries, gallery, captions, targets, sources = _mitstates_like(2)
    task = _mitstates_task(captions, targets, sources, True)
    assert R.retrieval_metrics(task, queries, gallery, max_chunk_elems=1) == \
        R.retrieval_metrics(task, queries, gallery, max_chunk_elems=2 ** 40)


def reference_fiq(query_feats, gallery_feats, gallery_names, target_names, categories, cats, n_keep=50):
    """The reference ``fiq_test()`` from its features on, with the per-category counter reset for every k.

    The reference ranking keeps the first ``n_keep`` (50) distinct ids; duplicates of a name are dropped, the first
    occurrence kept.
    """
    sims = reference_similarities(query_feats, gallery_feats)
    nn_result = [np.argsort(-sims[i, :], kind="stable") for i in range(sims.shape[0])]
    nn_ids = [[gallery_names[j] for j in row] for row in nn_result]
    filtered = [list(OrderedDict.fromkeys(row))[:n_keep] for row in nn_ids]
    counts = {cat: sum(c == cat for c in categories) for cat in cats}
    out = []
    for k in KS:
        hits = {cat: 0.0 for cat in cats}  # reset for every k (the reference does not)
        for i, row in enumerate(filtered):
            if target_names[i] in row[:k]:
                hits[categories[i]] += 1
        for cat in cats:
            out.append((f"recall_top{k}_correct_{cat}", hits[cat] / counts[cat]))
    return OrderedDict(out)


def _fiq_like(seed, n_distinct=150, n_dup=40, n_queries=120, dim=10):
    rng = np.random.default_rng(seed)
    names = [f"img{i:03d}" for i in range(n_distinct)]
    distinct_feats = rng.standard_normal((n_distinct, dim)).astype(np.float32)
    # the reference gallery lists some images twice (same image -> same features)
    dup = list(rng.integers(0, n_distinct, n_dup))
    order = list(range(n_distinct)) + dup
    rng.shuffle(order)
    gallery_names = [names[i] for i in order]
    gallery_feats = torch.from_numpy(distinct_feats[order])
    targets = [names[i] for i in rng.integers(0, n_distinct, n_queries)]
    queries = torch.from_numpy(np.stack([distinct_feats[names.index(t)] for t in targets])
                               + 2.5 * rng.standard_normal((n_queries, dim)).astype(np.float32))
    cats = ["dress", "shirt", "toptee"]
    categories = [cats[i] for i in rng.integers(0, 3, n_queries)]
    return queries, gallery_feats, gallery_names, targets, categories, cats


def _dedup_task(gallery_feats, gallery_names, targets, categories, cats):
    first = list(OrderedDict((name, i) for i, name in reversed(list(enumerate(gallery_names)))).items())
    first.sort(key=lambda item: item[1])  # distinct names in order of first occurrence
    keep = [i for _, i in first]
    names = [gallery_names[i] for i in keep]
    task = RetrievalTask(image_keys=names, gallery=list(range(len(names))), query_source=[0] * len(targets),
                         query_text=["x"] * len(targets), gallery_labels={"id": names},
                         query_targets={"id": list(targets)}, query_exclude=None,
                         query_groups={cat: [c == cat for c in categories] for cat in cats})
    return task, gallery_feats[keep]


def test_grouped_metrics_match_reference_fiq():
    queries, gallery_feats, gallery_names, targets, categories, cats = _fiq_like(4)
    task, dedup_feats = _dedup_task(gallery_feats, gallery_names, targets, categories, cats)
    assert len(task.gallery) == 150 < len(gallery_names)
    got = R.retrieval_metrics(task, queries, dedup_feats)
    expected = reference_fiq(queries, gallery_feats, gallery_names, targets, categories, cats, n_keep=10 ** 9)
    assert list(got) == list(expected)
    assert list(got)[:4] == ["recall_top1_correct_dress", "recall_top1_correct_shirt", "recall_top1_correct_toptee",
                             "recall_top5_correct_dress"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    # recall is a fraction and grows with k (the reference's unreset counter broke both)
    for cat in cats:
        values = [got[f"recall_top{k}_correct_{cat}"] for k in KS]
        assert values == sorted(values) and 0.0 < values[0] and values[-1] <= 1.0
    # the reference's 50 kept ids: same numbers up to k = 50, its recall@100 is its recall@50; ours is larger
    ref50 = reference_fiq(queries, gallery_feats, gallery_names, targets, categories, cats, n_keep=50)
    for cat in cats:
        for k in (1, 5, 10, 50):
            assert got[f"recall_top{k}_correct_{cat}"] == pytest.approx(ref50[f"recall_top{k}_correct_{cat}"])
        assert ref50[f"recall_top100_correct_{cat}"] == ref50[f"recall_top50_correct_{cat}"]
        assert got[f"recall_top100_correct_{cat}"] > got[f"recall_top50_correct_{cat}"]


def test_grouped_metrics_need_one_view():
    queries, gallery, captions, targets, sources = _mitstates_like(1)
    task = _mitstates_task(captions, targets, sources, True)
    task.query_groups = {"a": [True] * len(sources)}
    with pytest.raises(ValueError, match="one label view"):
        R.retrieval_metrics(task, queries, gallery)


# ----------------------------------------------------------------------------------------------------------------
# evaluate() with a fake model and dataset
# ----------------------------------------------------------------------------------------------------------------

IMAGE_SIZE = 8
DIM = 16


class FakeModel(nn.Module):
    """Implements the evaluation API; the state is a (B, 2, D) map, so it differs from the (B, D) embedding."""

    def __init__(self, texts):
        super().__init__()
        self.encoder = nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, DIM)
        self.dropout = nn.Dropout(0.5)  # makes a forgotten model.eval() visible
        self.vocab = {t: i for i, t in enumerate(sorted(set(texts)))}
        self.text_table = nn.Embedding(len(self.vocab), DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.state_weight = 1.0
        self.n_encoded = 0
        self.seen = set()  # (training, inference mode, embedding dtype) at each image_features call

    def image_features(self, imgs):
        assert imgs.dtype == torch.uint8 and imgs.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        self.n_encoded += imgs.shape[0]
        x = imgs.flatten(1).float() / 255.0 - 0.5
        embedding = self.dropout(self.encoder(x))  # (B, D)
        self.seen.add((self.training, torch.is_inference_mode_enabled(), embedding.dtype))
        return embedding, torch.stack([embedding, 2.0 * embedding], dim=1)  # (B, D), (B, 2, D)

    def extract_text_feature(self, texts):
        ids = torch.tensor([self.vocab[t] for t in texts], device=self.text_table.weight.device)
        return self.text_table(ids)  # (B, D)

    def compose_img_text_features(self, state, text_features):
        return {"repres": self.state_weight * state.mean(dim=1) + self.mix(text_features)}  # (B, D)


class FakeDataset:
    def __init__(self, n_images, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.keys = [f"images/{i:02d}.jpg" for i in range(n_images)]
        self.images = {k: torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
                       for k in self.keys}
        self.loads = Counter()

    def load_image(self, key):
        self.loads[key] += 1
        return self.images[key]


def _fake_setup(seed=0):
    """15 images: 0..11 in the gallery (shuffled order), 12 and 13 only query sources, 14 unused."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dataset = FakeDataset(15, seed)
    gallery = [int(p) for p in rng.permutation(12)]
    captions = [f"c{i % 9}" for i in range(12)]  # duplicate labels in the gallery
    n_queries = 23
    sources = [12, 13] + [int(s) for s in rng.integers(0, 14, n_queries - 2)]
    texts = [f"t{i % 7}" for i in range(n_queries)]
    targets = [captions[int(i)] for i in rng.integers(0, 12, n_queries)]
    task = RetrievalTask(image_keys=list(dataset.keys), gallery=gallery, query_source=sources, query_text=texts,
                         gallery_labels={"composition": captions}, query_targets={"composition": targets},
                         query_exclude=[gallery.index(s) if s in gallery else -1 for s in sources])
    model = FakeModel(texts)
    return model, dataset, task


def _direct_features(model, dataset, task):
    """Features computed the obvious way: all images in one batch, eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        imgs = torch.stack([dataset.images[k] for k in task.image_keys])
        embedding, state = model.image_features(imgs)
        texts = model.extract_text_feature(task.query_text)
        queries = model.compose_img_text_features(state[task.query_source], texts)["repres"]
        gallery = embedding[task.gallery]
    model.train(was_training)
    return queries, gallery


def test_evaluate_loads_and_encodes_each_image_once_and_matches_direct(monkeypatch):
    model, dataset, task = _fake_setup()
    expected_queries, expected_gallery = _direct_features(model, dataset, task)
    model.train()
    model.dropout.eval()  # mixed modes must come back as they were
    model.n_encoded, model.seen = 0, set()

    captured = {}
    real_metrics = R.retrieval_metrics

    def capture(task_, query_feats, gallery_feats, **kwargs):
        captured["q"], captured["g"] = query_feats, gallery_feats
        return real_metrics(task_, query_feats, gallery_feats, **kwargs)

    def no_collectives(*args, **kwargs):
        raise AssertionError("single-process evaluation must not call torch.distributed collectives")

    monkeypatch.setattr(R, "retrieval_metrics", capture)
    for name in ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce"):
        monkeypatch.setattr(torch.distributed, name, no_collectives)
    metrics = R.evaluate(model, dataset, task, batch_size=4, progress=False)

    used = set(task.gallery) | set(task.query_source)
    assert dataset.loads == Counter({task.image_keys[p]: 1 for p in used})
    assert task.image_keys[14] not in dataset.loads
    assert model.n_encoded == len(used) == 14
    assert model.seen == {(False, True, torch.float32)}  # eval mode, inference mode, fp32
    assert model.training and model.encoder.training and not model.dropout.training
    assert captured["q"].dtype == captured["g"].dtype == torch.float32
    torch.testing.assert_close(captured["q"], expected_queries, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured["g"], expected_gallery, rtol=1e-5, atol=1e-6)
    assert metrics == real_metrics(task, expected_queries, expected_gallery)
    assert list(metrics) == [f"recall_top{k}_correct_composition" for k in KS]
    assert 0.0 < metrics["recall_top1_correct_composition"] < 1.0


def test_evaluate_restores_eval_mode_and_num_workers():
    model, dataset, task = _fake_setup(1)
    model.eval()
    first = R.evaluate(model, dataset, task, batch_size=5, progress=False)
    assert not model.training and not model.dropout.training
    again = R.evaluate(model, dataset, task, batch_size=32, progress=False, max_chunk_elems=1, num_workers=2)
    assert again == first


def _separated_setup():
    """Each query's text points at its target's embedding: the right gallery item wins by a wide margin."""
    model, dataset, task = _fake_setup(2)
    n_queries = len(task.query_source)
    captions = [f"item{i}" for i in range(len(task.gallery))]  # unique labels
    rng = np.random.default_rng(5)
    target_pos = [int(rng.choice([g for g in range(len(task.gallery)) if task.gallery[g] != s]))
                  for s in task.query_source]
    task.gallery_labels = {"composition": captions}
    task.query_targets = {"composition": [captions[g] for g in target_pos]}
    task.query_text = [f"q{i}" for i in range(n_queries)]
    model.vocab = {t: i for i, t in enumerate(task.query_text)}
    model.text_table = nn.Embedding(n_queries, DIM)
    _, gallery = _direct_features(model, dataset, task)
    with torch.no_grad():
        model.text_table.weight.copy_(3.0 * gallery[target_pos])
        model.mix.weight.copy_(torch.eye(DIM))
        model.mix.bias.zero_()
    model.state_weight = 0.1
    return model, dataset, task


def test_evaluate_amp_bf16_close_to_fp32():
    model, dataset, task = _separated_setup()
    fp32 = R.evaluate(model, dataset, task, batch_size=4, progress=False)
    assert {dtype for _, _, dtype in model.seen} == {torch.float32}
    assert fp32["recall_top1_correct_composition"] == 1.0
    model.seen = set()
    bf16 = R.evaluate(model, dataset, task, batch_size=4, progress=False, amp=True)
    assert {dtype for _, _, dtype in model.seen} == {torch.bfloat16}  # autocast was on
    assert list(bf16) == list(fp32)
    for name in fp32:
        assert bf16[name] == pytest.approx(fp32[name], abs=1e-6), name


# ----------------------------------------------------------------------------------------------------------------
# Distributed (2 processes, gloo, CPU)
# ----------------------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, dataset, task = _fake_setup(3)
        metrics = R.evaluate(model, dataset, task, batch_size=3, progress=False)
        torch.save({"metrics": dict(metrics), "loads": dict(dataset.loads), "n_encoded": model.n_encoded},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes_match_single_process(tmp_path):
    model, dataset, task = _fake_setup(3)
    single = R.evaluate(model, dataset, task, batch_size=3, progress=False)
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["metrics"] == dict(single)
        assert 0 < result["n_encoded"] < model.n_encoded  # each rank encoded only its share
    loads = Counter(results[0]["loads"]) + Counter(results[1]["loads"])
    assert loads == dataset.loads  # together, every used image exactly once
    assert sum(results[0]["loads"].values()) + sum(results[1]["loads"].values()) == model.n_encoded == 14
