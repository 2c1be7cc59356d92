"""A checkpoint carries its run: --test_only and --resume take the settings that define the model, the data and the
training from it (config.take_checkpoint_settings), refuse (resume) or warn about (test_only) a given flag that
differs, and read an original-code checkpoint's settings from its pickled ``opt`` Namespace."""
from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shutil

import pytest
import torch

import checkpoint
import config
from errors import UserInputError

METRIC_LINE = re.compile(r"^     (train|test) recall_top\d+_correct_\w+ \d+(\.\d+)?$")


def metric_lines(text: str, split: str = "") -> list[str]:
    return [line for line in text.splitlines() if METRIC_LINE.match(line) and line.startswith(f"     {split}")]


def execution_flags(log_dir) -> list[str]:
    """Flags that only decide how a run is executed or observed."""
    return ["--device", "cpu", "--loader_num_workers", "0", "--log_dir", str(log_dir)]


def dataset_flags(data: str) -> list[str]:
    return ["--dataset", "mitstates", "--dataset_path", data]


def latest(run: dict) -> str:
    return os.path.join(run["folder"], "latest_checkpoint.pth")


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    return config.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
def test_test_only_with_only_the_dataset_flags_prints_the_final_evaluation(tirg_lstm_run, run_main_cli, tmp_path):
    """Trained at 32 px with a 16-wide LSTM: evaluated at the default 224 px / 512 it would print other numbers."""
    expected = metric_lines(tirg_lstm_run["stdout"], "test")
    assert len(expected) == 15
    rc, out, err = run_main_cli(dataset_flags(tirg_lstm_run["data"]) + [
        "--test_only", "--model_checkpoint", latest(tirg_lstm_run), *execution_flags(tmp_path)])
    assert rc == 0, err
    assert metric_lines(out) == expected  # the test split only, by default
    taken = [line for line in err.splitlines() if "settings taken from" in line]
    assert len(taken) == 1 and "--image_size 32" in taken[0] and "--lstm_dim 16" in taken[0], taken
    assert "--model tirg" in taken[0] and "--loss soft_triplet" in taken[0]
    assert "WARNING" not in err


def test_resume_with_only_the_dataset_flags_equals_a_straight_run(tirg_lstm_run, run_main_cli, tiny_mitstates,
                                                                   tmp_path):
    """2 iterations, resumed to 4 with no model or training flag, equal the 4 straight iterations exactly."""
    first = ["--dataset", "mitstates", "--dataset_path", tiny_mitstates, *tirg_lstm_run["flags"], "--num_iters", "2",
             *execution_flags(tmp_path / "first")]
    assert run_main_cli(first)[0] == 0
    (ckpt,) = glob.glob(str(tmp_path / "first" / "*" / "latest_checkpoint.pth"))
    rc, _, err = run_main_cli(dataset_flags(tiny_mitstates) + ["--resume", ckpt, "--num_iters", "4",
                                                                    "--device", "cpu", "--loader_num_workers", "0"])
    assert rc == 0, err
    resumed, straight = checkpoint.read_checkpoint(ckpt), checkpoint.read_checkpoint(latest(tirg_lstm_run))
    assert resumed["it"] == straight["it"] == 4
    a, b = resumed["model_state_dict"], straight["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["args"]["loss"] == "soft_triplet" and resumed["args"]["image_size"] == 32


@pytest.mark.parametrize("flag, value, shown", [
    ("--loss", "batch_based_classification", "--loss soft_triplet"),
    ("--image_size", "64", "--image_size 32"),
    ("--learning_rate", "0.1", "--learning_rate 0.01"),
    ("--use_bert", "True", "--use_bert False"),
])
def test_resume_refuses_a_flag_that_changes_the_run(tirg_lstm_run, run_main_cli, tmp_path, flag, value, shown):
    ckpt = str(tmp_path / "latest_checkpoint.pth")
    shutil.copy(latest(tirg_lstm_run), ckpt)
    rc, out, err = run_main_cli(dataset_flags(tirg_lstm_run["data"]) + [
        "--resume", ckpt, flag, value, "--num_iters", "6", "--device", "cpu"])
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("main.py: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert ckpt in errors[0] and shown in errors[0] and f"{flag} {value}" in errors[0], errors[0]
    assert checkpoint.read_checkpoint(ckpt)["it"] == 4 and sorted(os.listdir(tmp_path)) == ["latest_checkpoint.pth"]


def test_resume_allows_execution_and_observation_flags(tirg_lstm_run):
    ckpt = checkpoint.read_checkpoint(latest(tirg_lstm_run))
    argv = dataset_flags(tirg_lstm_run["data"]) + ["--resume", "x.pth", "--num_iters", "9", "--eval_every", "2",
                                                   "--save_every", "3", "--log_every", "5", "--loader_num_workers",
                                                   "2", "--device", "cpu", "--log_dir", "elsewhere",
                                                   "--channels_last", "--cudnn_benchmark", "True", "--image_cache",
                                                   "cache"]
    args, given = parse(argv)
    args = config.take_checkpoint_settings(args, ckpt, given, "x.pth", resume=True)
    assert (args.num_iters, args.eval_every, args.save_every, args.log_every) == (9, 2, 3, 5)
    assert (args.channels_last, args.loader_num_workers, args.image_cache) == (True, 2, "cache")
    assert (args.model, args.lstm_dim, args.image_size, args.seed) == ("tirg", 16, 32, 3)


def test_test_only_lets_a_given_flag_win_with_one_warning_each(tirg_lstm_run, caplog):
    ckpt = checkpoint.read_checkpoint(latest(tirg_lstm_run))
    args, given = parse(dataset_flags(tirg_lstm_run["data"]) + ["--test_only", "--model_checkpoint", "x.pth",
                                                                "--image_size", "48", "--seed", "3", "--amp"])
    with caplog.at_level(logging.INFO):
        args = config.take_checkpoint_settings(args, ckpt, given, "x.pth", resume=False)
    assert (args.image_size, args.amp, args.seed, args.model, args.lstm_dim) == (48, True, 3, "tirg", 16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # --seed 3 is the checkpoint's own: no warning
    assert any("--image_size 32" in w and "--image_size 48" in w for w in warnings)
    assert any("--amp False" in w and "--amp True" in w for w in warnings)
    info = [r.getMessage() for r in caplog.records if "settings taken from x.pth" in r.getMessage()]
    assert len(info) == 1 and "--image_size" not in info[0] and "--lstm_dim 16" in info[0]


def test_original_format_settings_come_from_its_namespace(tirg_lstm_run, caplog):
    """The original's checkpoint: {'it', 'opt', 'model_state_dict'}; the flags it did not have take the original's
    behaviour and, given, warn of nothing (the checkpoint does not record them)."""
    ckpt = checkpoint.read_checkpoint(latest(tirg_lstm_run))
    opt = argparse.Namespace(dataset="fashion200k", dataset_path="/orig/fashion200k", model="tirg", use_bert=False,
                             loss="batch_based_classification", image_embed_dim=256, learning_rate=0.05,
                             learning_rate_decay_frequency=50000, weight_decay=5e-5, batch_size=32,
                             use_complete_text_query=True, num_iters=160000, comment="x", log_dir="../logs/")
    original = {"it": 123, "opt": opt, "model_state_dict": ckpt["model_state_dict"]}
    args, given = parse(["--test_only", "--model_checkpoint", "orig.pth", "--lstm_dim", "16"])
    with caplog.at_level(logging.INFO):
        args = config.take_checkpoint_settings(args, original, given, "orig.pth", resume=False)
    args = config.resolve_defaults(args)
    assert (args.dataset, args.dataset_path, args.model, args.loss) == (
        "fashion200k", "/orig/fashion200k", "tirg", "batch_based_classification")
    assert (args.image_embed_dim, args.learning_rate, args.weight_decay, args.use_complete_text_query) == (
        256, 0.05, 5e-5, True)
    assert (args.image_size, args.triplet_grad_scale, args.lstm_dim) == (224, 0.5, 16)  # original behaviour; given
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_given_flags_are_told_apart_from_defaults():
    args, given = parse(["--dataset", "mitstates", "--dataset_path", "d", "--batch_size", "32", "--amp",
                         "--use_bert", "False"])
    assert given == {"dataset", "dataset_path", "batch_size", "amp", "use_bert"}  # --batch_size 32 = the default
    assert args.amp is True and args.use_bert is False and args.image_size is None


def test_a_checkpoint_that_does_not_fit_names_its_own_settings(tirg_lstm_run, run_main_cli, tmp_path):
    """--test_only with a given --lstm_dim that the weights do not have: one line that names what the checkpoint
    was trained with, and no run folder."""
    rc, _, err = run_main_cli(dataset_flags(tirg_lstm_run["data"]) + [
        "--test_only", "--model_checkpoint", latest(tirg_lstm_run), "--lstm_dim", "24", *execution_flags(tmp_path)])
    assert rc == 2
    (line,) = [line for line in err.splitlines() if line.startswith("main.py: error: ")]
    assert "--lstm_dim 16" in line and "--model tirg" in line and "original" not in line, line
    assert os.listdir(tmp_path) == []


def test_resume_from_a_best_checkpoint_is_refused(tirg_lstm_run, tmp_path):
    best = os.path.join(tirg_lstm_run["folder"], "best_checkpoint.pth")
    assert "optimizer" not in checkpoint.read_checkpoint(best)
    with pytest.raises(UserInputError, match="latest_checkpoint.pth"):
        config.prepare_args(*parse(dataset_flags(tirg_lstm_run["data"]) + ["--resume", best]))


def test_weights_from_a_checkpoint_fetch_no_imagenet_and_no_bert(tirg_lstm_run, tmp_path, monkeypatch):
    """A checkpoint trained from ImageNet weights: evaluating or resuming it builds the ResNet without them (the
    checkpoint holds every weight), and an LSTM checkpoint loads no BERT."""
    import torchvision

    import factory
    import text_model

    ckpt = checkpoint.read_checkpoint(latest(tirg_lstm_run))
    ckpt["args"]["image_weights"] = "imagenet"
    real = torchvision.models.resnet18

    def resnet18(*a, weights=None, **k):
        assert weights is None, "fetched ImageNet weights"
        return real(*a, weights=None, **k)

    def no_bert(*a, **k):
        raise AssertionError("loaded BERT")

    monkeypatch.setattr(torchvision.models, "resnet18", resnet18)
    monkeypatch.setattr(text_model, "BertTextEncoder", no_bert)
    args, given = parse(dataset_flags(tirg_lstm_run["data"]) + ["--test_only", "--model_checkpoint", "x.pth"])
    args = config.resolve_defaults(config.take_checkpoint_settings(args, ckpt, given, "x.pth", resume=False))
    assert args.image_weights == "imagenet"  # the record stays; the weights come from the checkpoint
    model, _, _ = factory.build_model(args, torch.device("cpu"), (), ckpt, "x.pth")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model_state_dict"].items())
    path = str(tmp_path / "imagenet_trained.pth")
    torch.save(ckpt, path)
    model, _, _ = factory.model_from_checkpoint(path, torch.device("cpu"))
    assert torch.equal(model.state_dict()["img_model.fc.0.weight"], ckpt["model_state_dict"]["img_model.fc.0.weight"])
