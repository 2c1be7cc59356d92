"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM (pre-emption) and SIGUSR1 (SLURM's --signal=USR1@60).

During training they are recorded by ``interrupt_flag``; the training loop then saves between two steps and raises
``Interrupted``. During an evaluation (``--test_only``), ``stop_evaluation_on_interrupt`` raises
``EvaluationInterrupted`` at once: an evaluation that did not finish writes nothing."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch

INTERRUPT_SIGNALS: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGUSR1")


class Interrupted(Exception):
    """Training stopped on a signal, between two steps; ``checkpoint`` is the file to resume from (None: none)."""

    def __init__(self, signum: int, it: int, checkpoint: str | None, saved: bool):
        self.signum, self.it, self.checkpoint, self.saved = signum, it, checkpoint, saved
        super().__init__(f"{signal.Signals(signum).name} at iteration {it}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""
        return 128 + self.signum


class EvaluationInterrupted(Exception):
    """An evaluation of ``checkpoint`` stopped on signal ``signum`` before it finished (nothing was written)."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"{signal.Signals(signum).name} during the evaluation of {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""
        return 128 + self.signum


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    """``handler`` for every signal of ``INTERRUPT_SIGNALS`` this platform has, the previous handlers back on exit.
    Outside the main thread (where Python cannot install handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in INTERRUPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def interrupt_flag() -> Iterator[dict[str, int]]:
    """Installs handlers of ``INTERRUPT_SIGNALS`` that only record the signal (``flag['signum']``), so the loop can
    stop between two steps; a second signal raises KeyboardInterrupt at once. The previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) nothing is installed."""
    flag = {"signum": 0}

    def handler(signum, frame):
        if flag["signum"]:
            raise KeyboardInterrupt
        flag["signum"] = signum

    with _handlers(handler):
        yield flag


class StoppedEarly(KeyboardInterrupt):
    """A signal of ``INTERRUPT_SIGNALS`` outside the training loop and the evaluation (while the data, the model or
    the run folder are being made): raised at once; nothing has been saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_at_once_on_interrupt() -> Iterator[None]:
    """Installs handlers of ``INTERRUPT_SIGNALS`` that raise ``StoppedEarly(signum)`` at once, so SIGTERM and
    SIGUSR1 before the training loop end in one line like SIGINT (not by their default action, which leaves
    ``run.lock`` and the new run folder behind). ``interrupt_flag`` and ``stop_evaluation_on_interrupt`` replace
    them while they run. The previous handlers come back on exit."""
    def handler(signum, frame):
        raise StoppedEarly(signum)

    with _handlers(handler):
        yield


@contextlib.contextmanager
def stop_evaluation_on_interrupt(checkpoint: str) -> Iterator[None]:
    """Installs handlers of ``INTERRUPT_SIGNALS`` that raise ``EvaluationInterrupted(signum, checkpoint)`` at once
    (an evaluation has no step to finish and nothing to save). The previous handlers come back on exit; outside
    the main thread nothing is installed."""
    def handler(signum, frame):
        raise EvaluationInterrupted(signum, checkpoint)

    with _handlers(handler):
        yield


def agree_on_signal(flag: dict[str, int], device: torch.device) -> int:
    """With several processes: the signal any of them received (the largest number), recorded in every process's
    ``flag``, so that all stop at the same step (saving is a collective). A collective: every process calls it."""
    signum = torch.tensor([flag["signum"]], device=device)  # (1,)
    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    flag["signum"] = int(signum)
    return flag["signum"]


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM / SIGUSR1 to the main process, which saves and ends them."""
    for name in INTERRUPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
