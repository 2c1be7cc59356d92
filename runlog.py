"""Run folders and what a run writes into them: TensorBoard scalars and images, ``metrics.json`` and checkpoints."""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime

from checkpoint import atomic_write, save_checkpoint
from torch_functions import UserInputError


def run_folder(args) -> str:
    """Creates and returns the original's run folder <log_dir>/<Mon DD_HH-MM-SS>_<host><comment>; a run started in
    the same second with the same comment gets <name>_1, _2, ... instead of sharing (overwriting) the folder."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    base = os.path.join(args.log_dir, f"{stamp}_{socket.gethostname()}{args.comment}")
    os.makedirs(args.log_dir, exist_ok=True)
    for n in range(1000):
        folder = f"{base}_{n}" if n else base
        try:
            os.mkdir(folder)  # atomic: concurrent runs cannot both get it
            return folder
        except FileExistsError:
            continue
    raise UserInputError(f"{base}: 1000 runs started in this second; use --comment to tell them apart")


def write_json(path: str, data) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2), mode="w")


class Run:
    """What a run writes: TensorBoard scalars, metrics.json and checkpoints in one run folder.

    Only the process of rank 0 writes (``enabled``); the others keep the same interface and write nothing.
    """

    def __init__(self, args, folder: str, enabled: bool = True):
        self.args, self.folder, self.enabled = args, folder, enabled
        self.history: list[dict] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(folder)
        for key, value in vars(args).items():
            self.writer.add_text(key, str(value))
        previous = os.path.join(folder, "metrics.json")
        if os.path.exists(previous):  # a resumed run keeps its history
            with open(previous) as f:
                self.history = json.load(f).get("history", [])

    def scalars(self, values: dict[str, float], it: int) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, it)

    def metrics(self, metrics: dict[str, float], it: int) -> None:
        self.scalars(metrics, it)
        self.history.append({"it": it, **metrics})
        if self.enabled:
            write_json(os.path.join(self.folder, "metrics.json"), {"latest": self.history[-1], "history": self.history})

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

    def close(self, final: dict[str, float]) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(self.args).items()}
        for summary in hparams(hp, {k: v for k, v in final.items() if k.startswith("test ")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()

