"""Shared test fixtures: a tiny random BERT saved to disk and loaded back through the real loading code."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

# Covers the synthetic dataset's adjectives and nouns, so that its texts get distinct BERT vectors.
TINY_BERT_WORDS = ["red", "green", "blue", "yellow", "purple", "small", "large", "striped", "dotted", "hollow",
                   "apple", "ball", "circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "arrow",
                   "pentagon", "heart", "clock", "plate", "wheel", "window", "fish", "table", "replace", "with",
                   "and", "it", "is", "dress", "shirt", "the", "a", "more", "less"]


def make_tiny_bert(path: str, hidden: int = 768, layers: int = 2, seed: int = 0) -> str:
    """Writes a randomly initialised BERT (config, weights, WordPiece vocab) to ``path``; returns it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_BERT_WORDS
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself; older releases a vocab.txt path
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids(["red"]) == [vocab.index("red")], "tiny BERT tokenizer lost its vocab"
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_768(tmp_path_factory) -> str:
    return make_tiny_bert(str(tmp_path_factory.mktemp("bert768")), hidden=768)


@pytest.fixture(scope="session")
def tiny_bert_32(tmp_path_factory) -> str:
    return make_tiny_bert(str(tmp_path_factory.mktemp("bert32")), hidden=32)


# ------------------------------------------------------------------------------------------------------------------
# A TIRG + LSTM + soft-triplet run at 32 px, read by tests/test_checkpoint_settings.py and tests/test_run_outputs.py
TIRG_LSTM_FLAGS = ["--model", "tirg", "--use_bert", "False", "--lstm_dim", "16", "--loss", "soft_triplet",
                   "--image_size", "32", "--batch_size", "4", "--learning_rate_decay_frequency", "3", "--seed", "3",
                   "--train_eval_queries", "8", "--image_weights", "none", "--eval_every", "1000", "--log_every", "1"]


def execution_flags(log_dir) -> list[str]:
    """Flags that only decide how a run is executed or observed."""
    return ["--device", "cpu", "--loader_num_workers", "0", "--log_dir", str(log_dir)]


def run_main_captured(argv: list[str], threads: int | None = 1) -> tuple[int, str, str]:
    """main.main(argv) -> (exit code, stdout, stderr), the log lines into stderr too; on ``threads`` torch threads
    (restored after), or with None the thread count left as main sets it (the caller restores it)."""
    import contextlib
    import io
    import logging

    import main

    out, err = io.StringIO(), io.StringIO()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    root = logging.getLogger()
    handler = logging.StreamHandler(err)  # pytest holds the root logger: the log lines are captured here too
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main.main(argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if threads is not None:
            torch.set_num_threads(before)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_mitstates(tmp_path_factory) -> str:
    import synthetic

    path = str(tmp_path_factory.mktemp("tiny_mitstates") / "data")
    synthetic.generate_synthetic(path, seed=0, image_size=32, n_train_nouns=2, n_test_nouns=1, adjectives_per_noun=3,
                                 images_per_class=3)
    return path


# Triplets (--dataset triplets) on the tiny synthetic data: 18 training rows, 36 test rows over 18 test images.
TRIPLETS_TINY = dict(image_size=32, n_train_nouns=2, n_test_nouns=2, adjectives_per_noun=3, images_per_class=3)


def triplets_cli(data: str, log_dir, *extra: str) -> list[str]:
    """Flags of a tiny CPU triplets run (LSTM, no ImageNet download), evaluated only at its end."""
    return ["--dataset", "triplets", "--dataset_path", data, "--image_size", "32", "--batch_size", "4",
            "--train_eval_queries", "10", "--loader_num_workers", "0", "--log_dir", str(log_dir), "--device", "cpu",
            "--image_weights", "none", "--eval_every", "1000", "--use_bert", "False", "--lstm_dim", "16",
            "--seed", "3", *extra]


def main_stdout(argv: list[str]) -> tuple[int, str]:
    """main.main(argv) on one thread -> (exit code, stdout)."""
    import contextlib
    import io

    import main

    out, before = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            rc = main.main(argv)
    finally:
        torch.set_num_threads(before)
    return rc, out.getvalue()


@pytest.fixture(scope="session")
def triplets_data(tmp_path_factory) -> str:
    import synthetic

    path = str(tmp_path_factory.mktemp("triplets") / "data")
    synthetic.write_triplets_csv(path, seed=0, **TRIPLETS_TINY)
    return path


@pytest.fixture(scope="session")
def tirg_lstm_run(tmp_path_factory, tiny_mitstates) -> dict:
    """4 iterations (one epoch of 18 training images), evaluated once, at the end."""
    import glob

    log_dir = tmp_path_factory.mktemp("tirg_lstm_run")
    argv = ["--dataset", "mitstates", "--dataset_path", tiny_mitstates, *TIRG_LSTM_FLAGS, "--num_iters", "4",
            *execution_flags(log_dir)]
    rc, out, err = run_main_captured(argv)
    assert rc == 0, err
    (folder,) = glob.glob(os.path.join(str(log_dir), "*"))
    return {"folder": folder, "stdout": out, "stderr": err, "log_dir": str(log_dir), "data": tiny_mitstates,
            "flags": TIRG_LSTM_FLAGS}


@pytest.fixture(scope="session")
def run_main_cli():
    """``run_main_captured``: main.main(argv, threads=1) -> (exit code, stdout, stderr)."""
    return run_main_captured


@pytest.fixture(scope="session")
def triplets_run(tmp_path_factory, triplets_data) -> dict:
    """2 training iterations (one evaluation, at the end), then --test_only of the final checkpoint."""
    import glob

    log_dir = tmp_path_factory.mktemp("triplets_run")
    rc, train_out = main_stdout(triplets_cli(triplets_data, log_dir, "--num_iters", "2"))
    assert rc == 0
    (folder,) = glob.glob(os.path.join(str(log_dir), "*"))
    ckpt = os.path.join(folder, "latest_checkpoint.pth")
    test_log = tmp_path_factory.mktemp("triplets_test_only")
    rc, test_out = main_stdout(triplets_cli(triplets_data, test_log, "--test_only", "True",
                                            "--model_checkpoint", ckpt, "--eval_splits", "train,test"))
    assert rc == 0
    return {"folder": folder, "ckpt": ckpt, "train_stdout": train_out, "test_stdout": test_out}


@pytest.fixture(scope="session")
def run_main():
    """``main_stdout``: main.main(argv) on one thread -> (exit code, stdout)."""
    return main_stdout


@pytest.fixture(scope="session")
def triplets_tools():
    """The helpers above for test modules (conftest itself is not importable under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(cli=triplets_cli, run=main_stdout, tiny=TRIPLETS_TINY)


@pytest.fixture
def one_thread():
    """The test on one torch thread, the count restored after: tiny models gain little from a second thread, and
    on a busy machine two spinning OpenMP threads cost several times the CPU time of one. A module takes it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------------
# retrieve.py and demo.py against a gallery: the test split of the triplets data (triplets_data) in a folder
def rows_of_test_split(data: str) -> list[dict]:
    """The rows of ``data``'s triplets.csv whose split is test (36 on the tiny data, over 18 images)."""
    import csv

    with open(os.path.join(data, "triplets.csv"), newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


def copy_test_split(data: str, folder: str) -> str:
    """The test split's images of the triplets data ``data`` copied into ``folder`` (made if missing), each under
    its relative path (images/ADJ NOUN/NNN.jpg); returns ``folder``."""
    import shutil

    rows = rows_of_test_split(data)
    for rel in sorted({r[c] for r in rows for c in ("source", "target")}):
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(data, rel), os.path.join(folder, rel))
    return folder


def retrieve_captured(*argv: str) -> tuple[int, str, str]:
    """retrieve.main(argv) -> (exit code, stdout, stderr)."""
    import contextlib
    import io

    import retrieve

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = retrieve.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def edited_checkpoint(source: str, path: str, edit) -> str:
    """A copy of the checkpoint ``source`` written to ``path`` (returned) after ``edit(state)``, which changes the
    state dict in place or returns the dict to save instead."""
    from checkpoint import read_checkpoint, save_checkpoint

    state = read_checkpoint(source)
    replaced = edit(state)
    save_checkpoint(path, state if replaced is None else replaced)
    return path


def original_code_state(state: dict) -> dict:
    """The original code's keys of a checkpoint's state only (it, opt, model_state_dict): no vocabulary, no args."""
    return {"it": state["it"], "opt": state["opt"], "model_state_dict": state["model_state_dict"]}


GALLERY_QUERY_IMAGE = "images/blue clock/000.jpg"  # a test-split image, the source of the gallery tests' query


def query_flags(ckpt: str, gallery: str, top_k: int) -> list[str]:
    """retrieve.py's flags for the query GALLERY_QUERY_IMAGE + "green" of ``gallery`` on the CPU."""
    return ["--model_checkpoint", ckpt, "--gallery", gallery, "--device", "cpu",
            "--image", os.path.join(gallery, GALLERY_QUERY_IMAGE), "--text", "green", "--top_k", str(top_k)]


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """A copy of ``argv`` whose ``flag`` (present in it) takes ``value``."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, triplets_data) -> str:
    """The test split's 18 images in a folder of their own (``copy_test_split``), one copy per test module."""
    return copy_test_split(triplets_data, str(tmp_path_factory.mktemp("gallery")))


@pytest.fixture(scope="session")
def run_retrieve():
    """``retrieve_captured``: retrieve.main(argv) -> (exit code, stdout, stderr)."""
    return retrieve_captured


@pytest.fixture(scope="session")
def gallery_tools():
    """The gallery helpers above: ``test_rows(data)``, ``copy_test_split(data, folder)``, ``query_image``,
    ``query_flags(ckpt, gallery, top_k)``, ``edited_checkpoint(source, path, edit)``, ``original_code_state(state)``
    and ``with_flag(argv, flag, value)``."""
    import types

    return types.SimpleNamespace(test_rows=rows_of_test_split, copy_test_split=copy_test_split,
                                 query_image=GALLERY_QUERY_IMAGE, query_flags=query_flags,
                                 edited_checkpoint=edited_checkpoint, original_code_state=original_code_state,
                                 with_flag=with_flag)
