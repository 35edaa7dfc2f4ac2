"""Tensor parallelism on 2 gloo ranks equals the single process (fp32, rtol 1e-4).

One spawn, three layouts, each compared on 2 AdamW steps: the losses, every gradient of
the second step (gathered from its DTensor shards, and the replicated ones as they are,
which catches a missing gradient reduction such as MLA's shared RoPE key or a sequence-
parallel norm's weight) and the parameters afterwards:
- tp=2: heads, dense MLP, shared experts and head split;
- tp=2 + sequence parallelism: norms and the residual stream on sequence shards;
- tp=2 + sequence parallelism + vocabulary-parallel loss (logits stay vocab-sharded).
"""

import pytest
import torch
from torch.distributed.tensor import DTensor

from test_parallel_harness import TINY, assert_params_match, batches, reference, run_layout, spawn, tiny_config

from moeforge.config import ConfigError, load_config


def _check(ref, data, **parallel):
    ref_model, ref_losses, _, ref_grads, _ = ref
    cfg, mesh, model, losses, biases, grads, _ = run_layout(data, keep_grads=True, **parallel)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=0)
    assert_params_match(model, ref_model, mesh, rtol=1e-4, atol=1e-7, ref_grads=ref_grads, grads=grads)
    assert_params_match(model, ref_model, mesh)
    return cfg, model


def _worker(rank, world):
    data = batches(2)
    ref = reference(tiny_config(), data, keep_grads=True)
    cfg, model = _check(ref, data, tp=2)
    assert isinstance(model.layers[0].attn.wkv_b.weight, DTensor)
    assert model.layers[0].attn.n_heads == cfg.model.n_heads // 2  # local heads

    seen = []  # the residual stream's length inside a block: half the sequence under SP
    cfg, model = _check(ref, data, tp=2, sequence_parallel=True)
    model.layers[1].ffn_norm.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    model(data[0][0])
    assert seen == [data[0][0].shape[1] // 2]
    assert isinstance(model.layers[1].ffn_norm.weight, DTensor)

    cfg, model = _check(ref, data, tp=2, sequence_parallel=True, loss_parallel=True)
    logits = model(data[0][0]).logits
    assert isinstance(logits, DTensor) and logits.to_local().shape[-1] == cfg.model.vocab_size // 2


@pytest.mark.slow
def test_tp2_and_sequence_parallel_match_single_process():
    spawn(_worker, 2)


@pytest.mark.parametrize("over, needs", [
    ({}, "needs parallel.tp > 1"),
    ({"parallel.tp": 2, "train.seq_len": 15}, "tp=2 does not divide train.seq_len=15"),
    ({"parallel.tp": 2, "parallel.pp": 2}, "pp > 1 is not supported"),
])
def test_sequence_parallel_config_is_validated(over, needs):
    with pytest.raises(ConfigError, match=needs):
        load_config(None, {**TINY, "parallel.sequence_parallel": True, **over})


@pytest.mark.slow
def test_pretrain_cli_tp2_loss_parallel_sequence_parallel_matches_one_process(tmp_path):
    """``moeforge pretrain`` under torchrun (the trainer's own loop, no loss_context), 3 steps
    of 2 accumulated micro-batches with an eval: the logged loss, gradient norm (which
    feeds clipping) and eval loss equal the single process's; its step-2 checkpoint
    resumes under another layout (dp_shard=2) and continues the same run."""
    from test_train_distributed import _close, _single, _torchrun
    from train_helpers import write_shards

    from moeforge.train.metrics import read_records

    write_shards(tmp_path / "data")
    common = {"train__steps": 3, "train__ckpt_every": 2, "train__eval_every": 3, "train__micro_batch_size": 4}
    _single(tmp_path, "one", **common)
    _torchrun(tmp_path, "tp2", parallel__tp=2, parallel__loss_parallel=True, parallel__sequence_parallel=True,
              **common)
    # the tp2 checkpoint (DTensor shards of heads and vocabulary) resumes as dp_shard=2: the
    # same global batch, now 2 sequences per rank, continues the single process's run
    step2 = tmp_path / "runs" / "tp2" / "checkpoints" / "step_000002"
    _torchrun(tmp_path, "tp2_to_dp2", parallel__dp_shard=2, resume=str(step2),
              **{**common, "train__micro_batch_size": 2})

    def series(run, key, kind="train"):
        recs = read_records(tmp_path / "runs" / run / "metrics.jsonl")
        return {r["step"]: r[key] for r in recs if r.get("kind") == kind}

    for key, kind in (("loss", "train"), ("grad_norm", "train"), ("loss", "eval")):
        _close(series("tp2", key, kind), series("one", key, kind))
    for key in ("loss", "grad_norm"):  # not eval: its windows depend on the per-rank micro-batch size
        _close(series("tp2_to_dp2", key), {k: v for k, v in series("one", key).items() if k > 2})
