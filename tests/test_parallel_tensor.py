"""Tensor parallelism on 2 gloo ranks equals the single process (fp32, rtol 1e-4).

One spawn: tp=2 (heads, dense MLP, shared experts and head split). It compares 2 AdamW steps' losses, every gradient of the second step (gathered from its
DTensor shards, and the replicated ones as they are, which catches a missing gradient
reduction such as MLA's shared RoPE key) and the parameters afterwards.
"""

import pytest
import torch
from torch.distributed.tensor import DTensor

from test_parallel_harness import assert_params_match, batches, reference, run_layout, spawn, tiny_config


def _worker(rank, world):
    data = batches(2)
    ref_model, ref_losses, _, ref_grads, _ = reference(tiny_config(), data, keep_grads=True)
    cfg, mesh, model, losses, biases, grads, _ = run_layout(data, keep_grads=True, tp=2)
    assert isinstance(model.layers[0].attn.wkv_b.weight, DTensor)
    assert model.layers[0].attn.n_heads == cfg.model.n_heads // 2  # local heads
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=0)
    assert_params_match(model, ref_model, mesh, rtol=1e-4, atol=1e-7, ref_grads=ref_grads, grads=grads)
    assert_params_match(model, ref_model, mesh)


@pytest.mark.slow
def test_tp2_matches_single_process():
    spawn(_worker, 2)
