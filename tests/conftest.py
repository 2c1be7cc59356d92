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
                                            "--model_checkpoint", ckpt))
    assert rc == 0
    return {"folder": folder, "ckpt": ckpt, "train_stdout": train_out, "test_stdout": test_out}


@pytest.fixture(scope="session")
def triplets_tools():
    """The helpers above for test modules (conftest itself is not importable under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(cli=triplets_cli, run=main_stdout, tiny=TRIPLETS_TINY)
