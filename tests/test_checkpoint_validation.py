"""checkpoint_settings: the settings that size a model are refused, one line naming the checkpoint and the field,
unless they are integers in range and a vocabulary of words to ids."""
from __future__ import annotations

import argparse

import pytest

from checkpoint_settings import SETTING_RANGES, recorded_settings, validate_checkpoint_settings
from errors import UserInputError

SOUND = {"image_size": 224, "image_embed_dim": 512, "lstm_dim": 512, "vocab": {"<UNK>": 0, "red": 1, "green": 2},
         "model": "tirg"}


def test_sound_settings_and_absent_ones_pass():
    validate_checkpoint_settings(SOUND, "ck.pth")
    validate_checkpoint_settings({}, "ck.pth")
    validate_checkpoint_settings({"image_size": None, "vocab": None, "lstm_dim": 65536}, "ck.pth")
    for name, (low, high) in SETTING_RANGES.items():
        validate_checkpoint_settings({**SOUND, name: low}, "ck.pth")
        validate_checkpoint_settings({**SOUND, name: high}, "ck.pth")


@pytest.mark.parametrize("name, value, words", [
    ("image_size", 200000, "is 200000, outside 1..4096"), ("image_size", 4097, "outside 1..4096"),
    ("image_size", 0, "outside 1..4096"), ("image_embed_dim", -3, "outside 1..65536"),
    ("lstm_dim", 65537, "outside 1..65536"), ("image_size", 32.0, "(float), not an integer"),
    ("lstm_dim", "512", "(str), not an integer"), ("image_embed_dim", True, "(bool), not an integer"),
    ("vocab", ["red"], "'vocab' is a list, not a dict"), ("vocab", {1: 0}, "has the key 1 (int), not a word"),
    ("vocab", {"<UNK>": 0, "red": "1"}, "maps 'red' to '1', not an id in 0..1"),
    ("vocab", {"<UNK>": 0, "red": 2}, "maps 'red' to 2, not an id in 0..1"),
    ("vocab", {"<UNK>": False}, "maps '<UNK>' to False"),
])
def test_unsound_setting_is_one_line_naming_the_checkpoint_and_field(name, value, words):
    with pytest.raises(UserInputError) as info:
        validate_checkpoint_settings({**SOUND, name: value}, "runs/ck.pth")
    message = str(info.value)
    assert message.startswith(f"checkpoint runs/ck.pth: '{name}' ") and words in message, message
    assert "\n" not in message and message.endswith("pass a checkpoint written by main.py")


def test_recorded_settings_of_this_projects_and_the_original_codes_checkpoints():
    ours = recorded_settings({"args": {"image_size": 32, "lstm_dim": 16}, "opt": argparse.Namespace(image_size=7),
                              "vocab": {"<UNK>": 0}})
    assert ours == {"image_size": 32, "lstm_dim": 16, "vocab": {"<UNK>": 0}}  # 'args' wins over 'opt'
    original = recorded_settings({"opt": argparse.Namespace(image_size=7, embed_dim=512), "model_state_dict": {}})
    assert original == {"image_size": 7, "embed_dim": 512, "vocab": None}
    assert recorded_settings({"model_state_dict": {}}) == {"vocab": None}
