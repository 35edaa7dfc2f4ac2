"""MoE layer: grouped dispatch vs a straightforward per-expert loop, and scaling in experts.

Part 1 times forward + backward of one MoE layer (bf16 compute, FP32 master weights)
with our dispatch (sort by expert, one grouped GEMM per projection) against the
per-expert loop most reference implementations use (mask, gather, three GEMMs and an
index_add per expert). Same weights, same routing, same tokens; outputs are checked
equal before timing. Target: >= 2x.

Part 2 keeps the activated parameters fixed (top-k and expert width constant) and grows
the number of routed experts: with grouped dispatch the step time should stay nearly
flat, because the work per token does not change.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moeforge.bench import interleaved, write_results
from moeforge.config import load_config
from moeforge.model.moe import MoE


def per_expert_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Baseline: loop over experts that received tokens (no sorting, no grouped GEMM)."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    weights, idx = moe.gate.route(moe.gate.scores(flat))
    out = torch.zeros_like(flat)
    ex = moe.experts
    hit = torch.bincount(idx.flatten(), minlength=moe.n_experts).nonzero().flatten().tolist()
    for e in hit:
        tok, slot = torch.where(idx == e)
        xe = flat[tok]
        h = F.silu(F.linear(xe, ex.w1[e].to(x.dtype))) * F.linear(xe, ex.w3[e].to(x.dtype))
        ye = F.linear(h, ex.w2[e].to(x.dtype)) * weights[tok, slot, None].to(x.dtype)
        out = out.index_add(0, tok, ye)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(b, s, d)


def make_moe(n_experts: int, topk: int, dim: int, inter: int, groups: int) -> MoE:
    cfg = load_config(None, {"model.dim": dim, "model.moe_inter_dim": inter, "model.n_routed_experts": n_experts,
                             "model.n_activated_experts": topk, "model.n_expert_groups": groups,
                             "model.n_limited_groups": max(1, groups // 2), "model.n_shared_experts": 1})
    torch.manual_seed(0)
    moe = MoE(cfg.model)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    return moe


def fwd_bwd(fn, moe: MoE, x: torch.Tensor):
    def step():
        moe.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        fn(xx).float().square().mean().backward()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tokens, dim, inter, topk = (1024, 256, 128, 4) if args.quick else (4096, 512, 256, 4)
    repeat = 3 if args.quick else 5
    x = torch.randn(tokens // 512, 512, dim).to(torch.bfloat16)

    rows = []
    moe = make_moe(32, topk, dim, inter, groups=4)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).float(), per_expert_loop(moe, x).float(), atol=2e-2, rtol=2e-2)
    t = interleaved({"grouped": fwd_bwd(moe, moe, x), "loop": fwd_bwd(lambda z: per_expert_loop(moe, z), moe, x)},
                    repeat=repeat)
    speedup = t["loop"] / t["grouped"]
    rows.append({"experts": 32, "top_k": topk, "tokens": tokens, "grouped_ms": t["grouped"] * 1e3,
                 "loop_ms": t["loop"] * 1e3, "speedup": speedup})

    scaling = []
    for e in ([8, 32, 64] if args.quick else [8, 16, 32, 64, 128, 256]):
        m = make_moe(e, topk, dim, inter, groups=4 if e >= 8 else 1)
        tt = interleaved({"grouped": fwd_bwd(m, m, x), "loop": fwd_bwd(lambda z, m=m: per_expert_loop(m, z), m, x)},
                         repeat=repeat)
        scaling.append({"experts": e, "top_k": topk, "grouped_ms": tt["grouped"] * 1e3, "loop_ms": tt["loop"] * 1e3})
    base = scaling[0]["grouped_ms"]
    for r in scaling:
        r["grouped_vs_fewest"] = r["grouped_ms"] / base

    summary = {"grouped_speedup_vs_loop_at_32_experts": speedup, "target": ">= 2x",
               "grouped_time_ratio_most_vs_fewest_experts": scaling[-1]["grouped_vs_fewest"]}
    notes = [f"MoE layer fwd+bwd, bf16 compute, dim {dim}, expert width {inter}, {tokens} tokens, 1 shared expert.",
             "Scaling rows keep top-k and expert width fixed (same activated parameters) while experts grow."]
    write_results("moe", "MoE layer: grouped dispatch vs per-expert loop", rows + scaling, notes, summary)
    print(f"grouped dispatch speedup vs per-expert loop: {speedup:.2f}x")
    for r in scaling:
        print(f"  experts {r['experts']:>4}: grouped {r['grouped_ms']:.1f} ms, loop {r['loop_ms']:.1f} ms")


if __name__ == "__main__":
    main()
