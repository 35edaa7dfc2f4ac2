"""Tokenizer: exact round trips on any Unicode, fixed special ids, chat masks, HF loading, bad files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeforge.data.tokenizer import (SPECIAL_TOKENS, encode_chat, load_tokenizer, render_chat, train_tokenizer)
from moeforge.errors import UserError

CORPUS = ["def f(x):\n    return x * 2\n", "The cat sat on the mat. The dog sat on the log.",
          "Problem: What is 12 + 30? The answer is 42.", "naïve café — 日本語 🙂 ünïcödé"] * 20


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(CORPUS, 400, path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_fixed_ids_and_are_single_tokens(tok):
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.role_ids == {"system": 3, "user": 4, "assistant": 5}
    assert tok.encode("<|user|>hi<|end|>")[0] == tok.role_ids["user"]
    assert 300 < tok.vocab_size <= 400


def test_training_learns_merges(tok):
    # frequent words become single tokens; bytes per token well above 1
    text = "The cat sat on the mat."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_chat_render_and_loss_mask(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}]
    assert render_chat(msgs, add_generation_prompt=False) == \
        "<|bos|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>"
    ids, mask = encode_chat(tok, msgs)
    assert ids == tok.encode(render_chat(msgs))  # the two paths agree
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "4<|end|>"
    with pytest.raises(UserError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])


def test_loadable_by_transformers(tok_path, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>")
    text = "Problem: What is 12 + 30? naïve 🙂"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


def test_bad_tokenizer_files(tmp_path, tok_path):
    with pytest.raises(UserError, match="missing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(tok_path.read_text()[:1000])
    with pytest.raises(UserError, match="bad.json: tokenizer file is not valid JSON"):
        load_tokenizer(bad)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="odd.json: not a valid tokenizers file"):
        load_tokenizer(odd)
    # a tokenizer without our special tokens is rejected by name
    from tokenizers import Tokenizer, models

    plain = tmp_path / "plain.json"
    Tokenizer(models.BPE()).save(str(plain))
    with pytest.raises(UserError, match="plain.json: missing special token"):
        load_tokenizer(plain)
