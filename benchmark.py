"""Training and evaluation throughput of this project's own code paths, on synthetic data in the MIT-States layout.

    python benchmark.py --size cpu                                    # tiny, < 1 min on a 2-core CPU
    python benchmark.py --size full --device cuda                     # the reference setup, plain fp32
    python benchmark.py --size full --device cuda --amp --channels_last --image_cache auto --workers 8
    python benchmark.py --size full --model tirg --text lstm --amp --channels_last --image_cache auto
    python benchmark.py --size cpu --profile /tmp/prof                # + torch.profiler trace and top-ops table
    python benchmark.py --mode retrieve --device cpu --threads 1       # one retrieve.py query, 100,000-row index

Prints ONE JSON object on stdout (everything else goes to stderr): steady-state training samples/s (after warm-up
iterations; timed with ``torch.cuda.synchronize`` on a GPU), evaluation queries/s (one full
``test_retrieval.evaluate`` of the synthetic test task, image features included), peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, ``ru_maxrss`` on the CPU) and every setting used.

Nothing here re-implements the project: the data is written by ``synthetic.generate_synthetic`` (with a process
pool: byte-identical files), read by ``datasets.build_datasets`` / ``EpochBatchSampler`` / ``collate_train``
(optionally through the decode-once ``image_cache``); the model and optimizer come from ``factory.build_model``, as
in main.py (flags parsed by ``main.get_args_parser`` + ``main.resolve_defaults``), every step is
``training.make_train_step``'s (``train_one_step``,
or ``CudaGraphStep`` with ``--cuda_graph``) and the evaluation is ``test_retrieval.evaluate``.

The reference measurement (original code, one H100) used 14,328 synthetic 128-px JPEGs: 3,528 test images with
17,640 queries and 10,800 training images. ``--size full`` writes 14,112 128-px JPEGs (9 training nouns, 3 test
nouns, 6 adjectives each, 196 images per class): the test split is the reference's exactly (3,528 images, 17,640
queries), the training split has 10,584 images (the generator has one ``images_per_class`` for all classes). Images
are resized to ``--image_size`` (224, the original's).

``--bert_model random-bert-base`` writes a randomly initialised BERT with bert-base's shape (transformers
``BertConfig()`` defaults: 12 layers, 768 wide, 12 heads, 3072 intermediate) and a WordPiece vocabulary of the
synthetic words into ``<data_dir>/`` and uses that folder: the compute of bert-base-uncased with no download
(``random-bert-tiny``: 2 layers, 128 wide, for tests). ``all-MiniLM-L6-v2`` and any local folder work as in main.py.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

import datasets
import distributed
import seeding
import synthetic
import factory
import main as main_module
import training
import test_retrieval

logger = logging.getLogger("benchmark")

# Reference measurements of the issue (original code, one H100, batch 32, 8 loader workers) and the ceiling
# (a ResNet-18 training step alone, bf16 autocast + channels_last), images/s per batch size.
REFERENCE = {"composeAE_bert_b32_samples_per_s": 169.0, "tirg_lstm_b32_samples_per_s": 234.0,
             "eval_queries_per_s": 329.0, "eval_queries": 17640, "eval_gallery": 3528, "images": 14328}
RESNET18_CEILING_IMAGES_PER_S = {32: 4859.0, 256: 11998.0}
TARGETS = {"composeAE_bert_b32_samples_per_s": 1700.0, "best_batch_fraction_of_ceiling": 0.70,
           "eval_queries_per_s": 10000.0}

# Sizes. A training sample is one (source, target) pair: two images through the ResNet.
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: 192 training / 96 test images (64-px JPEGs read at 32 px), 480 test queries
    "cpu": dict(jpeg_size=64, image_size=32, n_train_nouns=4, n_test_nouns=2, adjectives_per_noun=6,
                images_per_class=8, batch_size=16, iters=5, warmup=2, workers=0),
    # the reference: 14,112 JPEGs of 128 px (10,584 train; test 3,528 images / 17,640 queries); resized to 224
    "full": dict(jpeg_size=128, image_size=224, n_train_nouns=9, n_test_nouns=3, adjectives_per_noun=6,
                 images_per_class=196, batch_size=32, iters=100, warmup=32, workers=8),
}
RANDOM_BERTS = {
    "random-bert-base": {},  # transformers BertConfig() defaults = bert-base-uncased's shape
    "random-bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = dict(type=main_module.str2bool, nargs="?", const=True)  # `--amp`, `--amp True` and `--amp False` all work
    p.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="preset: data size, batch, iterations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", default="composeAE", help="composition model (main.py --model)")
    p.add_argument("--text", choices=["bert", "lstm"], default="bert", help="text encoder")
    p.add_argument("--bert_model", default="random-bert-base",
                   help="random-bert-base, random-bert-tiny, all-MiniLM-L6-v2 or a local BERT folder")
    p.add_argument("--loss", default="batch_based_classification",
                   help="base loss (the ComposeAE MIT-States command's)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch size [preset]")
    p.add_argument("--eval_batch_size", type=int, default=0, help="evaluation batch size; 0 = --batch_size (as main)")
    p.add_argument("--amp", default=False, help="bf16 autocast", **flag)
    p.add_argument("--channels_last", default=False, help="channels_last images and ResNet", **flag)
    p.add_argument("--image_cache", default="", help="decode-once uint8 cache folder; auto = <data_dir>/cache; '' off")
    p.add_argument("--workers", type=int, default=None, help="data loader processes [preset]")
    p.add_argument("--compile", default=False, help="torch.compile the image encoder (main.py --compile)", **flag)
    p.add_argument("--cudnn_benchmark", default=False, help="torch.backends.cudnn.benchmark (main.py --cudnn_benchmark)",
                   **flag)
    p.add_argument("--fuse_image_passes", default=False, help="one ResNet pass over query and target images "
                   "(main.py --fuse_image_passes)", **flag)
    p.add_argument("--cuda_graph", default=False, help="capture the training step as a CUDA graph (main.py "
                   "--cuda_graph)", **flag)
    p.add_argument("--allow_tf32", default=True, help="TF32 cuDNN on Ampere+ (main.py --allow_tf32)", **flag)
    p.add_argument("--graph_check", type=int, default=4, help="with --cuda_graph: after the timing, train this many "
                   "batches eagerly and through the graph from the same weights (dropout off) and report the "
                   "differences; 0 = skip")
    p.add_argument("--iters", type=int, default=None, help="timed training iterations [preset]")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations first [preset]")
    p.add_argument("--eval", default=True, help="time one full test_retrieval.evaluate of the test task", **flag)
    p.add_argument("--sync_check_steps", type=int, default=3,
                   help="CUDA: extra steps under torch.cuda.set_sync_debug_mode to count host syncs per step")
    p.add_argument("--image_size", type=int, default=None, help="image side after resize + crop [preset]")
    p.add_argument("--image_weights", default="none", help="ResNet-18 init (main.py --image_weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="data/benchmark", help="synthetic data, random BERT and caches live here")
    p.add_argument("--gen_workers", type=int, default=0, help="processes writing the synthetic JPEGs; 0 = all CPUs")
    p.add_argument("--profile", default="", metavar="DIR", help="torch.profiler trace + top-ops table of a few steps")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--prepare_only", default=False, help="write data, image cache and BERT; print paths", **flag)
    p.add_argument("--output", default="", help="also write the JSON to this file")
    p.add_argument("--ceiling", default=False, help="only time a bare ResNet-18 training step (bf16 autocast + "
                   "channels_last, random 224-px images) at batch 32 and 256: this machine's ceiling", **flag)
    p.add_argument("--report", default="", metavar="DIR",
                   help="print the markdown summary of the gpu_bench.sh results in DIR and exit")
    p.add_argument("--mode", choices=["train", "retrieve"], default="train",
                   help="train: training and evaluation throughput; retrieve: one retrieve.py query (encode + "
                        "ranking) against a --gallery_size index of random features")
    p.add_argument("--gallery_size", type=int, default=100000, help="--mode retrieve: rows of the index")
    p.add_argument("--repeats", type=int, default=5, help="--mode retrieve: timed queries (after one untimed)")
    p.add_argument("--threads", type=int, default=0, help="--mode retrieve: torch CPU threads (0 = torch's default)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Data
def synthetic_params(preset: dict, seed: int) -> dict:
    return dict(seed=seed, image_size=preset["jpeg_size"], n_train_nouns=preset["n_train_nouns"],
                n_test_nouns=preset["n_test_nouns"], adjectives_per_noun=preset["adjectives_per_noun"],
                images_per_class=preset["images_per_class"])


def synthetic_path(data_dir: str, params: dict) -> str:
    p = params
    return os.path.join(data_dir, f"synthetic-{p['n_train_nouns']}x{p['n_test_nouns']}x{p['adjectives_per_noun']}"
                                  f"x{p['images_per_class']}-{p['image_size']}px-seed{p['seed']}")


# ----------------------------------------------------------------------------------------------------------------
# A random BERT with bert-base's compute
def synthetic_words() -> list[str]:
    words = set(synthetic.SYNTHETIC_ADJECTIVES) | set(synthetic.SYNTHETIC_TRAIN_NOUNS) | set(synthetic.SYNTHETIC_TEST_NOUNS)
    return sorted(words)


def _wordpiece_tokenizer(cls, vocab_file: str, vocab: Sequence[str]):
    """A lower-casing WordPiece tokenizer over ``vocab_file`` whatever the transformers version: 4.x takes
    ``vocab_file=``, 5.x takes ``vocab=`` (and silently ignores ``vocab_file``, leaving only the special tokens)."""
    tries = (lambda: cls.from_pretrained(os.path.dirname(vocab_file), do_lower_case=True),
             lambda: cls(vocab=vocab_file, do_lower_case=True),
             lambda: cls(vocab_file=vocab_file, do_lower_case=True))
    for make in tries:
        try:
            tok = make()
        except (OSError, TypeError, ValueError):
            continue
        ids = [tok.convert_tokens_to_ids(w) for w in vocab[5:]]
        if len(tok) == len(vocab) and tok.unk_token_id not in ids:
            return tok
    raise RuntimeError(f"cannot build a WordPiece tokenizer over {vocab_file} with this transformers version")


def make_random_bert(parent: str, kind: str = "random-bert-base", words: Sequence[str] = (), seed: int = 0) -> str:
    """Writes (once) a randomly initialised BertModel of the ``kind`` shape with a WordPiece vocabulary holding
    ``words`` to ``<parent>/<kind>-<hash>`` and returns that folder (config.json, weights, tokenizer files)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.lower() for w in words} - {""})
    shape = RANDOM_BERTS[kind]
    key = hashlib.sha1(json.dumps([vocab, shape, seed]).encode()).hexdigest()[:12]
    path = os.path.join(parent, f"{kind}-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=parent)
    try:
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(vocab) + "\n")
        _wordpiece_tokenizer(BertTokenizerFast, vocab_file, vocab).save_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            BertModel(BertConfig(vocab_size=len(vocab), **shape)).save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # written meanwhile by another process
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_bert(name: str, data_dir: str, texts: Sequence[str]) -> str:
    if name in RANDOM_BERTS:
        return os.path.abspath(make_random_bert(data_dir, name, synthetic_words() + [w for t in texts for w in t.split()]))
    return name


# ----------------------------------------------------------------------------------------------------------------
# The run
def main_args(a: argparse.Namespace, data_path: str, bert_model: str, image_cache: str, device: str) -> argparse.Namespace:
    """main.py's flags for this benchmark, parsed and completed by main.py itself."""
    argv = ["--dataset", "mitstates", "--dataset_path", data_path, "--model", a.model,
            "--use_bert", str(a.text == "bert"), "--bert_model", bert_model, "--loss", a.loss,
            "--batch_size", str(a.batch_size), "--eval_batch_size", str(a.eval_batch_size),
            "--loader_num_workers", str(a.workers), "--image_size", str(a.image_size),
            "--image_weights", a.image_weights, "--amp", str(a.amp), "--channels_last", str(a.channels_last),
            "--image_cache", image_cache, "--compile", str(a.compile), "--seed", str(a.seed), "--device", device,
            "--fuse_image_passes", str(a.fuse_image_passes), "--cuda_graph", str(a.cuda_graph),
            "--num_iters", str(a.warmup + a.iters + max(a.profile_steps + 1, a.sync_check_steps) + 2),
            "--weight_decay", "5e-5", "--log_dir", os.path.join(a.data_dir, "logs"),
            "--cudnn_benchmark", str(a.cudnn_benchmark), "--allow_tf32", str(a.allow_tf32)]
    return main_module.resolve_defaults(main_module.get_args_parser().parse_args(argv))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss"


def endless_batches(loader, sampler) -> Iterator[dict]:
    """The training loader over consecutive epochs, as main.train walks it (batches of < 2 items skipped)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            if len(batch["text"]) >= 2:
                yield batch
        epoch += 1


def profile_steps(step, n: int, folder: str, device: torch.device) -> dict:
    """torch.profiler over ``n`` steps (after one warm-up step): a chrome trace, a key_averages table (stderr and
    top_ops.txt) and a summary of the time split."""
    from torch.profiler import ProfilerActivity, profile, record_function

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step(None)  # warm-up, outside the trace
    sync(device)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(n):
            step(record_function)
        sync(device)
    raw = os.path.join(folder, "trace.json")
    prof.export_chrome_trace(raw)
    trace = raw + ".gz"  # a few MB of JSON per step on a GPU; Perfetto opens the .gz as it is
    import gzip

    with open(raw, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    events = prof.key_averages()
    dev = device.type == "cuda"
    table = ""
    for sort_key in (("self_device_time_total", "self_cuda_time_total") if dev else ("self_cpu_time_total",)):
        try:  # the device column was called cuda before torch 2.4
            table = events.table(sort_by=sort_key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    with open(os.path.join(folder, "top_ops.txt"), "w") as f:
        f.write(table)
    print(table, file=sys.stderr)

    def self_dev(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    def total_dev(e) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) or 0.0)

    rows = sorted(events, key=(self_dev if dev else (lambda e: e.self_cpu_time_total)), reverse=True)
    top = [{"name": e.key, "calls_per_step": e.count / n, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
            **({"self_device_ms_per_step": self_dev(e) / 1e3 / n} if dev else {})}
           for e in rows[:15]]
    regions = {}
    for e in events:
        if e.key.startswith("benchmark/") or e.key.startswith("Optimizer.step"):
            regions[e.key] = {"cpu_ms_per_step": e.cpu_time_total / 1e3 / n,
                              **({"device_ms_per_step": total_dev(e) / 1e3 / n} if dev else {})}
    return {"trace": os.path.abspath(trace), "table": os.path.abspath(os.path.join(folder, "top_ops.txt")),
            "steps": n, "regions": regions, "top_ops": top}


def count_host_syncs(step, n: int) -> float:
    """Host-device synchronisations per training step, counted with torch.cuda.set_sync_debug_mode('warn')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step(None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return len(hits) / max(n, 1)


# Ops that only make a new view of a tensor: no kernel runs for them.
_VIEW_OPS = ("view", "_unsafe_view", "t", "detach", "expand", "slice", "select", "unsqueeze", "squeeze",
             "transpose", "permute", "alias", "as_strided", "reshape", "flatten", "unbind", "split")


def count_dispatched_ops(step: Callable[[], Any]) -> dict[str, Any]:
    """The PyTorch ops that one training step dispatches from Python, views left out: each is at least one kernel
    launch on a GPU (the host cost that bounds a small-batch step). A CUDA graph replay dispatches none of the
    ops it captured, so with --cuda_graph on a GPU only the work outside the graph is counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS:
                self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        step()
    top = sorted(counter.counts.items(), key=lambda kv: -kv[1])[:12]
    return {"ops_per_step": sum(counter.counts.values()), "top_ops": dict(top)}


def graph_vs_eager(args: argparse.Namespace, texts: Sequence[str], batches: Sequence[dict], device: torch.device,
                   warmup: int = 2) -> dict[str, Any]:
    """The same batches through ``training.train_one_step`` twice and through a ``training.CudaGraphStep`` once, from the
    same weights, with dropout off (its masks come from other streams of numbers in the two paths) and
    deterministic cuDNN. Returns the largest differences, graph against eager, of the total loss per step and of any
    weight or buffer relative to its largest entry; the second eager run gives the run-to-run noise of the same.

    Keep ``batches`` short: in this small problem a difference of one rounding grows ~100x per step."""
    runs = []
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for step_fn in (training.train_one_step, training.train_one_step, training.CudaGraphStep(warmup)):
            model, optimizer, scheduler = factory.build_model(args, device, texts)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            model.train()
            losses = torch.stack([step_fn(model, b, optimizer, scheduler, args, device)["total training loss"]
                                  for b in batches]).cpu()
            runs.append((model.state_dict(), losses, step_fn))
    finally:
        torch.backends.cudnn.deterministic = deterministic
    (eager, eager_losses, _), (again, again_losses, _), (graphed, graph_losses, step) = runs

    def rel(other: dict) -> dict[str, float]:
        return {name: float((other[name].double() - x.double()).abs().max() / x.double().abs().max().clamp_min(1e-12))
                for name, x in eager.items() if x.is_floating_point() and x.numel()}

    graph_rel, noise_rel = rel(graphed), rel(again)
    worst = max(graph_rel, key=graph_rel.get)
    return {"steps": len(batches), "warmup": warmup, "captures": step.captures,
            "loss_max_abs_diff": float((graph_losses - eager_losses).abs().max()),
            "eager_losses": eager_losses.tolist(), "graph_losses": graph_losses.tolist(),
            "weights_max_rel_diff": graph_rel[worst], "worst_tensor": worst,
            "eager_noise_loss_max_abs_diff": float((again_losses - eager_losses).abs().max()),
            "eager_noise_weights_max_rel_diff": max(noise_rel.values()),
            "int_buffers_equal": all(torch.equal(graphed[k], x) for k, x in eager.items() if not x.is_floating_point())}


@contextlib.contextmanager
def _survive(result: dict, key: str) -> Iterator[None]:
    """Runs a measurement that is not the main one: an exception is logged and kept under ``result[key]``."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (any failure of a diagnostic)
        logger.exception("%s failed", key)
        result[key] = f"{type(exc).__name__}: {exc}"[:500]


def run(a: argparse.Namespace) -> dict:
    preset = PRESETS[a.size]
    for key in ("batch_size", "iters", "warmup", "workers", "image_size"):
        if getattr(a, key) is None:
            setattr(a, key, preset[key])
    if a.eval_batch_size <= 0:
        a.eval_batch_size = a.batch_size
    if min(a.batch_size, a.iters, a.image_size) < 1 or a.warmup < 0 or a.workers < 0:
        raise main_module.UserInputError("--batch_size, --iters and --image_size must be >= 1, --warmup and "
                                         "--workers >= 0")
    device = distributed.pick_device(a.device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    params = synthetic_params(preset, a.seed)
    data_path = synthetic_path(a.data_dir, params)
    synthetic.generate_synthetic(data_path, num_workers=a.gen_workers or os.cpu_count() or 1, **params)
    timings["data_s"] = time.perf_counter() - t0

    image_cache = os.path.join(a.data_dir, "cache") if a.image_cache == "auto" else a.image_cache
    # the texts, for the random BERT's vocabulary: read without building a cache
    texts = datasets.MITStates(data_path, "train", image_size=a.image_size).get_all_texts()
    t0 = time.perf_counter()
    bert_model = resolve_bert(a.bert_model, a.data_dir, texts) if a.text == "bert" else a.bert_model
    timings["bert_write_s"] = time.perf_counter() - t0
    args = main_args(a, data_path, bert_model, image_cache, a.device)

    # -- factory's wiring, as main.run_main's factory.build_experiment, in two timed parts
    t0 = time.perf_counter()
    trainset, testset = factory.build_datasets(args)
    timings["datasets_s"] = time.perf_counter() - t0  # includes building the image cache the first time
    task = testset.test_task()
    data_info = {"path": os.path.abspath(data_path), "jpeg_size": params["image_size"], "train_images": len(trainset),
                 "test_images": len(testset), "test_queries": len(task.query_source),
                 **{k: v for k, v in params.items() if k != "image_size"}}  # image_size: the JPEGs' = jpeg_size
    settings = {
        "size": a.size, "model": args.model, "text_encoder": "bert" if args.use_bert else "lstm",
        "bert_model": a.bert_model if args.use_bert else None, "bert_path": bert_model if args.use_bert else None,
        "loss": args.loss, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "image_size": args.image_size, "amp": args.amp, "channels_last": args.channels_last,
        "image_cache": os.path.abspath(image_cache) if image_cache else "", "workers": args.loader_num_workers,
        "pin_memory": device.type == "cuda", "persistent_workers": args.loader_num_workers > 0,
        "compile": args.compile, "fuse_image_passes": args.fuse_image_passes, "cuda_graph": args.cuda_graph,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "image_weights": args.image_weights, "seed": args.seed, "warmup_iters": a.warmup, "timed_iters": a.iters,
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    if a.prepare_only:
        return {"prepared": True, "data": data_info, "settings": settings, "timings_s": timings}

    t0 = time.perf_counter()
    model, optimizer, scheduler = factory.build_model(args, device, trainset.get_all_texts())
    settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    timings["model_s"] = time.perf_counter() - t0
    if getattr(model, "bert", None) is not None:
        # Steady state: a long run has met every text, and the frozen BERT encodes each distinct text once
        # (text_model.BertTextEncoder caches them). MIT-States query texts are the target's adjective, or its
        # whole caption with use_complete_text_query.
        t0 = time.perf_counter()
        captions = trainset.get_all_texts()
        texts = [c if args.use_complete_text_query else c.split()[0] for c in captions] + list(task.query_text)
        model.bert.cache_texts(texts)
        sync(device)
        timings["bert_prefill_s"] = time.perf_counter() - t0
        settings["bert_texts_cached"] = len(set(texts))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- as main.train (one process)
    sampler = datasets.EpochBatchSampler(trainset, args.batch_size, args.seed)
    if len(sampler) == 0:
        raise main_module.UserInputError(f"{data_path}: {len(trainset)} training items, fewer than --batch_size "
                                         f"{args.batch_size}; lower --batch_size")
    loader = training.make_train_loader(args, trainset, sampler, device)
    batches = endless_batches(loader, sampler)
    train_step = training.make_train_step(args)  # training.train_one_step, or a CudaGraphStep with --cuda_graph
    model.train()
    last: dict = {}

    def step(record_function=None) -> int:
        ctx = record_function("benchmark/next_batch") if record_function else contextlib.nullcontext()
        with ctx:
            batch = next(batches)
        ctx = record_function("benchmark/train_one_step") if record_function else contextlib.nullcontext()
        with ctx:
            last["terms"] = train_step(model, batch, optimizer, scheduler, args, device)
        return len(batch["text"])

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync(device)
    timings["warmup_s"] = time.perf_counter() - t0
    samples, data_wait = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(a.iters):
        t = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t
        last["terms"] = train_step(model, batch, optimizer, scheduler, args, device)
        samples += len(batch["text"])
    sync(device)
    train_s = time.perf_counter() - t0
    loss = float(last["terms"]["total training loss"])
    train_peak, mem_kind = peak_memory(device)

    result: dict[str, Any] = {
        "train_samples_per_s": samples / train_s, "train_images_per_s": 2 * samples / train_s,
        "train_step_ms": 1e3 * train_s / a.iters, "train_seconds": train_s, "train_samples": samples,
        "data_wait_fraction": data_wait / train_s, "final_loss": loss, "loss_finite": math.isfinite(loss),
    }
    result["host_syncs_per_step"] = None
    with _survive(result, "dispatched_ops_error"):
        batch = next(batches)  # fetched first: the count is the training step's alone
        result["dispatched_ops"] = count_dispatched_ops(
            lambda: train_step(model, batch, optimizer, scheduler, args, device))
    if device.type == "cuda" and a.sync_check_steps > 0:
        with _survive(result, "host_syncs_error"):  # a diagnostic: its failure must not lose the numbers
            result["host_syncs_per_step"] = count_host_syncs(step, a.sync_check_steps)
    if a.profile:
        with _survive(result, "profile_error"):
            result["profile"] = profile_steps(step, a.profile_steps, a.profile, device)
    if a.cuda_graph and a.graph_check > 0:
        with _survive(result, "graph_check_error"):
            result["graph_check"] = graph_vs_eager(args, trainset.get_all_texts(),
                                                   [next(batches) for _ in range(a.graph_check)], device)

    result.update({"eval_queries_per_s": None, "eval_seconds": None})
    if a.eval:
        with _survive(result, "eval_error"):
            sync(device)
            t0 = time.perf_counter()
            metrics = test_retrieval.evaluate(model, testset, task, batch_size=args.eval_batch_size, device=device,
                                              num_workers=args.loader_num_workers, amp=args.amp,
                                              desc="benchmark eval", progress=False)
            sync(device)
            eval_s = time.perf_counter() - t0
            result.update({"eval_queries_per_s": len(task.query_source) / eval_s, "eval_seconds": eval_s,
                           "eval_queries": len(task.query_source), "eval_gallery": len(task.gallery),
                           "eval_recall": {k: v for k, v in metrics.items()
                                           if k.startswith(("recall_top1_", "recall_top10_"))}})
    peak, mem_kind = peak_memory(device)
    result.update({"peak_memory_bytes": peak, "peak_memory_train_bytes": train_peak, "peak_memory_kind": mem_kind,
                   "peak_memory_gib": peak / 2 ** 30})
    ceiling = RESNET18_CEILING_IMAGES_PER_S.get(args.batch_size)
    result["ceiling_samples_per_s"] = ceiling / 2 if (ceiling and device.type == "cuda") else None
    result["fraction_of_ceiling"] = (result["train_samples_per_s"] / result["ceiling_samples_per_s"]
                                     if result["ceiling_samples_per_s"] else None)
    result.update({"settings": settings, "data": data_info, "timings_s": timings})
    return result


def resnet18_ceiling(device: torch.device, batch_sizes: Sequence[int] = (32, 256), iters: int = 30, warmup: int = 10,
                     image_size: int = 224) -> dict:
    """Images/s of a bare torchvision ResNet-18 training step (bf16 autocast, channels_last, SGD with momentum) on
    random images: the issue's ceiling, measured on this machine."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    out = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (bs,), device=device)

        def step() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        out[str(bs)] = bs * iters / (time.perf_counter() - t0)
    return {"ceiling_images_per_s": out, "issue_ceiling_images_per_s": {str(k): v for k, v in
                                                                      RESNET18_CEILING_IMAGES_PER_S.items()},
            "settings": {"device": str(device), "torch_version": torch.__version__, "image_size": image_size,
                         "iters": iters, "warmup": warmup,
                         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}


def ceiling_main(a: argparse.Namespace) -> dict:
    """--ceiling: batch 32 and 256 at 224 px, 30 timed steps after 10, unless the flags say otherwise."""
    sizes = (a.batch_size,) if a.batch_size else tuple(RESNET18_CEILING_IMAGES_PER_S)
    return resnet18_ceiling(distributed.pick_device(a.device), sizes, iters=a.iters or 30,
                            warmup=10 if a.warmup is None else a.warmup, image_size=a.image_size or 224)


def retrieve_main(a: argparse.Namespace) -> dict:
    """--mode retrieve: what ``retrieve.py`` does for one query once its model is built, timed: reading the
    gallery index (``retrieve.load_index``, here ``--gallery_size`` rows of random features written in its format),
    encoding the query (JPEG decode, ``retrieve.encode`` = the evaluation's ``encode_task``) and ranking it
    (``retrieve.rank`` = ``test_retrieval.top_k``). The model has random weights (the cost is the same)."""
    import numpy as np
    from PIL import Image

    import retrieve

    if a.gallery_size < 1 or a.repeats < 1 or a.threads < 0:
        raise main_module.UserInputError("--gallery_size and --repeats must be >= 1, --threads >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.image_size = a.image_size or 224
    for key in ("batch_size", "iters", "warmup", "workers"):
        if getattr(a, key) is None:
            setattr(a, key, PRESETS[a.size][key])
    device = distributed.pick_device(a.device)
    os.makedirs(a.data_dir, exist_ok=True)
    words = synthetic_words()
    bert_model = resolve_bert(a.bert_model, a.data_dir, words) if a.text == "bert" else a.bert_model
    args = main_args(a, a.data_dir, bert_model, "", a.device)
    torch.manual_seed(a.seed)
    model, _, _ = factory.create_model_and_optimizer(args, words)
    model.to(device).eval()
    query_path = os.path.join(a.data_dir, "retrieve_query.jpg")
    rng = seeding.seeded_rng(a.seed)
    Image.fromarray(synthetic.render_synthetic_image("circle", "red", a.image_size, rng)).save(query_path)
    query = [{"path": query_path, "text": "", "image": query_path, "target": None}]

    index_path = os.path.join(a.data_dir, f"retrieve_index_{a.gallery_size}.pt")
    identity = {"checkpoint_sha256": "random", "image_size": a.image_size, "model": args.model}
    feats = torch.randn(a.gallery_size, args.image_embed_dim, generator=torch.Generator().manual_seed(a.seed))
    files = [(f"images/{i:07d}.jpg", 1000 + i, 1_700_000_000_000_000_000 + i) for i in range(a.gallery_size)]
    retrieve.save_index(index_path, identity, files, test_retrieval.normalize_rows(feats))
    del feats

    times: dict[str, list[float]] = {"index_load_s": [], "query_encode_s": [], "rank_s": [], "query_s": []}
    texts = sorted(synthetic.SYNTHETIC_ADJECTIVES)
    for r in range(a.repeats + 1):
        # a text not seen before each time: the BERT encoder caches the texts it has encoded
        query[0]["text"] = f"{texts[r % len(texts)]} {texts[(r // len(texts) + 1) % len(texts)]}"
        t0 = time.perf_counter()
        index = retrieve.load_index(index_path, identity)
        gallery = index["features"].to(device)
        t1 = time.perf_counter()
        _, query_feats, _ = retrieve.encode(model, a.image_size, [], query, batch_size=1, device=device,
                                            num_workers=0)
        sync(device)
        t2 = time.perf_counter()
        hits = retrieve.rank(query_feats.to(device), gallery, 10, torch.tensor([-1]))
        sync(device)
        t3 = time.perf_counter()
        if r:  # the first query is a warm-up
            for key, value in (("index_load_s", t1 - t0), ("query_encode_s", t2 - t1), ("rank_s", t3 - t2),
                               ("query_s", t3 - t1)):
                times[key].append(value)
        del index, gallery
    assert len(hits[0]) == 10 and a.repeats + 1 <= len(texts) ** 2
    return {"mode": "retrieve", "gallery_size": a.gallery_size, "repeats": a.repeats,
            **{f"median_{k}": float(np.median(v)) for k, v in times.items()},
            "settings": {"model": args.model, "text_encoder": "bert" if args.use_bert else "lstm",
                         "bert_model": a.bert_model if args.use_bert else None, "image_size": a.image_size,
                         "feature_dim": args.image_embed_dim, "device": str(device),
                         "device_name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}}


# ----------------------------------------------------------------------------------------------------------------
# Summary of a tools/gpu_bench.sh output folder
BENCH_ROWS = [  # file stem, label, reference key, target
    ("bench_a", "(a) ComposeAE+BERT-base b32, fp32, no cache (baseline of this code)",
     "composeAE_bert_b32_samples_per_s", None),
    ("bench_b", "(b) ComposeAE+BERT-base b32, fast", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_g", "(g) = (b) + --cuda_graph", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_h", "(h) = (g) + --fuse_image_passes", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_c", "(c) ComposeAE+BERT-base large batch, fast", None,
     (">= 70% of ceiling", lambda r: (r.get("fraction_of_ceiling") or 0) >= TARGETS["best_batch_fraction_of_ceiling"])),
    ("bench_d", "(d) TIRG+LSTM b32, fast", "tirg_lstm_b32_samples_per_s", None),
    ("bench_b_cudnn", "(b2) = (b) + cudnn.benchmark", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_f", "(f) = (b) + compile", "composeAE_bert_b32_samples_per_s", None),
]
OPTIONAL_ROWS = ("bench_b_cudnn", "bench_f")


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def _step_status(out_dir: str) -> dict[str, str]:
    status = {}
    try:
        with open(os.path.join(out_dir, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    status[parts[0]] = f"{parts[1]} ({parts[2]} s)"
    except OSError:
        pass
    return status


def _recall_metrics(out_dir: str, tag: str) -> dict | None:
    import glob

    files = sorted(glob.glob(os.path.join(out_dir, "runs", f"*{tag}", "metrics.json")))
    data = _load(files[-1]) if files else None
    return data.get("latest") if data else None


def summarize(out_dir: str) -> str:
    """Markdown tables of the benchmark JSONs and the recall runs that tools/gpu_bench.sh left in ``out_dir``."""
    status = _step_status(out_dir)
    lines = ["| config | train samples/s | step ms | % of ceiling | eval queries/s | peak mem GiB | reference | "
             "x reference | target | host syncs/step | data wait | step status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for stem, label, ref_key, target in BENCH_ROWS:
        r = _load(os.path.join(out_dir, stem + ".json"))
        results[stem] = r
        st = status.get(stem, "not run")
        if r is None or "train_samples_per_s" not in r:
            if stem in OPTIONAL_ROWS and stem not in status:
                continue
            lines.append(f"| {label} | — | — | — | — | — | {_fmt(REFERENCE.get(ref_key)) if ref_key else '—'} | — | "
                         f"{target[0] if target else '—'} | — | — | {st} |")
            continue
        s = r["settings"]
        errors = [f"{k}: {v[:80]}" for k, v in r.items() if k.endswith("_error")]
        st = "; ".join([st] + errors)
        ref = REFERENCE.get(ref_key) if ref_key else None
        met = "—" if not target else f"{target[0]}: {'yes' if target[1](r) else 'NO'}"
        frac = r.get("fraction_of_ceiling")
        lines.append(
            f"| {label} [b{s['batch_size']}, amp={s['amp']}, cl={s['channels_last']}, cache={'on' if s['image_cache'] else 'off'}, "
            f"w={s['workers']}, compile={s['compile']}, graph={s.get('cuda_graph', False)}, "
            f"fuse={s.get('fuse_image_passes', False)}] | {_fmt(r['train_samples_per_s'])} | {_fmt(r['train_step_ms'], 1)} | "
            f"{_fmt(100 * frac, 0) + '%' if frac else '—'} | {_fmt(r.get('eval_queries_per_s'))} | "
            f"{_fmt(r['peak_memory_gib'], 2)} | {_fmt(ref)} | {_fmt(r['train_samples_per_s'] / ref, 1) + 'x' if ref else '—'} | "
            f"{met} | {_fmt(r.get('host_syncs_per_step'), 1)} | {_fmt(100 * r.get('data_wait_fraction', 0), 0)}% | {st} |")
    evals = [(r["eval_queries_per_s"], stem) for stem, r in results.items() if r and r.get("eval_queries_per_s")]
    if evals:
        best, stem = max(evals)
        base = results.get("bench_a") or {}
        lines.append(f"| (e) evaluation, best of the runs above ({stem}, eval batch "
                     f"{results[stem]['settings']['eval_batch_size']}; baseline (a): "
                     f"{_fmt(base.get('eval_queries_per_s'))} q/s) | — | — | — | {_fmt(best)} | — | "
                     f"{_fmt(REFERENCE['eval_queries_per_s'])} | {_fmt(best / REFERENCE['eval_queries_per_s'], 1)}x | "
                     f">= 10,000: {'yes' if best >= TARGETS['eval_queries_per_s'] else 'NO'} | — | — | — |")
    any_r = next((r for r in results.values() if r), None)
    if any_r:
        s, d = any_r["settings"], any_r["data"]
        lines += ["", f"Device: {s['device_name']}, torch {s['torch_version']} (CUDA {s['cuda_version']}), "
                      f"{s['cpu_count']} CPUs. Data: {d['train_images']} training + {d['test_images']} test images "
                      f"({d['jpeg_size']} px JPEGs, resized to {s['image_size']}), {d['test_queries']} test queries. "
                      f"Reference (original code, H100): ComposeAE+BERT 169, TIRG+LSTM 234 samples/s, eval 329 q/s. "
                      f"Ceiling (ResNet-18 step, bf16+channels_last): 2 images per sample -> "
                      f"{RESNET18_CEILING_IMAGES_PER_S[32] / 2:,.0f} samples/s at b32, "
                      f"{RESNET18_CEILING_IMAGES_PER_S[256] / 2:,.0f} at b256."]

    for stem, r in results.items():
        check = (r or {}).get("graph_check")
        if check:
            lines += ["", f"Graph check ({stem}: {check['steps']} batches eager and through the CUDA graph from the same "
                          f"weights, dropout off): loss max abs diff {check['loss_max_abs_diff']:.3g}, weights max rel "
                          f"diff {check['weights_max_rel_diff']:.3g} ({check['worst_tensor']}), integer buffers equal: "
                          f"{check['int_buffers_equal']}, captures: {check['captures']}; eager against eager: loss "
                          f"{check.get('eager_noise_loss_max_abs_diff', float('nan')):.3g}, weights "
                          f"{check.get('eager_noise_weights_max_rel_diff', float('nan')):.3g}."]
        elif r and r.get("graph_check_error"):
            lines += ["", f"Graph check ({stem}) failed: {r['graph_check_error'][:200]}"]

    ceiling = _load(os.path.join(out_dir, "ceiling.json"))
    if ceiling and ceiling.get("ceiling_images_per_s"):
        c = ceiling["ceiling_images_per_s"]
        lines += ["", "Ceiling measured on this machine (bare ResNet-18 step, bf16 + channels_last): " + ", ".join(
            f"b{bs}: {_fmt(v)} images/s (issue: {_fmt(RESNET18_CEILING_IMAGES_PER_S.get(int(bs)))})"
            for bs, v in c.items()) + "."]
    recall = {tag: _recall_metrics(out_dir, tag) for tag in ("recall_plain_s0", "recall_fast_s0", "recall_plain_s1")}
    if any(recall.values()):
        lines += ["", "| test metric (after the short training run) | plain fp32 seed 0 | fast seed 0 | plain fp32 seed 1 | "
                      "fast - plain (seed 0) | seed noise (plain s1 - s0) | binomial s.e. |",
                  "|---|---|---|---|---|---|---|"]
        q = (any_r or {}).get("data", {}).get("test_queries")
        for name in ("recall_top1_correct_composition", "recall_top5_correct_composition",
                     "recall_top10_correct_composition", "recall_top1_correct_adj", "recall_top1_correct_noun"):
            vals = [(recall[t] or {}).get(f"test {name}") for t in ("recall_plain_s0", "recall_fast_s0", "recall_plain_s1")]
            diff = vals[1] - vals[0] if None not in vals[:2] else None
            noise = vals[2] - vals[0] if vals[0] is not None and vals[2] is not None else None
            se = math.sqrt(vals[0] * (1 - vals[0]) / q) if (vals[0] is not None and q) else None
            lines.append(f"| {name} | {_fmt(vals[0], 4)} | {_fmt(vals[1], 4)} | {_fmt(vals[2], 4)} | "
                         f"{_fmt(diff, 4)} | {_fmt(noise, 4)} | {_fmt(se, 4)} |")
        for tag in ("recall_plain_s0", "recall_fast_s0", "recall_plain_s1"):
            lines.append(f"\n{tag}: {status.get(tag, 'not run')}")
    shown = ("bench_", "recall_") if any(recall.values()) else ("bench_",)
    others = [f"{k}: {v}" for k, v in status.items() if not k.startswith(shown)]
    if others:
        lines += ["", "Other steps: " + "; ".join(others)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    a = get_args_parser().parse_args(argv)
    if a.report:
        print(summarize(a.report))
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        try:
            result = ceiling_main(a) if a.ceiling else retrieve_main(a) if a.mode == "retrieve" else run(a)
        except main_module.UserInputError as exc:
            print(f"benchmark.py: error: {exc}", file=sys.stderr)
            return 2
    text = json.dumps(result, indent=1, sort_keys=False)
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
