"""The training loop (``train``): exactly ``--num_iters`` steps, in the stages of DINO's main_dino.py: step, log,
evaluate, save. The step is ``sgd_step.train_one_step`` (``cuda_graph.CudaGraphStep`` with --cuda_graph), signals
are ``interrupts``', the choice of best_checkpoint.pth is ``selection``'s, resuming is
``checkpoint.restart_from_checkpoint``'s."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterator
from typing import NoReturn

import torch

import cirr_submission
import datasets
import console
import img_text_composition_models as models
import test_retrieval
import visualize
from checkpoint import ResumeState, checkpoint_state, evaluation_state, nonfinite_tensors, read_checkpoint
from cuda_graph import CudaGraphStep, make_train_step  # noqa: F401 (CudaGraphStep re-exported: benchmark.py, tests)
from distributed import distributed_world
from errors import UserInputError
from interrupts import Interrupted, agree_on_signal, ignore_interrupts_in_worker, interrupt_flag
from progress import interactive, progress, progress_line
from retrieval_datasets import completeness
from retrieval_datasets.registry import dataset_spec
from runlog import Run
from selection import best_metric_name, best_score, metric_names, new_best, selection_tasks  # noqa: F401 (main.py)
from sgd_step import train_one_step  # noqa: F401 (re-exported: benchmark.py, tests)


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the optimizer state became NaN or infinite."""


@dataclasses.dataclass
class Progress:
    """Where training stands, as a checkpoint records it: the iterations done, the epoch, the steps taken in it and
    the best selection score so far."""

    it: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float = -math.inf


def mean_over_processes(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Averages of the summed loss terms over the iterations and the processes (one host sync)."""
    values = torch.stack(list(sums.values())) / count  # (T,)
    _, world = distributed_world()
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(sums, values.tolist()))


class LossSums:
    """The loss terms of the steps since the last log line, summed on the device (no host sync until ``mean``)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in terms.items()}
        self.count += 1

    def mean(self, it: int, last_checkpoint: str | None) -> dict[str, float]:
        """The averages over the steps and the processes (a collective); a non-finite one stops the run."""
        averages = mean_over_processes(self.sums, self.count)
        if not all(math.isfinite(v) for v in averages.values()):
            raise TrainingDiverged(
                f"the loss is not finite ({averages}) in iterations {it - self.count + 1}..{it}; stopped. "
                f"The last good checkpoint is {last_checkpoint or 'none (none was written yet)'}; lower "
                f"--learning_rate or resume from it")
        return averages

    def reset(self) -> None:
        self.sums, self.count = {}, 0


class Checkpoints:
    """The run's checkpoints of the training state, behind the finite-weight guard; ``run.last_checkpoint`` names
    the newest one to resume from."""

    def __init__(self, args, model, optimizer, scheduler, run: Run):
        self.args, self.model, self.optimizer, self.scheduler, self.run = args, model, optimizer, scheduler, run

    def state(self, p: Progress) -> dict:
        """The full training state at ``p`` (a collective with several processes)."""
        return checkpoint_state(self.args, self.model, self.optimizer, self.scheduler, p.it, p.epoch,
                                p.batch_in_epoch, p.best)

    def check_finite(self, it: int, what: str) -> None:
        """The finite-weight guard: before every checkpoint write and evaluation (one host sync)."""
        bad = nonfinite_tensors(self.model, self.optimizer)
        if bad:
            last = self.run.last_checkpoint
            raise TrainingDiverged(
                f"{len(bad)} weight or optimizer tensors are not finite at iteration {it} (e.g. {bad[0]}); "
                f"{what} skipped and the run stopped. The last finite checkpoint is {last or 'none'}; "
                f"{'resume from it, or ' if last else ''}start again with a lower --learning_rate")

    def save_latest(self, p: Progress) -> None:
        """latest_checkpoint.pth: the full state, to resume from."""
        self.run.save("latest_checkpoint.pth", lambda: self.state(p))

    def save_best(self, p: Progress) -> None:
        """best_checkpoint.pth: what evaluation needs (no optimizer, schedule or random state)."""
        self.run.save("best_checkpoint.pth", lambda: evaluation_state(self.state(p)), resumable=False)

    def stop(self, signum: int, p: Progress) -> NoReturn:
        """On a signal, between two steps: saves the state (if finite) and raises ``Interrupted``."""
        saved = not nonfinite_tensors(self.model, self.optimizer)
        if saved:
            self.save_latest(p)
        raise Interrupted(signum, p.it, self.run.last_checkpoint, saved)


class ProgressReport:
    """What a user sees of training: tqdm's bar on a terminal (``progress.progress``) and, every --log_every
    iterations, a progress line (``progress.progress_line``: iteration, losses, speed, ETA) in out.log and, where
    stderr is not a terminal, on stderr. ``enabled``: this process reports (rank 0)."""

    def __init__(self, args, start_it: int, enabled: bool = True):
        self.args, self.enabled = args, enabled
        self.console = not interactive()  # no bar: the progress lines go to stderr
        self.bar = progress(total=args.num_iters, initial=start_it, desc="train", disable=not enabled)
        self.since, self.steps = time.monotonic(), 0

    def step(self) -> None:
        """One training step done."""
        self.bar.update(1)
        self.steps += 1

    def log(self, it: int, averages: dict[str, float]) -> None:
        """The progress line at iteration ``it`` with the averaged loss terms ``averages``."""
        if not self.enabled:
            return
        self.bar.set_postfix(loss=f"{averages['total training loss']:.4f}")
        elapsed = time.monotonic() - self.since
        speed = self.steps * self.args.batch_size / elapsed if elapsed > 0 else 0.0
        line = progress_line(it, self.args.num_iters, averages, speed, self.args.batch_size)
        console.progress_to_logs(line, self.console)

    def restart_clock(self) -> None:
        """The speed of the next line counts the steps from here on."""
        self.since, self.steps = time.monotonic(), 0

    def __enter__(self) -> ProgressReport:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def make_train_loader(args, trainset, sampler, device: torch.device) -> torch.utils.data.DataLoader:
    """The training DataLoader over ``sampler``'s batches (also used by benchmark.py)."""
    _, world = distributed_world()
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=sampler, num_workers=args.loader_num_workers,
        collate_fn=functools.partial(datasets.collate_train, keep_size=world > 1),
        pin_memory=device.type == "cuda", persistent_workers=args.loader_num_workers > 0,
        worker_init_fn=ignore_interrupts_in_worker if args.loader_num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed))  # own generator: worker seeds leave the global RNG alone


def epoch_batches(loader, sampler, p: Progress, args) -> Iterator[dict]:
    """The training batches from ``p``'s epoch and batch on, epoch after epoch while ``p.it < --num_iters``; as
    an epoch ends, ``p`` moves to the next. A batch of fewer than 2 items (the others' images unreadable) is
    skipped: BatchNorm needs 2; an epoch of only such batches is refused."""
    while p.it < args.num_iters:
        sampler.set_epoch(p.epoch)
        sampler.set_start_batch(p.batch_in_epoch)
        steps = skipped = 0
        for batch in loader:
            completeness.add_bad(loader.dataset, batch.get("bad_paths", ()))  # met in a DataLoader worker
            if len(batch["text"]) < 2:
                skipped += 1
                continue
            steps += 1
            yield batch
        if steps == 0 and skipped:
            raise UserInputError(
                f"{args.dataset_path}: none of the {skipped} training batches of epoch {p.epoch} had 2 readable "
                f"images (the warnings above name the unreadable files); fix the dataset's images")
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0


EVALUATIONS_PER_RUN = 8  # the 'eight_per_run' schedule


def stages_due(args, it: int, epoch_len: int) -> tuple[bool, bool, bool]:
    """Whether iteration ``it`` logs, evaluates and saves; at --num_iters all three. Evaluation every --eval_every
    iterations, or (0) on the dataset's schedule (its registry entry's ``eval_schedule``): 'epochs_1_4_7', as the
    original tested, at the start of epochs 1, 4, 7, ... (epoch % 3 == 1), i.e. after 1, 4, 7 epochs;
    'eight_per_run', 8 evaluations spread evenly over --num_iters iterations (after ceil(k * num_iters / 8)
    iterations, k = 1..8; every iteration when num_iters < 8). A checkpoint every --save_every iterations, or (0)
    every epoch, as the original."""
    last = it == args.num_iters
    if args.eval_every:
        evaluate = it % args.eval_every == 0
    elif dataset_spec(args.dataset).eval_schedule == "eight_per_run":
        # the k-th evaluation is at ceil(k * N / 8), i.e. where floor(8 * it / N) steps up
        n, k = args.num_iters, EVALUATIONS_PER_RUN
        evaluate = it > 0 and it * k // n > (it - 1) * k // n
    else:
        evaluate = it % epoch_len == 0 and (it // epoch_len) % 3 == 1
    return it % args.log_every == 0 or last, evaluate or last, it % (args.save_every or epoch_len) == 0 or last


def train(args, model, optimizer, scheduler, trainset, tasks: dict, run: Run, device: torch.device,
          start: ResumeState | None, step_model=None) -> dict[str, float]:
    """The training loop: exactly --num_iters steps from ``start`` (``checkpoint.restart_from_checkpoint``'s
    state; None: from scratch), with periodic logging, evaluation and atomic checkpoints; returns the metrics of
    the last evaluation.

    The original checked ``it < num_iters`` only between epochs, so it ran up to one epoch past --num_iters, and it
    never evaluated or saved the final weights; here training stops at --num_iters exactly, then evaluates and saves.
    ``step_model`` is what the training step calls (the DistributedDataParallel wrapper with several processes);
    ``model`` is the plain model that is evaluated and saved.
    """
    rank, world = distributed_world()
    sampler = datasets.EpochBatchSampler(trainset, args.batch_size, args.seed, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise UserInputError(f"{args.dataset_path}: {len(trainset)} training items, fewer than --batch_size "
                             f"{args.batch_size}; lower --batch_size")
    loader = make_train_loader(args, trainset, sampler, device)
    step, step_model = make_train_step(args), step_model or model
    p = Progress(**start) if start is not None else Progress()
    if start is not None and p.it >= args.num_iters:  # told as the run's last line, where it is seen
        run.notes.append(f"--resume {args.resume} is at iteration {p.it} already: --num_iters {args.num_iters} "
                         f"trains nothing more (--num_iters is the total number of iterations)")
    checkpoints, losses, metrics = Checkpoints(args, model, optimizer, scheduler, run), LossSums(), {}
    model.train()
    # the handlers are in place before the progress bar's first line: a signal from then on saves and stops
    with interrupt_flag() as flag, ProgressReport(args, p.it, enabled=rank == 0) as report:
        for batch in epoch_batches(loader, sampler, p, args):
            if flag["signum"] and world == 1:
                checkpoints.stop(flag["signum"], p)  # between two steps: the state is consistent
            # ============ one SGD step ============
            terms = step(step_model, batch, optimizer, scheduler, args, device)
            run.started = True  # from here on, a failure keeps the run folder
            p.it, p.batch_in_epoch = p.it + 1, p.batch_in_epoch + 1
            losses.add(terms)
            report.step()
            log_now, evaluate_now, save_now = stages_due(args, p.it, len(sampler))
            # ============ never log, evaluate or save a diverged model ============
            if log_now or evaluate_now or save_now:
                averages = losses.mean(p.it, run.last_checkpoint)
            if evaluate_now or save_now:
                checkpoints.check_finite(p.it, "evaluation and checkpoint" if evaluate_now else "the checkpoint")
            # ============ log ============
            if log_now:
                run.scalars({**averages, "learning_rate": optimizer.param_groups[0]["lr"]}, p.it)
                report.log(p.it, averages)
                losses.reset()
            # ============ evaluate; the best evaluation's weights to best_checkpoint.pth ============
            if evaluate_now:
                metrics = evaluate_all(args, model, selection_tasks(args, tasks), device, run, p.it)
                model.train()
                run.metrics(metrics, p.it)
                if (score := new_best(metrics, p.best, args)) is not None:
                    p.best = score
                    checkpoints.save_best(p)
            # ============ save the training state ============
            if save_now:
                checkpoints.save_latest(p)
            # ============ several processes stop at the same step (saving is a collective) ============
            if world > 1 and log_now and agree_on_signal(flag, device) and p.it < args.num_iters:
                checkpoints.stop(flag["signum"], p)
            if log_now:
                report.restart_clock()  # the speed of the next line: of the training steps, not the evaluation
            if p.it >= args.num_iters:
                break
    return metrics


def evaluate_all(args, model, tasks: dict, device, run: Run | None = None, it: int = 0) -> dict[str, float]:
    """'train <metric>' and 'test <metric>' for the fixed retrieval tasks, printed as the original printed them
    (``print('    ', name, round(value, 4))``; scripts parse these lines).

    With ``run``: the picture of a seeded sample of test queries and their top-5 (``visualize.training_picture``,
    from the features just computed) goes to TensorBoard as ``test/retrievals`` and to
    ``<run folder>/retrievals_<it>.png``.
    """
    out = {}
    for split, (dataset, task) in tasks.items():
        query_feats, gallery_feats = test_retrieval.encode_task(
            model, dataset, task, batch_size=args.eval_batch_size, device=device,
            num_workers=args.loader_num_workers, amp=args.amp, desc=f"eval {split}")
        metrics = test_retrieval.task_metrics(task, query_feats, gallery_feats)  # the task's protocol
        out.update({f"{split} {name}": value for name, value in metrics.items()})
        if run is not None:
            run.galleries[split] = gallery_facts(task)
        if split == "test" and run is not None and run.enabled:
            picture = visualize.training_picture(dataset, task, query_feats, gallery_feats, seed=args.seed)
            if picture is not None:
                run.image("test/retrievals", picture, it, f"retrievals_{it}.png")
    if distributed_world()[0] == 0:
        for name, value in out.items():
            console.echo(" ".join(map(str, ("    ", name, round(value, 4)))))
    return out


def gallery_facts(task: datasets.RetrievalTask) -> tuple[int, int]:
    """``(gallery images, distinct target classes)`` of ``task``: the classes are the gallery's labels of the
    composition view (MIT-States, Fashion200k), else of its first view; 1 / classes is the chance level of
    recall@1."""
    view = "composition" if "composition" in task.gallery_labels else next(iter(task.gallery_labels), None)
    labels = task.gallery_labels[view] if view is not None else task.gallery
    return len(task.gallery), len(set(labels))


def evaluate_best_on_test(args, model, tasks: dict, testset, run: Run, device) -> dict[str, float]:
    """``--select_on val``: loads best_checkpoint.pth (picked on the validation split) into ``model`` and evaluates
    the test split once; returns ``'test <metric>'`` values, recorded in metrics.json with the best iteration.
    Where the test split has no public targets (CIRR's test1) it writes the server's files (``--submission_dir``)
    instead and returns nothing."""
    path = os.path.join(run.folder, "best_checkpoint.pth")
    if distributed_world()[1] > 1:
        torch.distributed.barrier()  # rank 0 wrote it
    if not os.path.exists(path):
        raise UserInputError(f"--select_on val: {path} was never written (no validation score was finite)")
    ckpt = read_checkpoint(path)
    models.load_model_state(model, ckpt["model_state_dict"], path)  # this run's own weights: they fit
    best_it = int(ckpt["it"])
    if distributed_world()[0] == 0:
        console.echo(f"    best_checkpoint.pth: iteration {best_it}, selected on val {args.best_metric}")
    if "test" not in tasks:
        cirr_submission.write_test1_submission(args, model, testset, device)
        return {}
    metrics = evaluate_all(args, model, {"test": tasks["test"]}, device, run, best_it)
    run.info["best_it"] = best_it  # the iteration these test numbers come from
    run.metrics(metrics, best_it)
    return metrics
