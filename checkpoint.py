"""Checkpoints: atomic writes that fail with one line, reading and checking this project's and the original code's
files, every process's random state, and restarting training from a checkpoint (``restart_from_checkpoint``), so
that ``--resume`` continues exactly."""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from typing import IO, Any, TypedDict

import torch

from errors import UserInputError
from distributed import distributed_world


# The largest iteration, epoch or batch count a checkpoint may hold: seeding.py's stream tags assume epochs and
# indices below 2**40, and TensorBoard's steps are int64.
MAX_COUNT = 2 ** 40
RESUME_KEYS = ("it", "epoch", "batch_in_epoch", "best", "optimizer", "scheduler", "rng")
SCHEDULER_KEYS = ("last_epoch", "base_lrs")  # what every PyTorch LRScheduler computes its rates from
# A CUDA (Philox) generator's state: an 8-byte seed and an 8-byte offset (PyTorch also reads a seed alone)
CUDA_RNG_BYTES = (16, 8)


# ------------------------------------------------------------------------------------------------------------------
# Writing
class WriteFailed(OSError):
    """A file could not be written (disk full, quota, read-only, I/O error): one line naming the file, the reason
    and what to do; the earlier file of that name is intact and no temp file is left. main.py exits with 1."""


class _KeepsWriteErrors:
    """File ``f`` whose failing ``write`` keeps its OSError in ``error``: torch's zip writer reports the OSError
    of a full disk as a RuntimeError ('unexpected pos ...') without its errno."""

    def __init__(self, f: IO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def write_failed(what: str, exc: OSError, advice: str) -> WriteFailed:
    """The one line of a failed write: ``cannot write <what>: <reason>; <advice>``."""
    reason = "no space left on device" if exc.errno == errno.ENOSPC else str(exc.strerror or exc)
    return WriteFailed(f"cannot write {what}: {reason[:1].lower()}{reason[1:]}; {advice}")


def atomic_write(path: str, write: Callable[[IO], Any], mode: str = "wb",
                 advice: str = "the file there is unchanged", before_replace: Callable[[], Any] | None = None) -> None:
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``: readers
    see the old file or the whole new one, never a torn one. ``before_replace()`` runs between the flush and the
    rename (``save_checkpoint`` lists the new file's digest there).

    Any failure (``before_replace``'s too) removes the temp file and leaves ``path`` untouched. A failed write (an
    OSError, or torch's writer's RuntimeError over one) raises ``WriteFailed`` naming ``path``, the reason and
    ``advice``.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    f = None
    try:
        with open(tmp, mode) as raw:
            f = _KeepsWriteErrors(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:  # disk full, a write error, an interrupt: no temp file left, ``path`` untouched
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = exc if isinstance(exc, OSError) else None
        if isinstance(exc, RuntimeError) and f is not None:
            cause = f.error  # torch's writer over a failed write
        if cause is None or isinstance(exc, WriteFailed):
            raise
        raise write_failed(path, cause, advice) from None


class _Hashing:
    """A write-only file that feeds every byte written to ``f`` into ``digest`` (torch.save writes its zip
    archive in order, calling only ``write`` and ``flush``, so ``digest`` is the file's SHA-256)."""

    def __init__(self, f: IO, digest):
        self._f, self._digest = f, digest

    def write(self, data) -> int:
        self._digest.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(path: str, state: dict, advice: str = "the file there is unchanged", checksums=None) -> str:
    """``state`` written atomically to ``path`` (``atomic_write``: a failed write raises ``WriteFailed``); returns
    the SHA-256 (hex) of the bytes written, hashed while writing.

    With ``checksums`` (a ``checksums.ChecksumFile`` of ``path``'s folder) the file's name and digest are listed
    there (``add``, keeping the name's old line) before the rename, and the old line dropped (``drop_stale``) after
    it: a process killed at any moment leaves a listed checkpoint, the old one or the new one.
    """
    digest, name = hashlib.sha256(), os.path.basename(path)
    listed = None if checksums is None else (lambda: checksums.add(name, digest.hexdigest()))
    atomic_write(path, lambda f: torch.save(state, _Hashing(f, digest)), advice=advice, before_replace=listed)
    if checksums is not None:
        checksums.drop_stale(name, digest.hexdigest())
    return digest.hexdigest()


def nonfinite_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters and buffers (and the optimizer's state tensors) holding NaN or infinity.

    One check: a device reduction per tensor, stacked, and a single host sync; the names are looked up
    (a second sync) only when something is not finite.
    """
    named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            named += [(f"optimizer state {i} {key}", t) for key, t in state.items()
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])  # (N,) bool
    if bool(flags.all()):
        return []
    return [name for (name, _), ok in zip(named, flags.tolist()) if not ok]


# ------------------------------------------------------------------------------------------------------------------
# Reading and checking
def is_original_checkpoint(ckpt: dict) -> bool:
    """An original-code checkpoint: {'it', 'opt', 'model_state_dict'} and no optimizer state."""
    return "optimizer" not in ckpt and "format" not in ckpt


def read_checkpoint(path: str, resume: bool = False) -> dict:
    """Reads this project's checkpoints and the original code's ({'it', 'opt', 'model_state_dict'}), and checks
    their keys and types once, here (``_check_checkpoint``): a tampered or foreign field is a UserInputError that
    names the checkpoint and the field. An original-code checkpoint has no optimizer, schedule or random state,
    so ``resume`` refuses it (continuing it would not be the same run, and would write over files in its folder);
    ``--test_only`` evaluates it. ``restart_from_checkpoint`` then checks the training state against the model.

    The original pickled an argparse.Namespace as 'opt'; PyTorch's safe loader refuses unknown classes, so exactly
    that one class is allowed (safety stays on).
    """
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint {path} does not exist; pass the path of a latest_checkpoint.pth")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn, empty, foreign or unsafe file
        lines = str(exc).strip().splitlines() or [""]  # an empty file's error has an empty message
        raise UserInputError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {lines[0][:100]}); pass a "
                             f"checkpoint written by main.py") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserInputError(f"checkpoint {path} has no 'model_state_dict'; pass a checkpoint written by main.py")
    _check_checkpoint(path, ckpt, resume)
    return ckpt


def _refusal(path: str, advice: str = "pass a checkpoint written by main.py") -> Callable[[str], UserInputError]:
    """``what -> UserInputError('checkpoint <path>: <what>; <advice>')``."""
    return lambda what: UserInputError(f"checkpoint {path}: {what}; {advice}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _check_checkpoint(path: str, ckpt: dict, resume: bool) -> None:
    """The checks of ``read_checkpoint``: what evaluation reads (weights, vocabulary, iteration), and with
    ``resume`` the training state (``_check_training_state``)."""
    bad = _refusal(path)
    sd = ckpt["model_state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise bad(f"'model_state_dict' is a {type(sd).__name__}{' (empty)' if isinstance(sd, Mapping) else ''}, "
                  f"not a mapping of parameter names to tensors")
    wrong = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise bad(f"'model_state_dict' holds {len(wrong)} entries that are not tensors, e.g. {wrong[0]!r}")
    if "it" in ckpt and not _is_count(ckpt["it"]):
        raise bad(f"'it' is {ckpt['it']!r}, not an iteration count (0 to 2**40)")
    vocab = ckpt.get("vocab")
    if vocab is not None:
        if not isinstance(vocab, Mapping) or not vocab or not all(isinstance(w, str) for w in vocab):
            raise bad(f"'vocab' is a {type(vocab).__name__}{' (empty)' if isinstance(vocab, Mapping) else ''}, not "
                      f"the LSTM's mapping of words to ids (or None)")
        odd = [(w, i) for w, i in vocab.items() if not (_is_count(i) and i < len(vocab))]
        if odd or len(set(vocab.values())) != len(vocab):
            raise bad(f"'vocab' does not number its {len(vocab)} words 0..{len(vocab) - 1} once each"
                      f"{f' (e.g. {odd[0][0]!r}: {odd[0][1]!r})' if odd else ''}")
    if not resume:
        return
    if is_original_checkpoint(ckpt):
        raise UserInputError(f"checkpoint {path} is the original code's: it has no optimizer, schedule or random "
                             f"state, so --resume cannot continue it exactly; evaluate it with --test_only True "
                             f"--model_checkpoint {path}")
    if "optimizer" not in ckpt and "model_state_dict" in ckpt and ckpt.get("format"):
        raise UserInputError(f"--resume {path} holds no optimizer state (a best_checkpoint.pth: weights, args and "
                             f"vocabulary only); resume from the run's latest_checkpoint.pth, or evaluate it with "
                             f"--test_only True")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise bad(f"--resume needs its training state, but {', '.join(repr(k) for k in missing)} "
                  f"{'is' if len(missing) == 1 else 'are'} missing")
    _check_training_state(ckpt, bad)


def _check_training_state(ckpt: dict, bad: Callable[[str], UserInputError]) -> None:
    """Counts, best score, optimizer, schedule and random states of a checkpoint to resume, on their own (against
    the model: ``_check_fits``)."""
    for key in ("epoch", "batch_in_epoch"):
        if not _is_count(ckpt[key]):
            raise bad(f"{key!r} is {ckpt[key]!r}, not a count (0 to 2**40)")
    best = ckpt["best"]
    if not isinstance(best, float) or math.isnan(best) or best == math.inf:
        raise bad(f"'best' is {best!r}, not a selection score (a finite float, or -inf before the first evaluation)")
    for key in ("optimizer", "scheduler"):
        if not isinstance(ckpt[key], Mapping):
            raise bad(f"{key!r} is a {type(ckpt[key]).__name__}, not a state dict")
    opt = ckpt["optimizer"]
    if not isinstance(opt.get("state"), Mapping) or not isinstance(opt.get("param_groups"), list):
        raise bad("'optimizer' lacks 'state' / 'param_groups'")
    listed: set[int] = set()
    for i, group in enumerate(opt["param_groups"]):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list) or not all(_is_count(p) for p in params):
            raise bad(f"'optimizer' param_groups[{i}] has no list of parameter indices 'params'")
        if listed & set(params) or len(set(params)) != len(params):
            raise bad("'optimizer' param_groups list a parameter twice")
        listed |= set(params)
    for index, state in opt["state"].items():
        if index not in listed:
            raise bad(f"'optimizer' state holds parameter {index!r}, which no parameter group lists (a group is "
                      f"missing)")
        if not isinstance(state, Mapping):
            raise bad(f"'optimizer' state of parameter {index} is a {type(state).__name__}, not a mapping")
    sched = ckpt["scheduler"]
    missing = [k for k in SCHEDULER_KEYS if k not in sched]
    if missing:
        raise bad(f"'scheduler' lacks {', '.join(repr(k) for k in missing)}")
    if not _is_count(sched["last_epoch"]):
        raise bad(f"'scheduler' 'last_epoch' is {sched['last_epoch']!r}, not a step count (0 to 2**40)")
    base = sched["base_lrs"]
    if not isinstance(base, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             and math.isfinite(x) for x in base):
        raise bad(f"'scheduler' 'base_lrs' is {base!r}, not a list of learning rates")
    if not all(fn is None or isinstance(fn, Mapping) for fn in sched.get("lr_lambdas", [])):
        raise bad("'scheduler' 'lr_lambdas' holds entries that are neither None nor a state dict")
    _check_rng_states(ckpt["rng"], bad)


def _byte_state_problem(t, sizes: tuple[int, ...] = ()) -> str | None:
    """Why ``t`` is not a generator state (a 1-D uint8 tensor, of one of ``sizes`` bytes when given); None when
    it is."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        shown = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)[:40]
        return f"is {shown}, not a uint8 generator state"
    if sizes and t.numel() not in sizes:
        return f"holds {t.numel()} bytes, not the {sizes[0]} of this generator"
    return None


def _check_rng_states(rngs, bad: Callable[[str], UserInputError]) -> None:
    """One state per process: the torch CPU generator's ('torch'), the CUDA generators' ('cuda', a list), the
    soft-triplet sampler's ('loss'); numpy and Python states are not held (nothing here draws from them)."""
    rngs = rngs if isinstance(rngs, list) else [rngs]
    if not rngs:
        raise bad("'rng' is an empty list, not one random state per process")
    cpu_bytes = torch.get_rng_state().numel()
    for i, state in enumerate(rngs):
        if not isinstance(state, Mapping):
            raise bad(f"'rng'[{i}] is a {type(state).__name__}, not a random state")
        problem = _byte_state_problem(state.get("torch"), (cpu_bytes,))
        if problem:
            raise bad(f"'rng'[{i}]['torch'] {problem}")
        cuda = state.get("cuda", [])
        if not isinstance(cuda, list):
            raise bad(f"'rng'[{i}]['cuda'] is a {type(cuda).__name__}, not a list of CUDA generator states")
        for d, t in enumerate(cuda):
            if problem := _byte_state_problem(t, CUDA_RNG_BYTES):
                raise bad(f"'rng'[{i}]['cuda'][{d}] {problem}")
        if "loss" in state and (problem := _byte_state_problem(state["loss"])):
            raise bad(f"'rng'[{i}]['loss'] {problem}")


# ------------------------------------------------------------------------------------------------------------------
# The training state: saved, and restarted from
def rng_state(model) -> dict:
    """This process's random state: torch CPU and CUDA generators and the soft-triplet sampler's generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if model.loss_generator is not None:
        state["loss"] = model.loss_generator.get_state()
    return state


def _own_rng_state(states) -> Mapping:
    """This process's entry of a checkpoint's 'rng' (one state per process, in rank order)."""
    rank, _ = distributed_world()
    return states[min(rank, len(states) - 1)] if isinstance(states, list) else states


def set_rng_state(model, states) -> None:
    """Restores ``rng_state`` of this process (checkpoints hold one state per process, in rank order)."""
    state = _own_rng_state(states)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loss" in state and model.loss_generator is not None:
        model.loss_generator.set_state(state["loss"])


def checkpoint_state(args, model, optimizer, scheduler, it: int, epoch: int, batch_in_epoch: int, best: float) -> dict:
    """The full training state. Keys ``it``, ``opt`` and ``model_state_dict`` are the original's, so tools written
    for its checkpoints read these; ``rng`` holds every process's random state (a collective: all ranks call it)."""
    rngs = [rng_state(model)]
    _, world = distributed_world()
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state(model))
    vocab = model.text_model.vocab.word2id if model.text_model is not None else None
    return {"it": it, "opt": argparse.Namespace(**vars(args)), "model_state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best": best, "rng": rngs, "vocab": vocab, "args": vars(args),
            "format": "composeae-repro/1"}


def evaluation_state(state: dict) -> dict:
    """What evaluation needs of a full ``checkpoint_state``: the weights, args, vocabulary and step, without the
    optimizer, schedule and random states (best_checkpoint.pth; --resume needs a latest_checkpoint.pth)."""
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}


class ResumeState(TypedDict):
    """Where a resumed run continues: the iterations done, the epoch and the batch within it, and the best
    selection score so far (-inf before the first evaluation)."""

    it: int
    epoch: int
    batch_in_epoch: int
    best: float


def restart_from_checkpoint(ckpt: dict, source: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler) -> ResumeState:
    """Restores the training state of checkpoint ``source`` (``ckpt``, as ``read_checkpoint(source, resume=True)``
    read and checked it) into ``optimizer``, ``scheduler`` and this process's random generators, after checking
    that it fits them (``_check_fits``: parameter groups, state shapes, schedule, generator sizes); returns where
    training continues. As DINO's ``restart_from_checkpoint``, in one place for every resumed object.

    The model's weights are not loaded here: ``factory.build_experiment`` builds the model with them (from the
    same ``ckpt``), before the optimizer is restored. Non-finite weights or optimizer state are refused. A
    checkpoint at or past ``--num_iters`` trains nothing, which ``training.train`` tells as the run's last line.
    """
    _check_fits(ckpt, source, model, optimizer, scheduler)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(model, ckpt["rng"])
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        raise UserInputError(f"--resume {source}: {len(bad)} of its tensors are not finite (e.g. {bad[0]}); resume "
                             f"from an earlier checkpoint")
    return ResumeState(it=ckpt["it"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"], best=ckpt["best"])


def _kind(value) -> str:
    """The kind of an optimizer hyperparameter: 'a number', 'True or False' or 'None'."""
    if value is None or isinstance(value, bool):
        return "True, False or None"
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def _check_fits(ckpt: dict, source: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler) -> None:
    """The checkpoint's training state against the objects it is restored into: the same parameter groups with
    hyperparameters of the same kind, state tensors of their parameters' shapes, every schedule key, and this
    process's generator states of this device's sizes."""
    bad = _refusal(source, "resume from a latest_checkpoint.pth of this model written by main.py")
    saved_groups, groups = ckpt["optimizer"]["param_groups"], optimizer.param_groups
    sizes, expected = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
    if sizes != expected:
        raise bad(f"'optimizer' has {len(sizes)} parameter groups of {sizes} parameters, the model's optimizer "
                  f"{len(expected)} of {expected}")
    names = {id(p): name for name, p in model.named_parameters()}
    params = {}  # the saved index -> the parameter it is restored into (as Optimizer.load_state_dict maps them)
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        params.update(zip(saved["params"], group["params"]))
        for key, value in saved.items():
            if key != "params" and key in group and _kind(value) != _kind(group[key]):
                raise bad(f"'optimizer' param_groups[{i}][{key!r}] is {value!r}, not {_kind(group[key])}")
    for index, state in ckpt["optimizer"]["state"].items():
        p = params[index]
        for key, t in state.items():  # 0-d tensors are counters (Adam's 'step'), the others per-weight buffers
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                raise bad(f"'optimizer' state {key!r} of parameter {index} ({names.get(id(p), '?')}) has shape "
                          f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
    live = scheduler.state_dict()
    missing = [k for k in live if not k.startswith("_") and k not in ckpt["scheduler"]]
    if missing:
        raise bad(f"'scheduler' lacks {', '.join(repr(k) for k in missing)}")
    for key, value in live.items():  # one entry per parameter group: base_lrs, lr_lambdas
        saved = ckpt["scheduler"].get(key)
        if isinstance(value, list) and len(value) == len(groups) and not (
                isinstance(saved, list) and len(saved) == len(groups)):
            raise bad(f"'scheduler' {key!r} is {saved!r}, not one entry per parameter group ({len(groups)})")
    state = _own_rng_state(ckpt["rng"])
    if "loss" in state and model.loss_generator is not None:
        problem = _byte_state_problem(state["loss"], (model.loss_generator.get_state().numel(),))
        if problem:
            raise bad(f"'rng' 'loss' {problem} (the soft-triplet sampler's, on {model.loss_generator.device})")
