"""How fast and how right the gallery index's backends are on synthetic vectors (``measure_backend``).

    python index_bench.py --backends exact faiss --gallery_size 1000000 --dim 512 --index_dtype float16 \\
        --workdir /tmp/index_bench [--uniform] [--seed 0] [--threads 2]

prints one JSON line per backend. The gallery: ``N_CENTRES`` random unit centres, each vector a centre (drawn
uniformly) plus Gaussian noise of sigma 0.5/sqrt(dim) per coordinate, normalised; ``N_QUERIES`` queries drawn the
same way and not in the gallery; ``--uniform``: uniformly random unit vectors instead (the worst case for an
inverted file). The gallery is generated and written chunk by chunk (memory bounded; 10 M x 512 float16 is a
10 GB file, reused by later runs with the same settings), and the ground truth, a float32 exact top 10 of every
query, is computed from the float32 vectors as they are generated.

The query phase runs in a fresh process (``python index_bench.py --query_phase SPEC``) per backend, so its peak
resident size (``peak_rss_bytes``) is that backend's alone (with the ~0.5 GB that importing torch takes): one query at a time (p50, p95 of ``N_SINGLE`` queries after a
warm-up query), batches of 64 (p50 over the batches that cover all queries), and recall@10 of the batches'
results. Latency excludes query encoding (the queries are vectors).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Sequence

import numpy as np
import torch

import ann
from errors import UserInputError
from feature_store import SUFFIX, FeatureFile, FeatureWriter
from seeding import Stream, seeded_rng
from torch_functions import full_fp32_matmul

N_CENTRES = 1000
N_QUERIES = 1000
N_SINGLE = 200  # single queries timed
BATCH = 64
GEN_ROWS = 1 << 16  # rows generated, written and scored at a time
K = 10
KEYS = ("backend", "gallery_size", "build_s", "index_bytes", "peak_rss_bytes", "query_ms_p50", "query_ms_p95",
        "batch64_ms_p50", "recall_at_10")


def draw(rng: np.random.Generator, centres: np.ndarray, n: int, uniform: bool) -> np.ndarray:
    """``n`` unit vectors (n, dim) float32: a random centre plus N(0, (0.5/sqrt(dim))^2) noise, normalised; or
    uniformly random on the sphere when ``uniform``."""
    dim = centres.shape[1]
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if not uniform:
        x *= np.float32(0.5 / np.sqrt(dim))
        x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_gallery(workdir: str, gallery_size: int, dim: int, index_dtype: str, uniform: bool, seed: int) -> dict:
    """Writes (or finds, from an earlier call with the same settings) the gallery's feature file, the queries and
    their float32 exact top 10 in ``workdir``; returns ``{features, queries, truth, write_s, rows, dim, dtype}``
    (``write_s``: seconds spent writing rows, the exact backend's build)."""
    name = f"gallery-{gallery_size}x{dim}-{'uniform' if uniform else 'clustered'}-seed{seed}"
    meta_path = os.path.join(workdir, f"{name}-{index_dtype}.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    rng = seeded_rng(seed, Stream.INDEX_BENCH, 0)
    centres = draw(rng, np.zeros((0, dim), np.float32), N_CENTRES, True) if not uniform else np.zeros((0, dim))
    queries = draw(seeded_rng(seed, Stream.INDEX_BENCH, 1), centres, N_QUERIES, uniform)  # (Q, D)
    q = torch.from_numpy(queries)
    truth = ann.RunningTopK(N_QUERIES, K)
    meta = {"features": os.path.join(workdir, f"{name}.{SUFFIX[index_dtype]}"), "rows": gallery_size, "dim": dim,
            "dtype": index_dtype, "queries": os.path.join(workdir, f"{name}-queries.npy"),
            "truth": os.path.join(workdir, f"{name}-truth.npy"), "write_s": 0.0}
    gen = seeded_rng(seed, Stream.INDEX_BENCH, 2)
    with FeatureWriter(meta["features"], dim, index_dtype) as writer, full_fp32_matmul():
        for row in range(0, gallery_size, GEN_ROWS):
            x = draw(gen, centres, min(GEN_ROWS, gallery_size - row), uniform)  # (C, D)
            truth.add(q @ torch.from_numpy(x).t(), row)
            start = time.perf_counter()
            writer.append(x)
            meta["write_s"] += time.perf_counter() - start
        start = time.perf_counter()
        writer.sync()
        meta["write_s"] += time.perf_counter() - start
    np.save(meta["queries"], queries)
    np.save(meta["truth"], truth.ids.numpy())
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


def peak_rss_bytes() -> int:
    """The process's peak resident size: ``VmHWM`` of /proc/self/status, which belongs to the address space that
    ``execve`` made (``ru_maxrss`` survives ``execve`` on Linux, so a child started by a large parent reports at
    least the parent's size at the fork); ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _percentile(ms: Sequence[float], p: float) -> float:
    return round(float(np.percentile(np.asarray(ms), p)), 3) if len(ms) else float("nan")


def query_phase(spec: dict) -> dict:
    """The timed searches of one backend over the gallery ``spec`` describes (run in a fresh process): latency of
    single queries and batches of ``BATCH``, recall@10 against the ground truth, and the peak resident size."""
    ann.set_threads(int(spec.get("threads", 0)))
    features = FeatureFile(spec["features"], spec["rows"], spec["dim"], spec["dtype"])
    queries = torch.from_numpy(np.load(spec["queries"]))  # (Q, D)
    truth = np.load(spec["truth"])  # (Q, 10)
    index = ann.read_faiss(spec["faiss"]) if spec["backend"] == "faiss" else None

    def search(q: torch.Tensor) -> list[list[tuple[int, float]]]:
        return ann.search(spec["backend"], features, q, K, torch.full((q.shape[0],), -1), index, spec.get("nprobe", 1))

    search(queries[:1])  # warm-up: the page cache, the allocator
    single = []
    for i in range(min(int(spec.get("n_single", N_SINGLE)), len(queries))):
        start = time.perf_counter()
        search(queries[i:i + 1])
        single.append((time.perf_counter() - start) * 1000)
    batch, found = [], []
    for b in range(0, len(queries), BATCH):
        start = time.perf_counter()
        hits = search(queries[b:b + BATCH])
        batch.append((time.perf_counter() - start) * 1000)
        found += [len({g for g, _ in h} & set(t.tolist())) / K for h, t in zip(hits, truth[b:b + BATCH])]
    return {"query_ms_p50": _percentile(single, 50), "query_ms_p95": _percentile(single, 95),
            "batch64_ms_p50": _percentile(batch, 50), "recall_at_10": round(float(np.mean(found)), 4),
            "peak_rss_bytes": peak_rss_bytes()}


def measure_backend(backend: str, gallery_size: int, dim: int, index_dtype: str, uniform: bool, seed: int,
                    workdir: str, threads: int = 0, n_single: int = N_SINGLE, faiss_spec: str | None = None) -> dict:
    """One backend measured on the synthetic gallery (``make_gallery``): the index built on disk (``build_s``:
    writing the rows, plus the FAISS build for ``faiss``; ``index_bytes``: the feature file, plus the FAISS file),
    then ``query_phase`` in a fresh process. Returns ``KEYS`` and the settings (``dim``, ``index_dtype``,
    ``uniform``, ``threads``; for faiss its ``spec``, ``nprobe`` and the build's own held-out recall).
    ``faiss_spec``: another FAISS index factory string than ``ann.faiss_spec``'s."""
    if backend not in ann.BACKENDS:
        raise UserInputError(f"backend {backend!r} is not one of {', '.join(ann.BACKENDS)}")
    meta = make_gallery(workdir, gallery_size, dim, index_dtype, uniform, seed)
    spec = {**meta, "backend": backend, "threads": threads, "n_single": n_single}
    build_s, index_bytes, extra = meta["write_s"], os.path.getsize(meta["features"]), {}
    if backend == "faiss":
        ann.set_threads(threads)
        spec["faiss"] = meta["features"].rsplit(".", 1)[0] + ".faiss"
        with FeatureFile(meta["features"], meta["rows"], dim, index_dtype) as features:
            info = ann.build_faiss(features, spec["faiss"], seed=seed, log=lambda line: print(line, file=sys.stderr),
                                   spec=faiss_spec)
        spec["nprobe"] = info["nprobe"]
        build_s += info["build_s"]
        index_bytes += os.path.getsize(spec["faiss"])
        extra = {"spec": info["spec"], "nprobe": info["nprobe"], "build_recall_at_10": info["recall_at_10"]}
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--query_phase", json.dumps(spec)], cwd=here,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the query phase of {backend} failed:\n{done.stderr}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"backend": backend, "gallery_size": gallery_size, "build_s": round(build_s, 2),
            "index_bytes": index_bytes, **measured, "dim": dim, "index_dtype": index_dtype, "uniform": uniform,
            "threads": threads, **extra}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="index_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=list(ann.BACKENDS), choices=list(ann.BACKENDS))
    p.add_argument("--gallery_size", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--index_dtype", default="float16", choices=list(SUFFIX))
    p.add_argument("--uniform", action="store_true", help="uniformly random unit vectors (no clusters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0 = their defaults)")
    p.add_argument("--n_single", type=int, default=N_SINGLE, help="single queries timed")
    p.add_argument("--faiss_spec", default=None, help="FAISS index factory string (default: ann.faiss_spec's)")
    p.add_argument("--workdir", default="index_bench_data", help="folder for the generated gallery and indexes")
    p.add_argument("--query_phase", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: one JSON line per backend on stdout."""
    a = get_args_parser().parse_args(argv)
    if a.query_phase is not None:
        print(json.dumps(query_phase(json.loads(a.query_phase))))
        return 0
    if a.gallery_size < 1 or a.dim < 1 or a.n_single < 1:
        print("index_bench.py: error: --gallery_size, --dim and --n_single must be at least 1", file=sys.stderr)
        return 2
    for backend in a.backends:
        print(json.dumps(measure_backend(backend, a.gallery_size, a.dim, a.index_dtype, a.uniform, a.seed,
                                         a.workdir, a.threads, a.n_single, a.faiss_spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
