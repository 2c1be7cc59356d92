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
