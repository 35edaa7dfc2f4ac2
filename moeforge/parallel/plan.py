"""`moeforge plan`: the parallel layout a config would use, without creating any process group.

Prints the mesh, the layers on each pipeline stage (and which pp rank holds it), the
routed experts on each ep rank, and per-rank memory for parameters, gradients and AdamW
moments. The model is built on the meta device (no memory), so the DeepSeek-V3 recipe
plans in a second.

Choices (the estimate mirrors what ``apply`` does, see the other modules of this package):
- Tensor-parallel weights (attention up/out projections, dense MLP, shared experts,
  head) count 1/tp per rank; everything else is replicated over tp.
- Routed experts count 1/ep per rank and are FSDP-sharded over the edp = dp/ep replicas;
  every other weight is sharded over dp_shard (dp_replicate keeps full copies).
- FP32 master weights and gradients; moments FP32 or BF16 per ``train.moment_dtype``.
  Activations are not estimated: they depend on recomputation and the schedule's
  in-flight micro-batches more than on this layout.
"""

from __future__ import annotations

import argparse
import json

import torch

from moeforge.config import Config
from moeforge.model.transformer import Transformer
from moeforge.parallel.mesh import check_layout
from moeforge.parallel.pipeline import split_layers, stage_ids

TP_SPLIT = (".attn.wq.", ".attn.wq_b.", ".attn.wkv_b.", ".attn.wo.", ".attn.wk.", ".attn.wv.",
            ".ffn.w1.", ".ffn.w2.", ".ffn.w3.", ".shared_experts.")


def _owner(name: str, stage_of_layer: dict[int, int], last: int) -> int:
    """The pipeline stage holding parameter ``name``."""
    if name.startswith("layers."):
        return stage_of_layer[int(name.split(".")[1])]
    return 0 if name.startswith("embed.") else last


def plan(cfg: Config) -> dict:
    p, m = cfg.parallel, cfg.model
    n_stages = p.pp * p.stages_per_rank
    ranges = split_layers(m.n_layers, n_stages)
    stage_of_layer = {i: s for s, r in enumerate(ranges) for i in r}
    dp = p.dp_replicate * p.dp_shard
    edp_shard = max(dp // p.ep, 1) if p.ep > 1 else p.dp_shard
    with torch.device("meta"):
        model = Transformer(m)
    per_stage = [0.0] * n_stages
    for name, prm in model.named_parameters():
        n = float(prm.numel())
        if ".experts.w" in name:
            n = n / p.ep / edp_shard
        else:
            if p.tp > 1 and (any(k in "." + name for k in TP_SPLIT) or name.startswith("head.")):
                n /= p.tp
            n /= p.dp_shard
        per_stage[_owner(name, stage_of_layer, n_stages - 1)] += n
    moment_bytes = 4 if cfg.train.moment_dtype == "fp32" else 2
    ranks = []
    for r in range(p.pp):
        ids = stage_ids(r, p.pp, p.pp_schedule)
        params = sum(per_stage[i] for i in ids)
        ranks.append({
            "pp_rank": r,
            "stages": [{"stage": i, "layers": [ranges[i].start, ranges[i].stop - 1],
                        "embed": i == 0, "head_and_mtp": i == n_stages - 1} for i in ids],
            "params_per_rank": int(params),
            "gib": {"params": params * 4 / 2**30, "grads": params * 4 / 2**30,
                    "adam_moments": params * 2 * moment_bytes / 2**30},
        })
    per_ep = m.n_routed_experts // p.ep
    return {
        "world_size": p.world_size,
        "mesh": {"pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "ep": p.ep,
                 "edp": dp // p.ep},
        "schedule": p.pp_schedule, "microbatches": p.pp_microbatches,
        "experts_per_ep_rank": [[e * per_ep, (e + 1) * per_ep - 1] for e in range(p.ep)],
        "ranks": ranks,
    }


def cli(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge plan", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=None, help="check the layout against this many processes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, cfg = parse_config_args(argv, parser)
    if args.world_size is not None:
        check_layout(cfg, args.world_size)
    out = plan(cfg)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mesh = " x ".join(f"{k}={v}" for k, v in out["mesh"].items())
    print(f"world {out['world_size']}: {mesh}; schedule {out['schedule']}, {out['microbatches']} micro-batches")
    eps = out["experts_per_ep_rank"]
    print(f"routed experts per ep rank: {eps[0][1] - eps[0][0] + 1} (ep rank 0: {eps[0][0]}-{eps[0][1]}, "
          f"last: {eps[-1][0]}-{eps[-1][1]})")
    print(f"{'pp rank':>7}  {'stages (layers)':<38} {'params/rank':>12} {'weights':>8} {'grads':>8} {'moments':>8}  GiB")
    for r in out["ranks"]:
        st = ", ".join(f"{s['stage']}[{s['layers'][0]}-{s['layers'][1]}]" + ("+emb" if s["embed"] else "")
                       + ("+head/mtp" if s["head_and_mtp"] else "") for s in r["stages"])
        g = r["gib"]
        print(f"{r['pp_rank']:>7}  {st:<38} {r['params_per_rank']:>12,} {g['params']:>8.2f} {g['grads']:>8.2f} "
              f"{g['adam_moments']:>8.2f}")
    return 0
