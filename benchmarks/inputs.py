"""The benchmark's inputs: where the synthetic data of a preset lives, and a randomly initialised BERT with
bert-base's shape (the compute of bert-base-uncased with no download) over the synthetic words."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Sequence

import torch

import synthetic

RANDOM_BERTS = {
    "random-bert-base": {},  # transformers BertConfig() defaults = bert-base-uncased's shape
    "random-bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


def synthetic_params(preset: dict, seed: int) -> dict:
    """``synthetic.generate_synthetic``'s keyword arguments for a preset (its ``image_size`` is the JPEGs' side)."""
    return dict(seed=seed, image_size=preset["jpeg_size"], n_train_nouns=preset["n_train_nouns"],
                n_test_nouns=preset["n_test_nouns"], adjectives_per_noun=preset["adjectives_per_noun"],
                images_per_class=preset["images_per_class"])


def synthetic_path(data_dir: str, params: dict) -> str:
    """The folder under ``data_dir`` that holds the synthetic data of ``params`` (one per size and seed)."""
    p = params
    return os.path.join(data_dir, f"synthetic-{p['n_train_nouns']}x{p['n_test_nouns']}x{p['adjectives_per_noun']}"
                                  f"x{p['images_per_class']}-{p['image_size']}px-seed{p['seed']}")


def synthetic_words() -> list[str]:
    """Every word of the synthetic captions and query texts (adjectives and nouns), sorted."""
    words = set(synthetic.SYNTHETIC_ADJECTIVES) | set(synthetic.SYNTHETIC_TRAIN_NOUNS) | set(synthetic.SYNTHETIC_TEST_NOUNS)
    return sorted(words)


def _wordpiece_tokenizer(cls, vocab_file: str, vocab: Sequence[str]):
    """A lower-casing WordPiece tokenizer over ``vocab_file`` whatever the transformers version: 4.x takes
    ``vocab_file=``, 5.x takes ``vocab=`` (and silently ignores ``vocab_file``, leaving only the special tokens)."""
    tries = (lambda: cls.from_pretrained(os.path.dirname(vocab_file), do_lower_case=True),
             lambda: cls(vocab=vocab_file, do_lower_case=True),
             lambda: cls(vocab_file=vocab_file, do_lower_case=True))
    for make in tries:
        try:
            tok = make()
        except (OSError, TypeError, ValueError):
            continue
        ids = [tok.convert_tokens_to_ids(w) for w in vocab[5:]]
        if len(tok) == len(vocab) and tok.unk_token_id not in ids:
            return tok
    raise RuntimeError(f"cannot build a WordPiece tokenizer over {vocab_file} with this transformers version")


def make_random_bert(parent: str, kind: str = "random-bert-base", words: Sequence[str] = (), seed: int = 0) -> str:
    """Writes (once) a randomly initialised BertModel of the ``kind`` shape with a WordPiece vocabulary holding
    ``words`` to ``<parent>/<kind>-<hash>`` and returns that folder (config.json, weights, tokenizer files)."""
    # transformers' BERT classes take ~2.7 s to import on a 2-core CPU; only a random BERT needs them
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.lower() for w in words} - {""})
    shape = RANDOM_BERTS[kind]
    key = hashlib.sha1(json.dumps([vocab, shape, seed]).encode()).hexdigest()[:12]
    path = os.path.join(parent, f"{kind}-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=parent)
    try:
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(vocab) + "\n")
        _wordpiece_tokenizer(BertTokenizerFast, vocab_file, vocab).save_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            BertModel(BertConfig(vocab_size=len(vocab), **shape)).save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # written meanwhile by another process
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_bert(name: str, data_dir: str, texts: Sequence[str]) -> str:
    """``--bert_model``: a ``RANDOM_BERTS`` name becomes the folder of that random BERT (written once, its
    vocabulary the synthetic words and those of ``texts``); any other name is returned as it is."""
    if name in RANDOM_BERTS:
        return os.path.abspath(make_random_bert(data_dir, name, synthetic_words() + [w for t in texts for w in t.split()]))
    return name
