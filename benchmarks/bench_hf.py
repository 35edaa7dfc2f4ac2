"""Training throughput: moeforge against Hugging Face transformers' DeepseekV3ForCausalLM.

Same config (the ``small`` preset, MTP off because transformers builds no MTP layer),
same batch, same optimizer (torch AdamW, fused), forward + backward + step, on CPU. Each
side computes the loss its own way: transformers from its logits with F.cross_entropy,
moeforge with the head fused into the loss (``model(tokens, labels=...)``), as its trainer does.
Two precision regimes, each identical on both sides:
  fp32  — FP32 weights and compute;
  bf16  — FP32 master weights, bf16 compute (ours: explicit compute dtype; transformers:
          ``torch.autocast("cpu", torch.bfloat16)``, its standard mixed-precision path).
The two models start from the same weights (exported with ``moeforge.model.hf``) and the
first losses are checked close before timing. On an AVX2-class CPU (no fast bf16 GEMM:
a bf16 step would take minutes on either side) only fp32 is measured, into
``hf_throughput_avx2``. Targets: >= 3x tokens/s in bf16, >= 1.3x in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F

from moeforge.bench import class_suffix, interleaved, synced, write_results
from moeforge.config import load_config
from moeforge.model.transformer import Transformer


def build_pair(cfg, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from moeforge.model.hf import export, hf_config

    torch.manual_seed(seed)
    ours = Transformer(cfg.model)
    d = hf_config(cfg.model)
    d.pop("moeforge", None)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "dtype")})
    with tempfile.TemporaryDirectory() as tmp:
        export(ours, tmp, cfg.model)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, config=hf_cfg, torch_dtype=torch.float32,
                                                   attn_implementation="sdpa")
    return ours, hf


def make_step(model, tokens, is_hf: bool, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # on the params' device (CPU or CUDA)
    if not is_hf:
        model.set_compute_dtype(torch.bfloat16 if bf16 else torch.float32)
    model.train()

    def loss_fn():
        ctx = torch.autocast(tokens.device.type, torch.bfloat16) if (is_hf and bf16) else contextlib.nullcontext()
        with ctx:
            if not is_hf:
                return model(tokens[:, :-1], labels=tokens[:, 1:]).ce
            logits = model(tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return step, loss_fn


def measure(cfg, batch: int, seq: int, regime: str, repeat: int, device: str | torch.device = "cpu") -> dict:
    """One regime at one batch: both models from the same weights, first losses checked
    close, then steps timed interleaved (on CUDA each step ends in a synchronisation, so
    the work is timed, not its launch)."""
    device = torch.device(device)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1)).to(device)
    ours, hf = (m.to(device) for m in build_pair(cfg))
    s_ours, l_ours = make_step(ours, tokens, False, regime == "bf16")
    s_hf, l_hf = make_step(hf, tokens, True, regime == "bf16")
    s_ours, s_hf = synced(s_ours, device), synced(s_hf, device)
    with torch.no_grad():
        a, b = l_ours().item(), l_hf().item()
    assert abs(a - b) < (1e-3 if regime == "fp32" else 3e-2), (regime, a, b)
    t = interleaved({"moeforge": s_ours, "transformers": s_hf}, repeat=repeat)
    return {"precision": regime, "batch_tokens": batch * seq,
            "moeforge_tok_s": batch * seq / t["moeforge"], "transformers_tok_s": batch * seq / t["transformers"],
            "speedup": t["transformers"] / t["moeforge"], "first_loss_ours": a, "first_loss_hf": b}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", type=int, nargs="*", default=None,
                    help="more batch sizes (sequences) in this CPU's compute dtype (default 1 and 16; none with --quick)")
    args = ap.parse_args()
    over = {"model.mtp_depth": 0}
    if args.quick:
        over.update({"model.n_layers": 3, "model.vocab_size": 4096})
    cfg = load_config("small", over)
    batch, seq = (2, 128) if args.quick else (4, 256)
    repeat = 3 if args.quick else 5
    bf16 = class_suffix() == ""  # a bf16-capable CPU
    rows = [measure(cfg, batch, seq, regime, repeat) for regime in ("fp32", "bf16")[: 2 if bf16 else 1]]
    swept = "bf16" if bf16 else "fp32"  # the sweep is in this CPU's compute dtype
    sweep = args.sweep if args.sweep is not None else ([] if args.quick else [1, 16])
    rows += [measure(cfg, b, seq, swept, repeat) for b in sweep if b != batch]
    summary = {f"speedup_{r['precision']}": r["speedup"] for r in rows[: 2 if bf16 else 1]}
    summary["target"] = ">= 3x bf16, >= 1.3x fp32"
    if sweep:
        summary[f"speedup_{swept}_by_batch_tokens"] = {r["batch_tokens"]: r["speedup"] for r in sorted(
            (r for r in rows if r["precision"] == swept), key=lambda r: r["batch_tokens"])}
    notes = [f"config: small preset{' (quick: 3 layers, vocab 4096)' if args.quick else ''}, MTP off, "
             f"batch {batch} x {seq} (the sweep rows: other batch sizes of {seq}-token sequences, in {swept}); forward + "
             "backward + torch AdamW step; transformers uses its default expert implementation and SDPA attention."]
    write_results(f"hf_throughput{class_suffix()}", "Training throughput vs transformers DeepseekV3ForCausalLM", rows, notes, summary)
    for r in rows:
        print(f"{r['precision']} {r['batch_tokens']} tokens: moeforge {r['moeforge_tok_s']:.0f} tok/s, transformers "
              f"{r['transformers_tok_s']:.0f} tok/s -> {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
