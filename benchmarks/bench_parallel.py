"""Parallel layouts on gloo: step time, bytes per collective (measured vs derived), pipeline bubbles.

Per layout (single process, dp2 = DDP, fsdp2, tp2, ep2 x fsdp2, pp2 with 1F1B and
DualPipeV, and dp2 x tp2 on 4 ranks) one small MoE model (MLA, 8 routed experts top-2,
1 shared, MTP depth 1, FP32 compute) takes AdamW steps on the same global batch:
(a) the median step time (forward + backward + optimizer + balancing-bias update);
(b) per collective type, the bytes one rank moves in a step (mean over ranks), counted by
    ``moeforge.parallel.comm.CommCounter`` in a separate step, next to the bytes derived
    from the config alone (:func:`expected_bytes`, on a meta-device model);
(c) for the pipeline layouts, the bubble: 1 - (time inside stage forward / backward /
    weight-gradient chunks and the loss) / (wall time of the schedule's ``step``) per
    rank, next to the published formula.

Choices:
- Each world size is one ``torchrun`` launch (all its layouts in one process group, one
  mesh after another), so ``moeforge bench parallel`` (which runs this file through
  ``runpy``) works too: ``mp.spawn`` could not find functions of a runpy'd ``__main__``.
- One thread per rank (2 cores shared with other work): absolute times are noisy and the
  multi-rank layouts compete for the same 2 cores, so a step time says more about
  overhead than speed-up. The byte counts are exact and deterministic.
- Expectations use nccl-tests' buffer-size convention (see comm.py): all-reduce = tensor,
  all-gather = gathered output, reduce-scatter = full input, all-to-all = send buffer.
  Layer ranks' all-to-all buffers depend on the routing, but their mean over the ep
  ranks does not (every token sends exactly top-k rows), so means are compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from moeforge.bench import write_results
from moeforge.config import load_config
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel.plan import TP_SPLIT
from moeforge.parallel.pipeline import stage_ids

MODEL = {
    "model.vocab_size": 256, "model.dim": 64, "model.n_layers": 7, "model.n_dense_layers": 1,
    "model.n_heads": 4, "model.inter_dim": 128, "model.moe_inter_dim": 32, "model.q_lora_rank": 32,
    "model.kv_lora_rank": 32, "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8,
    "model.v_head_dim": 16, "model.n_routed_experts": 8, "model.n_activated_experts": 2,
    "model.n_expert_groups": 2, "model.n_limited_groups": 1, "model.seq_aux_alpha": 0.01,
    "model.bias_update_speed": 0.01, "model.mtp_depth": 1, "model.max_seq_len": 128, "model.init_std": 0.05,
}
LAYOUTS = [  # (name, world size, parallel overrides)
    ("single", 1, {}),
    ("dp2 (DDP)", 2, {"dp_replicate": 2}),
    ("fsdp2", 2, {"dp_shard": 2}),
    ("tp2", 2, {"tp": 2}),
    ("ep2 x fsdp2", 2, {"dp_shard": 2, "ep": 2}),
    ("pp2 1f1b m4", 2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}),
    ("pp2 1f1b m8", 2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 8}),
    ("pp2 dualpipev m4", 2, {"pp": 2, "pp_schedule": "dualpipev", "pp_microbatches": 4}),
    ("pp2 dualpipev m8", 2, {"pp": 2, "pp_schedule": "dualpipev", "pp_microbatches": 8}),
    ("dp2 x tp2", 4, {"dp_replicate": 2, "tp": 2}),
]
DTYPE_BYTES = 4  # FP32 compute, FP32 parameters and gradients


def sizes(quick: bool) -> dict:
    return {"batch": 8, "seq": 32, "repeat": 5} if quick else {"batch": 16, "seq": 64, "repeat": 9}


def make_config(parallel: dict, size: dict):
    dp = parallel.get("dp_replicate", 1) * parallel.get("dp_shard", 1)
    return load_config(None, {**MODEL, "train.micro_batch_size": size["batch"] // dp, "train.seq_len": size["seq"],
                              **{f"parallel.{k}": v for k, v in parallel.items()}})


# ----------------------------------------------------------------------------- expectations
def _tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A parameter's shape on one tp rank (tensor.py's plan: colwise splits rows, rowwise columns)."""
    if tp == 1 or not (any(k in "." + name for k in TP_SPLIT) or name.startswith("head.")) or len(shape) < 2:
        return shape
    rowwise = any(k in "." + name for k in (".attn.wo.", ".w2."))
    return (shape[0], shape[1] // tp) if rowwise else (shape[0] // tp, *shape[1:])


def _fsdp_unit(name: str, ep: int) -> str:
    """The FSDP2 unit owning a parameter (data.py: expert groups under EP, blocks, root)."""
    parts = name.split(".")
    if ep > 1 and ".experts.w" in name:
        return "experts:" + ".".join(parts[:-2])
    if parts[0] == "layers":
        return ".".join(parts[:2])
    if parts[0] == "mtp" and parts[2] == "block":
        return ".".join(parts[:3])
    return "root"


def dp_expected(model: Transformer, cfg) -> dict[str, float]:
    """FSDP2 per rank: all-gather each unit forward (and again in backward unless it is the
    root, which never reshards), reduce-scatter its gradients over the shard dim, all-reduce
    the shard over the replicate dim. Sizes are the tp-local shapes, dim 0 padded to the shard."""
    p = cfg.parallel
    out: dict[str, float] = defaultdict(float)
    if p.dp_replicate * p.dp_shard == 1:
        return out
    for name, prm in model.named_parameters():
        unit = _fsdp_unit(name, p.ep)
        shard, repl = (p.dp_replicate * p.dp_shard // p.ep, 1) if unit.startswith("experts:") else (p.dp_shard, p.dp_replicate)
        shape = _tp_local_shape(name, tuple(prm.shape), p.tp)
        padded = math.ceil(shape[0] / shard) * shard * math.prod(shape[1:]) * DTYPE_BYTES
        if shard > 1:
            out["all_gather"] += padded * (1 + (unit != "root" and p.reshard_after_forward))
            out["reduce_scatter"] += padded
        if repl > 1:
            out["all_reduce"] += padded / shard
    return out


def tp_expected(model: Transformer, cfg, tokens: list[int]) -> dict[str, float]:
    """Per block: forward all-reduce after ``wo`` and after the MLP / shared expert ``w2``
    (rowwise outputs); backward all-reduce of the input gradient of every colwise layer
    (``wq_b`` or ``wq``, ``wkv_b``, ``w1``, ``w3``) and of the shared RoPE key. Head (colwise,
    replicated output): all-gather of the logits forward, input-gradient all-reduce backward.
    ``tokens[k]`` is the tokens per rank seen at MTP depth k (0: main model)."""
    m = cfg.model
    out: dict[str, float] = defaultdict(float)
    if cfg.parallel.tp == 1:
        return out
    blocks = [(blk, tokens[0]) for blk in model.layers]
    blocks += [(mod.block, tokens[k]) for k, mod in enumerate(model.mtp, start=1) if k < len(tokens)]
    for blk, t in blocks:
        split_ffn = not isinstance(blk.ffn, MoE) or blk.ffn.shared_experts is not None
        fwd = m.dim * (1 + split_ffn)
        bwd = (m.q_lora_rank or m.dim) + m.kv_lora_rank + m.qk_rope_head_dim + 2 * m.dim * split_ffn
        out["all_reduce"] += t * (fwd + bwd) * DTYPE_BYTES
    for t in tokens:  # the head, on the main model and on each MTP depth
        out["all_gather"] += t * m.vocab_size * DTYPE_BYTES
        out["all_reduce"] += t * m.dim * DTYPE_BYTES
    return out


def ep_expected(cfg, tokens: list[int]) -> dict[str, float]:
    """Per MoE layer: a tiny all-to-all of per-expert counts (int64), then the routed rows
    (tokens x top-k x dim) dispatched and combined forward, and both reversed backward."""
    m = cfg.model
    out: dict[str, float] = defaultdict(float)
    if cfg.parallel.ep == 1:
        return out
    n_moe_main = m.n_layers - m.n_dense_layers
    for depth, t in enumerate(tokens):
        layers = n_moe_main if depth == 0 else 1
        out["all_to_all"] += layers * (4 * t * m.n_activated_experts * m.dim * DTYPE_BYTES + m.n_routed_experts * 8)
    return out


def pp_expected(cfg, size: dict) -> dict[str, float]:
    """Per micro-batch and cross-rank stage boundary: (h, emb) sent forward, their gradients
    sent back; V schedules pass the same-rank boundary in memory. Plus the step's two
    all-reduces of loss parts and expert counts over pp."""
    p, m = cfg.parallel, cfg.model
    out: dict[str, float] = defaultdict(float)
    if p.pp == 1:
        return out
    n_stages = p.pp * p.stages_per_rank
    owner = {s: r for r in range(p.pp) for s in stage_ids(r, p.pp, p.pp_schedule)}
    cross = sum(owner[s] != owner[s + 1] for s in range(n_stages - 1))
    act = (size["batch"] // p.pp_microbatches) * size["seq"] * m.dim * DTYPE_BYTES
    total = cross * p.pp_microbatches * 2 * act * 2  # 2 tensors, forward + backward
    out["send"] = out["recv"] = total / p.pp
    out["all_reduce"] += (4 + n_moe(cfg) * m.n_routed_experts // p.ep) * 4
    return out


def n_moe(cfg) -> int:
    m = cfg.model
    return (m.n_layers - m.n_dense_layers) + (m.mtp_depth if m.n_dense_layers < m.n_layers else 0)


def counts_expected(cfg) -> dict[str, float]:
    """``update_balancing_bias``: global tokens per expert (fp32) over dp, or gathered over ep."""
    p, m = cfg.parallel, cfg.model
    nbytes = n_moe(cfg) * m.n_routed_experts * 4
    dp = p.dp_replicate * p.dp_shard
    if p.ep > 1:
        return {"all_gather": nbytes, **({"all_reduce": nbytes} if dp // p.ep > 1 else {})}
    return {"all_reduce": nbytes} if dp > 1 else {}


def expected_bytes(cfg, size: dict) -> dict[str, float]:
    """Bytes per collective type one rank moves in a step (mean over ranks), from the config."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
    tokens = [size["batch"] // dp * (size["seq"] - k) for k in range(cfg.model.mtp_depth + 1)]
    total: dict[str, float] = defaultdict(float)
    for part in (dp_expected(model, cfg), tp_expected(model, cfg, tokens), ep_expected(cfg, tokens),
                 pp_expected(cfg, size), counts_expected(cfg)):
        for k, v in part.items():
            total[k] += v
    return dict(total)


# ----------------------------------------------------------------------------- measurement (every rank)
class StageTimer:
    """Time spent inside a schedule's compute actions on this rank, and in its ``step``.

    Wraps the ``PipelineStage`` chunk methods (F, full backward B, input-only backward I,
    weight backward W) and the schedule's loss; receives and sends waited on between
    them are what is left of the wall time."""

    def __init__(self, schedule):
        from torch.distributed.pipelining import schedules

        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._originals: list[tuple[object, str, object]] = []
        self._wrap(schedules, "_wait_batch_p2p", lambda kw: "wait")  # blocking on received activations/grads
        stages = getattr(schedule, "_stages", None) or [schedule._stage]  # multi- / single-stage schedules
        for st in stages:
            self._wrap(st, "forward_one_chunk", lambda kw: "F")
            self._wrap(st, "backward_one_chunk", lambda kw: "B" if kw.get("full_backward", True) else "I")
            self._wrap(st, "backward_weight_one_chunk", lambda kw: "W")
        self._wrap(schedule, "_compute_loss", lambda kw: "loss")
        self._wrap(schedule, "step", lambda kw: "wall")

    def _wrap(self, obj, name: str, key) -> None:
        fn = getattr(obj, name)
        self._originals.append((obj, name, fn))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                k = key(kwargs)
                self.time[k] += time.perf_counter() - t0
                self.calls[k] += 1

        setattr(obj, name, timed)

    def close(self) -> None:
        """Put the wrapped functions back (the module-level one outlives this layout)."""
        for obj, name, fn in reversed(self._originals):
            setattr(obj, name, fn)

    def reset(self) -> None:
        self.time = defaultdict(float)
        self.calls = defaultdict(int)


def measure_layout(name: str, parallel: dict, size: dict) -> dict | None:
    """Time ``repeat`` steps of one layout, then count one; rank 0 returns the raw results."""
    import torch.distributed as dist

    from moeforge.bench import interleaved
    from moeforge.parallel import apply, build_mesh, update_balancing_bias
    from moeforge.parallel.comm import CommCounter, gather_summaries
    from moeforge.train.losses import lm_loss

    cfg = make_config(parallel, size)
    mesh = build_mesh(cfg)
    torch.manual_seed(0)
    model = apply(Transformer(cfg.model), mesh, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, cfg.model.vocab_size, (size["batch"], size["seq"] + 1), generator=g)
    dp, r = (mesh.dp, mesh.rank("dp")) if mesh is not None else (1, 0)
    rows = seq[r * size["batch"] // dp : (r + 1) * size["batch"] // dp]
    tokens, labels = rows[:, :-1], rows[:, 1:]

    def step():
        if cfg.parallel.pp > 1:
            counts = model.step(tokens, labels)["counts"]
        else:
            out = model(tokens)
            lm_loss(out, labels, cfg.model)["loss"].backward()
            counts = out.expert_counts
        update_balancing_bias(model, counts, cfg.model.bias_update_speed, mesh)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # builds the pipeline schedule, warms allocators
    timer = StageTimer(model.schedule(tokens)) if cfg.parallel.pp > 1 else None
    per_step: list[dict] = []  # the pipeline's chunk times of each timed step

    def timed_step():
        step()
        if timer is not None:
            per_step.append({"time": dict(timer.time), "calls": dict(timer.calls)})
            timer.reset()

    step_s = interleaved({name: timed_step}, repeat=size["repeat"], warmup=0)[name]
    timing = {"step_s": step_s, "stages": per_step}
    if timer is not None:
        timer.close()
    with CommCounter() as counter:
        step()
    summaries = gather_summaries(counter)
    if mesh is None:
        return {"name": name, "parallel": parallel, "ranks": 1, "timing": [timing], "comm": summaries}
    timings: list = [None] * dist.get_world_size()
    dist.all_gather_object(timings, timing)
    if dist.get_rank() != 0:
        return None
    return {"name": name, "parallel": parallel, "ranks": dist.get_world_size(), "timing": timings, "comm": summaries}


def worker(world: int, quick: bool, out_path: str) -> None:
    """Entry point of each torchrun rank: every layout of this world size, one after another."""
    import torch.distributed as dist

    from moeforge.parallel import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    size = sizes(quick)
    results = [measure_layout(n, par, size) for n, w, par in LAYOUTS if w == world]
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, quick: bool) -> list[dict]:
    """Run this world size's layouts under torchrun and read back rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               __file__, "--worker", str(world), "--out", str(out)] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEFORGE_DIST_TIMEOUT": "300"}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- report
def bubble_theory(cfg, t: dict[str, float], n: dict[str, int]) -> tuple[float, str]:
    """Published bubble fraction of the schedule, with chunk times measured here where it needs them."""
    p = cfg.parallel
    m, pp = p.pp_microbatches, p.pp
    if p.pp_schedule == "1f1b":
        return (pp - 1) / (m + pp - 1), f"(p-1)/(m+p-1), p={pp}, m={m}"
    # DualPipeV: (PP/2-1)(F&B + B - 3W) per device, PP = stages = 2 x ranks; F&B = F + B
    # here (the schedule runs an overlapped pair one after the other)
    f = t.get("F", 0) / n["F"]
    b = (t.get("B", 0) + t.get("I", 0) + t.get("W", 0)) / n["F"]
    w = t.get("W", 0) / n["F"]
    bubble = (2 * pp / 2 - 1) * (f + b + b - 3 * w)
    frac = bubble / (bubble + 2 * m * (f + b))
    return frac, f"(PP/2-1)(F&B+B-3W), PP={2 * pp}, F={f * 1e3:.1f} B={b * 1e3:.1f} W={w * 1e3:.1f} ms/chunk"


def rows_for(res: dict, size: dict) -> list[dict]:
    from moeforge.parallel.comm import KINDS, mean_bytes

    cfg = make_config(res["parallel"], size)
    exp = expected_bytes(cfg, size)
    meas = mean_bytes(res["comm"])
    step_ms = max(t["step_s"] for t in res["timing"]) * 1e3
    base = {"layout": res["name"], "ranks": res["ranks"], "step_ms": step_ms}
    rows = []
    for kind in [k for k in KINDS if k in meas or k in exp]:
        calls = sum(s["calls"].get(kind, 0) for s in res["comm"]) / len(res["comm"])
        ops = sorted({op.split(".default")[0] for s in res["comm"] for op in s["ops"].get(kind, [])})
        got, want = meas.get(kind, 0.0), exp.get(kind, 0.0)
        rows.append({**base, "metric": f"{kind} bytes/rank", "calls": calls, "measured": got, "expected": want,
                     "ratio": got / want if want else "", "detail": ", ".join(ops)})
    if not rows:
        rows.append({**base, "metric": "collectives", "calls": 0, "measured": 0, "expected": 0, "ratio": "",
                     "detail": "none"})
    if cfg.parallel.pp > 1:
        # bubble per timed step, averaged over ranks; the median step is reported
        steps = list(zip(*(t["stages"] for t in res["timing"])))  # [step][rank]
        fracs = [[1 - sum(v for k, v in r["time"].items() if k not in ("wall", "wait")) / r["time"]["wall"]
                  for r in st] for st in steps]
        mid = sorted(range(len(fracs)), key=lambda i: sum(fracs[i]))[len(fracs) // 2]
        tot, cnt = defaultdict(float), defaultdict(int)
        for st in steps:
            for r in st:
                for k, v in r["time"].items():
                    tot[k] += v
                for k, v in r["calls"].items():
                    cnt[k] += v
        theory, formula = bubble_theory(cfg, tot, cnt)
        got = sum(fracs[mid]) / len(fracs[mid])
        rows.append({**base, "metric": "bubble fraction", "calls": "", "measured": got, "expected": theory,
                     "ratio": got / theory, "detail": f"median step, ranks {'/'.join(f'{b:.3f}' for b in fracs[mid])}; "
                     f"{formula}"})
        waits = [r["time"].get("wait", 0.0) / r["time"]["wall"] for r in steps[mid]]
        wait = sum(waits) / len(waits)
        rows.append({**base, "metric": "bubble: P2P wait share", "calls": "", "measured": wait, "expected": theory,
                     "ratio": wait / theory, "detail": f"same step, ranks {'/'.join(f'{w:.3f}' for w in waits)}; "
                     f"the rest of the bubble is P2P posting and schedule overhead"})
    return rows


NOTES = [
    "Bytes are per rank and step, averaged over ranks, by nccl-tests' buffer convention: all-reduce = "
    "tensor, all-gather = gathered output, reduce-scatter = full input, all-to-all = send buffer, send/recv "
    "= tensor. Ring wire bytes are 2(n-1)/n (all-reduce) or (n-1)/n (all-gather, reduce-scatter) of these.",
    "Counted by moeforge.parallel.comm.CommCounter (a TorchDispatchMode over the c10d and _c10d_functional "
    "ops) in one step after the timed ones; 'detail' lists the ops it saw. FSDP2 and the pipeline's P2P go "
    "through c10d ops, DTensor TP and the EP token all-to-all through _c10d_functional.",
    "DDP (= FSDP2 with dp_replicate=2, dp_shard=1): one all-reduce of every gradient, i.e. all parameter "
    "bytes (FP32), plus the expert-count all-reduce of update_balancing_bias (MoE layers x experts x 4 B).",
    "FSDP2 (dp_shard=2): all-gather of every unit's parameters in forward and again in backward for the "
    "units that reshard after forward (blocks, MTP block; not the root: embed, norms, head, MTP projection), "
    "reduce-scatter of all gradients; dim 0 padded to a multiple of the shard count.",
    "TP (tp=2, Megatron pairing, no sequence parallelism): per block a forward all-reduce after attn.wo and "
    "after the MLP/shared-expert w2, and a backward all-reduce of each colwise layer's input gradient "
    "(wq_b: q_lora_rank, wkv_b: kv_lora_rank, w1 and w3: dim) plus the RoPE-key gradient (rope dim); the "
    "head all-gathers the logits (vocab) and all-reduces its input gradient, for the main and MTP outputs.",
    "EP (ep=2 inside dp_shard=2): per MoE layer (incl. MTP) an int64 count all-to-all (experts x 8 B), then "
    "tokens x top-k x dim rows dispatched and combined forward and both reversed backward (4 x). Non-expert "
    "weights follow FSDP2; experts are FSDP-sharded over edp = dp/ep = 1 (no traffic). Expert counts are "
    "all-gathered over ep.",
    "PP: per micro-batch and cross-rank stage boundary, (h, emb) forward and their gradients backward "
    "(2 x 2 x mb x seq x dim x 4 B); 1F1B on 2 ranks has 1 such boundary, DualPipeV (stages 0,3 | 1,2) 2 "
    "(1->2 stays on rank 1). Plus 2 all-reduces over pp of loss parts and expert counts.",
    "Bubble measured = 1 - (time inside stage forward/backward/weight chunks + loss) / (wall time of the "
    "schedule's step), averaged over ranks, for the median of the timed steps; the 'P2P wait share' row is "
    "the part of that step spent blocked in the schedule's waits for received activations/gradients (the "
    "idle time the formulas describe), the remainder being per-action overhead. Theory: 1F1B (p-1)/(m+p-1) (Narayanan et al. 2021, PipeDream-"
    "Flush/Megatron-LM); DualPipeV bubble per device (PP/2-1)(F&B+B-3W) over PP stages on PP/2 devices "
    "(deepseek-ai/DualPipe README; DeepSeek-V3 TR Table 2), as a fraction of that plus 2m(F+B), with F, B "
    "(= input + weight backward) and W measured per chunk here and F&B = F+B (no compute/comm overlap on CPU). "
    "For reference the zero-bubble ZB1P formula is (p-1)(F+B-2W) (Qi et al. 2024, same table).",
    "The theories assume equal stage times and free communication; on 2 shared cores with gloo the P2P and "
    "Python overhead between chunks also counts as bubble, and the last stage carries head + MTP + loss. "
    "Above all, the ranks share 2 cores with other jobs (see the load average): a rank descheduled mid-chunk "
    "makes its peer wait, which shows as one rank's bubble far above the other's. On a quiet machine 1F1B "
    "m4 measured 0.202 against 0.200; the byte counts, by contrast, are exact whatever the load.",
    "Step times: one thread per rank, all ranks on the same 2 shared cores, so multi-rank layouts are not "
    "faster than one process here; they show the overhead of each layout's communication on a tiny model.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-4", action="store_true", help="skip the 4-rank dp2 x tp2 layout")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.out)
        return
    size = sizes(args.quick)
    torch.set_num_threads(1)
    results = [measure_layout(n, par, size) for n, w, par in LAYOUTS if w == 1]
    for world in (2,) if args.no_4 else (2, 4):
        results += launch(world, args.quick)
    rows = [r for res in results for r in rows_for(res, size)]
    ratios = [r["ratio"] for r in rows if r["metric"].endswith("bytes/rank") and r["ratio"] != ""]
    summary = {"global batch x seq": f"{size['batch']} x {size['seq']}",
               "load average (1 min) after the run, 2 cores": os.getloadavg()[0],
               "bytes measured/expected, min": min(ratios), "bytes measured/expected, max": max(ratios)}
    for r in rows:
        if r["metric"].startswith("bubble"):
            summary[f"{r['metric']} {r['layout']}: measured / theory"] = f"{r['measured']:.3f} / {r['expected']:.3f}"
    write_results("parallel", "Parallel layouts on gloo: step time, bytes per collective, pipeline bubble",
                  rows, NOTES, summary)
    for r in rows:
        print(f"{r['layout']:>16} {r['step_ms']:8.1f} ms  {r['metric']:<26} {r['measured']:>12.4g} "
              f"{r['expected']:>12.4g} {r['ratio'] or 0:6.3f}  {r['detail']}")


if __name__ == "__main__":
    main()
