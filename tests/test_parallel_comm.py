"""The collective counter (moeforge.parallel.comm) against bytes computed by hand.

- plain ``torch.distributed`` calls and the functional collectives DTensor and our EP use,
  on 2 gloo ranks, each sized so the expected bytes follow from the tensor shapes;
- a data-parallel step: under DDP (FSDP2 replicate) the gradient all-reduce and under
  FSDP2 (shard) the gradient reduce-scatter move exactly the model's parameter bytes, and
  FSDP2 all-gathers every parameter in forward and the blocks' again in backward;
- in one process (a 1-rank group, no spawn): calls over one rank are kept out of the totals.
"""

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from test_parallel_harness import batches, local_rows, spawn, tiny_config, tiny_model

from moeforge.parallel import apply, build_mesh
from moeforge.parallel.comm import CommCounter, gather_summaries, mean_bytes
from moeforge.train.losses import lm_loss


def _plain_collectives(rank, world):
    solo = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
    with CommCounter() as c:
        dist.all_reduce(torch.ones(3, 5))  # 15 fp32 = 60 B
        dist.all_gather([torch.empty(4, dtype=torch.float64) for _ in range(2)], torch.ones(4, dtype=torch.float64))
        dist.all_gather_into_tensor(torch.empty(8), torch.ones(4))  # output 8 fp32 = 32 B
        dist.reduce_scatter_tensor(torch.empty(4), torch.ones(8))  # input 8 fp32 = 32 B
        ins, outs = ([1, 2], [1, 3]) if rank == 0 else ([3, 1], [2, 1])  # uneven int64 rows
        dist.all_to_all_single(torch.empty(sum(outs), dtype=torch.long), torch.zeros(sum(ins), dtype=torch.long),
                               outs, ins)
        dist.broadcast(torch.ones(5), src=0)  # 20 B
        if rank == 0:
            dist.send(torch.ones(7), dst=1)  # 28 B
        else:
            dist.recv(torch.empty(7), src=0)
        fc.all_reduce(torch.ones(10, dtype=torch.bfloat16), "sum", dist.group.WORLD).wait()  # 20 B, functional
        x = torch.ones(4, requires_grad=True)
        fc.all_to_all_single_autograd(x * 2, [2, 2], [2, 2], dist.group.WORLD).sum().backward()  # 16 B fwd + 16 bwd
        dist.all_reduce(torch.ones(100), group=solo[rank])  # one rank: not traffic
    s = c.summary()
    a2a = (3 if rank == 0 else 4) * 8 + 2 * 16
    p2p = {"send": 28} if rank == 0 else {"recv": 28}
    assert s["bytes"] == {"all_reduce": 60 + 20, "all_gather": 64 + 32, "reduce_scatter": 32, "all_to_all": a2a,
                          "broadcast": 20, **p2p}, s
    assert s["calls"] == {"all_reduce": 2, "all_gather": 2, "reduce_scatter": 1, "all_to_all": 3, "broadcast": 1,
                          **{k: 1 for k in p2p}}, s
    assert s["local_calls"] == {"all_reduce": 1}
    assert "_c10d_functional.all_reduce.default" in s["ops"]["all_reduce"]
    everyone = gather_summaries(c)
    assert [e["rank"] for e in everyone] == [0, 1]
    assert mean_bytes(everyone)["all_to_all"] == ((3 + 4) * 8 + 4 * 16) / 2
    assert mean_bytes(everyone)["send"] == 14


@pytest.mark.slow
def test_plain_collectives_count_hand_computed_bytes():
    spawn(_plain_collectives, 2)


def _counted_step(**parallel) -> dict:
    cfg = tiny_config(**parallel)
    mesh = build_mesh(cfg)
    model = apply(tiny_model(cfg), mesh, cfg)
    tokens, labels = batches(1)[0]
    with CommCounter() as c:
        lm_loss(model(local_rows(tokens, mesh)), local_rows(labels, mesh), cfg.model)["loss"].backward()
    return c.summary()


def _dp_step(rank, world):
    ref = tiny_model(tiny_config())
    param_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    # FSDP units: each block (and the MTP block) reshards after forward; the root does not
    block_bytes = sum(p.numel() * 4 for n, p in ref.named_parameters() if n.startswith("layers.") or ".block." in n)
    ddp = _counted_step(dp_replicate=2)
    assert ddp["bytes"] == {"all_reduce": param_bytes}, ddp
    fsdp = _counted_step(dp_shard=2)  # tiny shapes all have even dim 0: no padding
    assert fsdp["bytes"] == {"all_gather": param_bytes + block_bytes, "reduce_scatter": param_bytes}, fsdp


@pytest.mark.slow
def test_dp_step_reduces_exactly_the_parameter_bytes():
    spawn(_dp_step, 2)


def test_one_rank_group_is_not_traffic(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with CommCounter() as c:
            dist.all_reduce(torch.ones(8))
            torch.ones(3) @ torch.ones(3)  # not a collective
        s = c.summary()
        assert s["bytes"] == {} and s["calls"] == {} and s["local_calls"] == {"all_reduce": 1}
        assert len(c.events) == 1 and c.events[0]["bytes"] == 32 and c.events[0]["group"] == (0,)
    finally:
        dist.destroy_process_group()
