"""Checkpoints: atomic writes, reading this project's and the original code's files, and every process's random
state, so that ``--resume`` continues exactly."""
from __future__ import annotations

import argparse
import os

import torch

from torch_functions import UserInputError, distributed_world


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``: readers
    see the old file or the whole new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str) -> dict:
    """Reads this project's checkpoints and the original code's ({'it', 'opt', 'model_state_dict'}).

    The original pickled an argparse.Namespace as 'opt'; PyTorch's safe loader refuses unknown classes, so exactly
    that one class is allowed (safety stays on).
    """
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint {path} does not exist; pass the path of a latest_checkpoint.pth")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn, foreign or unsafe file
        raise UserInputError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:100]}); pass a checkpoint written by main.py") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserInputError(f"checkpoint {path} has no 'model_state_dict'; pass a checkpoint written by main.py")
    return ckpt


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
