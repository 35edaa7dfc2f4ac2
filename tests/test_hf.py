"""Hugging Face DeepSeek-V3 interop: same logits as transformers both ways, FP8 import, round trips.

Weights are drawn larger than the training init (std 0.15, random norm gains, a random
balancing bias) so logits vary by O(1) and an atol of 1e-4 actually tests the mapping;
each logits test also checks that the routing bias changes the answer, so a dropped or
misplaced ``e_score_correction_bias`` cannot pass. Nothing is downloaded: configs are
built locally and models saved to tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeforge.config import ModelConfig, load_config
from moeforge.errors import UserError
from moeforge.model import hf
from moeforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=48, moe_inter_dim=16,
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2, route_scale=2.5, mtp_depth=1, max_seq_len=128)
    cfg = ModelConfig(**(base | kw))
    cfg.validate()
    return cfg


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.15)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.add_(0.2 * torch.randn_like(t))
            elif name.endswith("gate.bias"):
                t.copy_(0.1 * torch.randn_like(t))
    return model.eval()


def our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, with_mtp=False).logits


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def load_hf(path) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_same_logits(ours: Transformer, theirs, cfg: ModelConfig, seq: int = 16) -> None:
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    a, b = our_logits(ours, tokens), hf_logits(theirs, tokens)
    assert a.std() > 0.3, "logits too small for the tolerance to mean anything"
    assert (a - b).abs().max() < 1e-4, f"max |diff| {(a - b).abs().max():.2e}"
    # the balancing bias must matter: zeroing it in one model changes routing and logits
    with torch.no_grad():
        saved = [m.gate.bias.clone() for m in ours.moe_layers()]
        for m in ours.moe_layers():
            m.gate.bias.zero_()
        assert (our_logits(ours, tokens) - b).abs().max() > 1e-3
        for m, s in zip(ours.moe_layers(), saved):
            m.gate.bias.copy_(s)


# ----------------------------------------------------------------------------- moeforge -> HF
def test_export_loads_in_transformers_with_same_logits(tmp_path):
    cfg = tiny_cfg()
    model = random_model(cfg)
    hf.export(model, tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys
    mtp = f"model.layers.{cfg.n_layers}."  # MTP as the extra layer, with the released checkpoint's names
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight"):
        assert mtp + name in keys
    assert_same_logits(model, load_hf(tmp_path / "hf"), cfg)


def test_yarn_matches_transformers(tmp_path):
    cfg = tiny_cfg(rope_factor=4.0, original_seq_len=16, mscale=0.7, max_seq_len=64, mtp_depth=0)
    model = random_model(cfg, seed=3)
    hf.export(model, tmp_path / "hf")
    theirs = load_hf(tmp_path / "hf")
    assert theirs.config.rope_parameters["rope_type"] == "yarn"
    assert_same_logits(model, theirs, cfg, seq=48)  # well past original_seq_len
    assert hf.import_hf(tmp_path / "hf")[0] == cfg


# ----------------------------------------------------------------------------- HF -> moeforge
def hf_random_model(q_lora_rank, rope_interleave: bool, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=128, initializer_range=0.15, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                t.add_(0.2 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn_like(t))
    return model


@pytest.mark.parametrize("q_lora_rank,interleave", [(24, True), (None, False)])
def test_transformers_model_imports_with_same_logits(tmp_path, q_lora_rank, interleave):
    theirs = hf_random_model(q_lora_rank, interleave)
    theirs.save_pretrained(tmp_path / "hf")
    cfg, sd = hf.import_hf(tmp_path / "hf")
    assert cfg.mtp_depth == 0  # transformers saves no MTP layer
    assert cfg.q_lora_rank == (q_lora_rank or 0) and cfg.n_shared_experts == 2 and cfg.rope_theta == 5000.0
    ours = Transformer(cfg).eval()
    ours.load_state_dict(sd)
    assert_same_logits(ours, theirs, cfg)
    # transformers' in-memory fused experts (gate_up_proj / down_proj) give the same weights
    fused = theirs.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    sd2 = hf.from_hf_state_dict(fused, cfg, rope_interleave=interleave)
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# ----------------------------------------------------------------------------- FP8 checkpoints
def quantize_blocks(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct transcription of DeepSeek's block quantization: s = amax / 448 per b x b block."""
    rows, cols = math.ceil(w.shape[0] / b), math.ceil(w.shape[1] / b)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            s[i, j] = blk.abs().max().clamp_min(1e-12) / 448.0
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_checkpoint_imports_within_e4m3_error(tmp_path):
    # dim 160 and q_lora 136: blocks at the edges are partial in both directions
    cfg = tiny_cfg(dim=160, q_lora_rank=136, inter_dim=200, moe_inter_dim=64, mtp_depth=1)
    model = random_model(cfg, seed=5)
    hf.export(model, tmp_path / "bf")
    src = load_file(tmp_path / "bf" / "model.safetensors")
    quantized = {}
    for name, t in src.items():  # as in the released V3: projections in FP8, embeddings/head/gate/norms not
        if name.endswith("_proj.weight") and "eh_proj" not in name:
            quantized[name], quantized[name + "_scale_inv"] = quantize_blocks(t)
        else:
            quantized[name] = t
    (tmp_path / "fp8").mkdir()
    save_file(quantized, tmp_path / "fp8" / "model.safetensors")
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    assert quantized["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)  # 136 x 160

    cfg2, sd = hf.import_hf(tmp_path / "fp8")
    assert cfg2 == cfg
    ref = model.state_dict()
    n_quantized = 0
    for key, w in ref.items():
        got = sd[key]
        if torch.equal(got, w):
            continue
        n_quantized += 1
        # E4M3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step near zero
        scale = w.abs().max() / 448
        assert ((got - w).abs() <= w.abs() / 16 + scale * 2**-9 + 1e-12).all(), key
    assert n_quantized >= 20  # the projections really went through FP8 (and came back close)


def test_fp8_scale_is_multiplied(tmp_path):
    q = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    src = hf._Tensors(tensors={"w": q, "w_scale_inv": torch.tensor([[3.0]])})
    assert torch.equal(hf._dequantize(src, "w", (128, 128)), torch.tensor([[3.0, -6.0], [1.5, 12.0]]))


# ----------------------------------------------------------------------------- round trips and errors
def test_export_import_round_trip_is_bitwise(tmp_path):
    cfg = tiny_cfg(n_layers=4, n_dense_layers=2, mtp_depth=2, rope_factor=2.0, mtp_lambda=0.2)
    model = random_model(cfg, seed=7)
    # a small shard limit forces several shards + an index
    hf.export(model, tmp_path / "hf", max_shard_bytes=20_000, extra_config={"bos_token_id": 3, "eos_token_id": 4})
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 3, "eos_token_id": 4}
    cfg2, sd = hf.import_hf(tmp_path / "hf")
    assert cfg2 == cfg
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


def test_cli_export_import(tmp_path):
    cfg = tiny_cfg(mtp_depth=1)
    model = random_model(cfg, seed=9)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hf.save_weights(model.state_dict(), ckpt / "model.safetensors")
    (ckpt / "config.toml").write_text(hf.model_toml(cfg))
    assert hf.cli_export(["--weights", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert hf.cli_import(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    # a trainer checkpoint keeps its resolved config in state.json instead of config.toml
    (ckpt / "config.toml").unlink()
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "config": {"model": dataclasses.asdict(cfg)}}))
    assert hf.cli_export(["--weights", str(ckpt), "--out", str(tmp_path / "hf2")]) == 0
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["moe_intermediate_size"] == cfg.moe_inter_dim
    loaded = load_config(tmp_path / "back" / "config.toml")
    assert loaded.model == cfg
    fresh = Transformer(loaded.model)
    hf.load_weights(fresh, tmp_path / "back")
    ref = model.state_dict()
    for k, v in fresh.state_dict().items():  # the router stays FP32 in a bf16 export, as transformers keeps it
        want = ref[k] if ".gate." in k else ref[k].to(torch.bfloat16).float()
        assert torch.equal(v, want), k


def test_bad_checkpoints_name_tensor_and_file(tmp_path):
    cfg = tiny_cfg(mtp_depth=0)
    hf.export(random_model(cfg), tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    good = load_file(f)

    def broken(change) -> str:
        tensors = dict(good)
        change(tensors)
        save_file(tensors, f)
        with pytest.raises(UserError) as e:
            hf.import_hf(tmp_path / "hf")
        assert "\n" not in str(e.value)
        return str(e.value)

    name = "model.layers.1.self_attn.kv_b_proj.weight"
    msg = broken(lambda t: t.__setitem__(name, t[name][:-1]))
    assert name in msg and str(f) in msg and "shape" in msg
    msg = broken(lambda t: t.pop("model.norm.weight"))
    assert "model.norm.weight" in msg and "missing" in msg
    expert = "model.layers.2.mlp.experts.3.up_proj.weight"
    msg = broken(lambda t: t.pop(expert))
    assert expert in msg and "missing" in msg
    msg = broken(lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(1)))
    assert "model.layers.0.mlp.extra.weight" in msg and str(f) in msg
    with pytest.raises(UserError, match="MLA"):
        hf.hf_config(dataclasses.replace(cfg, attn_type="mha"))


# The released DeepSeek-V3 config.json (transcribed; auto_map and quantization_config left out).
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def test_released_v3_config_matches_our_preset():
    preset = load_config("deepseek-v3-671b").model
    cfg = hf.model_config_from_hf(V3_CONFIG)
    # the preset trains at 16K and uses the paper's init; everything architectural is identical
    assert cfg == dataclasses.replace(preset, max_seq_len=163840, init_std=0.02)
    ours = hf.hf_config(preset)
    for key in ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "n_routed_experts", "n_group",
                "topk_group", "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "routed_scaling_factor"):
        assert ours[key] == V3_CONFIG[key], key
    with pytest.raises(UserError, match="mscale"):
        bad = V3_CONFIG | {"rope_scaling": V3_CONFIG["rope_scaling"] | {"mscale": 0.707}}
        hf.model_config_from_hf(bad)
