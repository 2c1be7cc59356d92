"""Progress display of training, evaluation, encoding and the image cache, by one rule: tqdm's bar when stderr is a
terminal; otherwise (a log file, a cluster job's output) no bar at all, since tqdm redraws it with carriage returns
before every line the run prints. There the training loop prints a plain progress line every --log_every iterations
instead (``progress_line``)."""
from __future__ import annotations

import datetime
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

TOTAL_LOSS = "total training loss"  # the loss term that sgd_step names the weighted sum


def interactive(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class QuietProgress:
    """tqdm's interface as this project uses it (iteration, ``update``, ``set_postfix``, ``n``, context manager)
    with no output at all."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0):
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            self.n += 1
            yield item

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> QuietProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False) -> tqdm | QuietProgress:
    """A progress bar over ``iterable`` (or one counted by ``update``): tqdm on a terminal (its width follows the
    terminal, at most one refresh a second), a ``QuietProgress`` when ``disable`` or when stderr is not a
    terminal."""
    if disable or not interactive():
        return QuietProgress(iterable, total=total, initial=initial)
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, mininterval=1.0)


def progress_line(it: int, total: int, losses: dict[str, float], samples_per_s: float, batch_size: int) -> str:
    """``iteration 40/300  loss 1.2345 (soft_triplet 1.1000, L2_loss 0.0100)  52.1 samples/s  ETA 0:04:10``:
    the iteration, the averaged total loss and its terms (``losses``: the loss terms by name, the total under
    'total training loss'), the training speed (``batch_size`` samples an iteration) and the time left at that
    speed."""
    terms = ", ".join(f"{name} {value:.4f}" for name, value in losses.items() if name != TOTAL_LOSS)
    loss = f"loss {losses[TOTAL_LOSS]:.4f}" if TOTAL_LOSS in losses else "loss -"
    if terms:
        loss += f" ({terms})"
    line = f"iteration {it}/{total}  {loss}  {samples_per_s:.1f} samples/s"
    return f"{line}  ETA {eta(total - it, samples_per_s / batch_size)}"


def eta(iterations_left: int, iterations_per_s: float) -> str:
    """The time ``iterations_left`` take at ``iterations_per_s``, as H:MM:SS; '?' without a measured speed."""
    if not iterations_per_s > 0:
        return "?"
    return str(datetime.timedelta(seconds=round(max(iterations_left, 0) / iterations_per_s)))
