"""Data and expert parallelism and distributed checkpoints on 2 gloo ranks vs 1 process.

One spawn checks, each against the single-process run on the full batch (fp32, 2 AdamW
steps, rtol 1e-4): FSDP2 (dp_shard=2); replication (dp_replicate=2, i.e. DDP) with 2
accumulated micro-batches and gradient sync only on the last; expert parallelism
(dp_shard=2, ep=2: 4 experts per rank, all-to-all dispatch) including the balancing
bias being identical on both ranks. The FSDP and EP runs save DCP checkpoints that the
test process then loads without any process group and continues training from, and
that ``moeforge export`` turns into a Hugging Face checkpoint whose transformers model
gives the logits of ours loaded from the shards. The spawn runs once per module (a
fixture); both tests read its checkpoints.
"""

import pytest
import torch
import torch.distributed as dist

from test_parallel_harness import (adamw, assert_params_match, batches, reference, run_layout, spawn, tiny_config,
                                   tiny_model, train)

from moeforge.parallel import checkpoint

RTOL = 1e-4


def _check(losses, biases, model, mesh, ref):
    ref_model, ref_losses, ref_biases = ref[:3]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=RTOL, atol=0)
    for got, want in zip(biases[-1], ref_biases[-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # sign updates from equal global counts
    assert_params_match(model, ref_model, mesh)


def _bias_same_on_all_ranks(biases):
    flat = torch.cat(biases[-1])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for g in gathered:
        assert torch.equal(g, flat)


def _worker(rank, world, tmp):
    data = batches(2)
    ref = reference(tiny_config(), data)

    cfg, mesh, model, losses, biases, _, opt = run_layout(data, dp_shard=2)
    _check(losses, biases, model, mesh, ref)
    checkpoint.save(f"{tmp}/fsdp", model, opt, mesh)

    cfg, mesh, model, losses, biases, _, _ = run_layout(data, accum=2, dp_replicate=2)
    _check(losses, biases, model, mesh, ref)

    cfg, mesh, model, losses, biases, _, opt = run_layout(data, dp_shard=2, ep=2)
    assert model.layers[1].ffn.experts.w1.full_tensor().shape[0] == 4  # half the experts live here
    _check(losses, biases, model, mesh, ref)
    _bias_same_on_all_ranks(biases)
    checkpoint.save(f"{tmp}/ep", model, opt, mesh)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The directory with the 2-rank runs' DCP checkpoints ``fsdp`` and ``ep`` (the layouts
    checked against the single process on the way)."""
    tmp = tmp_path_factory.mktemp("sharded")
    spawn(_worker, 2, str(tmp))
    return tmp


@pytest.mark.slow
def test_fsdp_ddp_ep_match_single_process_and_checkpoints_reload_in_one_process(sharded):
    tmp_path = sharded
    data = batches(3)
    ref_model, _, _, _, ref_opt = reference(tiny_config(), data[:2])
    train(ref_model, tiny_config(), None, data[2:], opt=ref_opt)  # one more step
    for layout in ("fsdp", "ep"):
        cfg = tiny_config()
        model = tiny_model(cfg)
        opt = adamw(model)
        train(model, cfg, None, data[:1], opt=opt)  # create optimizer state to load into
        checkpoint.load(tmp_path / layout, model, opt)
        train(model, cfg, None, data[2:], opt=opt)  # same step from the restored state
        assert_params_match(model, ref_model)
        for a, b in zip(model.moe_layers(), ref_model.moe_layers()):
            assert torch.equal(a.gate.bias, b.gate.bias)


@pytest.mark.slow
def test_sharded_ep_checkpoint_exports_to_hf_with_the_same_logits(sharded, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import hf_logits, load_hf, our_logits

    from moeforge.model import hf

    ckpt = sharded / "ep"
    assert (ckpt / ".metadata").is_file() and not (ckpt / hf.WEIGHTS).exists()  # only DCP shards
    cfg = tiny_config()
    (tmp_path / "model.toml").write_text(hf.model_toml(cfg.model))
    assert hf.cli_export(["--weights", str(ckpt), "--out", str(tmp_path / "hf"),
                          "--config", str(tmp_path / "model.toml")]) == 0
    ours = tiny_model(cfg)
    checkpoint.load(ckpt, ours)  # the sharded run's weights, experts of both ep ranks included
    ours.eval()
    tokens = batches(1)[0][0]
    want = our_logits(ours, tokens)
    assert not torch.allclose(want, our_logits(tiny_model(cfg).eval(), tokens), atol=1e-3)  # trained, not init
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "hf"), tokens), want, rtol=1e-4, atol=1e-5)
