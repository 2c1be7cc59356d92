"""``--mode retrieve``: what ``retrieve.py`` does for one query once its model is built, timed."""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

import distributed
import factory
import retrieve
import seeding
import synthetic
import test_retrieval
from benchmarks.common import fill_preset, main_args, sync
from benchmarks.inputs import resolve_bert, synthetic_words
from errors import UserInputError

TIMES = ("index_load_s", "query_encode_s", "rank_s", "query_s")  # the medians reported, in this order


def _random_model(a: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, argparse.Namespace]:
    """``(model, args)``: the model of the flags with random weights (``factory.build_model``), in eval mode and
    without torch.compile, as ``retrieve.py`` builds a checkpoint's."""
    words = synthetic_words()
    bert_model = resolve_bert(a.bert_model, a.data_dir, words) if a.text == "bert" else a.bert_model
    args = main_args(a, a.data_dir, bert_model, "", a.device)
    args.compile = False  # an evaluation tool: not worth torch.compile's warm-up (factory.model_from_checkpoint)
    model, _, _ = factory.build_model(args, device, words)
    model.eval()
    return model, args


def _write_index(a: argparse.Namespace, args: argparse.Namespace) -> tuple[str, dict]:
    """Writes ``--gallery_size`` rows of seeded random features in ``retrieve.save_index``'s format; returns the
    index's path and the identity it was saved under."""
    index_path = os.path.join(a.data_dir, f"retrieve_index_{a.gallery_size}.pt")
    identity = {"checkpoint_sha256": "random", "image_size": a.image_size, "model": args.model}
    feats = torch.randn(a.gallery_size, args.image_embed_dim, generator=torch.Generator().manual_seed(a.seed))  # (G, D)
    files = [(f"images/{i:07d}.jpg", 1000 + i, 1_700_000_000_000_000_000 + i) for i in range(a.gallery_size)]
    retrieve.save_index(index_path, identity, files, test_retrieval.normalize_rows(feats))
    return index_path, identity


def _time_queries(a: argparse.Namespace, model: torch.nn.Module, index_path: str, identity: dict,
                  device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of ``--repeats`` queries after one untimed: reading the index, encoding the query,
    ranking it (``retrieve.rank``), and encoding + ranking together."""
    query_path = os.path.join(a.data_dir, "retrieve_query.jpg")
    rng = seeding.seeded_rng(a.seed)
    Image.fromarray(synthetic.render_synthetic_image("circle", "red", a.image_size, rng)).save(query_path)
    query = [{"path": query_path, "text": "", "image": query_path, "target": None}]
    times: dict[str, list[float]] = {key: [] for key in TIMES}
    texts = sorted(synthetic.SYNTHETIC_ADJECTIVES)
    for r in range(a.repeats + 1):
        # a text not seen before each time: the BERT encoder caches the texts it has encoded
        query[0]["text"] = f"{texts[r % len(texts)]} {texts[(r // len(texts) + 1) % len(texts)]}"
        t0 = time.perf_counter()
        index = retrieve.load_index(index_path, identity)
        gallery = index["features"].to(device)  # (G, D)
        t1 = time.perf_counter()
        _, query_feats, _ = retrieve.encode(model, a.image_size, [], query, batch_size=1, device=device,
                                            num_workers=0)
        sync(device)
        t2 = time.perf_counter()
        hits = retrieve.rank(query_feats.to(device), gallery, 10, torch.tensor([-1]))
        sync(device)
        t3 = time.perf_counter()
        if r:  # the first query is a warm-up
            for key, value in zip(TIMES, (t1 - t0, t2 - t1, t3 - t2, t3 - t1)):
                times[key].append(value)
        del index, gallery
    assert len(hits[0]) == 10 and a.repeats + 1 <= len(texts) ** 2
    return times


def retrieve_main(a: argparse.Namespace) -> dict:
    """--mode retrieve: what ``retrieve.py`` does for one query once its model is built, timed: reading the
    gallery index (``retrieve.load_index``, here ``--gallery_size`` rows of random features written in its format),
    encoding the query (JPEG decode, ``retrieve.encode`` = the evaluation's ``encode_task``) and ranking it
    (``retrieve.rank`` = ``test_retrieval.top_k``). The model has random weights (the cost is the same)."""
    if a.gallery_size < 1 or a.repeats < 1 or a.threads < 0:
        raise UserInputError("--gallery_size and --repeats must be >= 1, --threads >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.image_size = a.image_size or 224
    fill_preset(a, ("batch_size", "iters", "warmup", "workers"))
    device = distributed.pick_device(a.device)
    os.makedirs(a.data_dir, exist_ok=True)
    model, args = _random_model(a, device)
    index_path, identity = _write_index(a, args)
    times = _time_queries(a, model, index_path, identity, device)
    return {"mode": "retrieve", "gallery_size": a.gallery_size, "repeats": a.repeats,
            **{f"median_{k}": float(np.median(v)) for k, v in times.items()},
            "settings": {"model": args.model, "text_encoder": "bert" if args.use_bert else "lstm",
                         "bert_model": a.bert_model if args.use_bert else None, "image_size": a.image_size,
                         "feature_dim": args.image_embed_dim, "device": str(device),
                         "device_name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}}
