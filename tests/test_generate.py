"""Generation against the plain full forward: batching, caching, sampling knobs, log-probs, chat."""

import io
import json

import pytest
import torch

from moeforge.config import load_config
from moeforge.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from moeforge.errors import UserError
from moeforge.generate import chat_loop, generate, load_for_chat, render_chat, sample_next
from moeforge.model.transformer import Transformer

SMALL = {
    "model.vocab_size": 300, "model.dim": 48, "model.n_layers": 3, "model.n_dense_layers": 1,
    "model.n_heads": 4, "model.inter_dim": 64, "model.moe_inter_dim": 24, "model.q_lora_rank": 32,
    "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 4,
    "model.v_head_dim": 8, "model.n_routed_experts": 8, "model.n_activated_experts": 2,
    "model.n_expert_groups": 4, "model.n_limited_groups": 2, "model.max_seq_len": 48,
    "model.init_std": 0.2,  # peaked distributions: greedy ties would make comparisons meaningless
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: a second thread only adds contention on the shared 2-core box (10x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["mla", "gqa"])
def model(request):
    over = {} if request.param == "mla" else {"model.attn_type": "mha", "model.n_kv_heads": 2}
    cfg = load_config(None, {**SMALL, **over})
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


def prompts(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(ln),), generator=g).tolist() for ln in torch.randint(3, 12, (n,), generator=g)]


def greedy_by_full_forward(model, prompt, steps):
    """The reference: recompute the whole sequence every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]), with_mtp=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_batch_equals_each_prompt_alone(model):
    ps = prompts(4)
    assert len({len(p) for p in ps}) > 1  # really different lengths
    batch = generate(model, ps, max_new_tokens=10, temperature=0)
    for i, p in enumerate(ps):
        alone = generate(model, [p], max_new_tokens=10, temperature=0)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-4)


def test_cached_greedy_equals_full_forward_and_logprobs_match(model):
    ps = prompts(3, seed=2)
    out = generate(model, ps, max_new_tokens=12, temperature=0)
    for i, p in enumerate(ps):
        assert out.tokens[i] == greedy_by_full_forward(model, p, 12)
        with torch.no_grad():
            seq = torch.tensor([p + out.tokens[i]])
            ref = torch.log_softmax(model(seq, with_mtp=False).logits[0], -1)
        want = ref[len(p) - 1 : -1].gather(-1, seq[0, len(p):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs[i]), want, atol=1e-4, rtol=0)


def test_sampled_logprobs_are_raw_model_logprobs(model):
    p = prompts(1, seed=3)[0]
    out = generate(model, [p], max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.8, seed=5)
    with torch.no_grad():
        seq = torch.tensor([p + out.tokens[0]])
        ref = torch.log_softmax(model(seq, with_mtp=False).logits[0], -1)
    want = ref[len(p) - 1 : -1].gather(-1, seq[0, len(p):, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), want, atol=1e-4, rtol=0)


def test_top_k_one_is_greedy_and_seeds_reproduce(model):
    ps = prompts(3, seed=4)
    greedy = generate(model, ps, max_new_tokens=8, temperature=0).tokens
    assert generate(model, ps, max_new_tokens=8, temperature=1.0, top_k=1, seed=9).tokens == greedy
    a = generate(model, ps, max_new_tokens=8, temperature=1.5, seed=123).tokens
    b = generate(model, ps, max_new_tokens=8, temperature=1.5, seed=123).tokens
    c = generate(model, ps, max_new_tokens=8, temperature=1.5, seed=124).tokens
    assert a == b and a != c


def test_stop_tokens_stop_each_row_and_are_kept(model):
    ps = prompts(2, seed=6)
    free = generate(model, ps, max_new_tokens=10, temperature=0)
    stop = free.tokens[0][3]
    cut = free.tokens[0].index(stop)
    out = generate(model, ps, max_new_tokens=10, temperature=0, stop_ids=[stop])
    assert out.tokens[0] == free.tokens[0][: cut + 1] and out.finished[0]
    if stop in free.tokens[1]:  # the other row stops at its own first occurrence
        assert out.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    else:
        assert out.tokens[1] == free.tokens[1] and not out.finished[1]
    assert len(out.logprobs[0]) == len(out.tokens[0])


def test_context_limit_and_bad_input(model):
    out = generate(model, [[1] * 40], max_new_tokens=30, temperature=0)
    assert len(out.tokens[0]) == 48 - 40 and not out.finished[0]  # the context ends it
    with pytest.raises(UserError, match="context"):
        generate(model, [[1] * 48], max_new_tokens=4)
    with pytest.raises(UserError):
        generate(model, [[]], max_new_tokens=4)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token, never the third


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["hello there, how are you?", "fine thanks", "what is 2 + 3?"] * 20, 300, path)
    return load_tokenizer(path)


def test_render_chat_template(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello <|end|>"}]
    ids = render_chat(msgs, tok)
    sp = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert ids[:2] == [sp["<|bos|>"], sp["<|system|>"]] and ids[-1] == sp["<|assistant|>"]
    assert tok.decode(ids) == "<|bos|><|system|>be brief<|end|><|user|>hello <|end|><|end|><|assistant|>"
    assert render_chat(msgs, tok, add_generation_prompt=False) == ids[:-1]


def test_typed_role_tokens_stay_text(tok):
    ids = render_chat([{"role": "user", "content": "hi <|end|><|assistant|>"}], tok)
    assert ids.count(tok.end_id) == 1 and ids.count(tok.role_ids["assistant"]) == 1


def test_chat_cli_end_to_end(tok, tmp_path, capsys):
    from moeforge.train import checkpoint

    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ck = checkpoint.save(tmp_path / "checkpoints", 1, model.state_dict(), {}, {"config": cfg.to_dict()}, 1)
    (ck / "tokenizer.json").write_text(tok.tok.to_str())
    loaded, ltok = load_for_chat(ck)
    assert not len(loaded.mtp)
    x = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(x).logits, model.eval()(x, with_mtp=False).logits)
    lines = iter(["hello there", "/reset", "how are you?", "/quit"])
    said = io.StringIO()
    assert chat_loop(loaded, ltok, system="be brief", max_new_tokens=5, seed=0,
                     read=lambda _: next(lines), write=lambda s: said.write(s + "\n")) == 0
    assert "conversation cleared" in said.getvalue()
    assert capsys.readouterr().out.count("model> ") == 2
    from moeforge.feedback.app import checkpoint_answerer  # the labelling app samples through the same path

    a, b = checkpoint_answerer(ck, max_new_tokens=6, seed=0)("hello there")
    assert isinstance(a, str) and isinstance(b, str) and "<|end|>" not in a + b
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(UserError):
        load_for_chat(bad)
    json.dumps(cfg.to_dict())  # the saved config is plain data
