"""Run folders and what a run writes into them: TensorBoard scalars and images, ``metrics.json`` and checkpoints."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import socket
from datetime import datetime

from checkpoint import atomic_write, save_checkpoint
from torch_functions import UserInputError

logger = logging.getLogger("main")
LOCK_NAME = "run.lock"
_TEMP_SUFFIX = re.compile(r"\.tmp-?(\d+)$")  # atomic_write's <name>.tmp<pid>, the image cache's <name>.tmp-<pid>


def run_folder(args) -> str:
    """Creates and returns the original's run folder <log_dir>/<Mon DD_HH-MM-SS>_<host><comment>; a run started in
    the same second with the same comment gets <name>_1, _2, ... instead of sharing (overwriting) the folder."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    base = os.path.join(args.log_dir, f"{stamp}_{socket.gethostname()}{args.comment}")
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


def write_json(path: str, data) -> None:
    """Strict JSON (no NaN / Infinity tokens), written atomically."""
    text = json.dumps(strict_json(data), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text), mode="w")


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
    live one refuses the second process with a UserInputError. ``release`` removes the lock file if it is ours.
    """

    def __init__(self, folder: str):
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
            with os.fdopen(fd, "w") as f:
                f.write(me)
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


class Run:
    """What a run writes: TensorBoard scalars, metrics.json and checkpoints in one run folder.

    Only the process of rank 0 writes (``enabled``); the others keep the same interface and write nothing.
    """

    def __init__(self, args, folder: str, enabled: bool = True):
        self.args, self.folder, self.enabled = args, folder, enabled
        self.history: list[dict] = []
        self.info: dict = {}  # what the numbers are comparable with (factory.run_info), written into metrics.json
        self.lock: RunLock | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"cannot create the run folder {folder} ({exc.strerror or exc}); pass another "
                                 f"--log_dir") from None
        self.lock = RunLock(folder)  # a second process training in this folder is refused here
        remove_stale_temp_files(folder)
        self.writer = SummaryWriter(folder)
        for key, value in vars(args).items():
            self.writer.add_text(key, str(value))
        self.history = load_history(folder)  # a resumed run keeps its history

    def scalars(self, values: dict[str, float], it: int) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, it)

    def metrics(self, metrics: dict[str, float], it: int) -> None:
        self.scalars(metrics, it)
        self.history.append({"it": it, **metrics})
        if self.enabled:
            write_json(os.path.join(self.folder, "metrics.json"),
                       {**self.info, "latest": self.history[-1], "history": self.history})

    def image(self, tag: str, picture, it: int, file_name: str = "") -> None:
        """A PIL image to TensorBoard under ``tag`` at step ``it`` and, with ``file_name``, atomically to
        <run folder>/<file_name> as PNG (rank 0 only)."""
        if not self.enabled:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(picture.convert("RGB")), it, dataformats="HWC")
        if file_name:
            atomic_write(os.path.join(self.folder, file_name), lambda f: picture.save(f, format="PNG"))

    def save(self, name: str, state_fn) -> None:
        """Writes ``state_fn()`` atomically to <run folder>/<name> (rank 0 only; every rank calls state_fn)."""
        state = state_fn()
        if self.enabled:
            save_checkpoint(os.path.join(self.folder, name), state)

    def release(self) -> None:
        """Removes this run's lock file (also done by ``close``)."""
        if self.lock is not None:
            self.lock.release()

    def close(self, final: dict[str, float]) -> None:
        self.release()
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(self.args).items()}
        for summary in hparams(hp, {k: v for k, v in final.items() if k.startswith("test ")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()

