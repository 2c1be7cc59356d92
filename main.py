"""Train and evaluate ComposeAE / TIRG composed image retrieval models.

    python main.py                                   # embedded default: synthetic data, ComposeAE + MiniLM, CPU
    python main.py --dataset=mitstates --dataset_path=../data/mitstates/ --model=composeAE \
        --loss=batch_based_classification --learning_rate_decay_frequency=50000 --num_iters=160000 \
        --use_bert True --use_complete_text_query True --weight_decay=5e-5 --comment=mitstates_composeAE \
        --log_dir ../logs/mitstates/
    python main.py ... --test_only True --model_checkpoint RUN_DIR/latest_checkpoint.pth

The flags and their defaults are the original code's (github ecom-research/ComposeAE, main.py); the added flags
default to the original's behaviour. With ``--dataset synthetic`` (the default) the flags that are not given take
a small CPU preset instead (see ``config.SYNTHETIC_PRESET``). The flags, their defaults and checks are in
``config.py``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
from typing import Callable, Sequence

import torch

import cirr_submission
from checkpoint import WriteFailed, restart_from_checkpoint
from config import parse_args, prepare_args
from distributed import distributed_world, init_distributed
from errors import UserInputError, report_internal_error
from factory import build_experiment, cirr_test1, run_info
from interrupts import EvaluationInterrupted, Interrupted, stop_at_once_on_interrupt, stop_evaluation_on_interrupt
from retrieval_datasets import completeness
from retrieval_datasets.registry import dataset_spec
from runlog import LOG_FORMAT, LogBuffer, Run, TqdmLogHandler, print_last, run_folder
from test_retrieval import NonFiniteFeaturesError
from training import (TrainingDiverged, best_metric_name, best_score, evaluate_all, evaluate_best_on_test,
                      metric_names, train)

logger = logging.getLogger("main")

PROG = "main.py"
# Failures of a run that are not the program's fault: one ``main.py: error:`` line (2 for bad input, else 1).
RUN_FAILURES = (UserInputError, TrainingDiverged, WriteFailed, NonFiniteFeaturesError)
# Stops on a signal: one ``main.py: <SIGNAL>:`` line, exit 128 + the signal's number.
STOPS = (Interrupted, EvaluationInterrupted)


def eval_splits(args, tasks: dict) -> dict:
    """The tasks that --test_only evaluates (--eval_splits, in the original's order: train before test)."""
    names = [s.strip() for s in args.eval_splits.split(",") if s.strip()]
    if names == ["test"] and "test" not in tasks:  # no public test targets (CIRR's test1): the validation split
        names = [s for s in ("val",) if s in tasks]
        if not names:
            return {}
    unknown = [s for s in names if s not in tasks]
    if unknown or not names:
        raise UserInputError(f"--eval_splits {args.eval_splits}: use a comma-separated list of {', '.join(tasks)}")
    return {split: tasks[split] for split in tasks if split in names}


def run_main(args: argparse.Namespace, given: set[str] | None = None, argv: Sequence[str] | None = None) -> int:
    """Trains, or with --test_only evaluates, as ``args`` say.

    ``args`` as the parser gives them (flags not given are None or their defaults; resolved args work too) and
    ``given``, the flags the user set (``parse_args``): --test_only and --resume take every other setting of the
    run from the checkpoint (``take_checkpoint_settings``). ``argv``: the command line, for run.json (default: this
    process's).

    An unexpected exception once the run folder exists is reported here (``errors.report_internal_error``: one
    line, exit code 1), with its traceback in the run's out.log where a failed run keeps its folder.
    """
    early = LogBuffer()  # what is logged before the run folder exists goes into its out.log too
    logging.getLogger().addHandler(early)
    try:
        return _run(args, set(given or ()), early, sys.argv[1:] if argv is None else list(argv))
    finally:
        logging.getLogger().removeHandler(early)


def _run(args: argparse.Namespace, given: set[str], early, argv: list[str]) -> int:
    args, ckpt, source, sha256 = prepare_args(args, given)
    device = init_distributed(args)
    rank, world = distributed_world()
    if args.cuda_graph and (device.type != "cuda" or world > 1) and not args.test_only:
        raise UserInputError(f"--cuda_graph True needs one process on a CUDA device (here: {device.type}, "
                             f"{world} process{'es' if world > 1 else ''}); drop --cuda_graph")
    logger.info("arguments: %s", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    info = run_info(args)  # warns now when the numbers are not comparable with the papers' protocol
    if args.test_only:  # the evaluated file, as verified against its checksums.sha256
        info.update(checkpoint=os.path.abspath(source), checkpoint_sha256=sha256)
    exp = build_experiment(args, device, ckpt, source)
    model, optimizer, scheduler, tasks = exp.model, exp.optimizer, exp.scheduler, exp.tasks
    if args.test_only:
        tasks = eval_splits(args, tasks)
    splits = {k: v for k, v in exp.splits().items() if not args.test_only or k in tasks}  # the splits it reads
    data = completeness.DataRecord(splits, dataset_spec(args.dataset).title)  # warns of missing images
    names = metric_names(exp.tasks)
    # a bad --best_metric stops here, before any step
    score_name = best_metric_name(names, args.best_metric, args.select_on) if not args.test_only else ""
    start = None  # --resume: the ResumeState that train continues from
    if ckpt is not None and not args.test_only:
        start = restart_from_checkpoint(ckpt, source, model=model, optimizer=optimizer, scheduler=scheduler)

    folder, created = choose_run_folder(args, rank, world)
    run = Run(args, folder, enabled=rank == 0, device=device, metric_names=names, created=created,
              score=None if args.test_only else selection_score(args), score_name=score_name, early=early,
              argv=[PROG, *argv])
    run.info.update(info)
    run.live_info = data  # every metrics.json write carries the current image counts
    try:
        if run.enabled:  # the index files' SHA-256 (rank 0 writes metrics.json and run.json)
            run.info["data_fingerprint"] = completeness.fingerprint(splits)
            run.record_provenance(data_fingerprint=run.info["data_fingerprint"])
        logger.info("log files saved to %s", folder)
        if args.test_only:
            return evaluate_checkpoint(args, model, tasks, device, run, int(ckpt.get("it", 0)))
        if start is not None:
            logger.info("resuming from %s at iteration %d", args.resume, ckpt["it"])
        step_model = model
        if world > 1:
            step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        metrics = train(args, model, optimizer, scheduler, exp.trainset, tasks, run, device, start, step_model)
        if args.select_on == "val":
            metrics = evaluate_best_on_test(args, model, tasks, exp.testset, run, device)
    except BaseException as exc:
        stopped = isinstance(exc, STOPS + (KeyboardInterrupt,))
        run.abort(f"{PROG}: error: {exc}" if isinstance(exc, RUN_FAILURES) else "",
                  "interrupted" if stopped else "failed")
        if isinstance(exc, Exception) and not isinstance(exc, RUN_FAILURES + STOPS):
            return report_internal_error(PROG, exc, kept_out_log(run))
        raise
    finally:
        run.release()
    if run.best is not None:
        logger.info("best %s: %.2f%% at iteration %d; run folder %s", run.best["metric"], 100 * run.best["value"],
                    run.best["it"], folder)
    else:
        logger.info("finished training; checkpoints and metrics.json in %s", folder)
    run.close(metrics, args.num_iters)
    return 0


def kept_out_log(run: Run) -> str | None:
    """The out.log of ``run`` where it is still on disk after ``run.abort`` (a run that failed before its first
    step leaves no folder); None on the processes that do not write (rank > 0)."""
    path = os.path.join(run.folder, "out.log")
    return path if run.enabled and os.path.isfile(path) else None


def choose_run_folder(args: argparse.Namespace, rank: int, world: int) -> tuple[str, bool]:
    """``(folder, created)``: the run's folder, the same on every process. A resumed run continues in the folder of
    its checkpoint; otherwise rank 0 creates a new one under --log_dir (``runlog.run_folder``), named
    ``eval_<time>_<checkpoint name><comment>`` for --test_only."""
    folder, created = "", False
    if args.resume:
        folder = os.path.dirname(os.path.abspath(args.resume))  # a resumed run continues in its folder
    elif rank == 0:
        name = None
        if args.test_only:  # an evaluation, named as one: eval_<time>_<checkpoint name><comment>
            stem = os.path.splitext(os.path.basename(args.model_checkpoint))[0]
            name = f"eval_{{time}}_{stem}{args.comment}"
        folder, created = run_folder(args, name), True
    if world > 1:  # the folder name holds the time: take rank 0's
        shared = [folder]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = shared[0]
    return folder, created


def selection_score(args: argparse.Namespace) -> Callable[[dict], float]:
    """The score of an evaluation's metrics that picks best_checkpoint.pth (--best_metric on --select_on's split);
    NaN where the evaluation lacks that split."""
    def score(metrics: dict) -> float:
        if not any(k.startswith(f"{args.select_on} ") for k in metrics):
            return math.nan
        return best_score(metrics, args.best_metric, args.select_on)

    return score


def evaluate_checkpoint(args: argparse.Namespace, model: torch.nn.Module, tasks: dict, device: torch.device,
                        run: Run, it: int) -> int:
    """--test_only: evaluates ``tasks`` once (iteration ``it`` of the checkpoint), writes the CIRR server's
    prediction files with --submission_dir, closes ``run``; returns the exit code 0. A signal during the
    evaluation raises ``EvaluationInterrupted`` (the run, not started, then leaves no folder)."""
    test1 = cirr_test1(args) if args.submission_dir else None  # its files are checked before the evaluation
    with stop_evaluation_on_interrupt(args.model_checkpoint):
        metrics = evaluate_all(args, model, tasks, device, run, it)
    run.started = True
    run.metrics(metrics, it)
    if test1 is not None:
        cirr_submission.write_test1_submission(args, model, test1, device)
    run.close(metrics, it)
    return 0


def resume_command(argv: Sequence[str], checkpoint: str) -> str:
    """The command line ``argv`` with ``--resume checkpoint`` in place of any --resume it had."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            rest.append(a)
    return shlex.join(["main.py", "--resume", checkpoint, *rest])


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success; 2 and one ``main.py: error:`` line for bad input; 1 and one line for a run
    that failed (diverged, a write that failed, features that are not finite); 128 + the signal's number and one
    line for a signal; 1 and one ``main.py: internal error:`` line for anything else (``report_internal_error``)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=[TqdmLogHandler()])
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, given = parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed)
        return int(exc.code or 0)
    try:
        with stop_at_once_on_interrupt():
            return run_main(args, given, argv)
    except UserInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WriteFailed, NonFiniteFeaturesError) as exc:  # a run that failed, not bad input
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except STOPS as exc:
        print_last(f"{PROG}: {stop_line(exc, argv)}")
        return exc.exit_code
    except KeyboardInterrupt as exc:  # before training started (StoppedEarly), or a second Ctrl-C
        signum = getattr(exc, "signum", signal.SIGINT)
        print_last(f"{PROG}: {signal.Signals(signum).name}: interrupted; stopped without writing a checkpoint (any "
                   f"written before is intact)")
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 (the last resort, before the run folder exists: traceback in a file)
        return report_internal_error(PROG, exc)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def stop_line(exc: Interrupted | EvaluationInterrupted, argv: Sequence[str]) -> str:
    """What main.py says (after ``main.py: ``) when a signal stopped it: the signal, where, and what is left."""
    name = signal.Signals(exc.signum).name
    if isinstance(exc, EvaluationInterrupted):
        return f"{name}: interrupted during the evaluation of {exc.checkpoint}; nothing written"
    if exc.checkpoint:
        unsaved = "" if exc.saved else " (its weights are not finite: nothing saved)"
        return (f"{name}: interrupted at iteration {exc.it}{unsaved}; resume with: "
                f"{resume_command(argv, exc.checkpoint)}")
    return f"{name}: interrupted at iteration {exc.it}; no finite checkpoint to resume from"


if __name__ == "__main__":
    sys.exit(main())
