"""Evaluation queries/s: one full ``test_retrieval.evaluate`` of a test task (every image encoded, every query
composed and ranked), timed from outside."""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import test_retrieval
from benchmarks.common import sync
from datasets import RetrievalTask


def evaluation_speed(model: torch.nn.Module, testset: Any, task: RetrievalTask, args: argparse.Namespace,
                     device: torch.device) -> dict[str, Any]:
    """Queries/s and seconds of one ``test_retrieval.evaluate`` of ``task`` with main.py's evaluation settings
    (``--eval_batch_size``, ``--loader_num_workers``, ``--amp``), the task's size and its recall@1 and @10."""
    sync(device)
    t0 = time.perf_counter()
    metrics = test_retrieval.evaluate(model, testset, task, batch_size=args.eval_batch_size, device=device,
                                      num_workers=args.loader_num_workers, amp=args.amp,
                                      desc="benchmark eval", progress=False)
    sync(device)
    eval_s = time.perf_counter() - t0
    return {"eval_queries_per_s": len(task.query_source) / eval_s, "eval_seconds": eval_s,
            "eval_queries": len(task.query_source), "eval_gallery": len(task.gallery),
            "eval_recall": {k: v for k, v in metrics.items() if k.startswith(("recall_top1_", "recall_top10_"))}}
