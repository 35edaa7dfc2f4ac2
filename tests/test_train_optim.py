"""Optimizer, schedules, batch ramp, FLOPs count, MaxVio, router-bias direction, config TOML."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
from torch import nn

from moeforge.config import TrainConfig, load_config
from moeforge.model.transformer import Transformer
from moeforge.train.loop import update_router_bias
from moeforge.train.metrics import config_toml, forward_macs_per_token, max_violation, train_flops_per_token
from moeforge.train.optim import AdamW, decays, lr_at, micro_batches_at
from train_helpers import SMALL


def tc(**kw) -> TrainConfig:
    t = TrainConfig(**kw)
    t.validate()
    return t


def test_v3_schedule_by_hand():
    # 100 steps: warmup 10, constant to 50, cosine 50 -> 80, tail min_lr 80 -> 100
    c = tc(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, decay_start=0.5, decay_end=0.8, tail_lr_ratio=0.5, schedule="v3")
    assert lr_at(0, c) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(30, c) == 1.0 and lr_at(49, c) == 1.0
    assert lr_at(50, c) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(65, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_at(79, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 29 / 30)))
    # tails: 20 steps after the cosine split 2:1 -> steps 80..92 at min_lr, 93..99 at min_lr * 0.5
    assert lr_at(80, c) == pytest.approx(0.1) and lr_at(92, c) == pytest.approx(0.1)
    assert lr_at(93, c) == pytest.approx(0.05) and lr_at(99, c) == pytest.approx(0.05)


def test_other_schedules_by_hand():
    wsd = tc(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10, decay_start=0.8, schedule="wsd")
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5)  # linear from 80 to 100
    cos = tc(steps=110, lr=1.0, min_lr=0.2, warmup_steps=10, schedule="cosine")
    assert lr_at(10, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.6)  # halfway of 100 decay steps
    const = tc(steps=50, lr=0.5, min_lr=0.1, warmup_steps=0, schedule="constant")
    assert lr_at(0, const) == 0.5 and lr_at(49, const) == 0.5


def test_batch_ramp_in_tokens():
    c = tc(grad_accum=8, batch_ramp_start=2, batch_ramp_tokens=6000)
    assert micro_batches_at(0, c) == 2
    assert micro_batches_at(3000, c) == 5  # 2 + 0.5 * 6
    assert micro_batches_at(5999, c) == 7
    assert micro_batches_at(6000, c) == 8 and micro_batches_at(10**9, c) == 8
    assert micro_batches_at(123, tc(grad_accum=3)) == 3  # no ramp


def _pair_models():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def _run(model, step_fn, n=3):
    torch.manual_seed(1)
    for _ in range(n):
        x = torch.randn(32, 8)
        model(x).pow(2).mean().backward()
        step_fn()


def test_adamw_fp32_matches_torch_adamw_with_decay_groups():
    ours, ref = _pair_models()
    opt = AdamW(ours.named_parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.ndim < 2]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _run(ours, lambda: (opt.step(), opt.zero_grad()))
    _run(ref, lambda: (topt.step(), topt.zero_grad()))
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_bf16_moments_are_stored_in_bf16_and_stay_close():
    m32, m16 = _pair_models()
    o32 = AdamW(m32.named_parameters(), 1e-2, (0.9, 0.95), 1e-8, 0.1, "fp32")
    o16 = AdamW(m16.named_parameters(), 1e-2, (0.9, 0.95), 1e-8, 0.1, "bf16")
    _run(m32, lambda: (o32.step(), o32.zero_grad()))
    _run(m16, lambda: (o16.step(), o16.zero_grad()))
    assert all(t.dtype == torch.bfloat16 for t in o16.state_tensors().values())
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # master weights stay FP32
    diff = max((a - b).abs().max().item() for a, b in zip(m32.parameters(), m16.parameters()))
    assert 0 < diff < 1e-3  # rounding is real, and small


def test_no_weight_decay_on_norms_biases_and_router_bias():
    model = Transformer(load_config(None, SMALL).model)
    names = dict(model.named_parameters())
    assert not any(n.endswith("gate.bias") for n in names)  # a buffer: never optimised or decayed
    assert not decays("norm.weight", names["norm.weight"])
    assert decays("layers.1.ffn.experts.w1", names["layers.1.ffn.experts.w1"])
    # with zero gradients only decayed tensors move
    opt = AdamW(model.named_parameters(), lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.ndim >= 2), n


def test_router_bias_moves_against_load():
    model = Transformer(load_config(None, SMALL).model)
    main, mtp = model.moe_layers()  # the MTP block is an MoE block too
    # layer 0: expert 0 overloaded, 1 underloaded, 2-3 at the mean; layer 1: the reverse
    counts = torch.tensor([[10.0, 0.0, 5.0, 5.0], [0.0, 10.0, 5.0, 5.0]])
    update_router_bias(model, counts, gamma=0.01)
    assert main.gate.bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert mtp.gate.bias.tolist() == pytest.approx([0.01, -0.01, 0.0, 0.0])


def test_flops_count_matches_activated_parameters():
    cfg = load_config(None, SMALL).model
    model = Transformer(cfg)
    k_over_e = cfg.n_activated_experts / cfg.n_routed_experts
    matmul_params = sum(p.numel() * (k_over_e if ".experts.w" in n else 1) for n, p in model.named_parameters()
                        if p.ndim >= 2 and n != "embed.weight")
    seq = 32
    score_terms = (cfg.n_layers + cfg.mtp_depth) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq + 1) / 2
    shared_head_again = cfg.mtp_depth * cfg.dim * cfg.vocab_size  # MTP reuses the head: counted once, run twice
    expected = matmul_params + score_terms + shared_head_again
    assert forward_macs_per_token(cfg, seq) == pytest.approx(expected)
    assert train_flops_per_token(cfg, seq) == pytest.approx(6 * expected)


def test_max_violation():
    vio = max_violation(torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 4.0, 2.0, 2.0]]))
    assert vio.tolist() == pytest.approx([0.0, 1.0])


def test_resolved_config_toml_reads_back(tmp_path):
    cfg = load_config("configs/tiny.toml", {"train.steps": 7, "data.weights": {"code": 2.0}})
    path = tmp_path / "config.toml"
    path.write_text(config_toml(cfg))
    tomllib.loads(path.read_text())
    assert load_config(path).to_dict() == cfg.to_dict()
