"""Training samples/s (``--mode train``, the default): steady-state training steps of this project's own code path
on synthetic data in the MIT-States layout, then one timed evaluation (``eval_speed``), peak memory and the
diagnostics (dispatched ops, host syncs, a profiler trace, the CUDA graph against eager).

Nothing here re-implements the project: the data is written by ``synthetic.generate_synthetic``, the datasets, the
test task, the model and optimizer come from ``factory``, the batches from ``datasets.EpochBatchSampler`` and
``training.make_train_loader``, and every step is ``training.make_train_step``'s."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import math
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import datasets
import distributed
import factory
import synthetic
import training
from benchmarks.common import (RESNET18_CEILING_IMAGES_PER_S, PRESETS, device_name, fill_preset, main_args,
                               peak_memory, survive, sync)
from benchmarks.eval_speed import evaluation_speed
from benchmarks.inputs import resolve_bert, synthetic_params, synthetic_path
from datasets import RetrievalTask
from errors import UserInputError

# Ops that only make a new view of a tensor: no kernel runs for them.
_VIEW_OPS = ("view", "_unsafe_view", "t", "detach", "expand", "slice", "select", "unsqueeze", "squeeze",
             "transpose", "permute", "alias", "as_strided", "reshape", "flatten", "unbind", "split")


def endless_batches(loader, sampler) -> Iterator[dict]:
    """The training loader over consecutive epochs, as main.train walks it (batches of < 2 items skipped)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            if len(batch["text"]) >= 2:
                yield batch
        epoch += 1


def _top_ops_table(events, dev: bool) -> str:
    """The profiler's key_averages table sorted by self device time (self CPU time without a GPU), 30 rows."""
    for sort_key in (("self_device_time_total", "self_cuda_time_total") if dev else ("self_cpu_time_total",)):
        try:  # the device column was called cuda before torch 2.4
            return events.table(sort_by=sort_key, row_limit=30)
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def profile_steps(step, n: int, folder: str, device: torch.device) -> dict:
    """torch.profiler over ``n`` steps (after one warm-up step): a chrome trace, a key_averages table (stderr and
    top_ops.txt) and a summary of the time split."""
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
    with open(raw, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    events = prof.key_averages()
    dev = device.type == "cuda"
    table = _top_ops_table(events, dev)
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


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while it is active, by name, views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _VIEW_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(step: Callable[[], Any]) -> dict[str, Any]:
    """The PyTorch ops that one training step dispatches from Python, views left out: each is at least one kernel
    launch on a GPU (the host cost that bounds a small-batch step). A CUDA graph replay dispatches none of the
    ops it captured, so with --cuda_graph on a GPU only the work outside the graph is counted."""
    counter = _OpCounter()
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


# ----------------------------------------------------------------------------------------------------------------
# The run
@dataclasses.dataclass
class Setup:
    """What the timed part works on: main.py's args for the benchmark, the device, the synthetic data, the datasets
    and the test task (from ``factory``), and what the output reports about them."""

    args: argparse.Namespace
    device: torch.device
    data_path: str
    trainset: Any
    testset: Any
    task: RetrievalTask
    data_info: dict
    settings: dict
    timings: dict[str, float]


def _check_flags(a: argparse.Namespace) -> None:
    """Fills the flags left to the ``--size`` preset and refuses sizes below their bounds."""
    fill_preset(a, ("batch_size", "iters", "warmup", "workers", "image_size"))
    if a.eval_batch_size <= 0:
        a.eval_batch_size = a.batch_size
    if min(a.batch_size, a.iters, a.image_size) < 1 or a.warmup < 0 or a.workers < 0:
        raise UserInputError("--batch_size, --iters and --image_size must be >= 1, --warmup and --workers >= 0")


def _settings(a: argparse.Namespace, args: argparse.Namespace, device: torch.device, bert_model: str,
              image_cache: str) -> dict[str, Any]:
    """Every setting of the run and of the machine, as the output reports them."""
    return {
        "size": a.size, "model": args.model, "text_encoder": "bert" if args.use_bert else "lstm",
        "bert_model": a.bert_model if args.use_bert else None, "bert_path": bert_model if args.use_bert else None,
        "loss": args.loss, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "image_size": args.image_size, "amp": args.amp, "channels_last": args.channels_last,
        "image_cache": os.path.abspath(image_cache) if image_cache else "", "workers": args.loader_num_workers,
        "pin_memory": device.type == "cuda", "persistent_workers": args.loader_num_workers > 0,
        "compile": args.compile, "fuse_image_passes": args.fuse_image_passes, "cuda_graph": args.cuda_graph,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "image_weights": args.image_weights, "seed": args.seed, "warmup_iters": a.warmup, "timed_iters": a.iters,
        "device": str(device), "device_name": device_name(device),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
    }


def prepare(a: argparse.Namespace) -> Setup:
    """Writes the synthetic data (once) and the random BERT (once), parses main.py's flags for them and builds
    the datasets (and the image cache, the first time) and the test task, timing each part."""
    _check_flags(a)
    device = distributed.pick_device(a.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    preset = PRESETS[a.size]
    params = synthetic_params(preset, a.seed)
    data_path = synthetic_path(a.data_dir, params)
    synthetic.generate_synthetic(data_path, num_workers=a.gen_workers or os.cpu_count() or 1, **params)
    timings["data_s"] = time.perf_counter() - t0

    image_cache = os.path.join(a.data_dir, "cache") if a.image_cache == "auto" else a.image_cache
    t0 = time.perf_counter()
    # the synthetic captions and query texts are made of synthetic_words(), the random BERT's vocabulary
    bert_model = resolve_bert(a.bert_model, a.data_dir, ()) if a.text == "bert" else a.bert_model
    timings["bert_write_s"] = time.perf_counter() - t0
    args = main_args(a, data_path, bert_model, image_cache, a.device)

    t0 = time.perf_counter()
    trainset, testset = factory.build_datasets(args)
    timings["datasets_s"] = time.perf_counter() - t0  # includes building the image cache the first time
    task = factory.build_tasks(args, trainset, testset)["test"][1]
    data_info = {"path": os.path.abspath(data_path), "jpeg_size": params["image_size"], "train_images": len(trainset),
                 "test_images": len(testset), "test_queries": len(task.query_source),
                 **{k: v for k, v in params.items() if k != "image_size"}}  # image_size: the JPEGs' = jpeg_size
    return Setup(args, device, data_path, trainset, testset, task, data_info,
                 _settings(a, args, device, bert_model, image_cache), timings)


def _build_model(s: Setup) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """``factory.build_model`` (timed), then the frozen BERT's cache filled with every text a long run meets."""
    t0 = time.perf_counter()
    model, optimizer, scheduler = factory.build_model(s.args, s.device, s.trainset.get_all_texts())
    s.settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    s.timings["model_s"] = time.perf_counter() - t0
    if getattr(model, "bert", None) is not None:
        # Steady state: a long run has met every text, and the frozen BERT encodes each distinct text once
        # (text_model.BertTextEncoder caches them). MIT-States query texts are the target's adjective, or its
        # whole caption with use_complete_text_query.
        t0 = time.perf_counter()
        captions = s.trainset.get_all_texts()
        texts = [c if s.args.use_complete_text_query else c.split()[0] for c in captions] + list(s.task.query_text)
        model.bert.cache_texts(texts)
        sync(s.device)
        s.timings["bert_prefill_s"] = time.perf_counter() - t0
        s.settings["bert_texts_cached"] = len(set(texts))
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    return model, optimizer, scheduler


class _Steps:
    """Training steps as main.train runs them on one process: the loader's batches over consecutive epochs
    through ``training.make_train_step`` (``train_one_step``, or a ``CudaGraphStep`` with --cuda_graph)."""

    def __init__(self, s: Setup, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        args = s.args
        sampler = datasets.EpochBatchSampler(s.trainset, args.batch_size, args.seed)
        if len(sampler) == 0:
            raise UserInputError(f"{s.data_path}: {len(s.trainset)} training items, fewer than --batch_size "
                                 f"{args.batch_size}; lower --batch_size")
        self.batches = endless_batches(training.make_train_loader(args, s.trainset, sampler, s.device), sampler)
        self.train_step = training.make_train_step(args)
        self.model, self.optimizer, self.scheduler, self.args, self.device = model, optimizer, scheduler, args, s.device
        self.terms: dict = {}
        model.train()

    def train(self, batch: dict) -> dict:
        """One training step on ``batch``; its loss terms."""
        self.terms = self.train_step(self.model, batch, self.optimizer, self.scheduler, self.args, self.device)
        return self.terms

    def __call__(self, record_function=None) -> int:
        """Fetches a batch and trains on it (profiler regions named when ``record_function`` is given)."""
        ctx = record_function("benchmark/next_batch") if record_function else contextlib.nullcontext()
        with ctx:
            batch = next(self.batches)
        ctx = record_function("benchmark/train_one_step") if record_function else contextlib.nullcontext()
        with ctx:
            self.train(batch)
        return len(batch["text"])


def _time_training(a: argparse.Namespace, steps: _Steps, s: Setup) -> tuple[dict[str, Any], int]:
    """``--warmup`` untimed steps, then ``--iters`` timed ones (the wait for each batch counted apart). Returns the
    training figures and the peak memory after them."""
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        steps()
    sync(s.device)
    s.timings["warmup_s"] = time.perf_counter() - t0
    samples, data_wait = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(a.iters):
        t = time.perf_counter()
        batch = next(steps.batches)
        data_wait += time.perf_counter() - t
        steps.train(batch)
        samples += len(batch["text"])
    sync(s.device)
    train_s = time.perf_counter() - t0
    loss = float(steps.terms["total training loss"])
    train_peak, _ = peak_memory(s.device)
    figures = {"train_samples_per_s": samples / train_s, "train_images_per_s": 2 * samples / train_s,
               "train_step_ms": 1e3 * train_s / a.iters, "train_seconds": train_s, "train_samples": samples,
               "data_wait_fraction": data_wait / train_s, "final_loss": loss, "loss_finite": math.isfinite(loss)}
    return figures, train_peak


def _diagnostics(a: argparse.Namespace, steps: _Steps, s: Setup, result: dict[str, Any]) -> None:
    """Adds to ``result`` what is not the main measurement (a failure is kept under ``<name>_error``): dispatched
    ops per step, host syncs per step (CUDA), the profile (``--profile``) and the graph check (``--cuda_graph``)."""
    result["host_syncs_per_step"] = None
    with survive(result, "dispatched_ops_error"):
        batch = next(steps.batches)  # fetched first: the count is the training step's alone
        result["dispatched_ops"] = count_dispatched_ops(lambda: steps.train(batch))
    if s.device.type == "cuda" and a.sync_check_steps > 0:
        with survive(result, "host_syncs_error"):  # a diagnostic: its failure must not lose the numbers
            result["host_syncs_per_step"] = count_host_syncs(steps, a.sync_check_steps)
    if a.profile:
        with survive(result, "profile_error"):
            result["profile"] = profile_steps(steps, a.profile_steps, a.profile, s.device)
    if a.cuda_graph and a.graph_check > 0:
        with survive(result, "graph_check_error"):
            result["graph_check"] = graph_vs_eager(s.args, s.trainset.get_all_texts(),
                                                   [next(steps.batches) for _ in range(a.graph_check)], s.device)


def run(a: argparse.Namespace) -> dict:
    """``--mode train``: the data, BERT and datasets (``prepare``; ``--prepare_only`` stops there), then the timed
    training steps, the diagnostics, one timed evaluation (``--eval``), peak memory and the fraction of the
    ResNet-18 ceiling of the issue (on a GPU)."""
    s = prepare(a)
    if a.prepare_only:
        return {"prepared": True, "data": s.data_info, "settings": s.settings, "timings_s": s.timings}
    model, optimizer, scheduler = _build_model(s)
    steps = _Steps(s, model, optimizer, scheduler)
    result, train_peak = _time_training(a, steps, s)
    _diagnostics(a, steps, s, result)
    result.update({"eval_queries_per_s": None, "eval_seconds": None})
    if a.eval:
        with survive(result, "eval_error"):
            result.update(evaluation_speed(model, s.testset, s.task, s.args, s.device))
    peak, mem_kind = peak_memory(s.device)
    result.update({"peak_memory_bytes": peak, "peak_memory_train_bytes": train_peak, "peak_memory_kind": mem_kind,
                   "peak_memory_gib": peak / 2 ** 30})
    ceiling = RESNET18_CEILING_IMAGES_PER_S.get(s.args.batch_size)
    result["ceiling_samples_per_s"] = ceiling / 2 if (ceiling and s.device.type == "cuda") else None
    result["fraction_of_ceiling"] = (result["train_samples_per_s"] / result["ceiling_samples_per_s"]
                                     if result["ceiling_samples_per_s"] else None)
    result.update({"settings": s.settings, "data": s.data_info, "timings_s": s.timings})
    return result
