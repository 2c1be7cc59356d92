"""Checks of the settings a checkpoint records, made before a model is built from them.

A checkpoint's settings size the model's tensors and the images it is fed: an ``image_size`` of 200000 would
allocate 3 x 200000 x 200000 bytes per image. ``validate_checkpoint_settings`` refuses, with one line naming the
checkpoint and the field, any value that is not an integer in its range (``SETTING_RANGES``) or a vocabulary that
is not a mapping of words to ids.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from errors import UserInputError

# Inclusive ranges of the integer settings (main.py's flags require the same values to be positive).
SETTING_RANGES: dict[str, tuple[int, int]] = {
    "image_size": (1, 4096),
    "image_embed_dim": (1, 65536),
    "lstm_dim": (1, 65536),
}


def recorded_settings(ckpt: Mapping) -> dict[str, Any]:
    """The settings a checkpoint records, as saved: this project's ``'args'`` dict, else the original code's
    ``'opt'`` Namespace as a dict (empty when it holds neither), with the checkpoint's ``'vocab'`` (None when it
    has none)."""
    saved = ckpt.get("args")
    if not isinstance(saved, Mapping):
        opt = ckpt.get("opt")
        saved = vars(opt) if isinstance(opt, argparse.Namespace) else {}
    return {**saved, "vocab": ckpt.get("vocab")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_checkpoint_settings(settings: Mapping, source: str) -> None:
    """Raises UserInputError (one line naming ``source`` and the field) unless every setting of ``settings`` that
    sizes the model is sound: ``image_size``, ``image_embed_dim`` and ``lstm_dim`` integers in their
    ``SETTING_RANGES``, and ``vocab`` a dict of word (str) -> id (int in 0..len(vocab)-1, the rows of the LSTM's
    word embedding). A setting that is absent or None is not checked: the defaults apply to it (an original-code
    checkpoint records no vocabulary and not every flag).
    """
    def bad(what: str) -> UserInputError:
        return UserInputError(f"checkpoint {source}: {what}; pass a checkpoint written by main.py")

    for name, (low, high) in SETTING_RANGES.items():
        value = settings.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise bad(f"'{name}' is {value!r} ({type(value).__name__}), not an integer in {low}..{high}")
        if not low <= value <= high:
            raise bad(f"'{name}' is {value}, outside {low}..{high}")
    vocab = settings.get("vocab")
    if vocab is None:
        return
    if not isinstance(vocab, dict):
        raise bad(f"'vocab' is a {type(vocab).__name__}, not a dict of words to ids")
    for word, index in vocab.items():
        if not isinstance(word, str):
            raise bad(f"'vocab' has the key {word!r} ({type(word).__name__}), not a word (str)")
        if not _is_int(index) or not 0 <= index < len(vocab):
            raise bad(f"'vocab' maps {word!r} to {index!r}, not an id in 0..{len(vocab) - 1}")
