"""End-to-end tests of the command line (main.main) on tiny synthetic data, on the CPU.

The data is a tiny synthetic set in the MIT-States layout, read with ``--dataset mitstates`` (``--dataset synthetic``
regenerates its folder with the generator's default parameters). Runs that several tests read are session fixtures.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime

import pytest
import torch

import datasets
import synthetic
import img_text_composition_models as models
import config
import main
import runlog
import checkpoint
import factory
import test_retrieval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 training nouns x 3 adjectives x 3 images = 18 training images (4 batches of 4 per epoch), the same for testing
# (2 test nouns, 36 test queries).
TINY = dict(image_size=32, n_train_nouns=2, n_test_nouns=2, adjectives_per_noun=3, images_per_class=3)
BATCHES_PER_EPOCH = 18 // 4
METRIC_LINE = re.compile(r"^     (train|test) (recall_top\d+_correct_\w+) (\d+(?:\.\d{1,4})?)$")
LOSS_TERMS_AE = ["soft_triplet", "L2_loss", "L2_loss_text", "rot_sym_loss", "total training loss"]


# ------------------------------------------------------------------------------------------------------------------
# Helpers
def cli(data: str, log_dir, *extra: str, bert: str | None = None) -> list[str]:
    """Flags of a tiny CPU run (``--image_weights none``: no download), evaluated only at its end."""
    args = ["--dataset", "mitstates", "--dataset_path", data, "--image_size", "32", "--batch_size", "4",
            "--train_eval_queries", "20", "--loader_num_workers", "0", "--log_dir", str(log_dir), "--device", "cpu",
            "--image_weights", "none", "--eval_every", "1000"]
    args += ["--use_bert", "True", "--bert_model", bert] if bert else ["--use_bert", "False", "--lstm_dim", "32"]
    return args + list(extra)


@contextlib.contextmanager
def one_thread():
    """Tiny convolutions gain little from a second thread, and on a busy machine two spinning OpenMP threads cost
    several times the CPU time of one (the session-scoped runs need it too, so it is not only a fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """main.main(argv) -> (exit code, stdout)."""
    out = io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out):
        rc = main.main(argv)
    return rc, out.getvalue()


def metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if METRIC_LINE.match(line)]


def only_run_folder(log_dir) -> str:
    folders = [p for p in glob.glob(os.path.join(str(log_dir), "*")) if os.path.isdir(p)]
    assert len(folders) == 1, folders
    return folders[0]


def load(path: str) -> dict:
    return checkpoint.read_checkpoint(path)  # the safe (weights_only) loader: checkpoints must pass it


def events(folder: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(folder, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def one_error_line(err: str) -> str:
    """stderr is exactly one line, the error."""
    lines = [line for line in err.split("\n") if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("main.py: error: "), lines[0]
    return lines[0]


def error_message(err: str) -> str:
    """The one error line among other stderr output (progress bars); no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.split("\n") if "main.py: error: " in line]
    assert len(errors) == 1, err
    return errors[0][errors[0].index("main.py: error: "):]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:4]}"


# ------------------------------------------------------------------------------------------------------------------
# Session fixtures: the data and the runs that several tests read
@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    synthetic.generate_synthetic(path, seed=0, **TINY)
    return path


def lstm_ae_args(data: str, log_dir, num_iters: int) -> list[str]:
    """ComposeAE (dropout) + LSTM + soft triplet, the rate x0.1 every 3 iterations, losses logged every iteration."""
    return cli(data, log_dir, "--model", "composeAE", "--loss", "soft_triplet", "--learning_rate_decay_frequency", "3",
               "--log_every", "1", "--seed", "1", "--comment", "_unit", "--num_iters", str(num_iters))


@pytest.fixture(scope="session")
def lstm_run(tmp_path_factory, data_dir) -> dict:
    """4 iterations = exactly one epoch; one evaluation, at the end."""
    log_dir = tmp_path_factory.mktemp("lstm_run")
    rc, out = run_cli(lstm_ae_args(data_dir, log_dir, 4))
    assert rc == 0
    return {"folder": only_run_folder(log_dir), "stdout": out, "num_iters": 4}


def bert_args(data: str, bert: str, log_dir, num_iters: int, *extra: str) -> list[str]:
    """TIRG + frozen BERT + batch-based classification, the rate x0.1 every 5 iterations."""
    return cli(data, log_dir, "--model", "tirg", "--loss", "batch_based_classification",
               "--learning_rate_decay_frequency", "5", "--seed", "5", "--num_iters", str(num_iters), *extra, bert=bert)


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory, data_dir, tiny_bert_32) -> dict:
    """5 iterations: epoch 1, batch 1 (mid-epoch), after one decay of the rate."""
    log_dir = tmp_path_factory.mktemp("bert_run")
    rc, out = run_cli(bert_args(data_dir, tiny_bert_32, log_dir, 5))
    assert rc == 0
    folder = only_run_folder(log_dir)
    kept = str(log_dir / "kept_latest.pth")  # a copy that later resumes cannot touch
    shutil.copy(os.path.join(folder, "latest_checkpoint.pth"), kept)
    return {"folder": folder, "stdout": out, "ckpt": kept}


def resume_and_straight(tmp_path, first_ckpt: str, make_args, n: int, in_place: bool = False) -> tuple[dict, dict]:
    """Resumes ``first_ckpt`` (or a copy of it, in a folder of its own) to ``n`` iterations and trains ``n`` straight;
    -> the final checkpoints of both."""
    ckpt = first_ckpt
    if not in_place:
        (tmp_path / "resumed").mkdir()
        ckpt = str(tmp_path / "resumed" / "latest_checkpoint.pth")
        shutil.copy(first_ckpt, ckpt)
    assert run_cli(make_args(tmp_path / "unused", n) + ["--resume", ckpt])[0] == 0
    assert not os.path.exists(tmp_path / "unused"), "a resumed run continues in the folder of its checkpoint"
    assert run_cli(make_args(tmp_path / "straight", n))[0] == 0
    resumed = load(ckpt)
    straight = load(os.path.join(only_run_folder(tmp_path / "straight"), "latest_checkpoint.pth"))
    assert resumed["it"] == straight["it"] == n
    return resumed, straight


# ------------------------------------------------------------------------------------------------------------------
# 1. A training run and what it writes
def test_training_run_writes_run_folder_checkpoints_and_metrics(lstm_run):
    folder = lstm_run["folder"]
    name = os.path.basename(folder)
    # the original's name: datetime '%b%d_%H-%M-%S' + '_' + host + comment
    assert re.fullmatch(r"[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_" + re.escape(socket.gethostname() + "_unit"), name), name
    stamp = datetime.strptime(name[:14], "%b%d_%H-%M-%S")
    assert 0 <= (datetime.now().replace(year=1900) - stamp).total_seconds() < 3600
    files = os.listdir(folder)
    for f in ("latest_checkpoint.pth", "best_checkpoint.pth", "metrics.json"):
        assert f in files
    assert any(f.startswith("events.out.tfevents.") for f in files)
    assert not [f for f in files if ".tmp" in f], "temporary checkpoint files left behind"

    ckpt = load(os.path.join(folder, "latest_checkpoint.pth"))
    for key in ("it", "opt", "model_state_dict", "optimizer", "scheduler", "rng", "vocab", "args"):
        assert key in ckpt, key
    assert ckpt["it"] == lstm_run["num_iters"]
    assert isinstance(ckpt["opt"], argparse.Namespace)  # as the original pickled it
    assert ckpt["opt"].num_iters == ckpt["args"]["num_iters"] == 4 and ckpt["opt"].model == "composeAE"
    sd = ckpt["model_state_dict"]
    assert "img_model.fc.0.weight" in sd and "text_model.embedding_layer.weight" in sd  # the original's key names
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert len(ckpt["optimizer"]["param_groups"]) == 3
    assert ckpt["scheduler"]["last_epoch"] == 4
    # the LSTM vocabulary: whole words of the training captions
    assert {"circle", "square"} <= set(ckpt["vocab"]) and not any(" " in w for w in ckpt["vocab"])

    best = load(os.path.join(folder, "best_checkpoint.pth"))
    assert 1 <= best["it"] <= 4 and best["model_state_dict"].keys() == sd.keys()

    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["latest"]["it"] == 4 and [h["it"] for h in metrics["history"]] == [4]
    assert set(metrics["latest"]) >= {"train recall_top1_correct_composition", "test recall_top100_correct_noun"}
    # the printed final evaluation is the stored one
    printed = {m.group(1) + " " + m.group(2): float(m.group(3))
               for m in map(METRIC_LINE.match, metric_lines(lstm_run["stdout"]))}
    assert len(printed) == 2 * 5 * 3  # train/test x 5 k x composition/adj/noun
    assert printed == {k: round(v, 4) for k, v in metrics["latest"].items() if k != "it"}


# ------------------------------------------------------------------------------------------------------------------
# 2. --test_only reproduces the final evaluation
def test_test_only_lstm_prints_the_final_evaluation(lstm_run, data_dir, tmp_path, capsys):
    ckpt = os.path.join(lstm_run["folder"], "latest_checkpoint.pth")
    expected = metric_lines(lstm_run["stdout"])
    assert len(expected) == 30
    rc = main.main(lstm_ae_args(data_dir, tmp_path, 4)[:-2] + ["--test_only", "True", "--model_checkpoint", ckpt,
                                                                "--eval_splits", "test,train"])
    assert rc == 0
    assert metric_lines(capsys.readouterr().out) == expected
    # the test-only run logs to its own evaluation folder and leaves the checkpoint alone
    folder = only_run_folder(tmp_path)
    assert re.fullmatch(r"eval_[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_latest_checkpoint_unit", os.path.basename(folder))
    with open(os.path.join(folder, "metrics.json")) as f:
        assert f"test {expected[-1].split()[1]}" in json.load(f)["latest"]


def test_test_only_lstm_takes_the_vocabulary_from_the_checkpoint(lstm_run, data_dir, tmp_path, capsys):
    """A training folder with a new word would give a bigger vocabulary (and an embedding that does not fit) if the
    vocabulary were rebuilt from the data; the test split is unchanged, so its metrics are the same."""
    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    src = sorted(glob.glob(os.path.join(data, "images", "* circle", "*.jpg")))[0]
    os.makedirs(os.path.join(data, "images", "zebra circle"))
    for k in range(2):
        shutil.copy(src, os.path.join(data, "images", "zebra circle", f"{k}.jpg"))
    ckpt = os.path.join(lstm_run["folder"], "latest_checkpoint.pth")
    assert "zebra" not in load(ckpt)["vocab"]
    rc = main.main(lstm_ae_args(data, tmp_path / "logs", 4)[:-2] + ["--test_only", "True", "--model_checkpoint", ckpt])
    assert rc == 0
    got = metric_lines(capsys.readouterr().out)
    test_lines = [line for line in metric_lines(lstm_run["stdout"]) if line.startswith("     test ")]
    assert got == test_lines and len(got) == 15  # --test_only evaluates the test split by default


def test_test_only_bert_prints_the_final_evaluation(bert_run, data_dir, tiny_bert_32, tmp_path, capsys):
    expected = metric_lines(bert_run["stdout"])
    assert len(expected) == 30
    rc = main.main(bert_args(data_dir, tiny_bert_32, tmp_path, 5, "--test_only", "True", "--model_checkpoint",
                             bert_run["ckpt"], "--eval_splits", "train,test"))
    assert rc == 0
    assert metric_lines(capsys.readouterr().out) == expected


# ------------------------------------------------------------------------------------------------------------------
# 3. Resume = uninterrupted
def imgonly_args(data: str, log_dir, num_iters: int) -> list[str]:
    """The image-only baseline + batch-based classification: no random draw reaches the weights."""
    return cli(data, log_dir, "--model", "imgonly", "--loss", "batch_based_classification",
               "--learning_rate_decay_frequency", "4", "--seed", "2", "--num_iters", str(num_iters))


def test_resume_mid_epoch_equals_uninterrupted(data_dir, tmp_path):
    """5 iterations (epoch 1, batch 1, after one decay of the rate) resumed to 10 equals 10 straight: the weights, BN
    statistics, momentum buffers, schedule and data order are restored exactly."""
    assert run_cli(imgonly_args(data_dir, tmp_path / "first", 5))[0] == 0
    first_folder = only_run_folder(tmp_path / "first")
    ckpt = os.path.join(first_folder, "latest_checkpoint.pth")
    first = load(ckpt)
    assert (first["epoch"], first["batch_in_epoch"]) == (5 // BATCHES_PER_EPOCH, 5 % BATCHES_PER_EPOCH)
    resumed, straight = resume_and_straight(tmp_path, ckpt, functools.partial(imgonly_args, data_dir), 10,
                                            in_place=True)
    assert resumed["scheduler"]["last_epoch"] == 10
    assert math.isclose(resumed["optimizer"]["param_groups"][0]["lr"], 0.01 * 0.1 ** (10 // 4))
    assert_same_weights(resumed["model_state_dict"], straight["model_state_dict"])
    momentum = [[s["momentum_buffer"] for s in c["optimizer"]["state"].values()] for c in (resumed, straight)]
    assert len(momentum[0]) == len(momentum[1]) > 0 and all(map(torch.equal, *momentum))
    # training moved the weights after the resume (not a comparison of two copies of the first run)
    assert not torch.equal(first["model_state_dict"]["img_model.fc.0.weight"],
                           resumed["model_state_dict"]["img_model.fc.0.weight"])
    # the resumed run continued in its folder and kept its history
    with open(os.path.join(first_folder, "metrics.json")) as f:
        assert [h["it"] for h in json.load(f)["history"]] == [5, 10]
    assert sorted(os.listdir(tmp_path / "first")) == [os.path.basename(first_folder)]


def test_resume_with_another_batch_size_is_refused(data_dir, tmp_path, capsys):
    """The position inside an epoch is a batch count, so resuming with another --batch_size would replay or skip
    data: refused with one line that says what to pass."""
    assert run_cli(imgonly_args(data_dir, tmp_path / "first", 3))[0] == 0
    ckpt = os.path.join(only_run_folder(tmp_path / "first"), "latest_checkpoint.pth")
    capsys.readouterr()
    argv = imgonly_args(data_dir, tmp_path / "first", 6) + ["--resume", ckpt]
    argv[argv.index("--batch_size") + 1] = "2"
    assert run_cli(argv)[0] == 2
    line = one_error_line(capsys.readouterr().err.replace("\r", "\n"))
    assert "--batch_size 4" in line and ckpt in line
    assert load(ckpt)["it"] == 3  # the checkpoint is untouched


def test_resume_at_epoch_end_equals_uninterrupted_composeae_dropout_soft_triplet(lstm_run, data_dir, tmp_path):
    """ComposeAE (dropout 0.5, LSTM dropout 0.1) + soft triplet: 4 iterations (the end of epoch 0), resumed to 8,
    equals 8 straight."""
    resumed, straight = resume_and_straight(tmp_path, os.path.join(lstm_run["folder"], "latest_checkpoint.pth"),
                                            functools.partial(lstm_ae_args, data_dir), 8)
    assert_same_weights(resumed["model_state_dict"], straight["model_state_dict"])


def test_resume_mid_epoch_equals_uninterrupted_tirg_bert(bert_run, data_dir, tiny_bert_32, tmp_path):
    import text_model

    encoder = text_model.BertTextEncoder(tiny_bert_32)
    words = ["red", "green", "blue", "small", "large", "yellow", "striped", "dotted"]
    if torch.equal(encoder.encode_uncached(words), torch.cat([encoder.encode_uncached([w]) for w in words])):
        pytest.skip("on this machine a BERT vector does not depend on its batch: the cache order cannot show")
    resumed, straight = resume_and_straight(tmp_path, bert_run["ckpt"],
                                            functools.partial(bert_args, data_dir, tiny_bert_32), 10)
    assert not any(k.startswith("text_model.") for k in resumed["model_state_dict"])  # BERT stays out of it
    assert_same_weights(resumed["model_state_dict"], straight["model_state_dict"])


# ------------------------------------------------------------------------------------------------------------------
# 4. The original README's flag spellings
README_COMMANDS = {
    "mitstates_tirg": "--dataset=mitstates --dataset_path=../data/mitstates/  --model=tirg --loss=soft_triplet "
                      "--learning_rate_decay_frequency=50000 --num_iters=160000 --weight_decay=5e-5 "
                      "--comment=mitstates_tirg_original --log_dir ../logs/mitstates/",
    "mitstates_tirg_bert": "--dataset=mitstates --dataset_path=../data/mitstates/  --model=tirg --loss=soft_triplet "
                           "--learning_rate_decay_frequency=50000 --num_iters=160000 --weight_decay=5e-5 "
                           "--comment=mitstates_tirg_bert --log_dir ../logs/mitstates/ --use_bert True",
    "mitstates_tirg_complete": "--dataset=mitstates --dataset_path=../data/mitstates/  --model=tirg "
                               "--loss=soft_triplet --learning_rate_decay_frequency=50000 --num_iters=160000 "
                               "--weight_decay=5e-5 --comment=mitstates_tirg_complete_text_query "
                               "--log_dir ../logs/mitstates/ --use_complete_text_query True ",
    "fashion200k_composeAE": "--dataset=fashion200k --dataset_path=../data/fashion200k/  --model=composeAE "
                             "--loss=batch_based_classification --learning_rate_decay_frequency=50000 "
                             "--num_iters=160000 --use_bert True --use_complete_text_query True --weight_decay=5e-5 "
                             "--comment=fashion200k_composeAE --log_dir ../logs/fashion200k/",
    "fashionIQ_real": "--dataset=fashionIQ --dataset_path=../data/fashionIQ/  --model=RealSpaceConcatAE "
                      "--loss=batch_based_classification --learning_rate_decay_frequency=8000 --num_iters=100000 "
                      "--use_bert True --use_complete_text_query True --comment=fashionIQ_RealSpaceConcatAE "
                      "--log_dir ../logs/fashionIQ/",
}


def parse(line: str) -> argparse.Namespace:
    return config.get_args_parser().parse_args(shlex.split(line))


def test_readme_commands_parse_with_their_values():
    a = parse(README_COMMANDS["mitstates_tirg"])
    assert (a.dataset, a.dataset_path, a.model, a.loss) == ("mitstates", "../data/mitstates/", "tirg", "soft_triplet")
    assert (a.learning_rate_decay_frequency, a.num_iters, a.weight_decay) == (50000, 160000, 5e-5)
    assert (a.comment, a.log_dir) == ("mitstates_tirg_original", "../logs/mitstates/")
    r = config.resolve_defaults(a)  # flags left out take the original's defaults on the published datasets
    assert (r.use_bert, r.use_complete_text_query, r.test_only) == (False, False, False)
    assert (r.learning_rate, r.batch_size, r.image_embed_dim, r.image_size) == (1e-2, 32, 512, 224)
    assert (r.loader_num_workers, r.category_to_train, r.model_checkpoint) == (4, "all", "")

    b = parse(README_COMMANDS["mitstates_tirg_bert"])
    assert b.use_bert is True and b.comment == "mitstates_tirg_bert"
    c = parse(README_COMMANDS["mitstates_tirg_complete"])
    assert c.use_complete_text_query is True and not config.resolve_defaults(c).use_bert

    d = parse(README_COMMANDS["fashion200k_composeAE"])
    assert (d.dataset, d.model, d.loss) == ("fashion200k", "composeAE", "batch_based_classification")
    assert d.use_bert is True and d.use_complete_text_query is True

    e = config.resolve_defaults(parse(README_COMMANDS["fashionIQ_real"]))
    assert (e.dataset, e.model, e.learning_rate_decay_frequency, e.num_iters) == (
        "fashionIQ", "RealSpaceConcatAE", 8000, 100000)
    assert e.weight_decay == 1e-6 and e.category_to_train == "all"


@pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("true", True), ("0", False),
                                         ("1", True)])
def test_boolean_flags_mean_what_they_say(text, value):
    """The original's type=bool made '--use_bert False' True."""
    a = parse(f"--dataset=mitstates --dataset_path=x --use_bert {text} --use_complete_text_query {text} "
              f"--test_only {text} --model_checkpoint m.pth")
    assert a.use_bert is value and a.use_complete_text_query is value and a.test_only is value


def test_readme_flag_tables_are_the_parsers():
    """The README's flag tables are tools/flag_table.py's output for the parser (groups, flags, help, defaults), and
    list every flag once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_table", os.path.join(REPO, "tools", "flag_table.py"))
    flag_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_table)
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("<!-- flag-tables -->\n") + 21: readme.index("<!-- /flag-tables -->")]
    assert section == flag_table.flag_tables()
    table = re.findall(r"^\| `(-[-\w]+)` \|", readme, flags=re.MULTILINE)
    flags = [s for action in config.get_args_parser()._actions for s in action.option_strings if s not in ("-h", "--help")]
    assert sorted(table) == sorted(flags)


def test_jupyter_flag_and_original_defaults_parse():
    a = config.resolve_defaults(parse("-f /tmp/kernel-1.json --dataset=mitstates --dataset_path=x --test_only True "
                                    "--model_checkpoint m.pth"))
    assert a.f == "/tmp/kernel-1.json" and a.test_only is True and a.model_checkpoint == "m.pth"
    assert (a.model, a.loss, a.num_iters, a.learning_rate_decay_frequency, a.log_dir) == (
        "composeAE", "soft_triplet", 160000, 9999999, "logs")  # --log_dir: logs/ for every dataset


# ------------------------------------------------------------------------------------------------------------------
# 5. Bad input: one line on stderr, exit code 2
@pytest.fixture
def garbage_files(tmp_path, lstm_run):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    torn = tmp_path / "torn.pth"
    with open(os.path.join(lstm_run["folder"], "latest_checkpoint.pth"), "rb") as f:
        torn.write_bytes(f.read(1 << 20))  # the first MiB of a real checkpoint
    not_ours = tmp_path / "not_synthetic"
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("user data")
    return {"garbage": str(garbage), "torn": str(torn), "not_ours": str(not_ours)}


@pytest.mark.parametrize("case, extra, words", [
    ("unknown flag", ["--bogus_flag", "1"], ["--bogus_flag"]),
    ("bad boolean", ["--use_bert", "maybe"], ["maybe"]),
    ("bad choice", ["--model", "resnet"], ["resnet"]),
    ("missing dataset", ["--dataset_path", "/nonexistent/mitstates"], ["/nonexistent/mitstates"]),
    ("test_only without checkpoint", ["--test_only", "True"], ["--model_checkpoint"]),
    ("missing checkpoint", ["--test_only", "True", "--model_checkpoint", "/nonexistent/ck.pth"], ["/nonexistent/ck.pth"]),
    ("garbage checkpoint", ["--test_only", "True", "--model_checkpoint", "{garbage}"], ["{garbage}"]),
    ("torn checkpoint", ["--test_only", "True", "--model_checkpoint", "{torn}"], ["{torn}"]),
    ("missing resume", ["--resume", "/nonexistent/latest_checkpoint.pth"], ["/nonexistent/latest_checkpoint.pth"]),
    ("missing BERT folder", ["--use_bert", "True", "--bert_model", "/nonexistent/bert"], ["/nonexistent/bert"]),
    ("not a synthetic folder", ["--dataset", "synthetic", "--dataset_path", "{not_ours}"], ["{not_ours}"]),
    ("CUDA graph of the LSTM", ["--cuda_graph", "True", "--use_bert", "False"], ["--cuda_graph", "--use_bert True"]),
    ("CUDA graph on the CPU", ["--cuda_graph", "True", "--use_bert", "True", "--device", "cpu"],
     ["--cuda_graph", "CUDA device", "cpu"]),
    ("CUDA graph and compile", ["--cuda_graph", "True", "--use_bert", "True", "--compile", "True"], ["--compile"]),
])
def test_bad_input_gives_one_line_and_exit_code_2(case, extra, words, data_dir, tmp_path, garbage_files, capsys):
    extra = [x.format(**garbage_files) for x in extra]
    rc = main.main(cli(data_dir, tmp_path / "logs", "--num_iters", "2") + extra)
    out, err = capsys.readouterr()
    assert rc == 2, (case, err)
    line = one_error_line(err)
    for w in words:
        assert w.format(**garbage_files) in line, (case, line)
    assert not metric_lines(out)
    assert not glob.glob(str(tmp_path / "logs" / "*" / "*.pth")), "no checkpoint from a refused run"
    assert os.listdir(garbage_files["not_ours"]) == ["keep.txt"]  # never replaced


def test_cli_bad_dataset_path_prints_no_traceback(tmp_path):
    """The real command line (its logging goes to stderr): the error is one line, the last, with exit code 2."""
    proc = subprocess.run([sys.executable, "main.py", "--dataset", "mitstates", "--dataset_path", "/nonexistent/mit",
                           "--device", "cpu", "--log_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("main.py: error: ") and "/nonexistent/mit" in errors[0]


# ------------------------------------------------------------------------------------------------------------------
# 6. TensorBoard
def test_tensorboard_events_hold_losses_rate_metrics_and_args(lstm_run, bert_run):
    acc = events(lstm_run["folder"])
    scalars = set(acc.Tags()["scalars"])
    expected = {f"loss/{t}" for t in LOSS_TERMS_AE} | {"lr", "train/recall_top1_correct_composition",
                                                       "test/recall_top1_correct_composition",
                                                       "test/recall_top5_correct_adj", "test/recall_top100_correct_noun"}
    assert expected <= scalars, expected - scalars
    assert "loss/batch_based_classification" not in scalars
    # a few groups (loss, lr, train, test, and the HParams session metrics), not one chart per scalar
    assert {tag.split("/")[0] for tag in scalars} == {"loss", "lr", "train", "test", "session"}
    # losses logged every iteration (--log_every 1); the total is the weighted sum (ComposeAE Eq. 13)
    values = {name: {e.step: e.value for e in acc.Scalars(f"loss/{name}")} for name in LOSS_TERMS_AE}
    for name in LOSS_TERMS_AE:
        assert sorted(values[name]) == [1, 2, 3, 4], name
    for it in range(1, 5):
        terms = [values[n][it] for n in LOSS_TERMS_AE[:4]]
        weighted = sum(w * v for w, v in zip([1.0, 0.1, 0.1, 0.01], terms))
        assert math.isclose(values["total training loss"][it], weighted, rel_tol=1e-5)
        assert all(math.isfinite(v) for v in terms)
    # metrics at the iteration of the evaluation, equal to metrics.json
    with open(os.path.join(lstm_run["folder"], "metrics.json")) as f:
        latest = json.load(f)["latest"]
    for name in ("train recall_top1_correct_composition", "test recall_top1_correct_composition"):
        at_4 = [e.value for e in acc.Scalars(name.replace(" ", "/")) if e.step == 4]
        assert len(at_4) == 1 and math.isclose(at_4[0], latest[name], rel_tol=1e-6)
    # the args as one text card: a markdown table
    text_tags = [t for t in acc.Tags()["tensors"] if t.endswith("/text_summary")]
    assert text_tags == ["args/text_summary"], text_tags
    card = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert card.startswith("| setting | value |\n|---|---|\n")
    assert "| --model | `composeAE` |" in card and "| --num_iters | `4` |" in card

    bert_scalars = set(events(bert_run["folder"]).Tags()["scalars"])
    assert {"loss/batch_based_classification", "loss/total training loss", "lr"} <= bert_scalars
    assert not {"loss/soft_triplet", "loss/L2_loss", "loss/rot_sym_loss"} & bert_scalars  # TIRG: no autoencoder terms


def test_tensorboard_test_metrics_only_at_evaluation_steps(lstm_run):
    acc = events(lstm_run["folder"])
    for name in ("train/recall_top1_correct_composition", "test/recall_top1_correct_composition"):
        assert [e.step for e in acc.Scalars(name)] == [4], name


# ------------------------------------------------------------------------------------------------------------------
# 7. Optimizer groups and the learning-rate schedule
def test_optimizer_groups_cover_every_parameter_once(data_dir, tiny_bert_32):
    for extra in ([], ["--use_bert", "True", "--bert_model", tiny_bert_32]):
        args = config.resolve_defaults(config.get_args_parser().parse_args(
            cli(data_dir, "logs") + ["--learning_rate", "0.05", "--learning_rate_decay_frequency", "3"] + extra))
        texts = datasets.MITStates(data_dir, "train", image_size=32).get_all_texts()
        model, optimizer, scheduler = factory.create_model_and_optimizer(args, texts)
        groups = optimizer.param_groups
        assert len(groups) == 3
        ids = [[id(p) for p in g["params"]] for g in groups]
        assert set(ids[0]) == {id(p) for p in model.img_model.fc.parameters()}
        assert set(ids[1]) == {id(p) for p in model.img_model.parameters()} - set(ids[0])
        assert set(ids[2]) == {id(p) for p in model.parameters()} - {id(p) for p in model.img_model.parameters()}
        flat = [i for g in ids for i in g]
        assert len(flat) == len(set(flat)) == len(list(model.parameters()))  # each parameter exactly once
        assert all(len(g) for g in ids) and all(isinstance(p, torch.nn.Parameter) for g in groups for p in g["params"])
        if model.bert is not None:  # the frozen BERT is not trained
            assert not {id(p) for p in model.bert.bert.parameters()} & set(flat)
        lrs = [0.05, 0.005, 0.05]
        assert [g["lr"] for g in groups] == pytest.approx(lrs)
        assert optimizer.defaults["momentum"] == 0.9 and groups[0]["weight_decay"] == args.weight_decay
        for it in range(1, 8):  # the original: after iteration it, lr x0.1 when it % freq == 0
            optimizer.step()
            scheduler.step()
            assert [g["lr"] for g in groups] == pytest.approx([lr * 0.1 ** (it // 3) for lr in lrs]), it


def test_logged_learning_rate_decays_after_decay_frequency(lstm_run):
    rates = {e.step: e.value for e in events(lstm_run["folder"]).Scalars("lr")}
    assert rates == pytest.approx({1: 0.01, 2: 0.01, 3: 0.001, 4: 0.001})


# ------------------------------------------------------------------------------------------------------------------
# 8. A non-finite loss
def poison_loss_from(monkeypatch, first_bad_iteration: int) -> None:
    """From the given training iteration on, the total loss is NaN (and so, after the step, the weights)."""
    real = models.total_loss
    calls = {"n": 0}

    def total_loss(terms, weights):
        calls["n"] += 1
        total = real(terms, weights)
        return total * float("nan") if calls["n"] >= first_bad_iteration else total

    monkeypatch.setattr(models, "total_loss", total_loss)


def tirg_lstm(data_dir, log_dir, *extra):
    return cli(data_dir, log_dir, "--model", "tirg", "--loss", "batch_based_classification", *extra)


def test_nan_loss_stops_with_one_line_naming_the_iteration(data_dir, tmp_path, monkeypatch, capsys):
    poison_loss_from(monkeypatch, 3)
    rc = main.main(tirg_lstm(data_dir, tmp_path, "--num_iters", "6", "--log_every", "1", "--save_every", "1"))
    out, err = capsys.readouterr()
    assert rc == 1
    message = error_message(err)
    assert re.search(r"iterations? 3\b|\b3\.\.3\b", message), message
    assert "not finite" in message or "nan" in message.lower()
    ckpt = load(os.path.join(only_run_folder(tmp_path), "latest_checkpoint.pth"))
    assert ckpt["it"] == 2  # the last good one, untouched
    with open(os.path.join(only_run_folder(tmp_path), "out.log")) as f:
        assert f.read().splitlines()[-1] == message  # the run's log ends with the error
    assert all(torch.isfinite(v).all() for v in ckpt["model_state_dict"].values() if v.is_floating_point())
    assert not metric_lines(out)


def test_nan_loss_never_reaches_a_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    poison_loss_from(monkeypatch, 3)
    rc = main.main(tirg_lstm(data_dir, tmp_path, "--num_iters", "6", "--log_every", "5", "--save_every", "1"))
    assert rc == 1
    error_message(capsys.readouterr().err)
    for path in glob.glob(os.path.join(only_run_folder(tmp_path), "*.pth")):
        sd = load(path)["model_state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), path


def test_error_during_training_is_a_line_of_its_own(data_dir, tmp_path, monkeypatch, capsys):
    poison_loss_from(monkeypatch, 2)
    rc = main.main(tirg_lstm(data_dir, tmp_path, "--num_iters", "4", "--log_every", "1"))
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.split("\n") if line.strip()]
    assert lines[-1].startswith("main.py: error: ") and "\r" not in lines[-1], lines[-2:]


# ------------------------------------------------------------------------------------------------------------------
# 9. A checkpoint of the original code
def test_original_code_checkpoint_of_a_bert_model_evaluates(data_dir, tiny_bert_32, tmp_path, capsys):
    flags = cli(data_dir, tmp_path / "logs", bert=tiny_bert_32) + ["--model", "composeAE"]
    args = config.resolve_defaults(config.get_args_parser().parse_args(flags))
    trainset, testset = datasets.build_datasets("mitstates", data_dir, image_size=32)
    torch.manual_seed(123)
    model, _, _ = factory.create_model_and_optimizer(args, trainset.get_all_texts())
    state = dict(model.state_dict())
    assert not any(k.startswith("text_model.") for k in state)
    # the original kept an (unused) LSTM inside its BERT models
    g = torch.Generator().manual_seed(0)
    state.update({"text_model.embedding_layer.weight": torch.randn(20, 512, generator=g),
                  "text_model.lstm.weight_ih_l0": torch.randn(2048, 512, generator=g),
                  "text_model.lstm.weight_hh_l0": torch.randn(2048, 512, generator=g),
                  "text_model.lstm.bias_ih_l0": torch.randn(2048, generator=g),
                  "text_model.lstm.bias_hh_l0": torch.randn(2048, generator=g),
                  "text_model.fc_output.1.weight": torch.randn(512, 512, generator=g),
                  "text_model.fc_output.1.bias": torch.randn(512, generator=g)})
    opt = argparse.Namespace(f="", comment="mitstates_composeAE", dataset="mitstates", dataset_path=data_dir,
                             model="composeAE", image_embed_dim=512, use_bert=True, use_complete_text_query=False,
                             learning_rate=0.01, learning_rate_decay_frequency=50000, batch_size=32,
                             weight_decay=5e-5, category_to_train="all", num_iters=160000,
                             loss="batch_based_classification", loader_num_workers=4, log_dir="../logs/",
                             test_only=False, model_checkpoint="")
    path = str(tmp_path / "latest_checkpoint.pth")
    torch.save({"it": 1234, "opt": opt, "model_state_dict": state}, path)

    rc = main.main(flags + ["--test_only", "True", "--model_checkpoint", path])
    out = capsys.readouterr().out
    assert rc == 0
    lines = metric_lines(out)
    assert len(lines) == 15
    # the metrics of exactly these weights
    expected = test_retrieval.evaluate(model, testset, testset.test_task(), batch_size=4, device="cpu",
                                       progress=False)
    assert [line for line in lines if line.startswith("     test ")] == [
        f"     test {name} {round(value, 4)}" for name, value in expected.items()]


# ------------------------------------------------------------------------------------------------------------------
# 10. A corrupt image
def test_corrupt_jpeg_does_not_stop_training(data_dir, tmp_path, caplog):
    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    trainset = datasets.MITStates(data, "train", image_size=32, seed=0)
    epoch, index, slot = datasets.EpochBatchSampler(trainset, 4, seed=0).epoch_keys(0)[0]
    source, _ = trainset.training_pair(epoch, index, slot)
    bad = trainset.imgs[source]["file_path"]  # the source image of the first training batch
    with open(bad, "rb") as f:
        head = f.read()
    with open(bad, "wb") as f:
        f.write(head[: len(head) // 2])
    caplog.set_level("WARNING")
    rc, out = run_cli(tirg_lstm(data, tmp_path / "logs", "--num_iters", "3", "--seed", "0"))
    assert rc == 0
    assert any(bad in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), caplog.text
    assert load(os.path.join(only_run_folder(tmp_path / "logs"), "latest_checkpoint.pth"))["it"] == 3
    assert len(metric_lines(out)) == 30


# ------------------------------------------------------------------------------------------------------------------
# Run folders of runs started in the same second
def test_runs_started_in_the_same_second_get_their_own_folders(lstm_run, data_dir, tmp_path, monkeypatch):
    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 3, 5, 10, 20, 30)

    monkeypatch.setattr(runlog, "datetime", FrozenDatetime)
    ckpt = os.path.join(lstm_run["folder"], "latest_checkpoint.pth")
    for _ in range(2):
        rc, _ = run_cli(lstm_ae_args(data_dir, tmp_path, 4)[:-2] + ["--test_only", "True", "--model_checkpoint", ckpt])
        assert rc == 0
    folders = sorted(os.listdir(tmp_path))
    assert folders == ["eval_Mar05_10-20-30_latest_checkpoint_unit", "eval_Mar05_10-20-30_latest_checkpoint_unit_1"]
    for folder in folders:
        with open(tmp_path / folder / "metrics.json") as f:
            assert len(json.load(f)["history"]) == 1
