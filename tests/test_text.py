"""Text encoders: the LSTM's vocabulary and last-token read-out, BERT's bert-as-service pooling and its cache."""
from __future__ import annotations

import os

import pytest
import torch

import text_model
from errors import UserInputError


def test_vocab_tokenization_and_unknown_words():
    vocab = text_model.SimpleVocab()
    vocab.add_texts(["Red apple!", "replace red with Blue", "café"])
    assert vocab.word2id == {"<UNK>": 0, "red": 1, "apple": 2, "replace": 3, "with": 4, "blue": 5, "caf": 6}
    assert vocab.encode_text("RED, purple apple") == [1, 0, 2]
    assert vocab.encode_text("ñ") == [0]  # empty after ASCII filtering -> <UNK>


def test_lstm_reads_each_text_at_its_last_real_token():
    torch.manual_seed(0)
    lstm = text_model.build_text_encoder("lstm", ["red apple with a green ball", "blue"], lstm_dim=16).eval()
    batch = ["blue", "red apple with a green ball", "green"]
    together = lstm(batch)
    alone = torch.cat([lstm([t]) for t in batch])
    assert together.shape == (3, 16)
    torch.testing.assert_close(together, alone)  # padding never leaks into a shorter text's feature
    # and the read-out is the LSTM state after the last token, through dropout + Linear
    ids = torch.tensor(lstm.vocab.encode_text("red apple"))[:, None]
    out, _ = lstm.lstm(lstm.embedding_layer(ids))
    torch.testing.assert_close(lstm(["red apple"]), lstm.fc_output(out[-1]))


def test_saved_vocab_rebuilds_the_same_encoder():
    a = text_model.build_text_encoder("lstm", ["b a", "c"])
    b = text_model.build_text_encoder("lstm", [], vocab=a.vocab.word2id)
    assert b.vocab.word2id == a.vocab.word2id
    assert b.embedding_layer.weight.shape == a.embedding_layer.weight.shape


def hand_pooled(path: str, text: str, max_len: int = 25) -> torch.Tensor:
    """bert-as-service's REDUCE_MEAN of layer -2, computed by hand for one text (no padding at all)."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    ids = [tok.cls_token_id] + tok.convert_tokens_to_ids(tok.tokenize(text))[: max_len - 2] + [tok.sep_token_id]
    with torch.no_grad():
        hidden = bert(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(hidden) == bert.config.num_hidden_layers + 1
    return hidden[-2][0].mean(0)  # every token, [CLS] and [SEP] included


def test_bert_pooling_matches_a_hand_computation(tiny_bert_32):
    enc = text_model.build_text_encoder("bert", bert_model=tiny_bert_32)
    assert enc.dim == 32
    long_text = " ".join(["red apple"] * 30)  # 60 words: truncated to 23 + [CLS] + [SEP]
    batch = ["red", "replace red with blue", long_text]
    got = enc.encode_uncached(batch)
    assert not torch.allclose(got[0], got[1])  # the tokenizer knows the words: no all-[UNK] texts
    for row, text in zip(got, batch):
        torch.testing.assert_close(row, hand_pooled(tiny_bert_32, text), rtol=1e-5, atol=1e-5)
    # the mean really is over layer -2 and includes [CLS]/[SEP]: a last-layer or word-only mean differs
    assert not torch.allclose(got[0], hand_pooled(tiny_bert_32, "red", max_len=2), atol=1e-4)


def test_bert_cache_returns_the_same_vectors_and_runs_bert_once_per_text(tiny_bert_32):
    enc = text_model.build_text_encoder("bert", bert_model=tiny_bert_32)
    calls = []
    original = enc.encode_uncached
    enc.encode_uncached = lambda texts: calls.append(list(texts)) or original(texts)
    first = enc(["red", "blue", "red"])
    again = enc(["blue", "red"])
    fresh = original(["red", "blue"])
    torch.testing.assert_close(first[[0, 1]], fresh)
    torch.testing.assert_close(again, fresh[[1, 0]])
    torch.testing.assert_close(first[0], first[2])
    assert calls == [["red"], ["blue"]]  # one text per forward: a vector never depends on its batch-mates


def test_packaged_minilm_resolves_to_a_local_folder():
    path = text_model.resolve_bert_model("all-MiniLM-L6-v2")
    assert os.path.isfile(os.path.join(path, "config.json"))
    enc = text_model.build_text_encoder("bert", bert_model="all-MiniLM-L6-v2")
    assert enc.dim == 384
    v = enc(["red apple", "green ball"])
    assert v.shape == (2, 384) and not torch.allclose(v[0], v[1])


def test_missing_bert_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no such model folder"):
        text_model.build_text_encoder("bert", bert_model=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="cannot load it"):
        text_model.build_text_encoder("bert", bert_model=str(tmp_path / "empty"))


def test_bert_vectors_do_not_depend_on_the_callers_autocast(tiny_bert_32):
    """A text is encoded once, by whichever caller meets it first: under --amp the training step runs inside bf16
    autocast, the CUDA graph step and evaluation do not. The cached vector must be the fp32 one either way."""
    enc = text_model.build_text_encoder("bert", bert_model=tiny_bert_32)
    plain = enc.encode_uncached(["replace red with blue"])
    dtypes = []
    query = next(m for m in enc.bert.modules() if isinstance(m, torch.nn.Linear))
    query.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = enc(["replace red with blue"])
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16  # autocast is on out here
    assert dtypes and all(d == torch.float32 for d in dtypes)  # but not inside BERT
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
