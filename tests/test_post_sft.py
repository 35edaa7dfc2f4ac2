"""SFT: loss only on assistant tokens (checked on a rendered conversation), packing, invalid
lines reported with their numbers and skipped, and a short run on the shared loop."""

from __future__ import annotations

import json

import pytest

from moeforge.data.tokenizer import load_tokenizer
from moeforge.generate import render_chat
from moeforge.train.losses import IGNORE
from moeforge.train.sft import encode_examples, load_conversations, pack_rows, rows_to_batch, sft
from post_helpers import single_thread, tiny_config, tiny_world  # noqa: F401 (autouse fixture)

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}]


def test_labels_only_on_assistant_tokens(tmp_path):
    tiny_world(tmp_path)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    (ex,), skipped = encode_examples(tok, [CONV], 64)
    assert skipped == 0
    # the template is generation's: the prompt of the last turn is a prefix of the training row
    prompt = render_chat(CONV[:-1], tok)
    assert ex[0][: len(prompt)] == prompt
    inputs, labels = rows_to_batch(pack_rows([ex], 64, tok.pad_id, [0]), "cpu")
    trained = [int(t) for t in labels[0] if t != IGNORE]
    expect = tok.encode("The answer is 5.") + [tok.end_id] + tok.encode("8") + [tok.end_id]
    assert trained == expect
    # every label that is trained sits right after the input token that precedes it
    ids = ex[0]
    for t, lab in enumerate(labels[0].tolist()):
        if lab != IGNORE:
            assert lab == ids[t + 1] and int(inputs[0, t]) == ids[t]
    assert tok.role_ids["user"] not in trained and tok.pad_id not in trained


def test_packing_keeps_conversations_whole(tmp_path):
    tiny_world(tmp_path)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y"}]]
    exs, skipped = encode_examples(tok, convs, 48)
    assert skipped == 1 and len(exs) == 2  # the long one does not fit a row
    rows = pack_rows(exs, 48, tok.pad_id, [0, 1])
    assert all(len(r[0]) == len(r[1]) == 48 for r in rows)
    flat = [t for r in rows for t in r[0] if t != tok.pad_id]
    assert flat == exs[0][0] + exs[1][0]  # nothing cut, nothing lost, order kept
    assert sum(r[0].count(tok.bos_id) for r in rows) == 2


def test_invalid_lines_reported_and_skipped(tmp_path, capsys):
    cfg, _ = tiny_world(tmp_path)
    path = tmp_path / "convs.jsonl"
    good = json.dumps({"messages": CONV})
    path.write_text("\n".join([good, "{not json", good, json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                               json.dumps({"messages": [{"role": "robot", "content": "x"}]}), good]) + "\n")
    convs, source, bad = load_conversations(tiny_config(tmp_path, sft__data=str(path)))
    out = capsys.readouterr().out
    assert len(convs) == 3 and bad == 3
    assert f"{path}:2: not valid JSON" in out
    assert f"{path}:4: no non-empty assistant message" in out
    assert f"{path}:5: message 0" in out


def test_short_sft_run_lowers_heldout_loss(tmp_path):
    cfg, init = tiny_world(tmp_path)
    cfg = tiny_config(tmp_path, sft__steps=25, sft__seq_len=128, sft__micro_batch_size=4, sft__eval_every=0,
                      sft__eval_problems=4, sft__run_name="s", sft__lr=3e-3)
    res = sft(cfg, init)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 25
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.5
    assert 0 <= summary["eval_after"]["math_accuracy"] <= 1
    assert (res.checkpoint / "model.safetensors").is_file()
