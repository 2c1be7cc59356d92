"""Checkpoints: atomic writes, reading this project's and the original code's files, and every process's random
state, so that ``--resume`` continues exactly."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch

from errors import UserInputError
from distributed import distributed_world


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``: readers
    see the old file or the whole new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, a write error, an interrupt: no temp file left, ``path`` untouched
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


class WriteFailed(RuntimeError):
    """A run file (checkpoint, metrics.json) could not be written; the earlier file of that name is intact."""


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


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


RESUME_KEYS = ("it", "epoch", "batch_in_epoch", "best", "optimizer", "scheduler", "rng")


def is_original_checkpoint(ckpt: dict) -> bool:
    """An original-code checkpoint: {'it', 'opt', 'model_state_dict'} and no optimizer state."""
    return "optimizer" not in ckpt and "format" not in ckpt


def read_checkpoint(path: str, resume: bool = False) -> dict:
    """Reads this project's checkpoints and the original code's ({'it', 'opt', 'model_state_dict'}), and checks
    their keys and types once, here: ``model_state_dict`` a mapping of names to tensors, and with ``resume``
    the training state (``RESUME_KEYS``). An original-code checkpoint has no optimizer, schedule or random state,
    so ``resume`` refuses it (continuing it would not be the same run, and would write over files in its folder);
    ``--test_only`` evaluates it.

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


def _check_checkpoint(path: str, ckpt: dict, resume: bool) -> None:
    def bad(what: str) -> UserInputError:
        return UserInputError(f"checkpoint {path}: {what}; pass a checkpoint written by main.py")

    sd = ckpt["model_state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise bad(f"'model_state_dict' is a {type(sd).__name__}{' (empty)' if isinstance(sd, Mapping) else ''}, "
                  f"not a mapping of parameter names to tensors")
    wrong = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise bad(f"'model_state_dict' holds {len(wrong)} entries that are not tensors, e.g. {wrong[0]!r}")
    if "it" in ckpt and (isinstance(ckpt["it"], bool) or not isinstance(ckpt["it"], int) or ckpt["it"] < 0):
        raise bad(f"'it' is {ckpt['it']!r}, not an iteration count")
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
    for key in ("it", "epoch", "batch_in_epoch"):
        if isinstance(ckpt[key], bool) or not isinstance(ckpt[key], int) or ckpt[key] < 0:
            raise bad(f"{key!r} is {ckpt[key]!r}, not a count")
    if not isinstance(ckpt["best"], (int, float)):
        raise bad(f"'best' is {ckpt['best']!r}, not a number")
    for key in ("optimizer", "scheduler"):
        if not isinstance(ckpt[key], Mapping):
            raise bad(f"{key!r} is a {type(ckpt[key]).__name__}, not a state dict")
    opt = ckpt["optimizer"]
    if not isinstance(opt.get("state"), Mapping) or not isinstance(opt.get("param_groups"), list):
        raise bad("'optimizer' lacks 'state' / 'param_groups'")
    rngs = ckpt["rng"]
    rngs = rngs if isinstance(rngs, list) else [rngs]
    if not rngs or not all(isinstance(r, Mapping) and isinstance(r.get("torch"), torch.Tensor)
                           and r["torch"].dtype == torch.uint8 for r in rngs):
        raise bad("'rng' is not a list of random states (a uint8 'torch' state each)")


def rng_state(model) -> dict:
    """This process's random state: torch CPU and CUDA generators and the soft-triplet sampler's generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if model.loss_generator is not None:
        state["loss"] = model.loss_generator.get_state()
    return state


def set_rng_state(model, states) -> None:
    """Restores ``rng_state`` of this process (checkpoints hold one state per process, in rank order)."""
    rank, _ = distributed_world()
    state = states[min(rank, len(states) - 1)] if isinstance(states, list) else states
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
