"""The choice of best_checkpoint.pth: the metric that picks it (``--best_metric``), the split it is read on
(``--select_on``), and whether an evaluation is the new best."""
from __future__ import annotations

import math

import test_retrieval
from errors import UserInputError


def metric_names(tasks: dict) -> list[str]:
    """The '<split> <metric>' names that ``training.evaluate_all`` gives for ``tasks``, known without evaluating."""
    return [f"{split} {name}" for split, (_, task) in tasks.items() for name in test_retrieval.metric_names(task)]


def best_metric_name(names: list[str], best_metric: str, split: str = "test") -> str:
    """What ``best_score`` reads on ``split``, by name; an unknown --best_metric is refused (before training
    starts)."""
    prefix = f"{split} "
    known = [n[len(prefix):] for n in names if n.startswith(prefix)]
    if best_metric != "auto":
        if best_metric not in known:
            raise UserInputError(f"--best_metric {best_metric}: no such {split} metric; use auto or one of "
                                 f"{', '.join(known)}")
        return prefix + best_metric
    if "recall_top1_correct_composition" in known:
        return prefix + "recall_top1_correct_composition"
    return f"mean {split} recall_top10 over " + ", ".join(n[len("recall_top10_correct_"):] for n in known
                                                          if n.startswith("recall_top10_correct_"))


def best_score(metrics: dict[str, float], name: str, split: str = "test") -> float:
    """The score of ``split``'s metrics that picks best_checkpoint.pth (``--best_metric`` on ``--select_on``)."""
    prefix = f"{split} "
    if name != "auto":
        if prefix + name not in metrics:
            raise UserInputError(f"--best_metric {name}: no such {split} metric; use one of "
                                 f"{', '.join(k[len(prefix):] for k in metrics if k.startswith(prefix))}")
        return metrics[prefix + name]
    if prefix + "recall_top1_correct_composition" in metrics:
        return metrics[prefix + "recall_top1_correct_composition"]
    # a Fashion IQ category without queries has NaN recall: left out of the mean
    r10 = [v for k, v in metrics.items() if k.startswith(prefix + "recall_top10_correct_") and math.isfinite(v)]
    return sum(r10) / len(r10) if r10 else -math.inf


def selection_tasks(args, tasks: dict) -> dict:
    """The tasks evaluated during training: all of them, but without 'test' when ``--select_on val`` (the test
    split is then evaluated once, for the best checkpoint, by ``training.evaluate_best_on_test``)."""
    if getattr(args, "select_on", "test") == "val":
        return {split: t for split, t in tasks.items() if split != "test"}
    return tasks


def new_best(metrics: dict[str, float], best: float, args) -> float | None:
    """The selection score of an evaluation's ``metrics`` when it beats ``best`` (then best_checkpoint.pth is
    written), else None. The first of equal scores stays the best."""
    score = best_score(metrics, args.best_metric, getattr(args, "select_on", "test"))
    return score if score > best else None
