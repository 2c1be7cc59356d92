"""The training step and loop: one SGD step (eager or captured as a CUDA graph), exactly ``--num_iters`` steps
with periodic logging, evaluation and atomic checkpoints."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading

import torch

import datasets
import img_text_composition_models as models
import test_retrieval
import runlog
from checkpoint import WriteFailed, checkpoint_state, evaluation_state, nonfinite_tensors
from runlog import Run
from errors import UserInputError
from distributed import distributed_world

# SIGINT (Ctrl-C), SIGTERM (pre-emption) and SIGUSR1 (SLURM's --signal=USR1@60): save and stop between two steps
INTERRUPT_SIGNALS: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGUSR1")


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the optimizer state became NaN or infinite."""


class Interrupted(Exception):
    """Training stopped on a signal, between two steps; ``checkpoint`` is the file to resume from (None: none)."""

    def __init__(self, signum: int, it: int, checkpoint: str | None, saved: bool):
        self.signum, self.it, self.checkpoint, self.saved = signum, it, checkpoint, saved
        super().__init__(f"{signal.Signals(signum).name} at iteration {it}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 SIGINT, 143 SIGTERM, 138 SIGUSR1


@contextlib.contextmanager
def interrupt_flag():
    """Installs handlers of ``INTERRUPT_SIGNALS`` that only record the signal (``flag['signum']``), so the loop can
    stop between two steps; a second signal raises KeyboardInterrupt at once. The previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) nothing is installed."""
    flag = {"signum": 0}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signum"]:
            raise KeyboardInterrupt
        flag["signum"] = signum

    previous = {}
    for name in INTERRUPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM / SIGUSR1 to the main process, which saves and ends them."""
    for name in INTERRUPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def images_to_device(batch: dict, args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's query and target images (B, 3, H, W) on ``device`` (channels_last with --channels_last)."""
    src = batch["source_img"].to(device, non_blocking=True)
    tgt = batch["target_img"].to(device, non_blocking=True)
    if args.channels_last:
        src, tgt = src.contiguous(memory_format=torch.channels_last), tgt.contiguous(memory_format=torch.channels_last)
    return src, tgt


def loss_backward_update(model, src: torch.Tensor, texts, tgt: torch.Tensor, optimizer, args,
                         device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, backward and the SGD update on gradients that the caller zeroed; returns the detached loss terms
    (the base loss under its --loss name, the extra terms, and 'total training loss'), with no host sync.

    ``texts``: B strings, or their (B, T) features from a frozen text encoder (see ``CudaGraphStep``).
    """
    # Autocast's weight cache stays off: a CUDA graph cannot hold it, and with it a weight used twice (two ResNet
    # passes, the conjugate composition) would have its two gradient parts summed in bf16, without it in fp32, so
    # the eager and the captured step would differ under --amp.
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp, cache_enabled=False):
        terms = model(src, texts, tgt, args.loss)
    total = models.total_loss(terms, args.loss_weights)
    total.backward()
    optimizer.step()
    out = {name: value.detach().float() for name, value in terms.items()}
    out["total training loss"] = total.detach().float()
    return out


def train_one_step(model, batch: dict, optimizer, scheduler, args, device: torch.device) -> dict[str, torch.Tensor]:
    """One SGD step on one batch; returns the detached loss terms under the original's names (no host sync)."""
    src, tgt = images_to_device(batch, args, device)
    optimizer.zero_grad(set_to_none=True)
    out = loss_backward_update(model, src, batch["text"], tgt, optimizer, args, device)
    scheduler.step()
    return out


class CudaGraphStep:
    """``--cuda_graph``: ``train_one_step`` with forward, backward and the SGD update captured once as a CUDA graph
    and replayed for every batch of the same shape (opt-in, not the original).

    At batch 32 a ComposeAE step is ~1,000 small kernels whose launches bound its speed; a replay launches them all
    at once. How it keeps the step the same computation:

    * the first ``warmup`` steps run eagerly (on a side stream, as PyTorch requires before capture), which also
      creates SGD's momentum buffers;
    * the frozen BERT's vectors are looked up outside the graph and copied, with the images, into static input
      buffers (a trainable LSTM has per-batch sequence lengths and cannot be captured: main.py refuses that);
    * SGD's learning rates are constants inside the graph, so the step is captured again whenever the schedule
      changes them (every --learning_rate_decay_frequency iterations);
    * dropout and the soft-triplet sampler draw from generators registered with the graph, so every replay draws
      fresh numbers; a batch of another shape (one whose unreadable images were dropped) runs eagerly.

    On the CPU there is no capture: ``replay`` runs the same static-buffer step eagerly. Tests use that to check
    the plumbing against ``train_one_step``; on a GPU, tests/test_fast_paths.py and benchmark.py compare the
    captured step with the eager one.
    """

    def __init__(self, warmup: int = 3):
        if warmup < 1:  # SGD creates its momentum buffers on its first step: inside a capture they would be reset
            raise ValueError(f"CudaGraphStep needs at least 1 eager warm-up step, got {warmup}")
        self.warmup = warmup
        self.steps = 0
        self.static: dict[str, torch.Tensor] | None = None  # src, text, tgt input buffers
        self.outputs: dict[str, torch.Tensor] | None = None  # the loss terms, refreshed by each replay
        self.replay = None
        self.captured_lrs: tuple[float, ...] | None = None
        self.captures = 0  # how many times the step was (re)captured

    def __call__(self, model, batch: dict, optimizer, scheduler, args, device: torch.device) -> dict[str, torch.Tensor]:
        src, tgt = images_to_device(batch, args, device)
        text = model.extract_text_feature(batch["text"])  # (B, T) from the frozen encoder's cache, outside the graph
        inputs = {"src": src, "text": text, "tgt": tgt}
        same_shape = self.static is not None and all(
            inputs[k].shape == self.static[k].shape and inputs[k].stride() == self.static[k].stride() for k in inputs)
        # the static shape is taken from a full batch only: one that lost unreadable images runs eagerly
        full = len(batch["text"]) == args.batch_size
        if self.steps < self.warmup or not full or (self.static is not None and not same_shape):
            optimizer.zero_grad(set_to_none=True)
            with _side_stream(device):
                out = loss_backward_update(model, src, text, tgt, optimizer, args, device)
        else:
            if self.static is None:
                self.static = {k: torch.empty_like(v) for k, v in inputs.items()}
            for k, v in inputs.items():
                self.static[k].copy_(v, non_blocking=True)
            lrs = tuple(group["lr"] for group in optimizer.param_groups)
            if self.replay is None or lrs != self.captured_lrs:
                self._capture(model, optimizer, args, device)
                self.captured_lrs = lrs
            self.replay()
            out = {name: value.clone() for name, value in self.outputs.items()}  # the next replay overwrites them
        self.steps += 1
        scheduler.step()
        return out

    def _capture(self, model, optimizer, args, device: torch.device) -> None:
        s = self.static

        def step() -> dict[str, torch.Tensor]:
            return loss_backward_update(model, s["src"], s["text"], s["tgt"], optimizer, args, device)

        self.replay, self.outputs = None, None  # frees the previous graph and its memory before the new capture
        optimizer.zero_grad(set_to_none=True)  # the captured backward then writes (not adds) fresh gradients
        self.captures += 1
        if device.type != "cuda":
            def replay() -> None:  # as a replay of the captured backward: gradients written afresh, not added
                optimizer.zero_grad(set_to_none=True)
                self.outputs = step()
            self.replay = replay
            return
        graph = torch.cuda.CUDAGraph()
        for module in model.modules():  # the soft-triplet sampler's own generator, besides the default one
            generator = getattr(module, "loss_generator", None)
            if generator is not None and generator.device.type == "cuda":
                graph.register_generator_state(generator)
        torch.cuda.synchronize(device)
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA during the capture, which the
        # default "global" mode would count as an error in the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = step()
        self.replay = graph.replay


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Runs the block's CUDA work on a side stream ordered after the current one (before CUDA graph capture,
    PyTorch requires the warm-up steps on a side stream); a no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def make_train_step(args):
    """The training step function: ``train_one_step``, or a ``CudaGraphStep`` with --cuda_graph."""
    return CudaGraphStep() if args.cuda_graph else train_one_step


def mean_over_processes(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Averages of the summed loss terms over the iterations and the processes (one host sync)."""
    values = torch.stack(list(sums.values())) / count  # (T,)
    _, world = distributed_world()
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(sums, values.tolist()))


def make_train_loader(args, trainset, sampler, device: torch.device) -> torch.utils.data.DataLoader:
    """The training DataLoader over ``sampler``'s batches (also used by benchmark.py)."""
    _, world = distributed_world()
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=sampler, num_workers=args.loader_num_workers,
        collate_fn=functools.partial(datasets.collate_train, keep_size=world > 1),
        pin_memory=device.type == "cuda", persistent_workers=args.loader_num_workers > 0,
        worker_init_fn=_ignore_interrupts_in_worker if args.loader_num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed))  # own generator: worker seeds leave the global RNG alone


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
        if split == "test" and run is not None and run.enabled:
            import visualize

            picture = visualize.training_picture(dataset, task, query_feats, gallery_feats, seed=args.seed)
            if picture is not None:
                run.image("test/retrievals", picture, it, f"retrievals_{it}.png")
    if distributed_world()[0] == 0:
        for name, value in out.items():
            runlog.echo(" ".join(map(str, ("    ", name, round(value, 4)))))
    return out


def metric_names(tasks: dict) -> list[str]:
    """The '<split> <metric>' names that ``evaluate_all`` gives for ``tasks``, known without evaluating."""
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
    split is then evaluated once, for the best checkpoint, by ``evaluate_best_on_test``)."""
    if getattr(args, "select_on", "test") == "val":
        return {split: t for split, t in tasks.items() if split != "test"}
    return tasks


def evaluate_best_on_test(args, model, tasks: dict, testset, run: Run, device) -> dict[str, float]:
    """``--select_on val``: loads best_checkpoint.pth (picked on the validation split) into ``model`` and evaluates
    the test split once; returns ``'test <metric>'`` values, recorded in metrics.json with the best iteration.
    Where the test split has no public targets (CIRR's test1) it writes the server's files (``--submission_dir``)
    instead and returns nothing."""
    import factory
    from checkpoint import read_checkpoint

    path = os.path.join(run.folder, "best_checkpoint.pth")
    if distributed_world()[1] > 1:
        torch.distributed.barrier()  # rank 0 wrote it
    if not os.path.exists(path):
        raise UserInputError(f"--select_on val: {path} was never written (no validation score was finite)")
    ckpt = read_checkpoint(path)
    factory.load_weights(model, ckpt, path)
    best_it = int(ckpt["it"])
    if distributed_world()[0] == 0:
        runlog.echo(f"    best_checkpoint.pth: iteration {best_it}, selected on val {args.best_metric}")
    if "test" not in tasks:
        import cirr_submission

        cirr_submission.write_test1_submission(args, model, testset, device)
        return {}
    metrics = evaluate_all(args, model, {"test": tasks["test"]}, device, run, best_it)
    run.info["best_it"] = best_it  # the iteration these test numbers come from
    run.metrics(metrics, best_it)
    return metrics


def train(args, model, optimizer, scheduler, trainset, tasks, run: Run, device, start: dict | None,
          step_model=None) -> dict:
    """The training loop: exactly --num_iters steps, periodic logging, evaluation and atomic checkpoints.

    The original checked ``it < num_iters`` only between epochs, so it ran up to one epoch past --num_iters, and it
    never evaluated or saved the final weights; here training stops at --num_iters exactly, then evaluates and saves.

    ``step_model`` is what the training step calls (the DistributedDataParallel wrapper with several processes);
    ``model`` is the plain model that is evaluated and saved.
    """
    step_model = step_model or model
    rank, world = distributed_world()
    sampler = datasets.EpochBatchSampler(trainset, args.batch_size, args.seed, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise UserInputError(f"{args.dataset_path}: {len(trainset)} training items, fewer than --batch_size "
                             f"{args.batch_size}; lower --batch_size")
    loader = make_train_loader(args, trainset, sampler, device)
    train_step = make_train_step(args)
    epoch_len = len(sampler)
    save_every = args.save_every or epoch_len  # 0: every epoch, as the original

    def eval_due(it: int) -> bool:
        if args.eval_every:
            return it % args.eval_every == 0
        # the original tested at the start of epochs 1, 4, 7, ... (epoch % 3 == 1), i.e. after 1, 4, 7 epochs
        return it % epoch_len == 0 and (it // epoch_len) % 3 == 1

    it, epoch, batch_in_epoch, best = 0, 0, 0, -math.inf
    last_good = None  # the newest checkpoint known to hold finite weights: named when a run stops
    if start is not None:
        it, epoch, batch_in_epoch, best = start["it"], start["epoch"], start["batch_in_epoch"], start["best"]
        bad = nonfinite_tensors(model, optimizer)
        if bad:
            raise UserInputError(f"--resume {args.resume}: {len(bad)} of its tensors are not finite (e.g. {bad[0]}); "
                                 f"resume from an earlier checkpoint")
        last_good = args.resume or None
    sums, count, metrics = {}, 0, {}
    steps_in_epoch, skipped = 0, 0

    def state():
        return checkpoint_state(args, model, optimizer, scheduler, it, epoch, batch_in_epoch, best)

    def check_finite(what: str) -> None:
        """The finite-weight guard: before every checkpoint write and evaluation (one host sync)."""
        bad = nonfinite_tensors(model, optimizer)
        if bad:
            raise TrainingDiverged(
                f"{len(bad)} weight or optimizer tensors are not finite at iteration {it} (e.g. {bad[0]}); "
                f"{what} skipped and the run stopped. The last finite checkpoint is {last_good or 'none'}; "
                f"{'resume from it, or ' if last_good else ''}start again with a lower --learning_rate")

    def written(what: str, write) -> None:
        """``write()``; a write error (disk full, quota) becomes one line naming ``what`` and the last good
        checkpoint (the atomic writes leave the earlier file in place)."""
        try:
            write()
        except OSError as exc:
            advice = (f"The last good checkpoint is {last_good}; free space and resume from it" if last_good else
                      "No checkpoint was written yet; free space and start again")
            raise WriteFailed(f"cannot write {what} ({exc.strerror or exc}); the file there is unchanged. "
                              f"{advice}") from None

    def save(name: str, make_state=state) -> None:
        nonlocal last_good
        path = os.path.join(run.folder, name)
        written(path, lambda: run.save(name, make_state))
        if make_state is state:  # a full state: resumable (best_checkpoint.pth holds no optimizer)
            last_good = path

    def stop_on_signal(signum: int) -> None:
        saved = False
        if not nonfinite_tensors(model, optimizer):
            save("latest_checkpoint.pth")
            saved = True
        raise Interrupted(signum, it, last_good, saved)

    model.train()
    # the handlers are in place before the progress bar's first line: a signal from then on saves and stops
    with interrupt_flag() as flag:
        progress = tqdm_bar(total=args.num_iters, initial=it, desc="train", disable=rank != 0)
        try:  # an error is printed after the bar's last line, not on it
            while it < args.num_iters:
                sampler.set_epoch(epoch)
                sampler.set_start_batch(batch_in_epoch)
                for batch in loader:
                    if flag["signum"] and world == 1:
                        stop_on_signal(flag["signum"])  # between two steps: the state is consistent
                    if len(batch["text"]) < 2:  # all but one item had unreadable images: BatchNorm needs 2
                        skipped += 1
                        continue
                    terms = train_step(step_model, batch, optimizer, scheduler, args, device)
                    run.started = True  # from here on, a failure keeps the run folder
                    it, batch_in_epoch, count = it + 1, batch_in_epoch + 1, count + 1
                    steps_in_epoch += 1
                    sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
                    progress.update(1)
                    log_due = it % args.log_every == 0 or it == args.num_iters
                    save_due = it % save_every == 0 or it == args.num_iters
                    evaluate_now = eval_due(it) or it == args.num_iters
                    if log_due or evaluate_now or save_due:  # never evaluate or save diverged weights
                        averages = mean_over_processes(sums, count)
                        if not all(math.isfinite(v) for v in averages.values()):
                            raise TrainingDiverged(
                                f"the loss is not finite ({averages}) in iterations {it - count + 1}..{it}; stopped. "
                                f"The last good checkpoint is {last_good or 'none (none was written yet)'}; lower "
                                f"--learning_rate or resume from it")
                    if evaluate_now or save_due:
                        check_finite("evaluation and checkpoint" if evaluate_now else "the checkpoint")
                    if log_due:
                        averages["learning_rate"] = optimizer.param_groups[0]["lr"]
                        written(f"the TensorBoard events in {run.folder}", lambda: run.scalars(averages, it))
                        progress.set_postfix(loss=f"{averages['total training loss']:.4f}")
                        sums, count = {}, 0
                    if evaluate_now:
                        metrics = evaluate_all(args, model, selection_tasks(args, tasks), device, run, it)
                        model.train()
                        written(f"{os.path.join(run.folder, 'metrics.json')} or the TensorBoard events",
                                lambda: run.metrics(metrics, it))
                        score = best_score(metrics, args.best_metric, getattr(args, "select_on", "test"))
                        if score > best:
                            best = score
                            save("best_checkpoint.pth", lambda: evaluation_state(state()))
                    if save_due:
                        save("latest_checkpoint.pth")
                    if world > 1 and log_due:  # every process stops at the same step (the save is a collective)
                        signum = torch.tensor([flag["signum"]], device=device)
                        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
                        flag["signum"] = int(signum)
                        if flag["signum"] and it < args.num_iters:
                            stop_on_signal(flag["signum"])
                    if it >= args.num_iters:
                        break
                else:
                    if steps_in_epoch == 0 and skipped:
                        raise UserInputError(
                            f"{args.dataset_path}: none of the {skipped} training batches of epoch {epoch} had 2 "
                            f"readable images (the warnings above name the unreadable files); fix the dataset's "
                            f"images")
                    epoch, batch_in_epoch, steps_in_epoch, skipped = epoch + 1, 0, 0, 0
        finally:
            progress.close()
    return metrics


def tqdm_bar(**kw):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, mininterval=1.0, **kw)

