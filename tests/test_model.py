"""The model against independent references: causality, cache, routing, balance, counts, overfit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeforge.config import load_config
from moeforge.model.layers import rope_inv_freq, yarn_softmax_mscale
from moeforge.model.moe import GroupedExperts, MoE, padded_rows, sequence_balance_loss
from moeforge.model.transformer import Transformer, count_parameters
from moeforge.train.losses import lm_loss

SMALL = {
    "model.vocab_size": 97, "model.dim": 48, "model.n_layers": 3, "model.n_dense_layers": 1,
    "model.n_heads": 4, "model.inter_dim": 64, "model.moe_inter_dim": 24, "model.q_lora_rank": 32,
    "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 4,
    "model.v_head_dim": 8, "model.n_routed_experts": 8, "model.n_activated_experts": 2,
    "model.n_expert_groups": 4, "model.n_limited_groups": 2, "model.route_scale": 2.5,
    "model.max_seq_len": 64, "model.init_std": 0.05,
}


def make(**over):
    cfg = load_config(None, {**SMALL, **{k.replace("__", "."): v for k, v in over.items()}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():  # a non-trivial balancing bias so routing is not just argmax of scores
        for m in model.moe_layers():
            m.gate.bias.copy_(torch.randn_like(m.gate.bias) * 0.05)
    return cfg, model.eval()


ATTN = [{}, {"model__attn_type": "mha", "model__n_kv_heads": 2}, {"model__q_lora_rank": 0},
        {"model__rope_factor": 4.0, "model__original_seq_len": 16}]


@pytest.mark.parametrize("over", ATTN, ids=["mla", "gqa", "mla-noqlora", "mla-yarn"])
def test_causal(over):
    _, model = make(**over)
    tok = torch.randint(0, 97, (2, 20))
    tok2 = tok.clone()
    tok2[:, 11:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(tok).logits, model(tok2).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-5, rtol=0)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-3  # the future did change something later


@pytest.mark.parametrize("over", ATTN, ids=["mla", "gqa", "mla-noqlora", "mla-yarn"])
def test_cached_decoding_equals_full_forward(over):
    _, model = make(**over)
    tok = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(tok).logits
        cache = model.new_cache(2, 32)
        steps = [model(tok[:, :10], 0, cache).logits]  # prefill
        for t in range(10, 24):
            steps.append(model(tok[:, t : t + 1], t, cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_mla_cache_stores_latent_only():
    cfg, model = make()
    cache = model.new_cache(1, 8, dtype=torch.bfloat16)
    per_token = cache[0].nbytes_per_token()
    assert per_token == (cfg.model.kv_lora_rank + cfg.model.qk_rope_head_dim) * 2
    full_kv = cfg.model.n_heads * (cfg.model.qk_head_dim + cfg.model.v_head_dim) * 2
    assert per_token < full_kv


def _route_reference(scores, bias, n_groups, keep_groups, topk, scale):
    """Per-token NumPy transcription of V3's Gate for checking the vectorised one."""
    scores, bias = scores.double().numpy(), bias.double().numpy()
    t, e = scores.shape
    per = e // n_groups
    weights, chosen = np.zeros((t, topk)), np.zeros((t, topk), dtype=int)
    for i in range(t):
        b = scores[i] + bias
        gscore = [sum(sorted(b[g * per : (g + 1) * per])[-2:]) for g in range(n_groups)]
        kept = sorted(range(n_groups), key=lambda g: -gscore[g])[:keep_groups]
        cand = [j for g in kept for j in range(g * per, (g + 1) * per)]
        top = sorted(cand, key=lambda j: -b[j])[:topk]
        w = scores[i][top]
        chosen[i], weights[i] = top, w / w.sum() * scale
    return weights, chosen


def test_router_matches_reference_and_rules():
    _, model = make()
    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        gate.bias.copy_(torch.randn(8) * 0.3)
        x = torch.randn(64, 48)
        scores = gate.scores(x)
        w, idx = gate.route(scores)
    rw, ridx = _route_reference(scores, gate.bias, 4, 2, 2, 2.5)
    assert np.array_equal(np.sort(idx.numpy(), 1), np.sort(ridx, 1))
    order = np.argsort(idx.numpy(), 1)
    np.testing.assert_allclose(np.take_along_axis(w.numpy(), order, 1),
                               np.take_along_axis(rw, np.argsort(ridx, 1), 1), rtol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))
    # only experts of the two kept groups are ever chosen
    groups = (idx // 2).numpy()
    assert all(len(set(r)) <= 2 for r in groups)


def test_bias_changes_choice_not_weight_formula():
    _, model = make()
    gate = model.moe_layers()[0].gate
    x = torch.randn(32, 48)
    with torch.no_grad():
        gate.bias.zero_()
        gate.bias[5] = 10.0  # expert 5 (group 2) now always wins a slot
        scores = gate.scores(x)
        w, idx = gate.route(scores)
    assert (idx == 5).any(dim=-1).all()
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w, expected)  # unbiased scores, whatever the bias did


def test_bias_update_direction_and_size():
    _, model = make()
    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        gate.bias.zero_()
    gate.update_bias(torch.tensor([10, 0, 5, 5, 7, 3, 5, 5]), gamma=0.01)
    expected = torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0], dtype=torch.float32) * 0.01
    torch.testing.assert_close(gate.bias, expected)


def test_sequence_balance_loss_against_formula():
    torch.manual_seed(1)
    b, s, e, k = 3, 7, 6, 2
    scores = torch.rand(b * s, e)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(b * s)])
    got = sequence_balance_loss(scores, idx, b, e, k)
    total = 0.0
    for seq in range(b):
        for i in range(e):
            f = e / (k * s) * sum(int(i in idx[seq * s + t].tolist()) for t in range(s))
            p = sum(float(scores[seq * s + t, i] / scores[seq * s + t].sum()) for t in range(s)) / s
            total += f * p
    assert got.item() == pytest.approx(total / b, rel=1e-5)


def test_moe_layer_equals_per_token_reference():
    cfg, model = make()
    moe: MoE = model.moe_layers()[0]
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        y = moe(x)
        flat = x.reshape(-1, 48)
        w, idx = moe.gate.route(moe.gate.scores(flat))
        ref = torch.zeros_like(flat)
        ex = moe.experts
        for t in range(flat.shape[0]):
            for slot in range(idx.shape[1]):
                j = idx[t, slot]
                h = F.silu(ex.w1[j] @ flat[t]) * (ex.w3[j] @ flat[t])
                ref[t] += w[t, slot] * (ex.w2[j] @ h)
            ref[t] += moe.shared_experts(flat[t : t + 1])[0]
    torch.testing.assert_close(y.reshape(-1, 48), ref, atol=1e-5, rtol=1e-5)
    assert moe.last_counts.sum() == flat.shape[0] * cfg.model.n_activated_experts


@pytest.mark.parametrize("bucket", [1, 4, 128])
def test_expert_row_padding_changes_nothing(bucket):
    """CPU pads each expert's rows to a bucket (static GEMM shapes): outputs and gradients
    must equal a plain per-expert computation, empty experts included."""
    torch.manual_seed(0)
    ex = GroupedExperts(5, 16, 8)
    for w in (ex.w1, ex.w2, ex.w3):
        torch.nn.init.normal_(w, std=0.3)
    ex.row_bucket = bucket
    counts = [3, 0, 7, 1, 5]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    y = ex(x, counts)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in (ex.w1, ex.w2, ex.w3)]
    outs, s = [], 0
    for e, c in enumerate(counts):
        xe = xr[s : s + c]
        outs.append((F.silu(xe @ ws[0][e].T) * (xe @ ws[2][e].T)) @ ws[1][e].T)
        s += c
    ref = torch.cat(outs)
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    for w, wr in zip((ex.w1, ex.w2, ex.w3), ws):
        torch.testing.assert_close(w.grad, wr.grad)
    assert padded_rows([3, 0, 2], [4, 0, 4], torch.device("cpu")).tolist() == [0, 1, 2, 4, 5]


def test_parameter_counts_equal_tensor_sizes():
    cfg, model = make()
    c = count_parameters(model)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert c["total"] == main
    assert c["mtp_total"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    m = cfg.model
    routed_per_layer = 3 * m.dim * m.moe_inter_dim * m.n_routed_experts
    inactive = (m.n_layers - m.n_dense_layers) * routed_per_layer * (1 - m.n_activated_experts / m.n_routed_experts)
    assert c["activated"] == main - inactive
    assert c["activated_without_embedding"] == c["activated"] - m.vocab_size * m.dim


def test_v3_preset_published_totals():
    from moeforge.model.count import count_config

    c = count_config(load_config("deepseek-v3-671b").model)
    assert abs(c["total"] / 671.0e9 - 1) < 0.002
    assert abs(c["activated_without_embedding"] / 36.7e9 - 1) < 0.01


def test_yarn_frequencies():
    cfg = load_config(None, {"model.rope_factor": 40.0, "model.original_seq_len": 4096, "model.qk_rope_head_dim": 64})
    base = load_config(None, {"model.qk_rope_head_dim": 64})
    y, b = rope_inv_freq(cfg.model, 64), rope_inv_freq(base.model, 64)
    assert torch.allclose(y[:4], b[:4])  # high frequencies extrapolate (untouched)
    torch.testing.assert_close(y[-4:], b[-4:] / 40.0)  # low frequencies interpolate by the factor
    assert yarn_softmax_mscale(cfg.model) == pytest.approx((0.1 * math.log(40) + 1) ** 2)


def test_mtp_shapes_and_drop():
    _, model = make(model__mtp_depth=2)
    tok = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        out = model(tok)
        assert [lg.shape[1] for lg in out.mtp_logits] == [11, 10]
        base = out.logits
        model.drop_mtp()
        assert model(tok).logits.equal(base) and not model(tok).mtp_logits


def test_bf16_compute_keeps_fp32_master_grads():
    _, model = make()
    model.train().set_compute_dtype(torch.bfloat16)
    tok = torch.randint(0, 97, (2, 16))
    out = model(tok[:, :-1])
    lm_loss(out, tok[:, 1:], model.cfg)["loss"].backward()
    assert out.logits.dtype == torch.float32
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n


def test_tiny_model_overfits_one_batch():
    cfg, model = make()
    model.train()
    tok = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(tok[:, :-1])
        loss = lm_loss(out, tok[:, 1:], cfg.model)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.5, (losses[0], losses[-1])
