"""MLA decoding: the latent KV cache against a cache of materialised per-head K/V.

Both decoders use the same MLA weights and produce the same outputs (checked before
timing). The latent cache stores kv_lora_rank + qk_rope_head_dim numbers per token and
layer and folds the key/value up-projections into the query and output ("absorbed");
the materialised cache stores n_heads * (qk_head_dim + v_head_dim) numbers and runs
ordinary attention. Reported: bytes per cached token (all layers) and decode tokens/s
after a prompt, for the small preset's attention and for V3's published sizes (memory
only: V3 is too big to time here).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moeforge.bench import interleaved, write_results
from moeforge.config import load_config
from moeforge.model.attention import MLA


class MaterialisedCache:
    """Per-head keys [B, L, H, qk] and values [B, L, H, v] for one MLA layer."""

    def __init__(self, attn: MLA, batch: int, max_len: int, dtype: torch.dtype):
        h = attn.n_heads
        self.k = torch.zeros(batch, max_len, h, attn.nope + attn.rope, dtype=dtype)
        self.v = torch.zeros(batch, max_len, h, attn.vdim, dtype=dtype)

    def nbytes_per_token(self) -> int:
        return (self.k[0, 0].numel() + self.v[0, 0].numel()) * self.k.element_size()


def materialised_step(attn: MLA, x: torch.Tensor, start: int, cache: MaterialisedCache) -> torch.Tensor:
    b, s, _ = x.shape
    q_nope, q_pe = attn._queries(x, start)
    kv, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.rope], dim=-1)
    k_pe = attn.rotary(k_pe.unsqueeze(2), start)
    kvb = attn.wkv_b(attn.kv_norm(kv)).view(b, s, attn.n_heads, attn.nope + attn.vdim)
    k_nope, v = kvb.split([attn.nope, attn.vdim], dim=-1)
    cache.k[:, start : start + s] = torch.cat([k_nope, k_pe.expand(-1, -1, attn.n_heads, -1)], dim=-1)
    cache.v[:, start : start + s] = v
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    k, vv = cache.k[:, : start + s].transpose(1, 2), cache.v[:, : start + s].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, vv, is_causal=s > 1, scale=attn.softmax_scale)
    return attn.wo(o.transpose(1, 2).reshape(b, s, -1))


def decode(attn: MLA, prompt: torch.Tensor, steps: int, cache, step_fn) -> torch.Tensor:
    y = step_fn(attn, prompt, 0, cache)
    outs = [y]
    x = y[:, -1:]
    for t in range(steps):
        x = step_fn(attn, x, prompt.shape[1] + t, cache)
        outs.append(x)
    return torch.cat(outs, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cfg = load_config("small")
    m = cfg.model
    batch, prompt_len, steps = (4, 128, 32) if args.quick else (8, 512, 128)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    attn = MLA(m).eval()
    prompt = torch.randn(batch, prompt_len, m.dim).to(dtype)
    max_len = prompt_len + steps + 1

    def latent():
        return decode(attn, prompt, steps, attn.new_cache(batch, max_len, dtype), lambda a, x, s, c: a(x, s, c))

    def materialised():
        return decode(attn, prompt, steps, MaterialisedCache(attn, batch, max_len, dtype), materialised_step)

    with torch.no_grad():
        torch.testing.assert_close(latent().float(), materialised().float(), atol=5e-2, rtol=5e-2)
        t = interleaved({"latent": latent, "materialised": materialised}, repeat=3)
    lat_bytes = attn.new_cache(1, 1, dtype).nbytes_per_token() * m.n_layers
    mat_bytes = MaterialisedCache(attn, 1, 1, dtype).nbytes_per_token() * m.n_layers
    new_tokens = batch * steps
    rows = [
        {"cache": "MLA latent (absorbed)", "bytes_per_token_all_layers": lat_bytes,
         "decode_tokens_per_s": new_tokens / t["latent"]},
        {"cache": "materialised K/V", "bytes_per_token_all_layers": mat_bytes,
         "decode_tokens_per_s": new_tokens / t["materialised"]},
    ]
    v3 = load_config("deepseek-v3-671b").model
    v3_lat = (v3.kv_lora_rank + v3.qk_rope_head_dim) * 2 * v3.n_layers
    v3_mat = v3.n_heads * (v3.qk_head_dim + v3.v_head_dim) * 2 * v3.n_layers
    summary = {"memory_ratio_materialised_over_latent_small": mat_bytes / lat_bytes,
               "decode_speed_ratio_latent_over_materialised": t["materialised"] / t["latent"],
               "v3_bytes_per_token_latent_bf16": v3_lat, "v3_bytes_per_token_materialised_bf16": v3_mat,
               "v3_memory_ratio": v3_mat / v3_lat}
    notes = [f"small preset attention ({m.n_layers} layers, {m.n_heads} heads), bf16, batch {batch}, "
             f"prompt {prompt_len}, {steps} decode steps; time covers prefill + decode of one layer stack's "
             "attention (one layer timed, bytes scaled to all layers).",
             "V3 rows are arithmetic from the published sizes (61 layers, 128 heads, kv_lora 512, rope 64)."]
    write_results("attention", "MLA latent KV cache vs materialised K/V", rows, notes, summary)
    print(f"cache bytes/token: latent {lat_bytes}, materialised {mat_bytes} ({mat_bytes / lat_bytes:.1f}x); "
          f"decode speed latent/materialised {t['materialised'] / t['latent']:.2f}x; V3: {v3_mat / v3_lat:.1f}x")


if __name__ == "__main__":
    main()
