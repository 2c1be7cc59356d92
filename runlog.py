"""Run folders and what a run writes into them: ``args.json``, ``out.log``, TensorBoard scalars and images (an
HParams trial for a training run), ``metrics.json`` and checkpoints, and the console lines (the original's metric
lines, a summary table and the yardstick line at the end); the console itself is ``console``'s."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
from datetime import datetime
from typing import Callable

import console
from checkpoint import WriteFailed, atomic_write, save_checkpoint, write_failed
from checksums import ChecksumFile
from config import TENSORBOARD_LEFT_OUT
# LOG_FORMAT, TqdmLogHandler and print_last: main.py's, through this module
from console import LOG_FORMAT, LogBuffer, OutLog, TqdmLogHandler, echo, print_last  # noqa: F401
import provenance
from distributed import distributed_world
from errors import UserInputError
from retrieval_datasets.registry import dataset_spec

logger = logging.getLogger("main")
LOCK_NAME = "run.lock"
_TEMP_SUFFIX = re.compile(r"\.tmp-?(\d+)$")  # atomic_write's <name>.tmp<pid>, the image cache's <name>.tmp-<pid>
NEW_RUN_ADVICE = "free space or pass --log_dir on another disk"  # what a failed write in a run folder advises
SUMMARY_KS = (1, 5, 10, 50)  # the summary table's recall cut-offs
_METRIC = re.compile(r"^(\w+) recall_top(\d+)_correct_(\w+)$")  # '<split> recall_top<k>_correct_<view>'


def run_folder(args, name: str | None = None) -> str:
    """Creates and returns <log_dir>/<name>; ``name`` defaults to the original's <Mon DD_HH-MM-SS>_<host><comment>.
    A run started in the same second with the same name gets <name>_1, _2, ... instead of sharing (overwriting)
    the folder."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    base = os.path.join(args.log_dir, name.format(time=stamp) if name else f"{stamp}_{socket.gethostname()}{args.comment}")
    try:
        os.makedirs(args.log_dir, exist_ok=True)
        for n in range(1000):
            folder = f"{base}_{n}" if n else base
            try:
                os.mkdir(folder)  # atomic: concurrent runs cannot both get it
                return folder
            except FileExistsError:
                continue
    except OSError as exc:  # read-only, under a regular file, no space
        raise UserInputError(f"--log_dir {args.log_dir}: cannot create a run folder in it "
                             f"({exc.strerror or exc}: {exc.filename or base}); pass a writable --log_dir") from None
    raise UserInputError(f"{base}: 1000 runs started in this second; use --comment to tell them apart")


def strict_json(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN: a metric over zero queries,
    e.g. a Fashion IQ category without queries, is written as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, data, advice: str = "the file there is unchanged") -> None:
    """Strict JSON (no NaN / Infinity tokens), written atomically (a failed write: ``WriteFailed`` with
    ``advice``)."""
    text = json.dumps(strict_json(data), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text), mode="w", advice=advice)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Removes the temp files (``*.tmp<pid>``, ``*.tmp-<pid>``) that dead processes left in ``folder``; a live
    process's temp file is kept. Returns the removed paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):
        m = _TEMP_SUFFIX.search(path)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        logger.warning("removed %d temp file(s) left by ended processes in %s: %s", len(removed), folder,
                       ", ".join(os.path.basename(p) for p in removed))
    return removed


class RunLock:
    """``<run folder>/run.lock`` holding ``<host> <pid>``: one process at a time trains in a run folder.

    A lock whose process has ended (same host, dead pid, or an unreadable lock file) is stale and taken over; a
    live one refuses the second process with a UserInputError. A lock that cannot be written (a full disk) is
    removed and raises ``WriteFailed`` with ``advice``. ``release`` removes the lock file if it is ours.
    """

    def __init__(self, folder: str, advice: str = NEW_RUN_ADVICE):
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._stale():
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                continue
            except OSError as exc:
                raise UserInputError(f"cannot write into the run folder {folder} ({exc.strerror or exc}); make "
                                     f"it writable or pass another --log_dir / --resume") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(me)
            except OSError as exc:  # a full disk: the file exists, its line could not be written
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise write_failed(self.path, exc, advice) from None
            self.held = True
            return
        raise UserInputError(f"cannot take the lock {self.path}; retry")

    def _stale(self) -> bool:
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
            pid = int(pid)
        except FileNotFoundError:
            return False  # released meanwhile: retry
        except (OSError, ValueError):
            return True  # empty or torn: the process died while writing it
        if host == socket.gethostname() and (pid == os.getpid() or not pid_alive(pid)):
            return True  # ended, or this very process (a lock an earlier failed run in it left behind)
        raise UserInputError(f"the run folder {os.path.dirname(self.path)} is in use by process {pid} on {host} "
                             f"(lock file {self.path}); wait for it to end, or delete the lock file if that "
                             f"process is gone")

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def load_history(folder: str) -> list[dict]:
    """The history of ``<folder>/metrics.json``; a corrupt file is moved aside (``metrics.json.corrupt-<time>``)
    with a warning and a new history starts."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)["history"]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("'history' is not a list of records")
        return history
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        aside = f"{path}.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        logger.warning("%s is not a metrics file (%s: %s); moved it to %s and started a new history", path,
                       type(exc).__name__, str(exc)[:100], aside)
        return []


def split_metric(name: str) -> tuple[str, int, str] | None:
    """'test recall_top10_correct_adj' -> ('test', 10, 'adj'); None for another name."""
    m = _METRIC.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def headline_recall(metrics: dict[str, float], split: str, k: int) -> float:
    """The split's recall@k: of the composition view (MIT-States, Fashion200k), else the mean over the query
    groups (Fashion IQ categories, NaN groups left out); NaN when absent."""
    if f"{split} recall_top{k}_correct_composition" in metrics:
        return metrics[f"{split} recall_top{k}_correct_composition"]
    values = [v for name, v in metrics.items() if (split_metric(name) or ("", 0, ""))[:2] == (split, k)
              and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summary_table(metrics: dict[str, float], it: int, best: dict | None,
                  gallery_sizes: dict[str, int] | None = None) -> list[str]:
    """The compact table printed after each evaluation: recall@1/5/10/50 in % per split and view, the iteration
    and the best score so far. A recall@k with k at or above its split's gallery size (``gallery_sizes``: split ->
    gallery images) is left out (it is 100% by construction); a column left with no value is dropped."""
    sizes = gallery_sizes or {}
    rows: dict[tuple[str, str], dict[int, float]] = {}
    for name, value in metrics.items():
        parts = split_metric(name)
        if parts and parts[1] in SUMMARY_KS and parts[1] < sizes.get(parts[0], math.inf):
            rows.setdefault((parts[0], parts[2]), {})[parts[1]] = value
    ks = [k for k in SUMMARY_KS if any(k in recalls for recalls in rows.values())]
    width = max([len(f"{s} {v}") for s, v in rows] + [16])
    lines = [f"{'iteration ' + str(it):<{width}} " + " ".join(f"{'R@' + str(k):>6}" for k in ks) + "  (%)"]
    for (split, view), recalls in rows.items():
        cells = " ".join(f"{100 * recalls[k]:6.2f}" if k in recalls else f"{'':>6}" for k in ks)
        lines.append(f"{split + ' ' + view:<{width}} {cells}")
    if best is not None:
        lines.append(f"best so far: {best['metric']} {100 * best['value']:.2f}% at iteration {best['it']}")
    return lines


class Run:
    """What a run writes into its folder: args.json, out.log, TensorBoard events, metrics.json and checkpoints.

    ``score``: metrics -> the number that picks the best evaluation, named ``score_name``. ``created``: the folder
    is new, so a run that fails before its first step (``started`` still False) removes it (``abort``), as does a
    failure while the folder is set up (a full disk, a lock in use). Only the process of rank 0 writes
    (``enabled``); the others keep the same interface and write nothing. A failed write raises ``WriteFailed``
    naming the file and ``last_checkpoint``: the newest checkpoint to resume from (``save`` of a resumable one, or
    ``--resume``'s).
    """

    def __init__(self, args, folder: str, enabled: bool = True, *, device=None, metric_names: tuple = (),
                 score: Callable[[dict], float] | None = None, score_name: str = "", created: bool = False,
                 early: LogBuffer | None = None, argv: list[str] | None = None):
        self.args, self.folder, self.enabled, self.created = args, folder, enabled, created
        self.argv = argv  # the command line run.json records (default: this process's)
        self.score, self.score_name = score, score_name
        self.history: list[dict] = []
        self.best: dict | None = None
        self.started = False
        self.info: dict = {}  # what the numbers are comparable with (factory.run_info), written into metrics.json
        # () -> the current entries of metrics.json that change during the run (completeness.DataRecord: "data")
        self.live_info: Callable[[], dict] | None = None
        self.lock: RunLock | None = None
        # split -> (gallery images, distinct target classes) of the evaluated splits, for the summary table and the
        # yardstick (training.evaluate_all)
        self.galleries: dict[str, tuple[int, int]] = {}
        self.notes: list[str] = []  # warnings that ``close`` logs as the run's last lines
        # an evaluation (--test_only) writes its scalars apart from training's: eval/<split>/<metric>
        self.tag_prefix = "eval/" if getattr(args, "test_only", False) else ""
        self.last_checkpoint: str | None = getattr(args, "resume", "") or None
        if not enabled:
            return
        try:
            self._open(device, metric_names, early)
        except BaseException:
            self.abort()
            raise

    def _open(self, device, metric_names: tuple, early: LogBuffer | None) -> None:
        """Sets up the folder: the lock, out.log (with ``early``'s records), the history, args.json, TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter  # ~0.2 s: imported by the runs that write, only

        args, folder = self.args, self.folder
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"cannot create the run folder {folder} ({exc.strerror or exc}); pass another "
                                 f"--log_dir") from None
        self.lock = RunLock(folder, self.write_advice())  # a second process training in this folder is refused here
        remove_stale_temp_files(folder)
        self.out_log = OutLog(os.path.join(folder, "out.log"))
        for record in early.records if early is not None else ():
            self.out_log.handle(record)
        if early is not None:
            logging.getLogger().removeHandler(early)
        logging.getLogger().addHandler(self.out_log)
        console.open_out_logs.append(self.out_log)
        self.history = load_history(folder)  # a resumed run keeps its history
        for entry in self.history:
            self._update_best(entry)
        session = self.session = provenance.session_record(device, distributed_world()[1], self.argv)
        earlier = _load_run_file(folder)  # a resumed run adds its session to the earlier ones
        self.provenance = earlier or {"format": provenance.FORMAT, "sessions": []}
        self.provenance["sessions"].append(session)
        if earlier is None and self.history:  # a folder trained before run.json was written
            self.provenance["earlier_sessions_unknown"] = True
        self.record = {"args": {k: v for k, v in vars(args).items()},
                       "git_commit": provenance.commit_label(session["git"]), "torch": _torch_version(),
                       "python": session["python"], "device": str(device), "device_name": session["device_name"],
                       "host": session["host"], "command": self.argv or sys.argv}
        write_json(os.path.join(folder, "args.json"), self.record, self.write_advice())
        self._write_provenance()
        with self._writing(f"the TensorBoard events in {folder}"):
            self.writer = SummaryWriter(folder)
            self.writer.add_text("args", args_table(self.record))
            self.writer.add_custom_scalars(custom_layout(metric_names, self.tag_prefix))

    def record_provenance(self, **entries) -> None:
        """Adds ``entries`` (e.g. the dataset's fingerprint) to this process's session in run.json."""
        if self.enabled:
            self.session.update(entries)
            self._write_provenance()

    def _write_provenance(self) -> None:
        """run.json: the record of every process start of this run (``provenance.session_record``)."""
        data = {**self.provenance, "sessions": [provenance.public(r) for r in self.provenance["sessions"]]}
        write_json(os.path.join(self.folder, provenance.RUN_FILE), data, self.write_advice())

    def write_advice(self) -> str:
        """What the line of a failed write in this run advises: free space (a new run: or another --log_dir), and,
        once training has started or when resuming, which checkpoint is intact to resume from."""
        where = "free space" if getattr(self.args, "resume", "") else NEW_RUN_ADVICE
        if self.last_checkpoint:
            return f"{where}; the last checkpoint {self.last_checkpoint} is intact"
        if self.started and not getattr(self.args, "test_only", False):
            return f"{where}; no checkpoint was written yet"
        return where

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A failed write (an OSError) in the block raises ``WriteFailed`` naming ``what``."""
        try:
            yield
        except WriteFailed:
            raise
        except OSError as exc:
            raise write_failed(what, exc, self.write_advice()) from None

    # -- TensorBoard tags: loss/<term>, lr, <split>/<metric>
    def scalars(self, values: dict[str, float], it: int) -> None:
        """The training scalars: every loss term (under the original's names) and 'learning_rate'."""
        if not self.enabled:
            return
        with self._writing(f"the TensorBoard events in {self.folder}"):
            for name, value in values.items():
                self.writer.add_scalar("lr" if name == "learning_rate" else f"loss/{name}", value, it)

    def _update_best(self, entry: dict) -> None:
        if self.score is None:
            return
        value = self.score(entry)
        if not math.isnan(value) and (self.best is None or value > self.best["value"]):
            self.best = {"metric": self.score_name, "value": value, "it": entry["it"]}

    def metrics(self, metrics: dict[str, float], it: int) -> None:
        """One evaluation: TensorBoard '<split>/<metric>' (with --test_only 'eval/<split>/<metric>'), metrics.json
        (latest, history, best) and the summary table on the console."""
        self.history.append({"it": it, **metrics})
        self._update_best(self.history[-1])
        live = self.live_info() if self.live_info else {}  # every rank: it may gather across processes
        if not self.enabled:
            return
        with self._writing(f"the TensorBoard events in {self.folder}"):
            for name, value in metrics.items():
                split, _, metric = name.partition(" ")
                self.writer.add_scalar(f"{self.tag_prefix}{split}/{metric}", value, it)
        self._write_metrics_json(live)
        sizes = {split: size for split, (size, _) in self.galleries.items()}
        for line in summary_table(metrics, it, self.best, sizes):
            echo(line)

    def _write_metrics_json(self, live: dict) -> None:
        """metrics.json: ``info``, ``live`` (``live_info()``: the dataset counts), latest, history and best."""
        data = {**self.info, **live, "latest": self.history[-1], "history": self.history}
        if self.best is not None:
            data["best"] = self.best
        write_json(os.path.join(self.folder, "metrics.json"), data, self.write_advice())

    def image(self, tag: str, picture, it: int, file_name: str = "") -> None:
        """A PIL image to TensorBoard under ``tag`` at step ``it`` and, with ``file_name``, atomically to
        <run folder>/<file_name> as PNG (rank 0 only)."""
        if not self.enabled:
            return
        import numpy as np

        with self._writing(f"the TensorBoard events in {self.folder}"):
            self.writer.add_image(self.tag_prefix + tag, np.asarray(picture.convert("RGB")), it, dataformats="HWC")
        if file_name:
            atomic_write(os.path.join(self.folder, file_name), lambda f: picture.save(f, format="PNG"),
                         advice=self.write_advice())

    def save(self, name: str, state_fn: Callable[[], dict], resumable: bool = True) -> None:
        """Writes ``state_fn()`` atomically to <run folder>/<name>, its SHA-256 listed in the folder's
        checksums.sha256 (``checksums``; rank 0 only; every rank calls state_fn); a ``resumable`` one (a full
        training state) becomes ``last_checkpoint``."""
        path = os.path.join(self.folder, name)
        state = state_fn()
        if self.enabled:
            save_checkpoint(path, state, self.write_advice(), ChecksumFile(self.folder, self.write_advice()))
        if resumable:
            self.last_checkpoint = path

    def release(self) -> None:
        """Removes this run's lock file (also done by ``close`` and ``abort``)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self, final: dict[str, float], it: int = 0) -> None:
        """The end of the run: the yardstick line, for a training run its HParams trial (``_write_trial``), then
        ``notes`` as the run's last lines (warnings), run.json's end, the files closed and the lock released.
        metrics.json is written again when ``live_info`` may have changed since (unreadable images met after the
        last evaluation); ``live_info`` is called on every rank (a collective). A failure on the way records the
        session as failed (or interrupted) before it is raised."""
        try:
            live = self.live_info() if self.live_info is not None else None  # every rank: it may gather across ranks
            if not self.enabled:
                return
            if live is not None and self.history:
                self._write_metrics_json(live)
            line = self.yardstick()
            if line:
                echo(line)
            if not getattr(self.args, "test_only", False):  # an evaluation is no trial of its own
                with self._writing(f"the TensorBoard events in {self.folder}"):
                    self._write_trial(final, it)
            for note in self.notes:
                logger.warning("%s", note)
            provenance.finish(self.session, "finished")
            self._write_provenance()
            self._release()
        except BaseException as exc:  # a failed write, a signal: run.json says how the process ended
            if not self.enabled:
                raise
            if self.session["end"] is None:
                provenance.finish(self.session, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
                with contextlib.suppress(OSError):
                    self._write_provenance()
            self._release(failed=True)
            raise
        finally:
            self.release()  # the lock last: a --resume starting now sees the finished run.json

    def _write_trial(self, final: dict[str, float], it: int) -> None:
        """The run as a trial of TensorBoard's HParams dashboard, in its own event file: the configuration and the
        session's start and end (``hparams_session``), and the session metrics (the final and the best headline
        test recall@1 and @10) as scalars under 'session/', which the dashboard reads."""
        import hparams_session  # ~0.1 s (TensorBoard's HParams protos): imported by the runs that write, only

        if final:
            # the test numbers of the best iteration (with --select_on val: the test evaluation of best_checkpoint)
            best_entries = [e for e in self.history if self.best and e["it"] == self.best["it"]
                            and any(k.startswith("test ") for k in e)]
            entries = {"final": final, "best": best_entries[-1] if best_entries else final}
            for tag, _ in hparams_session.SESSION_METRICS:
                k, which = tag.split("_R@")[1].split("_")
                self.writer.add_scalar(tag, headline_recall(entries[which], "test", int(k)), it)
        trial = hparams_session.trial_summaries(self.args, os.path.basename(self.folder))
        for summary in [*trial, hparams_session.session_end_summary()]:
            self.writer.file_writer.add_summary(summary)

    def yardstick(self) -> str:
        """``yardstick: test gallery 240 images, 40 target classes; chance recall@1 2.50%``, for the split that
        picks the best checkpoint (--select_on; with --test_only: test, else the first evaluated split), from
        ``galleries``; with the dataset's measured R@1 of its default run (its registry entry's
        ``reference_recall_at_1``) where one is recorded. '' before any evaluation."""
        preferred = "test" if getattr(self.args, "test_only", False) else getattr(self.args, "select_on", "test")
        split = preferred if preferred in self.galleries else next(
            (s for s in self.galleries if s != "train"), next(iter(self.galleries), None))
        if split is None:
            return ""
        size, classes = self.galleries[split]
        line = (f"yardstick: {split} gallery {size} images, {classes} target classes; chance recall@1 "
                f"{100 / max(classes, 1):.2f}%")
        reference = dataset_spec(self.args.dataset).reference_recall_at_1 if hasattr(self.args, "dataset") else None
        if reference is not None:
            line += f"; the default run reaches recall@1 {100 * reference[0]:.1f}-{100 * reference[1]:.1f}%"
        return line

    def abort(self, error: str = "", status: str = "failed") -> None:
        """A failed run: ``error`` (the line main.py prints) ends its out.log and run.json records its end with
        ``status`` ('failed' or 'interrupted'); a run that failed before its first step has its new folder removed (a
        resumed run's is kept). A write error while closing its files (a full disk) is not raised: the run's own
        error is the one to report."""
        if not self.enabled:
            return
        if error and getattr(self, "out_log", None) is not None:
            self.out_log.write_line(error)
        if getattr(self, "provenance", None) is not None and self.session["end"] is None:
            provenance.finish(self.session, status)
            with contextlib.suppress(OSError):
                self._write_provenance()
        self._release(failed=True)
        self.release()
        if self.created and not self.started:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _release(self, failed: bool = False) -> None:
        """Closes the TensorBoard writer and out.log (flushing both); a write error raises ``WriteFailed``, unless
        the run has ``failed`` already."""
        quiet = contextlib.suppress(OSError) if failed else contextlib.nullcontext()
        if getattr(self, "writer", None) is not None:
            writer, self.writer = self.writer, None
            with quiet, self._writing(f"the TensorBoard events in {self.folder}"):
                writer.close()
        if getattr(self, "out_log", None) is not None:
            out_log, self.out_log = self.out_log, None
            logging.getLogger().removeHandler(out_log)
            console.out_log_ended(out_log)
            with quiet, self._writing(out_log.baseFilename):
                out_log.close()


def _load_run_file(folder: str) -> dict | None:
    """run.json of ``folder`` as a dict with a 'sessions' list; None where it is missing or unreadable."""
    try:
        with open(os.path.join(folder, provenance.RUN_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sessions"), list) else None


def _torch_version() -> str:
    import torch

    return torch.__version__


def args_table(info: dict) -> str:
    """The args (but ``config.TENSORBOARD_LEFT_OUT``) and the code's version, torch and device as one markdown
    table, for one TensorBoard text card."""
    rows = [(f"--{k}", v) for k, v in info["args"].items() if k not in TENSORBOARD_LEFT_OUT]
    rows += [(k, info[k]) for k in ("git_commit", "torch", "python", "device", "device_name", "host")]
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {cell(k)} | `{cell(v)}` |" for k, v in rows)


def custom_layout(metric_names, prefix: str = "") -> dict:
    """TensorBoard's custom-scalars layout: train and test recall@1 on one chart, recall@10 on another, and the
    loss terms together. ``metric_names``: the evaluation's '<split> <metric>' names; ``prefix``: of their tags."""
    charts = {}
    for k in (1, 10):
        tags = []
        for name in metric_names:
            parts = split_metric(name)
            if parts and parts[1] == k and (parts[2] == "composition" or not any(
                    split_metric(n) and split_metric(n)[2] == "composition" for n in metric_names)):
                split, _, metric = name.partition(" ")
                tags.append(f"{prefix}{split}/{metric}")
        charts[f"R@{k}"] = ["Multiline", tags]
    charts["losses"] = ["Multiline", [r"loss/.*"]]
    return {"retrieval": charts}
