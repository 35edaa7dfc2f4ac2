"""Pipeline parallelism on gloo ranks equals the unpipelined single process (fp32).

One 2-rank spawn runs every schedule (GPipe and 1F1B with 2 stages; Interleaved 1F1B
looped, ZBV and DualPipeV in a V, 4 stages over the 2 ranks; 4 micro-batches each) and
compares with the single process on the full batch: the loss of 2 AdamW steps, every
gradient of the second step on the parameters this rank holds (so the sequence-balance
loss injected on early stages and the MTP embedding sent along the pipe are both
exercised), the balancing bias after each step (expert counts gathered across stages),
the parameters afterwards, and the logits of the pipeline's plain forward (evaluation).
A 4-rank spawn does the same for dp2 x pp2 (FSDP inside each pipeline stage).
"""

import pytest
import torch

from test_parallel_harness import assert_params_match, batches, reference, run_layout, spawn, tiny_config

from moeforge.parallel.pipeline import SCHEDULES, split_layers, stage_ids


def test_stage_split_and_placement():
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]  # remainder to the front
    assert stage_ids(0, 2, "dualpipev") == [0, 3] and stage_ids(1, 2, "zbv") == [1, 2]
    assert stage_ids(1, 2, "interleaved1f1b") == [1, 3] and stage_ids(1, 2, "1f1b") == [1]


def _check_layouts(layouts: list[dict]):
    data = batches(2)
    ref_model, ref_losses, ref_biases, ref_grads, _ = reference(tiny_config(), data, keep_grads=True)
    tokens = data[0][0]
    with torch.no_grad():
        ref_logits = ref_model(tokens, with_mtp=False).logits
    for parallel in layouts:
        cfg, mesh, model, losses, biases, grads, _ = run_layout(data, keep_grads=True, **parallel)
        name = str(parallel)
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=0, msg=name)
        assert_params_match(model, ref_model, mesh, rtol=1e-4, atol=1e-7, ref_grads=ref_grads, grads=grads)
        assert_params_match(model, ref_model, mesh)
        held = [i for i, m in enumerate(model.moe_layers()) if m is not None]
        assert held, f"{name}: no MoE layer on this rank"
        for got, i in zip(biases[-1], held):
            assert torch.equal(got, ref_biases[-1][i]), f"{name}: bias of MoE layer {i}"
        with torch.no_grad():  # every rank gets the whole batch's logits from the last stage
            torch.testing.assert_close(model(tokens).logits, ref_logits, rtol=1e-4, atol=1e-5, msg=name)


def _every_schedule(rank, world):
    _check_layouts([dict(pp=2, pp_schedule=s, pp_microbatches=4) for s in SCHEDULES])


def _dp2_pp2(rank, world):
    _check_layouts([dict(pp=2, dp_shard=2, pp_schedule="1f1b", pp_microbatches=2)])


@pytest.mark.slow
def test_pp2_every_schedule_matches_single_process():
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"}
    spawn(_every_schedule, 2)


@pytest.mark.slow
def test_dp2_x_pp2_matches_single_process():
    spawn(_dp2_pp2, 4)
