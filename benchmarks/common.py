"""What every benchmark mode shares: the presets, the reference figures of the issue, main.py's flags for a
benchmark (parsed by ``config``), device timers, peak memory, system information and the JSON output."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
from typing import Any, Iterator

import torch

import config

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


def fill_preset(a: argparse.Namespace, keys: tuple[str, ...]) -> None:
    """Sets each flag of ``keys`` left unset (None) on the command line to the ``--size`` preset's value."""
    for key in keys:
        if getattr(a, key) is None:
            setattr(a, key, PRESETS[a.size][key])


def main_args(a: argparse.Namespace, data_path: str, bert_model: str, image_cache: str,
              device: str) -> argparse.Namespace:
    """main.py's flags for this benchmark, parsed and completed by main.py's own parser (``config``)."""
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
    return config.resolve_defaults(config.get_args_parser().parse_args(argv))


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that a host clock measures it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, how)``: ``torch.cuda.max_memory_allocated`` on a GPU, the process's ``ru_maxrss`` on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (``platform.processor()``, else the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def survive(result: dict, key: str) -> Iterator[None]:
    """Runs a measurement that is not the main one: an exception is logged and kept under ``result[key]``."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (any failure of a diagnostic)
        logger.exception("%s failed", key)
        result[key] = f"{type(exc).__name__}: {exc}"[:500]


def json_text(result: dict) -> str:
    """The one JSON object a benchmark prints (keys in the order the measurement made them)."""
    return json.dumps(result, indent=1, sort_keys=False)


def write_output(path: str, text: str) -> None:
    """Writes ``text`` and a newline to ``path`` (``--output``), making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
