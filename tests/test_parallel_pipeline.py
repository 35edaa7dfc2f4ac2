"""Pipeline parallelism on 2 gloo ranks equals the unpipelined single process (fp32).

One spawn runs 1F1B (2 stages, 4 micro-batches) and DualPipeV (4 stages in a V, rank 0
holding the first and last, 4 micro-batches) and compares with the single process on
the full batch: the loss of 2 AdamW steps, every gradient of the second step on the
parameters this rank holds (so the sequence-balance loss injected on early stages and
the MTP embedding sent along the pipe are both exercised), the balancing bias after
each step (expert counts gathered across stages) and the parameters afterwards.
"""

import pytest
import torch

from test_parallel_harness import assert_params_match, batches, reference, run_layout, spawn, tiny_config

from moeforge.parallel.pipeline import split_layers, stage_ids


def test_stage_split_and_placement():
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]  # remainder to the front
    assert stage_ids(0, 2, "dualpipev") == [0, 3] and stage_ids(1, 2, "zbv") == [1, 2]
    assert stage_ids(1, 2, "interleaved1f1b") == [1, 3] and stage_ids(1, 2, "1f1b") == [1]


def _worker(rank, world):
    data = batches(2)
    ref_model, ref_losses, ref_biases, ref_grads, _ = reference(tiny_config(), data, keep_grads=True)
    for schedule in ("1f1b", "dualpipev"):
        cfg, mesh, model, losses, biases, grads, _ = run_layout(data, keep_grads=True, pp=2, pp_schedule=schedule,
                                                                pp_microbatches=4)
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=0)
        assert_params_match(model, ref_model, mesh, rtol=1e-4, atol=1e-7, ref_grads=ref_grads, grads=grads)
        assert_params_match(model, ref_model, mesh)
        held = [i for i, m in enumerate(model.moe_layers()) if m is not None]
        for got, i in zip(biases[-1], held):
            assert torch.equal(got, ref_biases[-1][i]), f"{schedule}: bias of MoE layer {i}"


@pytest.mark.slow
def test_pp2_1f1b_and_dualpipev_match_single_process():
    spawn(_worker, 2)
